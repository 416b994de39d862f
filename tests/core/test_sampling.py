"""sample_next: greedy decoding, temperature, top-k and nucleus (top-p) filtering, seeded draws."""
from __future__ import annotations

import torch

from memlm.core.sampling import SamplingParams, sample_next

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # token 1 > 3 > 2 > 0
N = 4000  # draws per check: one batched call, every row an independent draw


def draws(probs: torch.Tensor, params: SamplingParams, seed: int = 0) -> torch.Tensor:
    logits = probs.log().expand(N, -1)
    return sample_next(logits, params, torch.Generator().manual_seed(seed))


def kept(probs: torch.Tensor, params: SamplingParams) -> set[int]:
    return set(draws(probs, params).unique().tolist())


def test_temperature_zero_is_argmax_per_row_whatever_the_generator():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9], [-5.0, -4.0, -4.5]])
    for seed in range(3):
        out = sample_next(logits, SamplingParams(temperature=0, top_k=2, top_p=0.1), torch.Generator().manual_seed(seed))
        assert out.tolist() == [1, 0, 1]


def test_plain_sampling_follows_the_softmax():
    freq = torch.bincount(draws(PROBS, SamplingParams(temperature=1.0)), minlength=4).float() / N
    assert torch.allclose(freq, PROBS, atol=0.03), freq


def test_temperature_sharpens_and_flattens():
    cold = torch.bincount(draws(PROBS, SamplingParams(temperature=0.25)), minlength=4).float() / N
    hot = torch.bincount(draws(PROBS, SamplingParams(temperature=4.0)), minlength=4).float() / N
    want_cold = (PROBS.log() / 0.25).softmax(-1)  # p^4, renormalised: token 1 dominates
    assert torch.allclose(cold, want_cold, atol=0.03) and cold[1] > 0.85
    assert hot.max() - hot.min() < PROBS.max() - PROBS.min() - 0.2  # closer to uniform


def test_top_k_keeps_exactly_the_k_most_likely():
    assert kept(PROBS, SamplingParams(top_k=1)) == {1}
    assert kept(PROBS, SamplingParams(top_k=2)) == {1, 3}
    assert kept(PROBS, SamplingParams(top_k=3, temperature=3.0)) == {1, 3, 2}
    # 0 and k >= vocabulary turn the filter off
    assert kept(PROBS, SamplingParams(top_k=0)) == kept(PROBS, SamplingParams(top_k=10)) == {0, 1, 2, 3}
    # the kept tokens keep their relative odds: 0.5 : 0.3
    freq = torch.bincount(draws(PROBS, SamplingParams(top_k=2)), minlength=4).float() / N
    assert abs(float(freq[1]) - 0.5 / 0.8) < 0.03


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    assert kept(PROBS, SamplingParams(top_p=0.45)) == {1}  # 0.5 alone reaches 0.45
    assert kept(PROBS, SamplingParams(top_p=0.79)) == {1, 3}  # 0.5 + 0.3
    assert kept(PROBS, SamplingParams(top_p=0.85)) == {1, 3, 2}  # 0.5 + 0.3 + 0.15
    assert kept(PROBS, SamplingParams(top_p=1.0)) == {0, 1, 2, 3}
    # the nucleus is measured after the temperature: a flat distribution needs more tokens
    assert kept(PROBS, SamplingParams(top_p=0.79, temperature=20.0)) == {0, 1, 2, 3}


def test_top_k_and_top_p_combine_and_each_row_is_filtered_on_its_own():
    assert kept(PROBS, SamplingParams(top_k=3, top_p=0.79)) == {1, 3}
    assert kept(PROBS, SamplingParams(top_k=1, top_p=0.99)) == {1}
    rows = torch.stack([PROBS.log(), PROBS.flip(0).log()])  # the second row's best token is 2
    out = sample_next(rows.repeat(N // 2, 1), SamplingParams(top_k=1), torch.Generator().manual_seed(0))
    assert set(out[0::2].tolist()) == {1} and set(out[1::2].tolist()) == {2}


def test_a_seeded_generator_reproduces_the_draws():
    p = SamplingParams(temperature=1.5, top_k=3, top_p=0.9)
    a, b, c = draws(PROBS, p, seed=7), draws(PROBS, p, seed=7), draws(PROBS, p, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
