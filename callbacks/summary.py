"""A model summary that tells the truth: total and active parameters, and FLOPs per token.

Lightning's summary measures FLOPs only for modules that define ``example_input_array``, and
prints ``Total FLOPs: 0`` otherwise. MemLM modules know their training FLOPs per token
(``flops_per_token(seq_len)``, the 6N + attention count), so this summary prints that
instead, and drops the FLOPs column whenever Lightning measured nothing.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count


def parameter_counts(module) -> tuple[int, int]:
    """(total, active) parameters; active counts only the experts a token is routed to (MoE)."""
    total = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    model = getattr(module, "model", None)
    counts = model.param_counts() if hasattr(model, "param_counts") else None
    active = int(counts["active"]) if counts else total
    return total, active


def summary_lines(module, summary_data, total_flops: int, seq_len: int | None) -> list[str]:
    columns = [(name, values) for name, values in summary_data if not (name == "FLOPs" and not total_flops)]
    columns = [(name, values) for name, values in columns if name not in ("In sizes", "Out sizes") or any(v != "?" for v in values)]
    rows = len(columns[0][1]) if columns else 0
    widths = [max(len(name), *(len(str(v)) for v in values)) if values else len(name) for name, values in columns]
    lines = ["  ".join(name.ljust(w) for (name, _), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for i in range(rows):
        lines.append("  ".join(str(values[i]).ljust(w) for (_, values), w in zip(columns, widths)))
    total, active = parameter_counts(module)
    trainable = sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())
    lines.append(f"{get_human_readable_count(total):>10}  total params")
    if active != total:
        lines.append(f"{get_human_readable_count(active):>10}  active params per token (routed experts only)")
    lines.append(f"{get_human_readable_count(trainable):>10}  trainable params")
    fpt = None
    fn = getattr(module, "flops_per_token", None)
    if callable(fn) and seq_len:
        try:
            fpt = fn(int(seq_len))
        except Exception:  # a module whose count needs state it does not have yet
            fpt = None
    if fpt:
        lines.append(f"{get_human_readable_count(int(fpt)):>10}  training FLOPs per token at context {seq_len}")
    elif total_flops:
        lines.append(f"{get_human_readable_count(int(total_flops)):>10}  FLOPs (Lightning's measurement)")
    return lines


class MemLMModelSummary(ModelSummary):
    """Lightning's summary table with honest totals (see the module docstring)."""

    def __init__(self, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)
        self._module = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._module = pl_module
        self._seq_len = getattr(getattr(trainer, "datamodule", None), "block_size", None) or getattr(pl_module, "max_seq_len", None)
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops=0, **kwargs) -> None:
        rank_zero_info("\n".join(summary_lines(self._module, summary_data, total_flops, self._seq_len)))
