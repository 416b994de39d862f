"""Memory analysis for HAMT: slot norms, slot utilisation, gate statistics, binding fidelity.

Every ``every_n_steps`` training steps the callback asks the model to collect per-layer
statistics for that one step (``model.collect_stats``), logs scalars ``mem/L{i}/...`` and keeps
a history. At every ``plot_every_n_steps`` step and at the end of fit it renders PNGs into
``<run dir>/memory_analysis/`` and hands them to the logger: ``log_image`` (W&B, online or offline)
or ``add_image`` (TensorBoard). Each analysed step's write-gate values per layer also go out as
a histogram (``memory_analysis/L{i}/write_gates``, see ``histograms.log_histograms``).

Figures:
- ``slot_norms.png``: per layer, heatmap of the RMS norm of each slot (y) over training steps (x);
- ``gates.png``: per layer, heatmap of each slot's mean write gate over steps, plus a histogram
  of the gate values at the last analysed step;
- ``utilisation.png``: effective fraction of slots used by the reads (exp(entropy)/S) and
  fraction of slots with mean write gate > 0.1, per layer over steps;
- ``fidelity.png``: binding/unbinding fidelity = cosine(unbind(M_t, k_t), i_t) per layer over steps.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch

from memlm.callbacks.histograms import log_histograms


def _model_of(pl_module):
    model = getattr(pl_module, "model", None)
    return model if model is not None and hasattr(model, "collect_stats") else None


class MemoryAnalysis(L.Callback):
    def __init__(self, every_n_steps: int = 25, plot_every_n_steps: int = 200, out_dir: str | None = None) -> None:
        self.every_n_steps = max(1, every_n_steps)
        self.plot_every_n_steps = max(1, plot_every_n_steps)
        self.out_dir = out_dir
        self.history: list[dict] = []  # one entry per analysed step: {"step", "layers": [stats]}
        self.saved: list[str] = []

    # -- collection -----------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = _model_of(pl_module)
        if model is not None and trainer.global_step % self.every_n_steps == 0:
            model.collect_stats = True
            self._step = int(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        model = _model_of(pl_module)
        if model is None or not model.collect_stats:
            return
        model.collect_stats = False
        layers = [self._summarise(s) for s in model.last_stats]
        step = getattr(self, "_step", int(trainer.global_step))
        self.history.append({"step": step, "layers": layers})
        for i, s in enumerate(layers):
            for k in ("fidelity", "utilisation", "write_util", "gate_mean", "gate_std", "slot_norm_mean"):
                pl_module.log(f"mem/L{i}/{k}", float(s[k]), on_step=True, on_epoch=False, rank_zero_only=True)
        log_histograms(trainer, {f"memory_analysis/L{i}/write_gates": s["gate_hist"] for i, s in enumerate(layers)}, step)
        if step > 0 and step % self.plot_every_n_steps < self.every_n_steps:
            self.render(trainer)

    @staticmethod
    def _summarise(st: dict) -> dict:
        read_w = st["read_weight_slot"].float()
        p = read_w / read_w.sum().clamp_min(1e-9)
        ent = float(-(p * p.clamp_min(1e-9).log()).sum())
        gates = st["gate_mean_slot"].float()
        hist = st["gate_hist"].float()
        return {
            "slot_norm": st["slot_norm"].float().numpy(),
            "gate_slot": gates.numpy(),
            "read_slot": read_w.numpy(),
            "decay": st["decay"].float().numpy(),
            "gate_hist": hist.numpy(),
            "fidelity": float(st.get("fidelity", torch.tensor(float("nan")))),
            "utilisation": math.exp(ent) / len(p),
            "write_util": float((gates > 0.1).float().mean()),
            "gate_mean": float(hist.mean()),
            "gate_std": float(hist.std()) if hist.numel() > 1 else 0.0,
            "slot_norm_mean": float(st["slot_norm"].float().mean()),
        }

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.history and self.history[-1]["step"] != getattr(self, "_rendered_step", None):
            self.render(trainer)

    # -- plots ------------------------------------------------------------------------------
    def _dir(self, trainer) -> Path:
        if self.out_dir:
            d = Path(self.out_dir)
        else:
            d = Path(trainer.default_root_dir or os.getcwd()) / "memory_analysis"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def render(self, trainer) -> list[str]:
        if trainer.global_rank != 0 or not self.history:
            return []
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        out = self._dir(trainer)
        steps = np.array([h["step"] for h in self.history])
        n_layers = len(self.history[-1]["layers"])
        paths = []

        def grid(title, key, fname, cmap):
            fig, axes = plt.subplots(1, n_layers, figsize=(4 * n_layers, 3), squeeze=False)
            for i in range(n_layers):
                mat = np.stack([h["layers"][i][key] for h in self.history], axis=1)  # [S, steps]
                ax = axes[0, i]
                im = ax.imshow(mat, aspect="auto", cmap=cmap, origin="lower", interpolation="nearest",
                               extent=[steps[0], steps[-1] + 1, -0.5, mat.shape[0] - 0.5])
                ax.set_title(f"layer {i}: {title}")
                ax.set_xlabel("step")
                ax.set_ylabel("slot")
                fig.colorbar(im, ax=ax)
            fig.tight_layout()
            p = out / fname
            fig.savefig(p, dpi=80)
            plt.close(fig)
            paths.append(p)

        grid("slot RMS norm", "slot_norm", "slot_norms.png", "viridis")
        grid("mean write gate", "gate_slot", "gates.png", "magma")

        fig, axes = plt.subplots(1, 3, figsize=(13, 3))
        for i in range(n_layers):
            axes[0].plot(steps, [h["layers"][i]["utilisation"] for h in self.history], label=f"L{i} read")
            axes[0].plot(steps, [h["layers"][i]["write_util"] for h in self.history], "--", label=f"L{i} write")
            axes[1].plot(steps, [h["layers"][i]["fidelity"] for h in self.history], label=f"L{i}")
            axes[2].hist(self.history[-1]["layers"][i]["gate_hist"], bins=40, range=(0, 1), alpha=0.5, label=f"L{i}")
        axes[0].set_title("slot utilisation")
        axes[1].set_title("binding fidelity cos(unbind(M,k), item)")
        axes[2].set_title(f"write gates at step {steps[-1]}")
        for ax in axes:
            ax.legend(fontsize=7)
        axes[0].set_xlabel("step")
        axes[1].set_xlabel("step")
        fig.tight_layout()
        p = out / "utilisation_fidelity_gates.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)

        self._log_images(trainer, paths, int(steps[-1]))
        self._rendered_step = int(steps[-1])
        self.saved = [str(p) for p in paths]
        return self.saved

    @staticmethod
    def _log_images(trainer, paths: list[Path], step: int) -> None:
        for logger in trainer.loggers:
            try:
                if hasattr(logger, "log_image"):  # WandbLogger (online or offline); one key per figure
                    for p in paths:
                        logger.log_image(key=f"memory_analysis/{p.stem}", images=[str(p)], step=step)
                elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                    import matplotlib.image as mpimg

                    for p in paths:
                        img = mpimg.imread(str(p))[..., :3]
                        logger.experiment.add_image(f"memory_analysis/{p.stem}", img, step, dataformats="HWC")
            except Exception as exc:  # a failing logger must not stop training
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"MemoryAnalysis could not log images to {type(logger).__name__}: {exc}")
