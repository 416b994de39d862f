"""Mixed precision for every gradient-trained architecture (transformer, HMST, HAMT).

A few Lightning training steps on a learnable periodic stream: the loss is finite and falls,
the weights stay fp32 (autocast only lowers the matmuls), and the carried recurrent state of
HAMT and HMST stays fp32 whatever precision the step ran in. ``bf16-mixed`` runs on CPU;
``16-mixed`` needs CUDA (Lightning's fp16 autocast and GradScaler are GPU-only).
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from memlm.lightning_modules.hamt.module import HAMTLanguageModel
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig
from memlm.lightning_modules.transformer import TransformerLM

STEPS, T, V = 6, 16, 64
OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=1)


def build(arch: str):
    torch.manual_seed(0)
    if arch == "transformer":
        return TransformerLM(V, block_size=T, n_layer=1, n_head=2, n_embd=32, optimizer=OPT)
    if arch == "hamt":
        return HAMTLanguageModel(V, n_layer=1, n_embd=32, n_slots=4, scan_chunk=8, optimizer=OPT)
    return HMSTLanguageModel(vocab_size=V, block_size=T, n_layer=2, n_head=2, d_model=32, d_ff=32, n_experts=4, top_k=2,
                             exit_layer=1, ssm_d_state=4, ssm_expand=1, mem_top_k=2, episodic_capacity=16,
                             controller_hidden=16, critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=32,
                             optimizer=OPT)


def stream():
    period = torch.tensor([5, 9, 2, 7, 11, 3, 8])  # a short cycle: learnable in a few steps
    data = period.repeat(2, STEPS * T // 7 + 2)[:, : STEPS * T + 1]
    data[1] = data[1] + 20
    return [{"input_ids": data[:, T * k:T * k + T], "targets": data[:, T * k + 1:T * k + T + 1],
             "stream": True, "first": k == 0} for k in range(STEPS)]


class Record(L.Callback):
    def __init__(self):
        self.losses, self.state_dtypes = [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        state = getattr(pl_module, "carried_state", None)
        if state is not None:
            self.state_dtypes |= {t.dtype for t in pl_module.state_to_dict(state).values() if t.is_floating_point()}


def run(arch: str, precision: str, accelerator: str = "cpu") -> tuple[L.LightningModule, Record]:
    module, rec = build(arch), Record()
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[rec])
    trainer.fit(module, train_dataloaders=DataLoader(stream(), batch_size=None))
    return module, rec


def check(arch: str, module, rec: Record) -> None:
    assert len(rec.losses) == STEPS and all(torch.isfinite(torch.tensor(rec.losses)))
    assert rec.losses[-1] < rec.losses[0], rec.losses
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    if arch != "transformer":  # stateful: the carried state was seen and stayed fp32
        assert rec.state_dtypes == {torch.float32}, rec.state_dtypes


@pytest.mark.parametrize("arch", ["transformer", "hamt", "hmst"])
def test_bf16_mixed_trains_and_keeps_state_fp32(arch):
    module, rec = run(arch, "bf16-mixed")
    check(arch, module, rec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed (fp16 autocast + GradScaler) needs a CUDA device")
@pytest.mark.parametrize("arch", ["transformer", "hamt", "hmst"])
def test_fp16_mixed_trains_on_cuda(arch):
    module, rec = run(arch, "16-mixed", accelerator="gpu")
    check(arch, module, rec)
