"""Lightning integration: online fit from the conversation datamodule, exact checkpoint round trip,
the generic checkpoint loader, the generate() protocol, and the train.py CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from memlm.core.sampling import SamplingParams
from memlm.datamodules.conversation import ConversationDataModule
from memlm.lightning_modules.hebbian.module import HebbianLanguageModel, HebbianTokenizer
from memlm.models.hebbian.vocab import BOS_ID, EOS_ID
from memlm.checkpoint import load_module

ROOT = Path(__file__).resolve().parents[2]


def _jsonl(tmp_path: Path, reps: int = 12) -> Path:
    rows = []
    for _ in range(reps):
        rows.append({"user": "what does the cat eat?", "assistant": "the cat eats fish."})
        rows.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                                  {"role": "assistant", "content": "hi there!"}]})
        rows.append({"text": "the cat sat on the mat"})
    path = tmp_path / "dialogues.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kw,
    )



def _sampled_from_top_k(net, prompt: list[int], units, k: int) -> list[bool]:
    """Replay ``<bos> + prompt + units`` (learning off): was each unit among the k best-scored
    predicted units (score >= threshold) at its step?"""
    snap = net.snapshot()
    net.reset()
    try:
        net.feed([BOS_ID] + list(prompt), learn=False)
        verdicts = []
        for u in units:
            scores = net.unit_scores()
            predicted = torch.nonzero(scores >= net.threshold).flatten()
            best = predicted[scores[predicted].argsort(descending=True)[:k]].tolist()
            # generate() feeds a first <eos> silently; the replay assumes the prompt does not end there
            assert verdicts or EOS_ID not in best, "the prompt looks complete: replay it with another prompt"
            verdicts.append(u in best)
            net.step(u, learn=False)
        return verdicts
    finally:
        net.restore(snap)


class _RecordBatches(L.Callback):
    """Keeps every training batch a fit really learned from."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(list(batch))

def test_fit_learns_online_and_checkpoint_round_trips(tmp_path):
    dm = ConversationDataModule(source=str(_jsonl(tmp_path)), batch_size=4, val_fraction=0.1)
    model = HebbianLanguageModel(vocab_size=dm.vocab_size, seed=0, temperature=0.0)
    assert model.automatic_optimization is False and model.configure_optimizers() is None
    trainer = _trainer(tmp_path, max_epochs=1, val_check_interval=4)
    trainer.fit(model, datamodule=dm)
    m = trainer.callback_metrics
    assert float(m["train/synapses"]) > 0 and float(m["train/vocab_size"]) > 128
    assert float(m["val/acc"]) > 0.5 and torch.isfinite(m["val/bpb"])
    assert model.learner.utterances == len(dm.split("train")) * 2 - len(
        [x for x in dm.split("train") if "\x1e" not in x])  # dialogues have two turns
    assert model.respond("what does the cat eat?", learn=False) == "the cat eats fish."

    ckpt = tmp_path / "hebbian.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["memlm"]["class_path"] == "memlm.lightning_modules.hebbian.module.HebbianLanguageModel"
    assert "hebbian_state" in raw and isinstance(raw["hebbian_state"]["vocab"], str)

    loaded = load_module(ckpt)
    assert isinstance(loaded, HebbianLanguageModel) and isinstance(loaded.tokenizer, HebbianTokenizer)
    a, b = model.learner.state_dict(), loaded.learner.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    # the chat protocol on unit ids
    tok = loaded.tokenizer
    ids = tok.encode("the cat sat on the")
    out = list(loaded.generate(ids, SamplingParams(10, temperature=0.0, eos_id=tok.eos_id)))
    assert tok.decode(out).strip() == "mat" and out[-1] == EOS_ID
    assert len(tok.token_bytes()) == tok.vocab_size
    q = tok.encode("what does the cat eat?")  # a complete prompt: generate() answers it
    assert tok.decode(list(loaded.generate(q, SamplingParams(20, temperature=0.0)))).strip() == "the cat eats fish."
    sampled = list(loaded.generate(ids, SamplingParams(10, temperature=0.8, top_k=2),
                                   generator=torch.Generator().manual_seed(0)))
    assert 1 <= len(sampled) <= 10
    # a seed in the params gives the same units as a generator seeded with it
    assert list(loaded.generate(ids, SamplingParams(10, temperature=0.8, top_k=2, seed=0))) == sampled
    # top_k=2 at a high temperature: every unit is one of the 2 strongest predictions at its step,
    # and the sampling really is random among them (different seeds, different continuations)
    prompt = tok.encode("the")
    runs = {tuple(loaded.generate(prompt, SamplingParams(8, temperature=5.0, top_k=2, seed=s))) for s in range(8)}
    assert len(runs) > 1, runs
    for run in runs:
        assert all(top_two for top_two in _sampled_from_top_k(loaded.learner.net, prompt, run, 2)), run
    # generation does not learn
    assert torch.equal(loaded.learner.net.weights, model.learner.net.weights)


def test_resume_restores_the_learner_exactly(tmp_path):
    dm = ConversationDataModule(source="builtin", builtin_items=120, batch_size=8, val_fraction=0.1)
    model = HebbianLanguageModel(vocab_size=dm.vocab_size, seed=3)
    trainer = _trainer(tmp_path, max_steps=5)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = model.learner.state_dict()

    resumed = HebbianLanguageModel(vocab_size=dm.vocab_size, seed=3)
    resumed.on_load_checkpoint(torch.load(ckpt, weights_only=True))
    for k, v in saved.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed.learner.state_dict()[k]), k
    # both continue identically on the same data
    batch = dm.split("train")[40:48]
    model.learner.net.reset()
    resumed.learner.net.reset()
    model(batch)
    resumed(batch)
    assert torch.equal(model.learner.net.weights, resumed.learner.net.weights)
    # fit can resume from the checkpoint file
    seen = _RecordBatches()
    trainer2 = _trainer(tmp_path, max_steps=8, callbacks=[seen])
    fresh = HebbianLanguageModel(vocab_size=dm.vocab_size, seed=3)
    trainer2.fit(fresh, datamodule=dm, ckpt_path=str(ckpt))
    assert fresh.learner.utterances > model.learner.utterances - len(batch)
    # the resumed fit = the checkpoint's learner + exactly the 3 batches of steps 6..8, nothing relearned from zero
    assert trainer2.global_step == 8 and len(seen.batches) == 3
    replay = HebbianLanguageModel(vocab_size=dm.vocab_size, seed=3)
    replay.on_load_checkpoint(torch.load(ckpt, weights_only=True))
    for texts in seen.batches:
        replay(texts)
    assert fresh.learner.utterances == replay.learner.utterances > int(saved["counters"][2])
    got, want = fresh.learner.net.state_tensors(), replay.learner.net.state_tensors()
    for k in got:
        if k != "abs_change":
            assert torch.equal(got[k], want[k]), k
    assert fresh.learner.vocab.to_json() == replay.learner.vocab.to_json()


def test_vocab_size_from_the_datamodule_caps_the_vocabulary():
    model = HebbianLanguageModel(vocab_size=150, max_vocab_size=4096)
    assert model.learner.vocab.max_vocab_size == 150


@pytest.mark.slow
def test_train_py_fit_with_the_micro_config(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", MEMLM_QUIET="1")
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/hebbian_micro.yaml",
           "--data.init_args.builtin_items=160", "--trainer.max_epochs=1", "--trainer.val_check_interval=10",
           "--run.root", str(tmp_path / "runs"), "--run.logger", "[csv]"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "hebbian_micro" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = (run / "metrics.csv").read_text()
    for key in ("train/acc", "train/vocab_size", "train/neurons", "train/synapses", "val/acc"):
        assert key in metrics
    loaded = load_module(run / "checkpoints" / "last.ckpt")
    assert loaded.learner.utterances > 100
