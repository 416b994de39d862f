"""Episodic-to-semantic consolidation: which episodes become long-term semantic items.

:class:`Consolidator` keeps the set of items it wrote into a :class:`SemanticMemory` (their
ids, centroid keys and values, importance, how many episodes each merged, and provenance: the
``(rank, step, start, end)`` of every episode merged into it). One :meth:`Consolidator.run`:

1. takes the candidate episodes newer than the last run (per source rank, by write step);
2. scores each: ``importance = w_surprise * surprise / max surprise + w_frequency *
   log1p(hits) / max log1p(hits) + w_novelty * (1 - best cosine to the semantic memory)``;
3. merges near-duplicates (cosine >= ``merge_threshold``), most important first, into one
   centroid key (mean of the merged keys, importance the max, provenance the union); a new
   cluster that is a near-duplicate of an item already consolidated merges into that item
   (its semantic entry is replaced: new id, same provenance plus the new);
4. keeps at most ``capacity`` consolidated items, evicting the least important (removed from
   the semantic memory too);
5. with a ``replay`` function (the callback's ``replay: true``), also writes each new cluster's
   episodes back as token-level items (what the model would have written had it ingested
   them): a centroid of pooled states cannot name "Quelt", a replayed episode can. They live
   and die with their cluster.

Everything is a pure function of the candidates, the semantic memory and the consolidator's
own state, with ties broken by candidate order: the same inputs give the same items and ids
on every process (the callback gathers every rank's episodes in rank order first).
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from memlm.core.errors import MemLMError


class Consolidator:
    def __init__(self, capacity: int, merge_threshold: float = 0.95, w_surprise: float = 1.0,
                 w_frequency: float = 1.0, w_novelty: float = 1.0) -> None:
        if isinstance(capacity, bool) or int(capacity) != capacity or capacity < 1:
            raise MemLMError(f"consolidation capacity must be an integer >= 1, got {capacity!r}")
        if not -1.0 <= merge_threshold <= 1.0:
            raise MemLMError(f"consolidation merge_threshold is a cosine in [-1, 1], got {merge_threshold}")
        if min(w_surprise, w_frequency, w_novelty) < 0:
            raise MemLMError("consolidation importance weights must be >= 0")
        self.capacity, self.merge_threshold = int(capacity), float(merge_threshold)
        self.weights = (float(w_surprise), float(w_frequency), float(w_novelty))
        self.ids = torch.zeros(0, dtype=torch.long)
        self.keys = torch.zeros(0, 0)
        self.values = torch.zeros(0, 0)
        self.importance = torch.zeros(0)
        self.counts = torch.zeros(0, dtype=torch.long)
        self.provenance: list[list[list[int]]] = []
        self.replayed: list[list[int]] = []  # per item: the ids of its replayed token-level items
        self.watermark: dict[int, int] = {}  # source rank -> first write step not yet seen
        self.runs = 0

    def __len__(self) -> int:
        return int(self.ids.numel())

    def importance_of(self, keys, surprise, hits, semantic) -> torch.Tensor:
        ws, wf, wn = self.weights
        s = surprise.float().clamp_min(0)
        f = torch.log1p(hits.float().clamp_min(0))
        novelty = torch.ones(keys.size(0))
        if semantic is not None and len(semantic):
            best = semantic.search(keys, 1)
            novelty = 1.0 - torch.where(best.mask[:, 0], best.scores[:, 0].float(), torch.zeros(())).cpu().clamp(-1, 1)
        return ws * s / s.max().clamp_min(1e-9) + wf * f / f.max().clamp_min(1e-9) + wn * novelty

    def run(self, semantic, keys, values, surprise, hits, rank, step, span, replay=None) -> dict:
        """Consolidate candidates (all [N] / [N, D] CPU tensors) into ``semantic``; returns counts.

        ``replay(indices)`` (optional; ``indices`` into the candidates given) returns ``(keys,
        values, texts)``: the token-level items of those episodes, written for every new cluster."""
        keep = torch.tensor([int(st) >= self.watermark.get(int(r), 0) for r, st in zip(rank.tolist(), step.tolist())],
                            dtype=torch.bool)
        for r in torch.unique(rank).tolist():
            self.watermark[int(r)] = max(self.watermark.get(int(r), 0), int(step[rank == r].max()) + 1)
        self.runs += 1
        cand = torch.nonzero(keep).squeeze(1)  # candidate index of each kept row (for replay)
        keys, values = keys[keep].float(), values[keep].float()
        surprise, hits, rank, step, span = surprise[keep], hits[keep], rank[keep], step[keep], span[keep]
        n = keys.size(0)
        if n == 0:
            return {"candidates": 0, "written": 0, "merged": 0, "evicted": 0, "replayed": 0}
        if self.keys.numel() == 0:
            self.keys, self.values = torch.zeros(0, keys.size(1)), torch.zeros(0, values.size(1))
        imp = self.importance_of(keys, surprise, hits, semantic)
        unit = F.normalize(keys, dim=-1)
        sims = unit @ unit.T
        order = torch.sort(-imp, stable=True).indices.tolist()
        free = torch.ones(n, dtype=torch.bool)
        clusters = []
        for i in order:
            if not free[i]:
                continue
            members = torch.nonzero(free & (sims[i] >= self.merge_threshold)).squeeze(1)
            free[members] = False
            clusters.append(members)
        prov = [[int(rank[j]), int(step[j]), int(span[j, 0]), int(span[j, 1])] for j in range(n)]
        merged = n - len(clusters)
        new_keys = torch.stack([keys[m].mean(0) for m in clusters])
        new_vals = torch.stack([values[m].mean(0) for m in clusters])
        new_imp = torch.stack([imp[m].max() for m in clusters])
        new_cnt = torch.tensor([m.numel() for m in clusters], dtype=torch.long)
        new_prov = [[prov[j] for j in m.tolist()] for m in clusters]
        new_rep: list[list[int]] = [[] for _ in clusters]  # replayed ids each new cluster inherits
        # a cluster close to an item already consolidated merges into it (count-weighted centroid)
        replaced = []
        if len(self):
            old = F.normalize(self.keys, dim=-1) @ F.normalize(new_keys, dim=-1).T  # [old, new]
            best, who = old.max(0)
            for c in range(len(clusters)):
                if best[c] >= self.merge_threshold:
                    o = int(who[c])
                    w_old, w_new = float(self.counts[o]), float(new_cnt[c])
                    new_keys[c] = (self.keys[o] * w_old + new_keys[c] * w_new) / (w_old + w_new)
                    new_vals[c] = (self.values[o] * w_old + new_vals[c] * w_new) / (w_old + w_new)
                    new_imp[c] = torch.maximum(new_imp[c], self.importance[o])
                    new_cnt[c] += self.counts[o]
                    new_prov[c] = self.provenance[o] + new_prov[c]
                    new_rep[c] = list(self.replayed[o])
                    if o not in replaced:
                        replaced.append(o)
                    merged += 1
        keep_old = torch.ones(len(self), dtype=torch.bool)
        if replaced:
            keep_old[torch.tensor(replaced)] = False
        # capacity: the most important of old + new survive (ties: old first, then new in order)
        all_imp = torch.cat([self.importance[keep_old], new_imp])
        n_old = int(keep_old.sum())
        rank_all = torch.sort(-all_imp, stable=True).indices
        survive = torch.zeros(all_imp.numel(), dtype=torch.bool)
        survive[rank_all[: self.capacity]] = True
        old_idx = torch.nonzero(keep_old).squeeze(1)
        drop_old = old_idx[~survive[:n_old]]
        gone = torch.cat([self.ids[~keep_old], self.ids[drop_old]])
        # an evicted item's replayed items go with it (a replaced one hands them to its successor)
        gone = torch.cat([gone, torch.tensor([i for o in drop_old.tolist() for i in self.replayed[o]], dtype=torch.long)])
        new_ok = survive[n_old:]
        for c in torch.nonzero(~new_ok).squeeze(1).tolist():  # a merged cluster that lost its place
            gone = torch.cat([gone, torch.tensor(new_rep[c], dtype=torch.long)])
        if gone.numel():
            semantic.remove(gone)
        texts = [json.dumps({"consolidated": p}) for p, ok in zip(new_prov, new_ok.tolist()) if ok]
        # pinned: the store's own max_items eviction never takes consolidated items; this
        # consolidator's capacity (above) decides what leaves
        added = (semantic.add(new_keys[new_ok], new_vals[new_ok], texts, pinned=True) if bool(new_ok.any())
                 else torch.zeros(0, dtype=torch.long))
        n_replayed = 0
        if replay is not None:
            for c in torch.nonzero(new_ok).squeeze(1).tolist():
                rk, rv, rt = replay(cand[clusters[c]])
                if rk.size(0):
                    new_rep[c] = new_rep[c] + semantic.add(rk.float(), rv.float(), rt, pinned=True).cpu().long().tolist()
                    n_replayed += int(rk.size(0))
        kept = old_idx[survive[:n_old]]
        self.ids = torch.cat([self.ids[kept], added.cpu().long()])
        self.keys = torch.cat([self.keys[kept], new_keys[new_ok]])
        self.values = torch.cat([self.values[kept], new_vals[new_ok]])
        self.importance = torch.cat([self.importance[kept], new_imp[new_ok]])
        self.counts = torch.cat([self.counts[kept], new_cnt[new_ok]])
        self.provenance = [self.provenance[i] for i in kept.tolist()] + [p for p, ok in zip(new_prov, new_ok.tolist()) if ok]
        self.replayed = [self.replayed[i] for i in kept.tolist()] + [r for r, ok in zip(new_rep, new_ok.tolist()) if ok]
        return {"candidates": n, "written": int(new_ok.sum()), "merged": merged,
                "evicted": int(drop_old.numel()) + int((~new_ok).sum()), "replayed": n_replayed}

    # -- persistence (tensors and one JSON string) -------------------------------------------
    def state_dict(self) -> dict:
        return {"ids": self.ids.clone(), "keys": self.keys.clone(), "values": self.values.clone(),
                "importance": self.importance.clone(), "counts": self.counts.clone(),
                "meta": json.dumps({"provenance": self.provenance, "runs": self.runs, "replayed": self.replayed,
                                    "watermark": {str(k): v for k, v in self.watermark.items()}})}

    def load_state_dict(self, state: dict) -> None:
        meta = json.loads(state["meta"])
        self.ids, self.keys, self.values = state["ids"].long(), state["keys"].float(), state["values"].float()
        self.importance, self.counts = state["importance"].float(), state["counts"].long()
        self.provenance, self.runs = meta["provenance"], int(meta["runs"])
        self.replayed = meta.get("replayed") or [[] for _ in self.provenance]
        self.watermark = {int(k): int(v) for k, v in meta["watermark"].items()}
