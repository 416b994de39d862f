"""TBPTT through Lightning: state carried across chunks is used for recall, checkpoints hold it,
resume continues exactly, DDP ranks keep their own streams."""
import lightning as L
import numpy as np
import torch

from memlm.callbacks.tbptt import TBPTT
from memlm.datamodules.recall import RecallDataModule
from memlm.lightning_modules.hamt.module import HAMTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig

QUERY, MARK = 1, 2  # token ids of the tiny cross-chunk task
FILL = list(range(3, 8))
VALUES = list(range(8, 16))
CHUNK, N_CHUNKS = 8, 3


def cross_chunk_batches(n_groups: int, batch: int, seed: int):
    """Chunk 1 holds MARK v at a random place, chunk 2 is filler, chunk 3 ends with QUERY -> target v."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_groups):
        x = rng.choice(FILL, size=(batch, CHUNK * N_CHUNKS))
        v = rng.choice(VALUES, size=batch)
        p = rng.integers(0, CHUNK - 1, size=batch)
        x[np.arange(batch), p] = MARK
        x[np.arange(batch), p + 1] = v
        x[:, -1] = QUERY
        y = np.full_like(x, -100)
        y[:, -1] = v
        for c in range(N_CHUNKS):
            sl = slice(c * CHUNK, (c + 1) * CHUNK)
            out.append({"input_ids": torch.from_numpy(x[:, sl].copy()), "targets": torch.from_numpy(y[:, sl].copy()),
                        "stream": True, "first": c == 0})
    return out


class _Batches:
    """A plain iterable of ready batches (Lightning would read a bare list as several dataloaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _ListData(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return _Batches(self.batches)


def _tiny(learning_rate: float = 1e-2, **kw):
    args = dict(vocab_size=16, n_layer=1, n_embd=32, n_slots=2, tau_min=8.0, tau_max=256.0,
                optimizer=OptimizerConfig(learning_rate=learning_rate, warmup_steps=10, weight_decay=0.0))
    args.update(kw)
    return HAMTLanguageModel(**args)


def _trainer(tmp_path, max_steps, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     gradient_clip_val=1.0, **kw)


def test_key_in_chunk_1_is_recalled_in_chunk_3(tmp_path):
    L.seed_everything(0)
    model = _tiny()
    trainer = _trainer(tmp_path, max_steps=390)
    trainer.fit(model, _ListData(cross_chunk_batches(130, 32, seed=1)))
    assert any(isinstance(cb, TBPTT) for cb in trainer.callbacks)  # added by the module
    model.eval()
    test = cross_chunk_batches(4, 64, seed=99)
    carried, reset, total = 0, 0, 0
    with torch.no_grad():
        for g in range(4):
            chunks = test[g * N_CHUNKS:(g + 1) * N_CHUNKS]
            state = None
            for c in chunks:
                out = model(c["input_ids"], state)
                state = out.state
            target = chunks[-1]["targets"][:, -1]
            carried += int((out.logits[:, -1].argmax(-1) == target).sum())
            fresh = model(chunks[-1]["input_ids"], None).logits[:, -1].argmax(-1)  # chunk 3 without the state
            reset += int((fresh == target).sum())
            total += len(target)
    acc_carried, acc_reset = carried / total, reset / total
    assert acc_carried > 0.8, (acc_carried, acc_reset)
    assert acc_reset < 0.35, (acc_carried, acc_reset)  # chance is 1/8


def _mqar_dm(**kw):
    args = dict(task="mqar", seq_len=24, eval_lengths=[24, 48], num_kv_pairs=2, num_keys=8, num_values=8,
                num_train=64, num_val=16, batch_size=8, stream_chunk=8, seed=3)
    args.update(kw)
    return RecallDataModule(**args)


def test_resume_with_carried_state_continues_the_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_in=None, ckpt_dir=None, save_state=True):
        L.seed_everything(0)
        model = _tiny(vocab_size=_mqar_dm().vocab_size, learning_rate=3e-3)
        cbs = [TBPTT(save_state=save_state)]
        if ckpt_dir:  # written during training after 4 steps, as a run's periodic checkpoint would be
            cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="mid", every_n_train_steps=4, save_top_k=-1))
        trainer = _trainer(tmp_path, max_steps, callbacks=cbs, limit_val_batches=0, enable_checkpointing=bool(ckpt_dir))
        trainer.fit(model, _mqar_dm(), ckpt_path=ckpt_in)
        return model

    full = run(7)
    half = run(4, ckpt_dir=tmp_path / "a")  # 4 chunks of 3-chunk streams: stops mid-stream
    ckpt = tmp_path / "a" / "mid.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["tbptt"]
    assert saved["has_state"] and saved["world_size"] == 1
    assert torch.equal(saved["tensors"]["layers.0.M"][0], half.carried_state["layers"][0]["M"])
    assert int(saved["tensors"]["pos"][0]) == 8  # one chunk into the second group of streams
    resumed = run(7, ckpt_in=str(ckpt))
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    # without the saved state the resumed run diverges from the uninterrupted one
    run(4, ckpt_dir=tmp_path / "b", save_state=False)
    other = run(7, ckpt_in=str(tmp_path / "b" / "mid.ckpt"))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(full.parameters(), other.parameters()))


def test_tbptt_resets_on_first_chunk_and_without_streams():
    cb = TBPTT()
    model = _tiny()
    model.carried_state = {"x": torch.zeros(2, 3)}
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "stream": True, "first": False}
    cb.on_train_batch_start(None, model, batch, 0)
    assert model.carried_state is not None  # continuing stream: keep
    cb.on_train_batch_start(None, model, {**batch, "input_ids": torch.zeros(3, 4, dtype=torch.long)}, 0)
    assert model.carried_state is None  # batch size changed: reset
    model.carried_state = {"x": torch.zeros(2, 3)}
    cb.on_train_batch_start(None, model, {**batch, "first": True}, 0)
    assert model.carried_state is None
    model.carried_state = {"x": torch.zeros(2, 3)}
    cb.on_train_batch_start(None, model, {"input_ids": batch["input_ids"]}, 0)  # random windows
    assert model.carried_state is None
    model.carried_state = {"x": torch.zeros(2, 3)}
    TBPTT(carry=False).on_train_batch_start(None, model, batch, 0)
    assert model.carried_state is None


def test_gradient_accumulation_carries_state_across_micro_batches(tmp_path):
    L.seed_everything(0)
    dm = _mqar_dm()
    model = _tiny(vocab_size=dm.vocab_size)
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            st = pl_module.carried_state
            seen.append((bool(batch["first"]), None if st is None else int(st["pos"])))

    trainer = _trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[Watch()], limit_val_batches=0)
    trainer.fit(model, dm)
    # Watch runs before TBPTT's reset (model callbacks come last); after each non-first chunk the
    # carried position is the stream position, i.e. state flows through every micro-batch
    assert seen[:6] == [(True, None), (False, 8), (False, 16), (True, 24), (False, 8), (False, 16)]


def test_ddp_ranks_carry_and_save_their_own_streams(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    dm = _mqar_dm()
    model = _tiny(vocab_size=dm.vocab_size)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=2)
    # ddp_fork: two real gloo ranks without re-importing everything in spawned processes
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ck], limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, dm)
    raw = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
    saved = raw["tbptt"]
    assert saved["world_size"] == 2 and saved["has_state"]
    m = saved["tensors"]["layers.0.M"]
    assert m.shape[0] == 2 and not torch.allclose(m[0], m[1])  # each rank's own streams
    # the datamodule shards by rank: different training sequences per rank
    a = dm.make(np.random.default_rng([dm.seed, 1, 0, 0]), 4, 24)[0]
    b = dm.make(np.random.default_rng([dm.seed, 1, 0, 1]), 4, 24)[0]
    assert not np.array_equal(a, b)


def test_per_row_reset_mask_reinitialises_only_those_rows():
    cb = TBPTT()
    model = _tiny().eval()
    x = torch.randint(0, 16, (3, 8))
    with torch.no_grad():
        state = model(x).state
    batch = {"input_ids": x, "stream": True, "first": False}
    model.carried_state = state
    cb.on_train_batch_start(None, model, {**batch, "reset": torch.tensor([False, False, False])}, 0)
    assert model.carried_state is state and cb.resets == 0
    cb.on_train_batch_start(None, model, {**batch, "reset": torch.tensor([False, True, False])}, 0)
    m_new, m_old = model.carried_state["layers"][0]["M"], state["layers"][0]["M"]
    assert torch.equal(m_new[[0, 2]], m_old[[0, 2]]) and not m_new[1].any() and m_old[1].abs().sum() > 0
    assert cb.resets == 0  # a row reset keeps the other streams: not a reset of the state
    cb.on_train_batch_start(None, model, {**batch, "reset": torch.tensor([True, True, True])}, 0)
    assert model.carried_state is None and cb.resets == 1
