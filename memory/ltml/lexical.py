"""BM25 over memory and episode texts (``rank_bm25``), the lexical half of wake's hybrid search.

Names, places and numbers ("Ghent", "4471") are where sentence embeddings are weakest and
exact term matching is strongest; fusing the two rankings covers both.
"""
from __future__ import annotations

import re

import numpy as np
from rank_bm25 import BM25Okapi

_STOP = frozenset(
    "a an the and or but of to in on at for with from by about as is are was were be been am do does did have has had "
    "i me my mine we our us you your it its this that these those there here what which who whom how why when where "
    "can could would should will shall may might must just so not no yes user user's said asked he she him her his "
    "hers they them their theirs".split()
)


def stem(w: str) -> str:
    """A light suffix strip, so inflections meet: "celebrated" ~ "celebrate", "launching" ~ "launch",
    "sisters" ~ "sister". No stemmer library is a dependency; this is a few rules, not Porter."""
    if len(w) > 4 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    for suf in ("ing", "ed", "e"):
        if len(w) >= 4 and w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[: -len(suf)]
    return w


def tokens(text: str) -> list[str]:
    """Lower-cased, stemmed words without stop words ("sisters" ~ "sister", "moved" ~ "move")."""
    out = []
    for w in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()):
        w = w.split("'")[0]
        if w in _STOP:
            continue
        out.append(stem(w))
    return out


def bm25_scores(query: str, docs: list[str]) -> np.ndarray:
    """BM25 (Okapi, rank_bm25 defaults) of ``query`` against each of ``docs``; zeros when nothing matches."""
    if not docs:
        return np.zeros(0, np.float32)
    corpus = [tokens(d) or ["\0"] for d in docs]  # rank_bm25 divides by document length
    q = tokens(query)
    if not q:
        return np.zeros(len(docs), np.float32)
    scores = np.asarray(BM25Okapi(corpus).get_scores(q), dtype=np.float32)
    # Okapi IDF goes negative for terms in over half the documents; such a term is no evidence
    return np.maximum(scores, 0.0)
