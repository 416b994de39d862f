"""Baseline GPT and the LanguageModel base: KV cache, generation, metrics, optimiser, guards."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from memlm.core.tokenizer import build_tokenizer
from memlm.core.sampling import SamplingParams, sample_next
from memlm.lightning_modules.language_model import LanguageModel, ModelOutput, OptimizerConfig
from memlm.lightning_modules.transformer import TransformerLM
from memlm.models.transformer import KVCache, apply_rope, rope_cache
from memlm.core.errors import MemLMError

V = 61


@pytest.fixture(scope="module")
def lm() -> TransformerLM:
    torch.manual_seed(0)
    m = TransformerLM(vocab_size=V, block_size=24, n_layer=2, n_head=2, n_embd=32)
    with torch.no_grad():  # make the distribution peaky enough for sampling to matter
        m.model.wte.weight.mul_(5)
    return m.eval()


def test_kv_cache_matches_full_forward(lm):
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    full = lm(ids).logits
    cache = lm.init_generation_state()
    parts = [lm(ids[:, :7], state=cache).logits]  # prefill
    for t in range(7, 12):  # one token at a time
        parts.append(lm(ids[:, t : t + 1], state=cache).logits)
    parts.append(lm(ids[:, 12:], state=cache).logits)  # several new tokens against a cached prefix
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_cache_overflow_is_a_clear_error(lm):
    cache = lm.init_generation_state()
    lm(torch.zeros(1, 20, dtype=torch.long), state=cache)
    with pytest.raises(MemLMError, match="exceeds the model's block_size 24"):
        lm(torch.zeros(1, 5, dtype=torch.long), state=cache)
    with pytest.raises(MemLMError, match="block_size"):
        lm(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=5),
        dict(temperature=1.2, top_p=0.9),
    ],
)
def test_generation_with_and_without_cache_is_identical(lm, kw):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    # 30 new tokens from an 8-token prompt runs past block_size 24: the cache must re-prefill
    cached, uncached = SamplingParams(30, use_cache=True, **kw), SamplingParams(30, use_cache=False, **kw)
    with_cache = list(lm.generate(prompt, cached, generator=torch.Generator().manual_seed(7)))
    without = list(lm.generate(prompt, uncached, generator=torch.Generator().manual_seed(7)))
    assert len(with_cache) == 30 and with_cache == without
    if kw["temperature"] > 0:  # sampling really samples: another seed gives another text
        other = list(lm.generate(prompt, cached, generator=torch.Generator().manual_seed(8)))
        assert other != with_cache
        # params.seed is the same as passing a generator seeded with it
        assert list(lm.generate(prompt, cached.replace(seed=7))) == with_cache


def test_generation_stops_at_eos_and_restores_mode(lm):
    greedy = list(lm.generate([1, 2, 3], SamplingParams(10, temperature=0)))
    stop = greedy[3]
    out = list(lm.generate([1, 2, 3], SamplingParams(10, temperature=0, eos_id=stop)))
    assert out == greedy[: greedy.index(stop) + 1]
    lm.train()
    list(lm.generate([1], SamplingParams(2, temperature=0)))
    assert lm.training
    lm.eval()
    # an empty prompt starts from the end-of-text token instead of failing
    assert len(list(lm.generate([], SamplingParams(3, temperature=0, eos_id=0)))) >= 1
    assert list(lm.generate([1, 2, 3], SamplingParams(0))) == []


def test_generate_rejects_the_old_positional_form(lm):
    with pytest.raises(TypeError, match="SamplingParams"):
        next(lm.generate([1, 2, 3], 10))


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]])
    assert sample_next(logits, SamplingParams(temperature=0)).item() == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, SamplingParams(top_k=1), g).item() for _ in range(20)} == {1}
    assert {sample_next(logits, SamplingParams(top_k=2), g).item() for _ in range(200)} == {1, 3}
    # top_k=0 and top_p=1 are "off": every token stays possible
    assert {sample_next(logits, SamplingParams(top_k=0, top_p=1.0, temperature=5.0), g).item() for _ in range(400)} == {0, 1, 2, 3, 4}
    # top_p keeps the smallest prefix reaching the mass: tokens 1 and 3 hold ~0.83 here
    assert {sample_next(logits, SamplingParams(top_p=0.5), g).item() for _ in range(200)} <= {1, 3}
    assert {sample_next(logits, SamplingParams(top_p=0.01), g).item() for _ in range(50)} == {1}
    a = [sample_next(logits, SamplingParams(), torch.Generator().manual_seed(3)).item() for _ in range(5)]
    b = [sample_next(logits, SamplingParams(), torch.Generator().manual_seed(3)).item() for _ in range(5)]
    assert a == b


def test_rope_rotation_is_relative():
    cos, sin = rope_cache(16, 8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(i, j):
        return (apply_rope(q, cos[i : i + 1], sin[i : i + 1]) * apply_rope(k, cos[j : j + 1], sin[j : j + 1])).sum()
    torch.testing.assert_close(score(5, 3), score(12, 10), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)  # position 0 is the identity


def test_tied_embeddings_params_and_flops(lm):
    assert lm.model.lm_head.weight is lm.model.wte.weight
    n = lm.model.num_params(non_embedding=True)
    # 2 layers x (qkv 3d^2 + proj d^2 + mlp 8d^2) + LayerNorm weights (2 per layer + final), d = 32
    assert n == 2 * 12 * 32 * 32 + (2 * 2 + 1) * 32
    assert lm.flops_per_token(24) == 6 * n + 12 * 2 * 2 * 16 * 24
    with pytest.raises(MemLMError, match="divisible"):
        TransformerLM(vocab_size=V, n_head=3, n_embd=32)


def test_embed_is_unit_vector(lm):
    e = lm.embed([1, 2, 3, 4])
    assert e.shape == (32,) and abs(float(e.norm()) - 1) < 1e-5
    assert not torch.allclose(e, lm.embed([9, 8, 7]))


def test_optimizer_groups_and_schedule():
    m = TransformerLM(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16,
                      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=4, max_steps=20, min_lr_ratio=0.1))
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    decay, no_decay = opt.param_groups
    ids_no_decay = {id(p) for p in no_decay["params"]}
    assert id(m.model.wte.weight) in ids_no_decay  # embeddings (tied head) are not decayed
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[12] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert lrs[20:] == pytest.approx([1e-4] * 5)  # floor after the horizon


def test_nan_loss_guard_raises():
    m = TransformerLM(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16)
    m._check_finite(torch.tensor(1.0))
    with pytest.raises(MemLMError, match="non-finite") as info:
        m._check_finite(torch.tensor(float("nan")))
    assert "checkpoint" in str(info.value) and "\n" not in str(info.value)


def test_tokenizer_larger_than_model_vocab_is_rejected():
    tok = build_tokenizer("byte")  # 259 tokens
    small = TransformerLM(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(MemLMError, match="259 tokens but the model was built for 100"):
        small.set_tokenizer(tok)
    big = TransformerLM(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)
    big.set_tokenizer(tok)  # padding the model's vocab is fine; the extra ids count zero bytes
    assert big.token_bytes.shape == (300,) and int(big.token_bytes[259:].sum()) == 0


# -- evaluation metrics on a hand-checked case ----------------------------------------------
class _FixedLogits(nn.Module):
    """Logits that do not depend on the input: log-probs log(p) for a chosen distribution."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logp", probs.log())
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, state=None):
        B, T = input_ids.shape
        return ModelOutput(logits=self.logp.expand(B, T, -1) + 0 * self.dummy, state=state)


class _Batches:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _FixedLM(LanguageModel):
    def __init__(self, vocab_size: int, probs: list[float]) -> None:
        super().__init__(vocab_size=vocab_size)
        self.model = _FixedLogits(torch.tensor(probs))


def test_val_metrics_bits_per_byte_hand_checked():
    """Two batches; a target of 'ä' (2 UTF-8 bytes), one of EOS (1 byte), one ignored (-100).

    char tokenizer over "aä": ids 0 EOS, 1 <unk>, 2 <pad>, 3 'a', 4 'ä'.
    p = [0.1, 0.1, 0.1, 0.5, 0.2]; targets 3, 4, 0, 3, 3 (+ one ignored)
    NLL = -(3 ln .5 + ln .2 + ln .1); bytes = 1 + 2 + 1 + 1 + 1 = 6; correct (argmax 3) = 3 of 5.
    """
    tok = build_tokenizer("char", ["aä"])
    assert [tok.tok.token_to_id(c) for c in "aä"] == [3, 4] and tok.eos_id == 0
    probs = [0.1, 0.1, 0.1, 0.5, 0.2]
    module = _FixedLM(5, probs)
    module.set_tokenizer(tok)
    batches = [
        {"input_ids": torch.zeros(1, 3, dtype=torch.long), "targets": torch.tensor([[3, 4, 0]])},
        {"input_ids": torch.zeros(1, 3, dtype=torch.long), "targets": torch.tensor([[3, -100, 3]])},
    ]
    assert int(module.bytes_of(batches[0]["targets"])) == 4 and int(module.bytes_of(batches[1]["targets"])) == 2
    nll = -(3 * math.log(0.5) + math.log(0.2) + math.log(0.1))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    loader = _Batches(batches)
    (res,) = trainer.validate(module, dataloaders=loader, verbose=False)
    assert res["val/bpb"] == pytest.approx(nll / (math.log(2) * 6), rel=1e-5)
    assert res["val/loss"] == pytest.approx(nll / 5, rel=1e-5)
    assert res["val/ppl"] == pytest.approx(math.exp(nll / 5), rel=1e-5)
    assert res["val/acc"] == pytest.approx(3 / 5)
    # a second validation starts from zero (sums are reset between epochs)
    (res2,) = trainer.validate(module, dataloaders=loader, verbose=False)
    assert res2["val/bpb"] == pytest.approx(res["val/bpb"], rel=1e-6)
