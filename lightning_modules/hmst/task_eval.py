"""Per-task evaluation of HMST on stage-2 data (memlm.datamodules.hmst_stage2).

A batch may carry ``em_metric`` (a row counts as right when every scored target token is
predicted, greedy and teacher-forced, which for a short answer is exactly greedy generation)
and ``write_memory`` (ingest this chunk into semantic memory, as facts are ingested at
inference: the items are removed again when the evaluation ends, so evaluating never changes
the memory a checkpoint holds).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class TaskEval:
    def __init__(self) -> None:
        self.right: dict[str, float] = {}
        self.rows: dict[str, float] = {}
        self.ingested: list[torch.Tensor] = []

    def update(self, module, batch: dict, out) -> None:
        y = batch["targets"]
        if batch.get("write_memory"):
            keys, values, texts = module._memory_items(batch["input_ids"], out, module.mem_ingest_stride)
            # a collective (every rank gets the same flagged chunks: equal rows per rank), so the
            # replicas and their id counters stay identical; every rank's items are removed later
            first = module.semantic.next_id
            module.semantic.replicated_add(keys.float(), values.float(), texts)
            self.ingested.append(torch.arange(first, module.semantic.next_id))
        name = batch.get("em_metric")
        if not name:
            return
        valid = y != IGNORE_INDEX
        scored = valid.any(1)
        right = ((out.logits.argmax(-1) == y) | ~valid).all(1) & scored
        self.right[name] = self.right.get(name, 0.0) + float(right.sum())
        self.rows[name] = self.rows.get(name, 0.0) + float(scored.sum())

    def results(self) -> dict[str, float]:
        return {k: self.right[k] / self.rows[k] for k in self.rows if self.rows[k] > 0}

    def log_and_reset(self, module, split: str) -> None:
        for name, value in self.results().items():
            module.log(f"{split}/{name}", value, sync_dist=True)
        self.reset(module)

    def reset(self, module=None) -> None:
        if module is not None and self.ingested:
            module.semantic.remove(torch.cat(self.ingested))
        self.right, self.rows, self.ingested = {}, {}, []
