"""MemoryAnalysis: per-layer statistics over training, PNGs in the run dir, images in the logger."""
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from memlm.callbacks.memory_analysis import MemoryAnalysis
from memlm.datamodules.recall import RecallDataModule
from memlm.lightning_modules.hamt.module import HAMTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig


def test_memory_analysis_writes_pngs_and_logs_images(tmp_path):
    L.seed_everything(0)
    dm = RecallDataModule(task="mqar", seq_len=24, eval_lengths=[24], num_kv_pairs=2, num_keys=8, num_values=8,
                          num_train=32, num_val=8, batch_size=8, stream_chunk=8)
    model = HAMTLanguageModel(vocab_size=dm.vocab_size, n_layer=2, n_embd=16, n_slots=3,
                              optimizer=OptimizerConfig(learning_rate=3e-3))
    ma = MemoryAnalysis(every_n_steps=1, plot_every_n_steps=2)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ma], limit_val_batches=0,
                        default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(model, dm)
    assert [h["step"] for h in ma.history] == [0, 1, 2, 3]
    for h in ma.history:
        assert len(h["layers"]) == 2
        for s in h["layers"]:
            assert s["slot_norm"].shape == (3,) and s["gate_slot"].shape == (3,)
            assert -1.0 <= s["fidelity"] <= 1.0 and 0.0 < s["utilisation"] <= 1.0 + 1e-6
            assert ((0 < s["decay"]) & (s["decay"] < 1)).all()
    out = tmp_path / "memory_analysis"
    for name in ("slot_norms.png", "gates.png", "utilisation_fidelity_gates.png"):
        assert (out / name).stat().st_size > 1000
    assert not model.model.collect_stats  # statistics are collected only on analysed steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0})
    ea.Reload()
    assert "memory_analysis/slot_norms" in ea.Tags()["images"]
    assert any(t.startswith("mem/L1/fidelity") for t in ea.Tags()["scalars"])
    # the stored items really come back: far above the ~0 cosine of unrelated vectors
    assert all(s["fidelity"] > 0.2 for h in ma.history for s in h["layers"])
    # the logged scalars are the analysed values, step by step
    tag = next(t for t in ea.Tags()["scalars"] if t.startswith("mem/L1/fidelity"))
    logged = {e.step: e.value for e in ea.Scalars(tag)}
    assert logged == pytest.approx({h["step"]: h["layers"][1]["fidelity"] for h in ma.history}, abs=1e-6)
    # and an analysed step summarises the model's own statistics of that step
    model.model.collect_stats = True
    out = model.model(next(iter(dm.train_dataloader()))["input_ids"])
    model.model.collect_stats = False
    layers = [MemoryAnalysis._summarise(s) for s in model.model.last_stats]
    assert np.mean([s["fidelity"] for s in layers]) == pytest.approx(float(out.metrics["fidelity"]), abs=1e-5)
    assert np.mean([s["gate_mean"] for s in layers]) == pytest.approx(float(out.metrics["gate_mean"]), abs=1e-4)


def _stats(read_weights, gates, fidelity=0.5):
    S = len(read_weights)
    return {"read_weight_slot": torch.tensor(read_weights), "gate_mean_slot": torch.tensor(gates),
            "gate_hist": torch.tensor(gates), "slot_norm": torch.arange(1.0, S + 1), "decay": torch.full((S,), 0.9),
            "fidelity": torch.tensor(fidelity)}


def test_summary_measures_slot_use_and_gates():
    even = MemoryAnalysis._summarise(_stats([0.25] * 4, [0.05, 0.2, 0.3, 0.5], fidelity=0.8))
    assert even["utilisation"] == pytest.approx(1.0)  # reads spread over every slot
    assert even["write_util"] == pytest.approx(0.75)  # 3 of 4 slots written with gate > 0.1
    assert even["gate_mean"] == pytest.approx(0.2625) and even["gate_std"] == pytest.approx(np.std([0.05, 0.2, 0.3, 0.5], ddof=1))
    assert even["fidelity"] == pytest.approx(0.8) and even["slot_norm_mean"] == pytest.approx(2.5)
    one = MemoryAnalysis._summarise(_stats([1.0, 0.0, 0.0, 0.0], [0.0] * 4))
    assert one["utilisation"] == pytest.approx(0.25, abs=1e-6)  # a single slot carries all reads
    assert one["write_util"] == 0.0
    two = MemoryAnalysis._summarise(_stats([3.0, 3.0, 0.0, 0.0], [0.0] * 4))  # unnormalised weights
    assert two["utilisation"] == pytest.approx(0.5, abs=1e-6)
    assert np.isnan(MemoryAnalysis._summarise({k: v for k, v in _stats([1.0], [0.5]).items() if k != "fidelity"})["fidelity"])
