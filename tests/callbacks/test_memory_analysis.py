"""MemoryAnalysis: per-layer statistics over training, PNGs in the run dir, images in the logger."""
import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from memlm.callbacks.memory_analysis import MemoryAnalysis
from memlm.datamodules.recall import RecallDataModule
from memlm.lightning_modules.hamt.module import HAMTLanguageModel


def test_memory_analysis_writes_pngs_and_logs_images(tmp_path):
    L.seed_everything(0)
    dm = RecallDataModule(task="mqar", seq_len=24, eval_lengths=[24], num_kv_pairs=2, num_keys=8, num_values=8,
                          num_train=32, num_val=8, batch_size=8, stream_chunk=8)
    model = HAMTLanguageModel(vocab_size=dm.vocab_size, n_layer=2, n_embd=16, n_slots=3, learning_rate=3e-3)
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
