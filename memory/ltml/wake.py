"""Wake: choose the memories worth injecting and render them within a token budget.

Score of a memory for a query (each term in [0, 1] first, weights as in Generative
Agents, configurable):

    score = (w_rel * relevance + w_imp * importance + w_rec * recency) / (w_rel + w_imp + w_rec)

- relevance  = max(0, cosine(query, memory)) from the FAISS index (0 without a query,
  e.g. at session start, when importance and recency decide);
- importance = the value sleep stored (recency, frequency, novelty, explicit, LLM rating);
- recency    = 0.5 ** (days since last mention or access / ``recency_half_life_days``).

With a query, the ``top_k`` best memories above ``min_relevance`` are taken, plus the
``core_k`` best memories without a query (importance and recency alone: explicit requests,
lessons, often-repeated facts), which is also what is injected at session start. The chosen
memories are rendered as a bullet list under a header and added in score order while the
block fits ``budget_tokens``; tokens are counted by ``count_tokens`` (the local model's
tokenizer) or by :func:`estimate_tokens` (about 1.3 tokens per word, the usual BPE rate
for English) when the backend is remote.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from memlm.memory.ltml.index import MemoryIndex
from memlm.memory.ltml.store import Memory, Store

DAY = 86400.0
HEADER = "Memories of this user from earlier chats (newer facts win):"


def estimate_tokens(text: str) -> int:
    """Word-based token estimate for remote backends: ceil(1.3 * words + punctuation / 2)."""
    words = len(re.findall(r"\w+", text))
    punct = len(re.findall(r"[^\w\s]", text))
    return int(math.ceil(1.3 * words + 0.5 * punct))


@dataclass
class WakeConfig:
    w_relevance: float = 3.0
    w_importance: float = 2.0
    w_recency: float = 0.5
    recency_half_life_days: float = 7.0
    budget_tokens: int = 200
    top_k: int = 8
    candidates: int = 64
    min_relevance: float = 0.2
    #: "core" memories added to every turn whatever the query: the best by importance and
    #: recency alone (explicit requests, lessons, often-repeated facts), as at session start
    core_k: int = 2


@dataclass
class Injected:
    memory: Memory
    score: float
    relevance: float
    importance: float
    recency: float
    tokens: int = 0

    def explain(self) -> str:
        m = self.memory
        return (
            f"#{m.id} score={self.score:.3f} (relevance {self.relevance:.2f}, importance {self.importance:.2f}, "
            f"recency {self.recency:.2f}) {m.kind}, mentioned {m.mention_count}x, used {m.access_count}x: {m.text}"
        )


@dataclass
class Injection:
    text: str
    items: list[Injected] = field(default_factory=list)
    tokens: int = 0
    skipped_for_budget: int = 0

    def explain(self) -> str:
        if not self.items:
            return "[memory] nothing injected"
        lines = [f"[memory] injected {len(self.items)} memories, {self.tokens} tokens:"]
        lines += ["[memory]   " + it.explain() for it in self.items]
        if self.skipped_for_budget:
            lines.append(f"[memory]   ({self.skipped_for_budget} more did not fit the token budget)")
        return "\n".join(lines)


def rank(
    store: Store, embedder, query: str | None, now: float | None = None, config: WakeConfig | None = None,
    index: MemoryIndex | None = None,
) -> list[Injected]:
    """All candidate memories for ``query``, best first."""
    cfg = config or WakeConfig()
    now = time.time() if now is None else now
    if query and query.strip():
        index = index or MemoryIndex(store, embedder.name)
        qv = embedder.encode([query])[0]
        ids, sims = index.search(qv, cfg.candidates)
        rel = {int(i): max(0.0, float(s)) for i, s in zip(ids, sims)}
        mems = [m for m in store.get_many(rel) if m.active]
        mems = [m for m in mems if rel[m.id] >= cfg.min_relevance]
    else:
        rel = {}
        mems = store.memories(active_only=True, with_embeddings=False)
    total = cfg.w_relevance + cfg.w_importance + cfg.w_recency
    out = []
    for m in mems:
        last = max(m.updated_at, m.last_accessed or 0.0)
        recency = 0.5 ** (max(0.0, now - last) / DAY / cfg.recency_half_life_days)
        r = rel.get(m.id, 0.0)
        score = (cfg.w_relevance * r + cfg.w_importance * m.importance + cfg.w_recency * recency) / total
        out.append(Injected(m, score, r, m.importance, recency))
    out.sort(key=lambda it: (-it.score, -it.memory.id))
    return out


def render(items: list[Injected]) -> str:
    if not items:
        return ""
    return "\n".join([HEADER] + [f"- {it.memory.text}" for it in items])


def wake(
    store: Store,
    embedder,
    query: str | None = None,
    config: WakeConfig | None = None,
    count_tokens: Callable[[str], int] | None = None,
    now: float | None = None,
    touch: bool = True,
    index: MemoryIndex | None = None,
) -> Injection:
    """Pick and render memories for ``query`` within the token budget; note their use."""
    cfg = config or WakeConfig()
    count = count_tokens or estimate_tokens
    ranked = rank(store, embedder, query, now, cfg, index)[: cfg.top_k]
    if query and cfg.core_k > 0:
        have = {it.memory.id for it in ranked}
        core = [it for it in rank(store, embedder, None, now, cfg, index) if it.memory.id not in have]
        ranked += core[: cfg.core_k]
    chosen: list[Injected] = []
    skipped = 0
    for it in ranked:
        trial = chosen + [it]
        if count(render(trial)) <= cfg.budget_tokens:
            it.tokens = count(f"- {it.memory.text}")
            chosen = trial
        else:
            skipped += 1
    text = render(chosen)
    if touch and chosen:
        store.note_access([it.memory.id for it in chosen], at=now)
    return Injection(text, chosen, count(text) if text else 0, skipped)


def system_prompt(base: str | None, injection: Injection) -> str:
    """The system prompt with the memory block appended."""
    parts = [p for p in (base, injection.text) if p]
    return "\n\n".join(parts)
