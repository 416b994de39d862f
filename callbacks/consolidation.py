"""MemoryConsolidation: move HMST's episodic entries into its semantic memory.

Runs every ``every_n_steps`` training steps, at the end of every training epoch
(``at_epoch_end``) and on demand (:meth:`MemoryConsolidation.consolidate`). Each run gathers the
episodic entries of every DDP rank (the stores are rank-local; all have the same capacity, so
one fixed-size ``all_gather`` each), in rank order, and runs the deterministic
:class:`memlm.memory.consolidation.Consolidator` on that same set on every rank, writing with
plain ``SemanticMemory.add``: the replicated semantic memories stay identical without another
collective. Importance weights, merge threshold and capacity are config (see that module).

An episode's key is the model's exit-layer norm of its pooled state (the space the semantic
queries live in); its value the same vector. With ``replay: true`` every new cluster's
episodes are also replayed: their stored tokens run through the model (a fresh stream, no
gradient, evaluation gates) and every token becomes an item as ``ingest`` would write it
(the module's ``mem_value``), so a name said once in the stream can be read back later. Every
rank replays the same gathered tokens through the same weights: the items agree. The
consolidator's state (ids, centroids, importance, provenance, per-rank watermarks, replayed
ids) is saved in the checkpoint under this callback.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist

from memlm.core.errors import MemLMError
from memlm.memory.consolidation import Consolidator


def gather_episodes(store, rank: int = 0) -> dict[str, torch.Tensor]:
    """Every rank's filled episodic entries, rank order (a collective under DDP)."""
    n = len(store)
    local = {"pooled": store.pooled.float(), "surprise": store.surprise.float(), "hits": store.hits.float(),
             "step": store.step, "span": store.span, "n": torch.tensor([n], device=store.pooled.device)}
    fields = ["pooled", "surprise", "hits", "step", "span"]
    if getattr(store, "tokens", None) is not None:
        local["tokens"] = store.tokens
        fields.append("tokens")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        parts = [{k: v.cpu() for k, v in local.items()}]
        ranks = [rank]
    else:
        world = dist.get_world_size()
        parts = [{} for _ in range(world)]
        for k, v in local.items():
            bufs = [torch.empty_like(v) for _ in range(world)]
            dist.all_gather(bufs, v.contiguous())
            for r in range(world):
                parts[r][k] = bufs[r].cpu()
        ranks = list(range(world))
    out: dict[str, list] = {k: [] for k in fields + ["rank"]}
    for r, p in zip(ranks, parts):
        m = int(p["n"][0])
        for k in fields:
            out[k].append(p[k][:m])
        out["rank"].append(torch.full((m,), r, dtype=torch.long))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def replay_episodes(pl_module, tokens: torch.Tensor):
    """(keys, values, texts) of every token of these episodes (``tokens`` [n, L], -1 padded; the
    last column is the token after the segment), each row run as a fresh stream."""
    tokens = tokens.to(pl_module.device)
    x, nxt = tokens[:, :-1], tokens[:, 1:]
    valid = (x >= 0).all(1)  # an episode stored without tokens has none to replay
    x, nxt = x[valid], nxt[valid]
    if x.size(0) == 0:
        d = pl_module.config.d_model
        return torch.zeros(0, d), torch.zeros(0, pl_module.semantic.value_dim), []
    was = pl_module.training
    pl_module.eval()
    try:
        out = pl_module(x)
        keys, values, texts = pl_module._memory_items(x, out, 1, next_ids=nxt)
    finally:
        pl_module.train(was)
    return keys.float().cpu(), values.float().cpu(), texts


class MemoryConsolidation(L.Callback):
    def __init__(self, capacity: int = 1024, every_n_steps: int | None = None, at_epoch_end: bool = True,
                 merge_threshold: float = 0.95, w_surprise: float = 1.0, w_frequency: float = 1.0,
                 w_novelty: float = 1.0, replay: bool = False) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise MemLMError(f"MemoryConsolidation every_n_steps must be >= 1 (or null), got {every_n_steps}")
        self.consolidator = Consolidator(capacity, merge_threshold, w_surprise, w_frequency, w_novelty)
        self.every_n_steps, self.at_epoch_end, self.replay = every_n_steps, at_epoch_end, bool(replay)
        self.last = {}

    @torch.no_grad()
    def consolidate(self, pl_module, rank: int | None = None) -> dict:
        """One consolidation run now (every rank must call it under DDP)."""
        if not hasattr(pl_module, "episodic") or not hasattr(pl_module, "semantic"):
            raise MemLMError("MemoryConsolidation needs an HMST module (episodic and semantic memories)")
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        ep = gather_episodes(pl_module.episodic, rank)
        norm = pl_module.model.exit_norm
        keys = norm(ep["pooled"].to(norm.weight.device, norm.weight.dtype)).float().cpu()
        replay = None
        if self.replay:
            if "tokens" not in ep:
                raise MemLMError("MemoryConsolidation replay needs episodes that keep their tokens (an HMST episodic store)")
            replay = lambda idx: replay_episodes(pl_module, ep["tokens"][idx])  # noqa: E731
        self.last = self.consolidator.run(pl_module.semantic, keys, keys, ep["surprise"], ep["hits"], ep["rank"],
                                          ep["step"], ep["span"], replay=replay)
        return self.last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._run_and_log(pl_module, on_step=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.at_epoch_end:
            self._run_and_log(pl_module, on_step=False)

    def _run_and_log(self, pl_module, on_step: bool) -> None:
        res = self.consolidate(pl_module)
        # identical on every rank by construction, so no reduction is needed
        res = {**res, "items": len(self.consolidator)}
        for k, v in res.items():
            pl_module.log(f"mem/consolidation_{k}", float(v), on_step=on_step, on_epoch=not on_step, rank_zero_only=True)

    def state_dict(self) -> dict:
        return self.consolidator.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.consolidator.load_state_dict(state_dict)
