"""Wake: choose what to inject for a turn and render it within a token budget.

Never worse than the raw log: wake searches the consolidated memories **and** the raw user
messages (episodes) together, so a fact that consolidation compressed badly, or never
extracted, is still reachable.

- **Relevance dominates.** Each candidate (memory or episode) is ranked by the embedding
  cosine and by BM25 (``rank_bm25``) over the same texts; the two rankings are fused by
  reciprocal-rank fusion, ``sum 1 / (rrf_k + rank)``. Importance and recency only break exact
  ties: a memory used on many turns never outranks a more relevant one.
- **A second hop for multi-hop questions.** Names (capitalised words not opening a sentence)
  in the best ``hop_from`` items that the question does not contain become a BM25 query of
  their own, fused at ``hop_weight``: "what have the rabbits chewed?" finds "Clementine" in
  the adoption message, then the message about Clementine and the charger.
- **De-duplicated.** An episode that an active memory came from is represented by that
  memory (which takes the better of the two ranks); an episode whose memories were all
  superseded is hidden (it holds a stale value). Expired temporary states are skipped.
- **Standing instructions ride along with every turn** (they apply whatever the question),
  in at most ``instruction_share`` of the budget, before the relevant items.
- **One dated line per day.** Instructions and lessons come first, undated; the rest follow
  in date order, the items of one day sharing a line (" | "), so a date is paid for once;
  the "User:" prefix is dropped (the header says whose memories these are).
- **The budget is filled by tokens**: items are added in rank order while the block fits;
  an item that does not fit is skipped and smaller ones after it may still go in. There is
  no fixed count (``top_k`` = 0), although one can be set.

Without a query (session start) the order is instructions, identity facts, then the rest by
importance and recency. Tokens are counted by ``count_tokens`` (the local model's
tokenizer) or by :func:`estimate_tokens` (about 1.3 tokens per word) for remote backends.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from memlm.memory.ltml.dates import iso_day
from memlm.memory.ltml.index import MemoryIndex
from memlm.memory.ltml.lexical import bm25_scores
from memlm.memory.ltml.lexical import tokens as lexical_tokens
from memlm.memory.ltml.store import Memory, Store

DAY = 86400.0
HEADER = "Memories of this user from earlier chats (newer facts win):"
EPISODE = "episode"


def estimate_tokens(text: str) -> int:
    """Word-based token estimate for remote backends: ceil(1.3 * words + punctuation / 2)."""
    words = len(re.findall(r"\w+", text))
    punct = len(re.findall(r"[^\w\s]", text))
    return int(math.ceil(1.3 * words + 0.5 * punct))


@dataclass
class WakeConfig:
    budget_tokens: int = 200
    #: 0 = no fixed count: the token budget decides how many items go in
    top_k: int = 0
    #: candidates taken from each ranking (cosine, BM25) before fusion
    candidates: int = 200
    #: cosine below which a candidate is not relevant by embedding (BM25 may still find it); 0 lets
    #: the budget fill with the next-best items, as a raw-log search would
    min_relevance: float = 0.0
    rrf_k: float = 60.0
    #: a memory stands for (replaces) its source message only if it keeps this share of the message's
    #: words; messages of at most ``holds_min_words`` content words always yield to their memory
    holds_share: float = 0.7
    holds_min_words: int = 4
    #: second hop: names (capitalised words) in the best ``hop_from`` items that the question does not
    #: contain become a BM25 query of their own, fused with ``hop_weight`` ("the rabbits" -> "Clementine");
    #: 0 turns it off
    hop_from: int = 3
    hop_weight: float = 0.5
    #: search the raw user messages beside the memories
    episodes: bool = True
    #: hide the message of a temporary state that has expired ("my parents visit tonight", days later);
    #: False keeps it reachable, dated, as any raw message
    hide_expired: bool = True
    #: longest episode rendered, in words (a long message is cut after this)
    episode_words: int = 60
    #: share of the budget standing instructions may take on a turn with a query
    instruction_share: float = 0.5
    #: standing instructions injected on every turn (0 = only what the query finds)
    core_k: int = 8
    recency_half_life_days: float = 7.0
    #: prefix memories and episodes with the date they were stated
    dated: bool = True


@dataclass
class Injected:
    memory: Memory  # an episode is a Memory with kind "episode" and id = -interaction id
    score: float
    relevance: float
    importance: float
    recency: float
    tokens: int = 0
    cosine: float = 0.0
    bm25: float = 0.0

    def explain(self) -> str:
        m = self.memory
        what = ("raw message" if m.kind == EPISODE else
                f"{m.kind} ({m.memory_class}), mentioned {m.mention_count}x, used {m.access_count}x")
        return (f"#{m.id} score={self.score:.4f} (relevance {self.relevance:.2f}: cosine {self.cosine:.2f}, "
                f"bm25 {self.bm25:.2f}; importance {self.importance:.2f}, recency {self.recency:.2f}) {what}: {m.text}")


@dataclass
class Injection:
    text: str
    items: list[Injected] = field(default_factory=list)
    tokens: int = 0
    skipped_for_budget: int = 0

    def explain(self) -> str:
        if not self.items:
            return "[memory] nothing injected"
        lines = [f"[memory] injected {len(self.items)} items, {self.tokens} tokens:"]
        lines += ["[memory]   " + it.explain() for it in self.items]
        if self.skipped_for_budget:
            lines.append(f"[memory]   ({self.skipped_for_budget} more did not fit the token budget)")
        return "\n".join(lines)


def _episode_text(content: str, question: str | None, words: int) -> str:
    toks = content.split()
    body = " ".join(toks[:words]) + (" ..." if len(toks) > words else "")
    short = len(toks) <= 6 and question and question.rstrip().endswith("?")
    return f'Asked "{question.strip()}", user: {body}' if short else f"User: {body}"


def _episodes(store: Store, embedder, cfg: WakeConfig) -> tuple[list[Memory], np.ndarray | None]:
    """The user's raw messages as Memory rows, with their embeddings (computed once, cached in SQLite)."""
    # the user's own past questions state nothing; injecting them would only spend the budget
    rows = [r for r in store.user_episodes() if not _QUESTION_ONLY.match(r[2])]
    if not rows:
        return [], None
    have = store.episode_vectors(embedder.name)
    embed_texts = {iid: (f"{q.strip()} {c}" if q and len(c.split()) <= 6 and q.rstrip().endswith("?") else c)
                   for iid, _s, c, _a, q in rows}
    missing = [iid for iid, *_ in rows if iid not in have]
    if missing:
        vecs = embedder.encode([embed_texts[i] for i in missing])
        store.put_episode_vectors(embedder.name, [(i, embed_texts[i], v) for i, v in zip(missing, vecs)])
        have.update({i: np.asarray(v, np.float32) for i, v in zip(missing, vecs)})
    mems = []
    for iid, _sid, content, at, question in rows:
        mems.append(Memory(
            id=-iid, text=_episode_text(content, question, cfg.episode_words), kind=EPISODE, subject=None, value=None,
            importance=0.0, novelty=1.0, explicit=False, mention_count=1, access_count=0, created_at=at, updated_at=at,
            last_accessed=None, provenance=[iid], superseded_by=None, archived=False, strength=1.0,
            llm_importance=None, embed_text=embed_texts[iid],
        ))
    dims = {have[m.provenance[0]].shape[0] for m in mems}
    if len(dims) != 1:
        return mems, None
    return mems, np.stack([have[m.provenance[0]] for m in mems]).astype(np.float32)


_QUESTION_ONLY = re.compile(r"^[^.!?\n]*\?\s*$")


_NAME = re.compile(r"(?<![.!?:\"] )(?<!^)\b[A-Z][a-z]{2,}(?: [A-Z][a-z]+)*")
_NOT_NAMES = frozenset("User Asked About For The This That Yes Nope Monday Tuesday Wednesday Thursday Friday Saturday "
                       "Sunday January February March April May June July August September October November "
                       "December".split())


def _hop_names(query: str, texts: list[str]) -> list[str]:
    """Names in ``texts`` (capitalised words not opening a sentence) that ``query`` does not mention."""
    q = query.lower()
    out: list[str] = []
    for t in texts:
        for name in _NAME.findall(t):
            if name not in _NOT_NAMES and name.lower() not in q and name not in out:
                out.append(name)
    return out


def _holds(m: Memory, episode: Memory, cfg: WakeConfig) -> bool:
    """Whether memory ``m`` keeps the words of the message it came from (then it stands for the message).
    A memory drawn from part of a longer message ("The user's daughter is called Zosia." from "My daughter
    Zosia lost her first tooth at breakfast.") does not: the message stays a candidate of its own."""
    words = lexical_tokens(episode.embed_text or episode.text)
    if len(words) <= cfg.holds_min_words:
        return True  # a short answer: the memory is its resolved form
    have = set(lexical_tokens(f"{m.text} {m.embed_text or ''}"))
    return sum(w in have for w in words) >= cfg.holds_share * len(words)


def _recency(m: Memory, now: float, cfg: WakeConfig) -> float:
    last = max(m.updated_at, m.last_accessed or 0.0)
    return 0.5 ** (max(0.0, now - last) / DAY / cfg.recency_half_life_days)


def _live(m: Memory, now: float) -> bool:
    return m.active and not (m.memory_class == "temporary" and m.expires_at is not None and m.expires_at <= now)


def _ranks(scores: np.ndarray, keep: np.ndarray, n: int) -> dict[int, int]:
    """Position (0 = best) of the best ``n`` entries of ``scores`` where ``keep``."""
    idx = np.flatnonzero(keep)
    order = idx[np.argsort(-scores[idx], kind="stable")][:n]
    return {int(j): r for r, j in enumerate(order)}


def rank(
    store: Store, embedder, query: str | None, now: float | None = None, config: WakeConfig | None = None,
    index: MemoryIndex | None = None,
) -> list[Injected]:
    """Every candidate for ``query`` (memories and, with ``config.episodes``, raw messages), best first."""
    cfg = config or WakeConfig()
    now = time.time() if now is None else now
    mems = [m for m in store.memories(active_only=True) if _live(m, now)]
    if not (query and query.strip()):
        order = {"instruction": 0, "identity": 1}
        out = [Injected(m, m.importance, 0.0, m.importance, _recency(m, now, cfg)) for m in mems]
        out.sort(key=lambda it: (order.get(it.memory.memory_class, 2), -(it.importance + 0.25 * it.recency),
                                 -it.memory.id))
        return out
    # every stated value is reachable: superseded memories hide their episodes, active ones stand for them
    covered: dict[int, Memory] = {}
    split: dict[int, list[Memory]] = {}
    stale: set[int] = set()
    for m in store.memories(active_only=False, with_embeddings=False):
        for iid in m.provenance:
            if m.active and _live(m, now):
                covered.setdefault(iid, m)
                if m.subject is None and m.kind == "fact":
                    split.setdefault(iid, []).append(m)
            elif m.superseded_by is not None or (cfg.hide_expired and m.memory_class == "temporary"
                                                 and not _live(m, now)):
                stale.add(iid)  # an old value (or, with hide_expired, a temporary state that has passed)
    # a message cut into several unkeyed sentences is shown once, whole, as its episode: one line,
    # one date, and the sentences keep each other's context
    absorbed = {m.id for iid, ms in split.items() if len(ms) >= 2 for m in ms}
    for iid, ms in split.items():
        if len(ms) >= 2 and all(covered.get(iid) is m or covered.get(iid).id in absorbed for m in ms):
            covered.pop(iid, None)
    mems = [m for m in mems if m.id not in absorbed]
    episodes, ep_mat = _episodes(store, embedder, cfg) if cfg.episodes else ([], None)
    keep = np.array([e.provenance[0] not in stale or e.provenance[0] in covered for e in episodes], dtype=bool)
    episodes = [e for e, k in zip(episodes, keep) if k]
    if ep_mat is not None:
        ep_mat = ep_mat[keep]
    docs = mems + episodes
    if not docs:
        return []
    qv = embedder.encode([query])[0].astype(np.float32)
    mem_vecs = [m.embedding for m in mems if m.embedding is not None and m.embedding.shape == qv.shape]
    cos = np.zeros(len(docs), np.float32)
    if len(mem_vecs) == len(mems) and mems:
        cos[: len(mems)] = np.stack(mem_vecs) @ qv
    if ep_mat is not None and ep_mat.shape[1] == qv.shape[0]:
        cos[len(mems):] = ep_mat @ qv
    bm = bm25_scores(query, [m.embed_text or m.text for m in mems] + [e.embed_text or e.text for e in episodes])
    cos_rank = _ranks(cos, cos >= cfg.min_relevance, cfg.candidates)
    bm_rank = _ranks(bm, bm > 0, cfg.candidates)
    fused = np.zeros(len(docs), np.float64)
    best_bm = float(bm.max()) if len(bm) and bm.max() > 0 else 1.0
    for ranks in (cos_rank, bm_rank):
        for j, r in ranks.items():
            fused[j] += 1.0 / (cfg.rrf_k + r + 1)
    top = 2.0 / (cfg.rrf_k + 1)
    names = _hop_names(query, [docs[j].text for j in np.argsort(-fused, kind="stable")[: cfg.hop_from]
                               if fused[j] > 0]) if cfg.hop_from > 0 and cfg.hop_weight > 0 else []
    if names:
        hop = bm25_scores(" ".join(names), [m.embed_text or m.text for m in mems]
                          + [e.embed_text or e.text for e in episodes])
        for j, r in _ranks(hop, hop > 0, cfg.candidates).items():
            fused[j] += cfg.hop_weight / (cfg.rrf_k + r + 1)
    by_id: dict[int, Injected] = {}
    for j in np.flatnonzero(fused > 0):
        d = docs[j]
        if d.kind == EPISODE and d.provenance[0] in covered and (
                d.provenance[0] in stale or _holds(covered[d.provenance[0]], d, cfg)):  # a stale value never shows
            d = covered[d.provenance[0]]  # the memory wins over the episode it came from, at the better rank
        it = Injected(d, float(fused[j]), float(fused[j] / top), d.importance, _recency(d, now, cfg),
                      cosine=max(0.0, float(cos[j])), bm25=float(bm[j] / best_bm))
        old = by_id.get(d.id)
        if old is None or it.score > old.score:
            by_id[d.id] = it
    out = list(by_id.values())
    # relevance first; importance and recency only separate exact ties
    out.sort(key=lambda it: (-round(it.score, 12), -(it.importance + it.recency), -it.memory.id))
    return out


def _body(m: Memory) -> str:
    """The memory's words; the "User:" prefix is dropped (the header already says whose memories these are)."""
    return m.text[6:] if m.text.startswith("User: ") else m.text


def _day(m: Memory) -> str:
    return iso_day(m.updated_at if m.kind != EPISODE else m.created_at)


def _line(it: Injected, dated: bool) -> str:
    m = it.memory
    if dated and m.kind not in ("instruction", "lesson"):
        return f"- ({_day(m)}) {_body(m)}"
    return f"- {_body(m)}"


def render(items: list[Injected], dated: bool = True) -> str:
    """The block: instructions and lessons first (undated), then the rest in date order, one line per
    day (items of the same day share it, joined by " | "), so a date is paid for once."""
    if not items:
        return ""
    undated = [it for it in items if not dated or it.memory.kind in ("instruction", "lesson")]
    lines = [HEADER] + [_line(it, False) for it in undated]
    days: dict[str, list[str]] = {}
    for it in sorted((it for it in items if it not in undated), key=lambda it: (_day(it.memory), it.memory.created_at)):
        days.setdefault(_day(it.memory), []).append(_body(it.memory))
    lines += [f"- ({d}) " + " | ".join(texts) for d, texts in days.items()]
    return "\n".join(lines)


def _fill(items: list[Injected], budget: int, count: Callable[[str], int], dated: bool,
          chosen: list[Injected], spent: int, limit: int | None = None) -> tuple[int, int]:
    """Add ``items`` to ``chosen`` in order while ``spent`` + their lines fit ``budget``; returns (spent, skipped)."""
    skipped = 0
    for it in items:
        if limit is not None and len(chosen) >= limit:
            break
        cost = count("\n" + _line(it, dated))
        if spent + cost <= budget:  # line by line is an upper bound for a word-count estimate
            it.tokens = cost
            chosen.append(it)
            spent += cost
            continue
        exact = count(render(chosen + [it], dated))  # near the limit: count the whole block
        if exact <= budget:
            it.tokens = cost
            chosen.append(it)
            spent = exact
        else:
            skipped += 1
    return spent, skipped


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
    now = time.time() if now is None else now
    has_query = bool(query and query.strip())
    chosen: list[Injected] = []
    spent = count(HEADER)
    skipped = 0
    ranked = rank(store, embedder, query, now, cfg, index)
    if has_query and cfg.core_k > 0:
        start = rank(store, embedder, None, now, cfg, index)
        instructions = [it for it in start if it.memory.memory_class == "instruction"][: cfg.core_k]
        share = spent + int(cfg.instruction_share * max(0, cfg.budget_tokens - spent))
        spent, skipped = _fill(instructions, min(share, cfg.budget_tokens), count, cfg.dated, chosen, spent)
        have = {it.memory.id for it in chosen}
        ranked = [it for it in ranked if it.memory.id not in have]
    limit = (len(chosen) + cfg.top_k) if cfg.top_k else None
    spent, more = _fill(ranked, cfg.budget_tokens, count, cfg.dated, chosen, spent, limit)
    skipped += more
    text = render(chosen, cfg.dated)
    while chosen and count(text) > cfg.budget_tokens:  # a tokenizer that is not additive over lines
        chosen.pop()
        skipped += 1
        text = render(chosen, cfg.dated)
    if not chosen:
        text = ""
    if touch and chosen:
        store.note_access([it.memory.id for it in chosen if it.memory.id > 0], at=now)
    return Injection(text, chosen, count(text) if text else 0, skipped)


def system_prompt(base: str | None, injection: Injection) -> str:
    """The system prompt with the memory block appended."""
    parts = [p for p in (base, injection.text) if p]
    return "\n\n".join(parts)
