"""How fast and how well the Hebbian continual learner learns, and how much it forgets.

    python bench/hebbian_learning.py [--quick]

The research comparisons (rate vs LIF, learned vs fixed vocabularies, Hebbian vs an online
gradient model) live in the sibling ``bench/hebbian_compare.py``, whose RESULT line holds
acc_after_5_rate, acc_after_5_lif, acc_after_5_gradient, retention_rate, retention_lif and
units_per_sec_lif.

1. Exposure curve: a stream of short distinct sentences is presented again and again (each
   pass in a new shuffled order, learning on). After each pass, next-unit accuracy is
   measured on a fresh repetition of every sentence with learning off (held-out
   repetitions). The same stream goes, interleaved, to a first-order baseline (one neuron
   per column, trace 1: a pure "what follows this unit" memory) so the gain from
   context-specific neurons is a ratio measured in the same process.
2. Forgetting: learn the first 20 sentences (``--exposures`` passes), measure them, then learn
   200 new sentences the same way and measure the first 20 again (retention = after/before).
3. Speed: units (tokens) learned per second during part 2, and on real text
   (tinyshakespeare lines, when /work/shared/data is present) with the online accuracy.
4. Dialogue recall: the builtin conversation corpus (question/answer dialogues about a fixed
   world, mixed with sentences) is learned twice; then every distinct question is asked
   (greedy, no learning) and the answer must match the taught one exactly. Repeated for
   several column sizes: busy units need one neuron per context they must keep apart.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402

ANIMALS = ["cat", "dog", "bird", "fox", "horse", "mouse", "cow", "duck", "frog", "bear", "lion", "goat", "owl", "pig"]
ADJS = ["little", "big", "old", "young", "happy", "sleepy", "brown", "white"]
VERBS = ["sat on", "slept on", "jumped on", "ran to", "looked at", "walked to", "hid under", "sang near"]
OBJECTS = ["mat", "bed", "box", "rug", "chair", "log", "wall", "step", "tree", "gate"]
SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        s = f"the {rng.choice(ADJS)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} the {rng.choice(OBJECTS)}."
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def accuracy(learner: ContinualLearner, texts: list[str]) -> float:
    correct = scored = 0
    for t in texts:
        c, s = learner.evaluate_text(t)
        correct, scored = correct + c, scored + s
    return correct / max(1, scored)


def oracle_accuracy(learner: ContinualLearner, texts: list[str], memory: list[str] | None = None) -> float:
    """Best accuracy any predictor can reach on ``texts`` with the learner's current units:
    a perfect high-order memory of ``memory`` (default: ``texts``) that predicts the most
    frequent continuation of the exact prefix (a tie between k continuations counts 1/k)."""
    from collections import Counter, defaultdict

    from memlm.models.hebbian.vocab import BOS_ID, EOS_ID

    def units(t):
        return [BOS_ID] + learner.vocab.encode(t) + [EOS_ID]

    nxt: dict[tuple, Counter] = defaultdict(Counter)
    for t in memory if memory is not None else texts:
        seq = units(t)
        for i in range(1, len(seq)):
            nxt[tuple(seq[:i])][seq[i]] += 1
    right = total = 0
    for t in texts:
        seq = units(t)
        for i in range(1, len(seq)):
            c = nxt[tuple(seq[:i])]
            if c and c[seq[i]] == max(c.values()):  # right, or one of several equally likely guesses
                right += 1.0 / sum(1 for v in c.values() if v == c[seq[i]])
            total += 1
    return right / max(1, total)


def learn_passes(learners: list[ContinualLearner], texts: list[str], passes: int, rng: random.Random) -> float:
    """Learn ``passes`` shuffled passes; returns the seconds spent by the first learner."""
    spent = 0.0
    for _ in range(passes):
        order = texts[:]
        rng.shuffle(order)
        for i, learner in enumerate(learners):
            t0 = time.perf_counter()
            for t in order:
                learner.learn_text(t)
            if i == 0:
                spent += time.perf_counter() - t0
    return spent


COLUMN_OVERRIDES: dict = {}


def make(first_order: bool, seed: int) -> ContinualLearner:
    if first_order:
        return ContinualLearner(LearnerConfig(seed=seed, neurons_per_column=1, k_winners=1, trace_len=1))
    return ContinualLearner(LearnerConfig(seed=seed, **COLUMN_OVERRIDES))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller run (< 2 minutes)")
    p.add_argument("--sentences", type=int, default=None, help="distinct sentences in the exposure curve")
    p.add_argument("--passes", type=int, default=None, help="exposures in the curve")
    p.add_argument("--exposures", type=int, default=5, help="passes per sentence in the forgetting test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neurons-per-column", type=int, default=None, help="override the column learner's column size")
    p.add_argument("--synapses-per-neuron", type=int, default=None, help="override the column learner's synapse slots")
    args = p.parse_args()
    if args.neurons_per_column:
        COLUMN_OVERRIDES["neurons_per_column"] = args.neurons_per_column
    if args.synapses_per_neuron:
        COLUMN_OVERRIDES["synapses_per_neuron"] = args.synapses_per_neuron
    n_curve = args.sentences or (40 if args.quick else 80)
    passes = args.passes or (6 if args.quick else 10)
    n_later = 100 if args.quick else 200
    text_lines = 1500 if args.quick else 6000

    # warm the JIT once so no timing includes compilation
    warm = make(False, 0)
    warm.learn_text("warm up the kernel.")
    warm.evaluate_text("warm up the kernel.")

    # 1. exposure curve
    rng = random.Random(args.seed)
    texts = sentences(n_curve, args.seed)
    col, fo = make(False, args.seed), make(True, args.seed)
    rows = [{"exposures": 0, "acc_column": accuracy(col, texts), "acc_first_order": accuracy(fo, texts)}]
    for e in range(1, passes + 1):
        learn_passes([col, fo], texts, 1, rng)
        rows.append({"exposures": e, "acc_column": accuracy(col, texts), "acc_first_order": accuracy(fo, texts),
                     "acc_oracle": oracle_accuracy(col, texts)})
    for r in rows:
        r["ratio"] = r["acc_column"] / r["acc_first_order"] if r["acc_first_order"] > 0 else float("nan")
    print(f"1. next-unit accuracy on held-out repetitions of {n_curve} sentences vs exposures")
    print_table(rows, ["exposures", "acc_column", "acc_first_order", "ratio", "acc_oracle"])
    print("   acc_oracle: a perfect memory of every sentence with the column learner's current units (the ceiling)")
    print(f"   column learner: vocab {len(col.vocab)}, neurons {col.net.n_neurons}, synapses {col.net.n_synapses()}")

    # 2. forgetting
    rng = random.Random(args.seed + 1)
    all_s = sentences(20 + n_later, args.seed + 1000)
    first, later = all_s[:20], all_s[20:]
    col2, fo2 = make(False, args.seed), make(True, args.seed)
    learn_passes([col2, fo2], first, args.exposures, rng)
    before = {"column": accuracy(col2, first), "first_order": accuracy(fo2, first)}
    units0 = col2.units_learned
    t_later = learn_passes([col2, fo2], later, args.exposures, rng)
    after = {"column": accuracy(col2, first), "first_order": accuracy(fo2, first)}
    later_acc = {"column": accuracy(col2, later), "first_order": accuracy(fo2, later)}
    ret_rows = [
        {"model": m, "acc_first20_before": before[m], "acc_first20_after": after[m],
         "retention": after[m] / before[m] if before[m] else float("nan"), f"acc_later{n_later}": later_acc[m]}
        for m in ("column", "first_order")
    ]
    oracle_before = oracle_accuracy(col2, first)
    oracle_after = oracle_accuracy(col2, first, memory=all_s)
    ret_rows.append({"model": "oracle (perfect memory)", "acc_first20_before": oracle_before,
                     "acc_first20_after": oracle_after, "retention": oracle_after / oracle_before,
                     f"acc_later{n_later}": oracle_accuracy(col2, later, memory=all_s)})
    print(f"\n2. forgetting: first 20 sentences before/after learning {n_later} more ({args.exposures} exposures each)")
    print_table(ret_rows)
    print("   oracle: the ceiling; its 'after' drops too because later sentences share prefixes with the first 20")
    speed_units = (col2.units_learned - units0) / t_later

    # 3. speed on real text
    speed_rows = [{"stream": f"{n_later} sentences x {args.exposures}", "units": col2.units_learned - units0,
                   "seconds": t_later, "units_per_sec": speed_units, "online_acc": float("nan")}]
    figures_text = {}
    if SHAKESPEARE.is_file():
        lines = [ln.strip() for ln in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if ln.strip()][:text_lines]
        ts = make(False, args.seed)
        t0 = time.perf_counter()
        for ln in lines:
            ts.learn_text(ln)
        dt = time.perf_counter() - t0
        chars = sum(len(ln) for ln in lines)
        st = ts.stats()
        speed_rows.append({"stream": f"tinyshakespeare {len(lines)} lines", "units": st["units_learned"],
                           "seconds": dt, "units_per_sec": st["units_learned"] / dt, "online_acc": st["online_accuracy"]})
        figures_text = {"shakespeare_units_per_sec": st["units_learned"] / dt, "shakespeare_chars_per_sec": chars / dt,
                        "shakespeare_online_acc": st["online_accuracy"], "shakespeare_vocab": st["vocab_size"],
                        "shakespeare_synapses": st["synapses"]}
    print("\n3. learning speed (column learner, one process, 1 thread of Python + numba kernel)")
    print_table(speed_rows)

    # 4. dialogue recall vs column size
    from memlm.datamodules.conversation import TURN_SEPARATOR, builtin_items

    items = builtin_items(2000 if args.quick else 4000, args.seed)
    qa: dict[str, set] = {}
    for x in items:
        if TURN_SEPARATOR in x:
            q, a = x.split(TURN_SEPARATOR)
            qa.setdefault(q, set()).add(a)
    qa_rows = []
    for c in ([16, 64] if args.quick else [16, 32, 64, 128]):
        learner = ContinualLearner(LearnerConfig(seed=args.seed, neurons_per_column=c))
        t0 = time.perf_counter()
        for _ in range(2):
            for x in items:
                learner.learn_text(x)
        dt = time.perf_counter() - t0
        right = sum(learner.respond(q, temperature=0) in a for q, a in qa.items())
        qa_rows.append({"neurons_per_column": c, "exact_answers": f"{right}/{len(qa)}", "answer_acc": right / len(qa),
                        "online_acc": learner.stats()["online_accuracy"], "neurons": learner.net.n_neurons,
                        "learn_seconds": dt})
    print(f"\n4. dialogue recall: {len(items)} builtin items x 2 passes, then every distinct question (greedy)")
    print_table(qa_rows)

    figures = {
        "acc_exposure_1": rows[1]["acc_column"],
        "acc_exposure_3": rows[min(3, passes)]["acc_column"],
        f"acc_exposure_{passes}": rows[-1]["acc_column"],
        "first_order_acc_exposure_1": rows[1]["acc_first_order"],
        f"first_order_acc_exposure_{passes}": rows[-1]["acc_first_order"],
        f"ratio_exposure_{passes}": rows[-1]["ratio"],
        f"oracle_acc_exposure_{passes}": rows[-1]["acc_oracle"],
        "curve_column": [round(r["acc_column"], 4) for r in rows],
        "curve_first_order": [round(r["acc_first_order"], 4) for r in rows],
        "first20_acc_before": before["column"],
        "first20_acc_after": after["column"],
        "retention": ret_rows[0]["retention"],
        "first_order_retention": ret_rows[1]["retention"],
        "oracle_first20_before": oracle_before,
        "oracle_first20_after": oracle_after,
        "units_per_sec": speed_units,
        **figures_text,
        **{f"answer_acc_c{r['neurons_per_column']}": r["answer_acc"] for r in qa_rows},
    }
    settings = {"quick": args.quick, "sentences": n_curve, "passes": passes, "exposures": args.exposures,
                "later": n_later, "seed": args.seed, "text_lines": text_lines,
                "config": {"LearnerConfig() defaults": True, **COLUMN_OVERRIDES}}
    print_result(figures, settings)
    return 0


if __name__ == "__main__":
    run_main(main)
