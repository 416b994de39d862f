"""LTML on free-form conversation: does what people actually say reach the prompt?

Data (``bench/data/ltml/``, written for this benchmark, no public set):

- ``freeform_dev.json`` / ``freeform_heldout.json``: users chatting with an assistant over
  months, stating facts in passing, correcting them later, answering "yep" to a question,
  giving instructions with "please" / "can you" / "remember, ...", and saying things that
  must *not* become memories (requests, hypotheticals, other people's facts, temporary
  states). The rules were developed on the dev half only; the held-out half is reported, not
  tuned on.
- ``longconv.json``: two pairs of friends, each over 22-23 sessions and eight months, with single-hop,
  multi-hop and temporal questions annotated with their evidence turns.

Methods, all within the same token budget (``--budget``, counted with ``estimate_tokens``):

- ``ltml``          : sleep after every session (as chat.py does on exit), wake per question;
- ``ltml-backlog``  : one sleep over the whole log at the end;
- ``raw-cosine``    : the top-5 raw user messages by MiniLM cosine, as many as fit;
- ``raw-bm25``      : the top-5 raw user messages by BM25 (rank_bm25), as many as fit.

Figures (free-form): recall of the current value; stale-only rate (an old value injected and
no current one); wrong-value rate (another person's or a hypothetical value and no current
one); false-memory share (consolidated memories that are requests, hypotheticals, other
people's facts filed as the user's, expired temporary states, or non-feedback "lessons");
instruction recall at session start and on unrelated turns; survival of identity facts and
instructions among the memories after 400 idle days; tokens per turn. Long conversations:
evidence recall (the injected block covers an evidence turn) at 200 and 500 tokens.

    python bench/ltml_freeform.py [--quick] [--budget 200] [--embedder minilm|hash]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import MemLMError, run_main  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "ltml"
DAY = 86400.0


def _t0(start: str) -> float:
    return dt.datetime.fromisoformat(start).replace(hour=9, tzinfo=dt.timezone.utc).timestamp()


def log_all(store, sessions, t0: float, sleep_each=None) -> list[list[int | None]]:
    """Log every session (the other speaker as 'assistant'); returns interaction ids per turn."""
    ids = []
    for sess in sessions:
        at = t0 + sess["day"] * DAY
        sid = store.start_session("bench", at=at)
        row = []
        for i, (role, text) in enumerate(sess["turns"]):
            row.append(store.log(sid, "user" if role == "user" else "assistant", text, at=at + 60 * i))
        store.end_session(sid, at=at + 3600)
        ids.append(row)
        if sleep_each is not None:
            sleep_each(at + DAY / 2)
    return ids


def _has(text: str, needles) -> bool:
    low = text.lower()
    return any(n.lower() in low for n in needles or [])


class RawLog:
    """The baselines: top-k raw user messages by cosine or BM25, added while they fit the budget."""

    def __init__(self, messages: list[tuple[int, str]], embedder) -> None:
        self.ids = [i for i, _ in messages]
        self.texts = [t for _, t in messages]
        self.mat = embedder.encode(self.texts) if self.texts else None
        self.embedder = embedder

    def block(self, query: str, how: str, budget: int, k: int | None = 5) -> tuple[str, list[int]]:
        from memlm.memory.ltml.lexical import bm25_scores
        from memlm.memory.ltml.wake import HEADER, estimate_tokens

        if how == "cosine":
            scores = self.mat @ self.embedder.encode([query])[0]
        else:
            scores = bm25_scores(query, self.texts)
        order = [int(j) for j in np.argsort(-scores, kind="stable") if how == "cosine" or scores[j] > 0]
        order = order[:k] if k else order
        lines, chosen, spent = [HEADER], [], estimate_tokens(HEADER)
        for j in order:
            cost = estimate_tokens("\n- " + self.texts[j])
            if spent + cost <= budget:
                lines.append("- " + self.texts[j])
                chosen.append(self.ids[j])
                spent += cost
        return ("\n".join(lines) if chosen else ""), chosen


def _false_memories(mems, annotations, now: float) -> int:
    bad = 0
    for m in mems:
        if m.memory_class == "temporary" and m.expires_at is not None and m.expires_at <= now:
            continue  # expired: wake no longer injects it
        for a in annotations:
            if a["snippet"].lower() not in (m.text or "").lower():
                continue
            if "person" in a:
                bad += m.person is None  # another person's fact filed as the user's
            elif "kind" in a:
                bad += m.kind == a["kind"]
            else:
                bad += 1
            break
    return bad


def run_freeform_user(user, embedder, budget: int, backlog: bool, tmp: Path) -> dict:
    from memlm.memory.ltml.sleep import sleep
    from memlm.memory.ltml.store import Store
    from memlm.memory.ltml.wake import WakeConfig, wake

    store = Store(tmp / f"{user['name']}{'-b' if backlog else ''}.sqlite")
    t0 = _t0(user["start"])
    each = None if backlog else (lambda at: sleep(store, embedder, now=at))
    log_all(store, user["sessions"], t0, each)
    now = t0 + user["probe_day"] * DAY
    if backlog:
        sleep(store, embedder, now=now)
    cfg = WakeConfig(budget_tokens=budget)
    out = {"hit": [], "stale": [], "wrong": [], "tokens": [], "inst_start": [], "inst_turn": [], "wake_ms": []}
    for p in user["probes"]:
        t = time.perf_counter()
        inj = wake(store, embedder, p["q"], cfg, now=now, touch=False)
        out["wake_ms"].append(1000 * (time.perf_counter() - t))
        hit = _has(inj.text, p["current"])
        out["hit"].append(hit)
        out["stale"].append(not hit and _has(inj.text, p.get("stale")))
        out["wrong"].append(not hit and _has(inj.text, p.get("wrong")))
        out["tokens"].append(inj.tokens)
    start = wake(store, embedder, None, cfg, now=now, touch=False).text
    for ins in user["instructions"]:
        out["inst_start"].append(_has(start, ins["check"]))
        out["inst_turn"].append(_has(wake(store, embedder, ins["q_unrelated"], cfg, now=now, touch=False).text,
                                     ins["check"]))
    mems = store.memories()
    out["false"] = _false_memories(mems, user["false"], now)
    out["memories"] = len(mems)
    sleep(store, embedder, now=now + 400 * DAY)  # 400 idle days: nothing used, nothing said
    kept = " ".join(m.text for m in store.memories())
    checks = [i for i in user["identity"]] + [ins["check"] for ins in user["instructions"]]
    out["survival"] = [_has(kept, c) for c in checks]
    store.close()
    return out


def run_freeform_raw(user, embedder, budget: int, how: str) -> dict:
    msgs, iid = [], 0
    for sess in user["sessions"]:
        for role, text in sess["turns"]:
            iid += 1
            if role == "user":
                msgs.append((iid, text))
    raw = RawLog(msgs, embedder)
    out = {"hit": [], "stale": [], "wrong": [], "tokens": [], "inst_turn": []}
    from memlm.memory.ltml.wake import estimate_tokens

    for p in user["probes"]:
        text, _ = raw.block(p["q"], how, budget)
        hit = _has(text, p["current"])
        out["hit"].append(hit)
        out["stale"].append(not hit and _has(text, p.get("stale")))
        out["wrong"].append(not hit and _has(text, p.get("wrong")))
        out["tokens"].append(estimate_tokens(text) if text else 0)
    for ins in user["instructions"]:
        out["inst_turn"].append(_has(raw.block(ins["q_unrelated"], how, budget)[0], ins["check"]))
    return out


def _summary(results: list[dict]) -> dict:
    def mean(key):
        vals = [v for r in results for v in r.get(key, [])]
        return float(np.mean(vals)) if vals else float("nan")

    row = {k: mean(k) for k in ("hit", "stale", "wrong", "inst_start", "inst_turn", "survival", "tokens")}
    if results and "false" in results[0]:
        row["false_share"] = sum(r["false"] for r in results) / max(1, sum(r["memories"] for r in results))
        row["memories"] = float(np.mean([r["memories"] for r in results]))
    else:
        row["false_share"] = float("nan")
    return row


def run_longconv(conv, embedder, budgets: list[int], tmp: Path, backlog: bool) -> dict:
    from memlm.memory.ltml.sleep import sleep
    from memlm.memory.ltml.store import Store
    from memlm.memory.ltml.wake import WakeConfig, wake

    store = Store(tmp / f"{conv['name']}{'-b' if backlog else ''}.sqlite")
    t0 = _t0(conv["start"])
    each = None if backlog else (lambda at: sleep(store, embedder, now=at))
    ids = log_all(store, conv["sessions"], t0, each)
    now = t0 + (conv["sessions"][-1]["day"] + 1) * DAY
    if backlog:
        sleep(store, embedder, now=now)
    user_msgs = [(ids[s][t], turn[1]) for s, sess in enumerate(conv["sessions"])
                 for t, turn in enumerate(sess["turns"]) if turn[0] == "user"]
    raw = RawLog(user_msgs, embedder)
    res: dict = {}
    for q in conv["questions"]:
        evidence = {ids[s][t] for s, t in q["evidence"]}
        for b in budgets:
            inj = wake(store, embedder, q["q"], WakeConfig(budget_tokens=b), now=now, touch=False)
            covered = set().union(*[set(it.memory.provenance) for it in inj.items]) if inj.items else set()
            res.setdefault(("ltml", b, q["type"]), []).append(bool(covered & evidence))
            if not backlog:
                for how in ("bm25", "cosine"):
                    _, chosen = raw.block(q["q"], how, b, k=None)
                    res.setdefault((f"raw-{how}", b, q["type"]), []).append(bool(set(chosen) & evidence))
    store.close()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="dev half and the long conversation only, per-session sleep")
    p.add_argument("--budget", type=int, default=200, help="token budget of the injected block (free-form)")
    p.add_argument("--embedder", default="minilm", help="minilm | hash")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from memlm.memory.ltml.embeddings import get_embedder

    if args.budget <= 0:
        raise MemLMError(f"--budget must be positive, got {args.budget}; pass e.g. --budget 200")
    import torch

    torch.set_num_threads(1)
    embedder = get_embedder(args.embedder)
    halves = ["dev"] if args.quick else ["dev", "heldout"]
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for half in halves:
            users = json.loads((DATA / f"freeform_{half}.json").read_text())["users"]
            (tmp / half).mkdir(exist_ok=True)
            methods = {"ltml": [run_freeform_user(u, embedder, args.budget, False, tmp / half) for u in users]}
            if not args.quick:
                methods["ltml-backlog"] = [run_freeform_user(u, embedder, args.budget, True, tmp / half) for u in users]
            for how in ("cosine", "bm25"):
                methods[f"raw-{how}"] = [run_freeform_raw(u, embedder, args.budget, how) for u in users]
            for name, results in methods.items():
                s = _summary(results)
                rows.append({"half": half, "method": name, "recall": s["hit"], "stale_only": s["stale"],
                             "wrong_value": s["wrong"], "false_mem": s["false_share"], "inst_start": s["inst_start"],
                             "inst_turn": s["inst_turn"], "survive_400d": s["survival"], "tokens": s["tokens"]})
                for k, v in rows[-1].items():
                    if k not in ("half", "method") and v == v:
                        figures[f"{half}_{name}_{k}".replace("-", "_")] = v
        print(f"free-form: {args.embedder} embedder, budget {args.budget} tokens (word estimate)")
        print_table(rows)
        convs = json.loads((DATA / "longconv.json").read_text())["conversations"]
        budgets = [200, 500]
        lrows, per_conv = [], []
        for backlog in ([False] if args.quick else [False, True]):
            res: dict = {}
            (tmp / "long").mkdir(exist_ok=True)
            for conv in convs:
                one = run_longconv(conv, embedder, budgets, tmp / "long", backlog)
                for key, vals in one.items():
                    res.setdefault(key, []).extend(vals)
                for name in sorted({k[0] for k in one}):  # each conversation on its own, too
                    for b in budgets:
                        vals = [v for typ in ("single", "multi", "temporal") for v in one.get((name, b, typ), [])]
                        label = name + ("-backlog" if backlog else "")
                        per_conv.append({"conversation": conv["name"], "method": label, "budget": b,
                                         "all": float(np.mean(vals))})
            for name in sorted({k[0] for k in res}):
                label = name + ("-backlog" if backlog else "")
                for b in budgets:
                    row = {"method": label, "budget": b}
                    for typ in ("single", "multi", "temporal"):
                        row[typ] = float(np.mean(res[(name, b, typ)]))
                    allv = [v for typ in ("single", "multi", "temporal") for v in res[(name, b, typ)]]
                    row["all"] = float(np.mean(allv))
                    lrows.append(row)
                    figures[f"long_{label}_{b}_evidence_recall".replace("-", "_")] = row["all"]
        print(f"long conversations: {sum(len(c['questions']) for c in convs)} questions over "
              f"{sum(len(c['sessions']) for c in convs)} sessions; evidence recall")
        print_table(lrows)
        print("per conversation (evidence recall, all questions)")
        print_table(per_conv)
    print_result(figures, {"budget": args.budget, "embedder": embedder.name, "quick": args.quick, "halves": halves})
    return 0


if __name__ == "__main__":
    run_main(main)
