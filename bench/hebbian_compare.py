"""The Hebbian learner's research comparisons, all on the same sentence stream:

    python bench/hebbian_compare.py [--quick]

1. rate vs LIF neurons (``neuron_model``), with the learned vocabulary;
2. the learned vocabulary vs a fixed character vocabulary (no merges) vs a fixed BPE-style
   vocabulary (pair merges learned on the whole stream first, then frozen), rate neurons;
3. Hebbian vs a gradient-trained character GRU with about as many parameters as the rate
   network's used synapses, trained online: one Adam step per utterance, as it arrives.

Exposure curve: the stream is presented in passes (a new shuffled order each, learning on);
after pass e every sentence is scored with learning off: next-unit accuracy (next-character
accuracy for the GRU and the char vocabulary; units differ between vocabularies, so compare
the char rows with the GRU). Reported after 1, 2, 5 and 10 exposures.
Retention: learn the first 20 sentences for 5 passes, score them, learn 10x as many new
sentences for 5 passes, score the first 20 again: retention = after / before; ``*_remap``
rows keep the utterances and re-learn those a new merge re-segments (``replay_memory``).
Speed: units learned per second by the LIF network during the retention phase.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hebbian_learning import sentences  # noqa: E402

from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402
from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig  # noqa: E402

EXPOSURES = (1, 2, 5, 10)
NET = dict(neurons_per_column=16, synapses_per_neuron=32, seed=0, calibrate_every=0)


def hebbian(kind: str, stream: list[str]) -> ContinualLearner:
    if kind == "lif":
        return ContinualLearner(LearnerConfig(neuron_model="lif", **NET))
    if kind == "char":
        return ContinualLearner(LearnerConfig(merge_threshold=10**9, **NET))
    learner = ContinualLearner(LearnerConfig(**NET))
    if kind == "bpe":  # merges learned on the whole stream first, then frozen
        for _ in range(3):
            for t in stream:
                learner.vocab.observe(t)
        learner.vocab.merge_threshold = 10**9
        learner.net.grow(learner.vocab.id_space)
    return learner


class CharGRU(nn.Module):
    def __init__(self, hidden: int, n_chars: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_chars, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, n_chars)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(self.emb(ids))[0])


class OnlineGRU:
    """A char GRU trained online: one Adam step on each utterance as it arrives."""

    def __init__(self, n_params: int, lr: float = 3e-3) -> None:
        hidden = 8
        while sum(p.numel() for p in CharGRU(hidden + 8).parameters()) <= n_params:
            hidden += 8
        torch.manual_seed(0)
        self.model = CharGRU(hidden)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)

    @staticmethod
    def ids(text: str) -> torch.Tensor:
        return torch.tensor([[2] + [min(127, ord(c)) for c in text] + [0]])

    def learn_text(self, text: str) -> None:
        x = self.ids(text)
        loss = nn.functional.cross_entropy(self.model(x[:, :-1])[0], x[0, 1:])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate_text(self, text: str) -> tuple[int, int]:
        x = self.ids(text)
        pred = self.model(x[:, :-1])[0].argmax(-1)
        return int((pred == x[0, 1:]).sum()), x.shape[1] - 1


def accuracy(model, texts: list[str]) -> float:
    correct = scored = 0
    for t in texts:
        c, s = model.evaluate_text(t)
        correct, scored = correct + c, scored + s
    return correct / max(1, scored)


def exposure_curve(model, stream: list[str], rng: random.Random) -> dict[int, float]:
    curve = {}
    for e in range(1, max(EXPOSURES) + 1):
        order = stream[:]
        rng.shuffle(order)
        for t in order:
            model.learn_text(t)
        if e in EXPOSURES:
            curve[e] = accuracy(model, stream)
    return curve


def retention(model, early: list[str], later: list[str], passes: int = 5) -> tuple[float, float, float]:
    """(before, after, units learned per second during the later phase)."""
    rng = random.Random(1)
    for _ in range(passes):
        for t in rng.sample(early, len(early)):
            model.learn_text(t)
    before = accuracy(model, early)
    units0 = getattr(model, "units_learned", 0)
    t0 = time.perf_counter()
    for _ in range(passes):
        for t in rng.sample(later, len(later)):
            model.learn_text(t)
    dt = time.perf_counter() - t0
    speed = (getattr(model, "units_learned", 0) - units0) / dt
    return before, accuracy(model, early), speed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller stream (a few minutes on 2 busy cores)")
    p.add_argument("--num-threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.num_threads)
    n_stream = 30 if args.quick else 60
    n_early, n_later = 20, 200
    stream = sentences(n_stream, seed=11)
    rows, figures, models = [], {}, {}
    for kind in ("rate", "lif", "char", "bpe"):
        models[kind] = hebbian(kind, stream)
        curve = exposure_curve(models[kind], stream, random.Random(0))
        rows.append({"model": f"hebbian {kind}" + (" (learned vocab)" if kind in ("rate", "lif") else " vocab"),
                     **{f"acc@{e}": round(curve[e], 3) for e in EXPOSURES},
                     "synapses / params": models[kind].net.n_synapses()})
        figures.update({f"acc_after_{e}_{kind}": round(curve[e], 4) for e in EXPOSURES})
    gru = OnlineGRU(models["char"].net.n_synapses())
    curve = exposure_curve(gru, stream, random.Random(0))
    rows.append({"model": "gradient char GRU, online", **{f"acc@{e}": round(curve[e], 3) for e in EXPOSURES},
                 "synapses / params": gru.params})
    figures.update({f"acc_after_{e}_gradient": round(curve[e], 4) for e in EXPOSURES})
    print_table(rows)

    all_s = sentences(n_early + n_later, seed=23)
    early, later = all_s[:n_early], all_s[n_early:]
    ret_rows = []
    remap = dict(replay_memory=2000, replay_per_merge=8)
    for kind, model in (("rate", hebbian("rate", [])), ("lif", hebbian("lif", [])),
                        ("rate_remap", ContinualLearner(LearnerConfig(**NET, **remap))),
                        ("lif_remap", ContinualLearner(LearnerConfig(neuron_model="lif", **NET, **remap))),
                        ("gradient", OnlineGRU(models["char"].net.n_synapses()))):
        before, after, speed = retention(model, early, later)
        figures[f"retention_{kind}"] = round(after / max(before, 1e-9), 4)
        if kind == "lif":
            figures["units_per_sec_lif"] = round(speed, 1)
        if kind == "rate":
            figures["units_per_sec_rate"] = round(speed, 1)
        ret_rows.append({"model": kind, "acc early (before)": round(before, 3), "after 10x more": round(after, 3),
                         "retention": round(after / max(before, 1e-9), 3),
                         "units/s": round(speed) if kind != "gradient" else "-"})
    print_table(ret_rows)
    print_result(figures, {"quick": args.quick, "stream": n_stream, "early": n_early, "later": n_later,
                           "retention_passes": 5, "network": NET})
    return 0


if __name__ == "__main__":
    run_main(main)
