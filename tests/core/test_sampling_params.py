"""SamplingParams: the one sampling object every generate() takes, and its range checks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from memlm.core.errors import MemLMError
from memlm.core.sampling import InvalidSamplingParam, SamplingParams, resolve_params, sample_next


def test_defaults_are_the_old_generate_defaults():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.eos_id, p.seed, p.use_cache) == (
        64, 1.0, None, None, None, None, True)
    assert not p.greedy and SamplingParams(temperature=0).greedy
    assert resolve_params(None) == p


@pytest.mark.parametrize("kw, field, words", [
    (dict(max_new_tokens=-1), "max_new_tokens", ">= 0"),
    (dict(max_new_tokens=None), "max_new_tokens", ">= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens", "integer"),
    (dict(temperature=-0.1), "temperature", ">= 0 (0 = greedy)"),
    (dict(temperature=float("nan")), "temperature", "finite"),
    (dict(temperature=float("inf")), "temperature", "finite"),
    (dict(temperature="hot"), "temperature", "number"),
    (dict(top_k=-1), "top_k", ">= 0 (0 = off)"),
    (dict(top_k=1.5), "top_k", "integer"),
    (dict(top_p=0.0), "top_p", "(0, 1]"),
    (dict(top_p=-0.5), "top_p", "(0, 1]"),
    (dict(top_p=1.01), "top_p", "(0, 1]"),
    (dict(eos_id=-3), "eos_id", ">= 0"),
    (dict(seed="abc"), "seed", "integer"),
])
def test_out_of_range_values_are_one_line_errors_naming_the_field(kw, field, words):
    with pytest.raises(InvalidSamplingParam) as info:
        SamplingParams(**kw)
    exc = info.value
    assert isinstance(exc, MemLMError) and exc.field == field
    msg = str(exc)
    assert "\n" not in msg and msg.startswith(field) and words in msg, msg
    assert exc.message_for("--" + field.replace("_", "-")).startswith("--" + field.replace("_", "-"))


def test_boundary_values_are_accepted_and_normalised():
    p = SamplingParams(max_new_tokens=np.int64(0), temperature=0, top_k=0, top_p=1, seed=np.int32(5))
    assert p.max_new_tokens == 0 and type(p.max_new_tokens) is int
    assert p.temperature == 0.0 and type(p.temperature) is float
    assert p.top_k == 0 and p.top_p == 1.0 and p.seed == 5
    assert SamplingParams(top_p=1e-9).top_p == 1e-9


def test_frozen_and_replace_validates_again():
    p = SamplingParams(max_new_tokens=8, temperature=0.7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 2.0
    q = p.replace(top_k=3)
    assert (q.max_new_tokens, q.temperature, q.top_k) == (8, 0.7, 3) and p.top_k is None
    with pytest.raises(InvalidSamplingParam):
        p.replace(top_p=0)


def test_bools_are_not_sizes():
    with pytest.raises(InvalidSamplingParam):
        SamplingParams(max_new_tokens=True)
    with pytest.raises(InvalidSamplingParam):
        SamplingParams(top_k=False)


def test_seed_makes_a_reproducible_generator_and_none_uses_the_global_rng():
    assert SamplingParams().make_generator() is None
    logits = torch.zeros(1, 50)  # uniform: every draw depends on the generator alone
    p = SamplingParams(seed=11)
    a = [sample_next(logits, p, g).item() for g in [p.make_generator()] for _ in range(20)]
    b = [sample_next(logits, p, g).item() for g in [p.make_generator()] for _ in range(20)]
    c = [sample_next(logits, p, g).item() for g in [p.replace(seed=12).make_generator()] for _ in range(20)]
    assert a == b and a != c


def test_resolve_params_rejects_the_old_positional_max_new_tokens():
    with pytest.raises(TypeError, match="SamplingParams"):
        resolve_params(30)
