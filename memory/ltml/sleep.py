"""Sleep: consolidate the raw log into memories while the user is away.

One pass (:func:`sleep`):

1. **Resume or start** a ``sleep_runs`` row. Its reference time ``now`` is stored, so a
   pass that was killed is finished later with the same clock (same result as a pass that
   was never interrupted).
2. **Extract** candidates from unconsolidated interactions, in batches (LLM extraction
   when a backend is configured, rule-based otherwise). Each batch is integrated and its
   interactions are marked consolidated in **one transaction**: a kill loses at most the
   batch in flight, which the next pass redoes.
3. **Integrate** each candidate against its nearest active memories (mem0-style policy):
   same subject + same value or cosine >= the embedder's duplicate threshold -> MERGE
   (mention count, provenance, newer wording wins); same subject + different value ->
   SUPERSEDE (the older memory gets ``superseded_by``; nothing is deleted); else ADD with
   novelty = 1 - max cosine to the existing memories.
4. **Rescore and forget** (one transaction): importance from recency, frequency, novelty,
   explicit requests, structure and the LLM's rating; retention strength decays with
   age and slower with use; below ``forget_threshold`` a memory is archived (restorable,
   never deleted; explicit memories are never archived).
5. **Finish**: mark the run done and rebuild the FAISS index.

Every function here is a pure function of the database and ``now``: running it twice
changes nothing the second time.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from memlm.memory.ltml.extract import Candidate, extract_llm, extract_rules, norm_value
from memlm.memory.ltml.index import MemoryIndex
from memlm.memory.ltml.store import Memory, Store

DAY = 86400.0
PAUSE_ENV = "MEMLM_LTML_SLEEP_PAUSE"  # seconds to wait after each committed batch (crash tests)


@dataclass
class SleepConfig:
    batch_size: int = 16
    #: importance weights (they sum to 1)
    w_recency: float = 0.25
    w_frequency: float = 0.2
    w_novelty: float = 0.15
    w_explicit: float = 0.25
    w_structured: float = 0.15
    #: weight of the LLM's 1-10 rating when a backend rated the memory
    w_llm: float = 0.5
    #: recency half-life for importance, days
    recency_half_life_days: float = 14.0
    #: retention half-life for forgetting (multiplied by 1 + log(1 + uses)), days
    retention_half_life_days: float = 30.0
    forget_threshold: float = 0.08
    #: None = the embedder's own duplicate threshold
    dup_threshold: float | None = None
    #: a candidate worded as a correction ("actually", "now", "anymore") without a subject key
    #: supersedes its nearest unkeyed memory about the same person when their cosine is at least
    #: this (None = the duplicate threshold - 0.3): a similar slot, a different value
    slot_threshold: float | None = None
    use_llm: bool = True


def ensure_embedder(store: Store, embedder) -> int:
    """Re-embed every memory when the database was built with another embedder."""
    current = store.get_meta("embedder")
    if current == embedder.name:
        return 0
    mems = store.memories(active_only=False, with_embeddings=False)
    if mems:
        vecs = embedder.encode([m.embed_text or m.text for m in mems])
        with store.transaction():
            for m, v in zip(mems, vecs):
                store.update_memory(m.id, embedding=v)
            store.set_meta("embedder", embedder.name)
            store.bump_generation()
    else:
        store.set_meta("embedder", embedder.name)
    return len(mems)


def _start_run(store: Store, now: float | None) -> tuple[int, float, bool]:
    with store.transaction() as c:
        row = c.execute("SELECT id, now FROM sleep_runs WHERE finished_at IS NULL ORDER BY id DESC LIMIT 1").fetchone()
        if row:
            return int(row[0]), float(row[1]), True
        t = float(now if now is not None else time.time())
        cur = c.execute("INSERT INTO sleep_runs(now, started_at) VALUES(?, ?)", (t, time.time()))
        return int(cur.lastrowid), t, False


class _Active:
    """The active memories' embeddings as one matrix, kept in step with the batch's changes."""

    def __init__(self, store: Store) -> None:
        mems = [m for m in store.memories(active_only=True) if m.embedding is not None]
        self.ids = [m.id for m in mems]
        self.mem = {m.id: m for m in mems}
        self.mat = np.stack([m.embedding for m in mems]).astype(np.float32) if mems else None

    def nearest(self, vec: np.ndarray) -> tuple[int | None, float]:
        if self.mat is None or not self.ids or self.mat.shape[1] != vec.shape[0]:
            return None, 0.0
        sims = self.mat @ vec
        j = int(np.argmax(sims))
        return self.ids[j], float(sims[j])

    def add(self, m: Memory) -> None:
        self.ids.append(m.id)
        self.mem[m.id] = m
        row = m.embedding.reshape(1, -1).astype(np.float32)
        self.mat = row if self.mat is None else np.concatenate([self.mat, row])

    def remove(self, mid: int) -> None:
        if mid in self.mem:
            j = self.ids.index(mid)
            self.ids.pop(j)
            self.mat = np.delete(self.mat, j, axis=0)
            del self.mem[mid]

    def replace(self, m: Memory) -> None:
        if m.id in self.mem:
            j = self.ids.index(m.id)
            self.mat[j] = m.embedding
            self.mem[m.id] = m


def _supersede(store: Store, active: _Active, old: Memory, new_id: int, c: Candidate, run: int, stats: dict) -> None:
    store.update_memory(old.id, superseded_by=new_id)
    store.record(old.id, "supersede", {"by": new_id, "old": old.text, "new": c.text}, c.at, run)
    active.remove(old.id)
    stats["superseded"] += 1


def _add(store: Store, c: Candidate, vec: np.ndarray, sim: float, prov: list[int], run: int, now: float,
         subject: str | None, value: str | None) -> int:
    return store.add_memory(
        c.text, c.kind, vec, c.at, subject, value, novelty=1.0 - max(sim, 0.0), explicit=c.explicit,
        provenance=prov, llm_importance=c.llm_importance, sleep_run=run, embed_text=c.embed_text,
        memory_class=c.memory_class, expires_at=c.expires_at, person=c.person, dates=c.dates,
        available_at=max(now, c.at),
    )


def _integrate(store: Store, active: _Active, c: Candidate, vec: np.ndarray, dup: float, run: int, stats: dict,
               now: float = 0.0, slot: float | None = None) -> None:
    prov = [c.interaction_id] if c.interaction_id is not None else []
    if c.kind == "forget":
        _forget(store, active, c, vec, dup - 0.3 if slot is None else slot, run, stats)
        return
    nearest, sim = active.nearest(vec)
    if c.subject:
        same = [active.mem[i] for i in active.ids if active.mem[i].subject == c.subject]
        for m in same:
            if norm_value(m.value) == norm_value(c.value) or float(m.embedding @ vec) >= max(dup, 0.97):
                _merge(store, active, m, c, vec, run)
                stats["merged"] += 1
                return
        mid = _add(store, c, vec, sim, prov, run, now, c.subject, c.value)
        new = store.get(mid)
        stats["added"] += 1
        superseded_new = False
        for m in same:
            if c.at >= m.updated_at:  # the newer statement wins
                _supersede(store, active, m, mid, c, run, stats)
            elif not superseded_new:  # an older statement logged late: it is history at once
                store.update_memory(mid, superseded_by=m.id)
                store.record(mid, "supersede", {"by": m.id, "old": c.text, "new": m.text}, c.at, run)
                superseded_new = True
                stats["superseded"] += 1
        if same:
            store.bump_generation()
        if not superseded_new:
            active.add(new)
        return
    if nearest is not None and sim >= dup:
        m = active.mem[nearest]
        if m.subject is None or c.subject is None:
            _merge(store, active, m, c, vec, run)
            stats["merged"] += 1
            return
    mid = _add(store, c, vec, sim, prov, run, now, None, None)
    stats["added"] += 1
    slot = dup - 0.3 if slot is None else slot
    if c.corrects and c.kind == "fact" and c.memory_class != "temporary":
        # a correction without a subject key: the most similar unkeyed fact about the same person
        # (a similar slot) that is not a near-duplicate is the value it replaces
        rivals = [(float(m.embedding @ vec), m) for m in active.mem.values()
                  if m.subject is None and m.kind == "fact" and m.person == c.person
                  and m.memory_class != "temporary" and m.updated_at <= c.at]
        best = max(rivals, key=lambda r: r[0], default=None)
        if best is not None and slot <= best[0] < dup:
            _supersede(store, active, best[1], mid, c, run, stats)
            store.bump_generation()
    active.add(store.get(mid))


def _forget(store: Store, active: _Active, c: Candidate, vec: np.ndarray, slot: float, run: int, stats: dict) -> None:
    """Archive what the user asked to forget: the memories of the same slot and value when the request names
    one ("forget that I live in Leeds" leaves a newer home alone), else the most similar memory when it is at
    least as close as a correction must be. Protected classes too: this is how they leave."""
    if c.subject:
        targets = [m for m in active.mem.values() if m.subject == c.subject
                   and (c.value is None or norm_value(m.value) == norm_value(c.value))]
    else:
        targets = []
    if not targets:
        nearest, sim = active.nearest(vec)
        targets = [active.mem[nearest]] if nearest is not None and sim >= slot else []
    for m in targets:
        if m.updated_at > c.at:
            continue  # stated again after the request: the newer statement stands
        store.forget(m.id, c.at, {"request": c.text, "interaction": c.interaction_id, "text": m.text}, run)
        active.remove(m.id)
        stats["forgotten"] = stats.get("forgotten", 0) + 1


_KIND_RANK = {"fact": 0, "preference": 1, "lesson": 2, "instruction": 3}
#: restating a temporary thing as lasting, or an ordinary one as identity, upgrades it (never the reverse)
_CLASS_RANK = {"temporary": 0, "ordinary": 1, "identity": 2, "instruction": 3}
PROTECTED = ("identity", "instruction")


def _merge(store: Store, active: _Active, m: Memory, c: Candidate, vec: np.ndarray, run: int) -> None:
    prov = set(m.provenance) | ({c.interaction_id} if c.interaction_id is not None else set())
    fields: dict = {
        "mention_count": m.mention_count + 1,
        "provenance": prov,
        "updated_at": max(m.updated_at, c.at),
        "explicit": int(m.explicit or c.explicit),
    }
    if c.llm_importance is not None:
        fields["llm_importance"] = max(c.llm_importance, m.llm_importance or 0.0)
    if _KIND_RANK.get(c.kind, 0) > _KIND_RANK.get(m.kind, 0):
        fields["kind"] = c.kind
    if _CLASS_RANK.get(c.memory_class, 0) > _CLASS_RANK.get(m.memory_class, 0):
        fields["memory_class"] = c.memory_class
    if m.memory_class == "temporary" and c.expires_at is not None:
        fields["expires_at"] = max(c.expires_at, m.expires_at or 0.0)
    reworded = c.at >= m.updated_at and c.text != m.text
    if reworded:  # the newer wording of the same statement wins; the old one stays in history
        fields.update(text=c.text, embedding=vec, embed_text=c.embed_text, value=c.value if c.value is not None else m.value)
    store.update_memory(m.id, **fields)
    store.record(m.id, "merge", {"text": c.text, "interaction": c.interaction_id, "reworded": reworded}, c.at, run)
    if reworded:
        store.bump_generation()
    active.replace(store.get(m.id))


def importance_and_strength(m: Memory, now: float, cfg: SleepConfig) -> tuple[float, float]:
    # decay counts from when the memory was last stated, used, or first became usable (the
    # sleep that found it): a backlog consolidated late starts fresh instead of already old
    last = max(m.updated_at, m.last_accessed or 0.0, m.available_at or 0.0)
    age_days = max(0.0, now - last) / DAY
    recency = 0.5 ** (age_days / cfg.recency_half_life_days)
    uses = (m.mention_count - 1) + 0.5 * m.access_count
    frequency = min(1.0, math.log1p(uses) / math.log1p(8.0))
    base = (
        cfg.w_recency * recency
        + cfg.w_frequency * frequency
        + cfg.w_novelty * min(1.0, max(0.0, m.novelty))
        + cfg.w_explicit * float(m.explicit)
        + cfg.w_structured * float(m.subject is not None or m.kind in ("lesson", "instruction"))
    )
    importance = base if m.llm_importance is None else (1 - cfg.w_llm) * base + cfg.w_llm * m.llm_importance
    half_life = cfg.retention_half_life_days * (1.0 + math.log1p(m.mention_count - 1 + m.access_count))
    strength = (0.5 + 0.5 * importance) * 0.5 ** (age_days / half_life)
    return float(importance), float(strength)


def rescore_and_forget(store: Store, now: float, cfg: SleepConfig, run: int | None = None) -> dict:
    archived = 0
    with store.transaction():
        for m in store.memories(active_only=True, with_embeddings=False):
            imp, strength = importance_and_strength(m, now, cfg)
            store.update_memory(m.id, importance=imp, strength=strength)
            if m.memory_class == "temporary" and m.expires_at is not None and m.expires_at <= now:
                store.update_memory(m.id, archived=1)
                store.record(m.id, "expire", {"expires_at": m.expires_at}, now, run)
                archived += 1
            elif strength < cfg.forget_threshold and not m.explicit and m.memory_class not in PROTECTED:
                # identity facts and standing instructions only leave through a newer value or a forget
                store.update_memory(m.id, archived=1)
                store.record(m.id, "archive", {"strength": round(strength, 4), "importance": round(imp, 4)}, now, run)
                archived += 1
        if archived:
            store.bump_generation()
    return {"archived": archived}


def sleep(
    store: Store,
    embedder,
    backend=None,
    now: float | None = None,
    config: SleepConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) one consolidation pass; returns what it did."""
    cfg = config or SleepConfig()
    say = log or (lambda msg: None)
    ensure_embedder(store, embedder)
    run, now, resumed = _start_run(store, now)
    dup = cfg.dup_threshold if cfg.dup_threshold is not None else embedder.dup_threshold
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    stats = {"run": run, "resumed": resumed, "now": now, "embedder": embedder.name, "interactions": 0,
             "candidates": 0, "added": 0, "merged": 0, "superseded": 0, "forgotten": 0, "llm_batches": 0,
             "rule_batches": 0}
    say(f"ltml sleep: run {run}{' (resumed)' if resumed else ''}, embedder {embedder.name}")
    while True:
        batch = store.pending_interactions(cfg.batch_size)
        if not batch:
            break
        cands: list[Candidate] = []
        llm_cands = None
        if backend is not None and cfg.use_llm:
            try:
                llm_cands = extract_llm([(r[2], r[3], r[4]) for r in batch], backend)
            except Exception as exc:  # a flaky backend must not stop consolidation
                say(f"ltml sleep: LLM extraction failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); using rules")
        if llm_cands is not None:
            stats["llm_batches"] += 1
            last_user = [r for r in batch if r[2] == "user"] or batch
            for cand in llm_cands:  # provenance: the message the LLM cites, else the batch's last user message
                row = batch[cand.source] if cand.source is not None and 0 <= cand.source < len(batch) else last_user[-1]
                cand.interaction_id, cand.at = row[0], row[4]
                if cand.expires_days is not None:
                    cand.expires_at = cand.at + cand.expires_days * DAY
            cands = sorted(llm_cands + _reflect_batch(store, batch, backend, say),
                           key=lambda c: c.at)  # older statements first, so newer ones supersede them
        else:
            stats["rule_batches"] += 1
            said: dict = {}  # the user's last message per session in this batch: whose name "What's her name?" asks
            for iid, sid, role, content, at in batch:
                prev = store.preceding_assistant(iid) if role == "user" else None
                opening = store.opening_answer(iid) if role == "user" and prev is None else None
                context = said.get(sid, "")
                if role == "user":
                    said[sid] = content
                for cand in extract_rules(content, role, prev_assistant=prev, at=at, context=context,
                                          last_answer=opening):
                    cand.interaction_id, cand.at = iid, at
                    cands.append(cand)
        vecs = embedder.encode([c.embed_text or c.text for c in cands]) if cands else np.zeros((0, 1), np.float32)
        with store.transaction() as conn:
            # another process (a CLI sleep beside a chat's idle sleep) may have consolidated some rows meanwhile
            ids = [r[0] for r in batch]
            still = {r[0] for r in conn.execute(
                f"SELECT id FROM interactions WHERE consolidated=0 AND id IN ({','.join('?' * len(ids))})", ids)}
            active = _Active(store)
            for cand, vec in zip(cands, vecs):
                if cand.interaction_id is None or cand.interaction_id in still:
                    _integrate(store, active, cand, vec, dup, run, stats, now, cfg.slot_threshold)
            conn.executemany("UPDATE interactions SET consolidated=1 WHERE id=?", [(i,) for i in still])
            conn.execute("UPDATE sleep_runs SET phase='extract' WHERE id=?", (run,))
        stats["interactions"] += len(batch)
        stats["candidates"] += len(cands)
        if pause:
            time.sleep(pause)
    stats.update(rescore_and_forget(store, now, cfg, run))
    with store.transaction() as conn:
        conn.execute(
            "UPDATE sleep_runs SET phase='done', finished_at=?, stats=? WHERE id=?",
            (time.time(), json.dumps(stats), run),
        )
    MemoryIndex(store, embedder.name).rebuild()
    say(
        f"ltml sleep: {stats['interactions']} interactions -> {stats['added']} added, {stats['merged']} merged, "
        f"{stats['superseded']} superseded, {stats['archived']} archived"
    )
    return stats


def _reflect_batch(store: Store, batch, backend, say) -> list[Candidate]:
    """Reflection over the batch's assistant turns through the backend (validated JSON, rules on failure):
    what did the user correct? Each correction becomes a lesson."""
    from memlm.memory.ltml.reflect import feedback_pairs, reflect_llm, reflect_rules

    pairs = [p for p in feedback_pairs(store, batch[0][0] - 1) if p[1] <= batch[-1][0]]
    if not pairs:
        return []
    try:
        got = reflect_llm(pairs, backend)
    except Exception as exc:  # a flaky backend must not stop consolidation
        say(f"ltml sleep: LLM reflection failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "using rules")
        got = None
    if got is None:
        got = reflect_rules(pairs)
    at = {r[0]: r[4] for r in batch}
    out = []
    for c in got:
        cand = Candidate(c.lesson, "lesson", embed_text=c.feedback, memory_class="instruction")
        cand.interaction_id, cand.at = c.reply_id, at.get(c.reply_id, batch[-1][4])
        out.append(cand)
    return out


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
