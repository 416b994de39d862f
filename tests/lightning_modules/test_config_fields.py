"""Every field of a model's config dataclass can be set from YAML / the CLI.

LightningCLI only sees a LightningModule's ``__init__`` signature, so a config field without a
matching init argument is unreachable from ``--model.init_args.*``. For each architecture the
test introspects the dataclass fields against the signature (same name, same default), then
builds the module with a non-default value for every field and checks each one arrived in
``module.config``. Deliberate exclusions are listed with their reason; a new config field
without an init argument, an exclusion, or a test value here fails the test.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from memlm.apps.cli import RUN_DIR_ENV, MemLMCLI
from memlm.core.tokenizer import build_tokenizer
from memlm.lightning_modules.hamt.module import HAMTLanguageModel
from memlm.lightning_modules.hebbian.module import HebbianLanguageModel
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.transformer import TransformerLM
from memlm.models.hamt.model import HAMTConfig
from memlm.models.hebbian.learner import LearnerConfig
from memlm.models.hmst.model import HMSTConfig
from memlm.models.transformer import GPTConfig, rope_cache

ROOT = Path(__file__).resolve().parents[2]

# field -> why it is not an init argument
EXCLUDED = {
    HAMTConfig: {
        "reset_token_id": "derived from the tokenizer's end-of-text id by set_tokenizer (switch with reset_on_eos); "
                          "a raw id in YAML would silently go stale when the tokenizer changes",
    },
}
# init arguments whose default deliberately differs from the dataclass's
DEFAULT_DIFFERS = {
    "vocab_size": "required: the CLI links it from data.vocab_size",
}

# a valid, non-default value for every field (jointly: one small module is built with all of them)
VALUES = {
    GPTConfig: dict(vocab_size=300, block_size=24, n_layer=1, n_head=2, n_embd=16, mlp_ratio=2.0, dropout=0.1,
                    bias=True, rope_base=500000.0),
    HMSTConfig: dict(vocab_size=300, block_size=16, n_layer=3, n_head=2, d_model=16, d_ff=24, n_experts=3, top_k=1,
                     capacity_factor=1.5, exit_layer=2, dropout=0.1, rope_base=500000.0, ssm_layers=2, ssm_d_state=4,
                     ssm_expand=1, ssm_d_conv=3, ssm_backend="ref", mem_top_k=3, mem_query_stride=2, episodic_top_k=1,
                     controller_hidden=8, critic_d_model=16, critic_layers=1, critic_heads=2, critic_max_len=32, critic_match_ngram=2,
                     exit_entropy_threshold=2.5, mem_score_bias=3.0, mem_key_window=2, mem_key_source="embedding", mem_knn_lambda=0.3,
                     mem_knn_temperature=0.2, mem_knn_min_score=0.5),
    HAMTConfig: dict(vocab_size=300, n_layer=1, n_embd=16, n_slots=4, binding="circular", key_source="position",
                     gate_mode="recurrent", scan_chunk=5, conv_kernel=2, mlp_ratio=2.0, dropout=0.1, tau_min=2.0,
                     tau_max=100.0, key_seed=3, aux_weight=0.2, compile_scan=True, mem_expand=2,
                     scan_impl="materialized"),
    LearnerConfig: dict(initial_vocab_size=40, max_vocab_size=300, merge_threshold=2, max_unit_len=6,
                        max_new_units_per_input=2, usage_half_life=100.0, forget_below=0.25, neurons_per_column=8,
                        synapses_per_neuron=12, k_winners=2, trace_len=3, trace_decay=0.25, learning_rate=0.2,
                        hebbian_strength=0.5, depression=0.1, stdp_ltd=0.1, weight_decay=0.01, weight_max=2.0,
                        activation_threshold=0.3, temperature=0.0, max_response_units=8, neuron_model="lif",
                        lif_steps=5, lif_tau_m=6.0, lif_threshold=2.5, lif_reset=-0.5, lif_refractory=1, lif_input=1.2,
                        lif_recurrent_gain=1.5, stdp_tau_plus=4.0, stdp_tau_minus=3.0, theta_plus=0.1,
                        theta_tau=500.0, calibrate_every=2, replay_memory=50, replay_per_merge=3,
                        teacher_api_url="http://127.0.0.1:9/v1", teacher_model="tiny-teacher", teacher_timeout=3.0,
                        teacher_retries=0, teacher_system_prompt="Be brief.", learn_from_teacher=False, seed=5),
}
# module arguments (not config fields) that the values above need: a kNN-LM output reads next-token items
MODULE_KWARGS = {HMSTLanguageModel: dict(mem_value="next_token")}
MODULES = [(TransformerLM, GPTConfig), (HMSTLanguageModel, HMSTConfig), (HAMTLanguageModel, HAMTConfig),
           (HebbianLanguageModel, LearnerConfig)]
IDS = [m.__name__ for m, _ in MODULES]


def _settable(config_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.name not in EXCLUDED.get(config_cls, {})]


@pytest.mark.parametrize("module_cls, config_cls", MODULES, ids=IDS)
def test_every_config_field_is_an_init_argument_with_the_same_default(module_cls, config_cls):
    params = inspect.signature(module_cls.__init__).parameters
    missing = [f.name for f in _settable(config_cls) if f.name not in params]
    assert not missing, f"{config_cls.__name__} fields {missing} cannot be set from YAML: add them to {module_cls.__name__}.__init__"
    for field in _settable(config_cls):
        default = params[field.name].default
        if field.name in DEFAULT_DIFFERS:
            continue
        assert default is not inspect.Parameter.empty, f"{module_cls.__name__}({field.name}) has no default"
        assert default == field.default, f"{module_cls.__name__}({field.name}={default!r}) but {config_cls.__name__} says {field.default!r}"
    assert set(EXCLUDED.get(config_cls, {})) <= {f.name for f in dataclasses.fields(config_cls)}, "stale exclusion"


@pytest.mark.parametrize("module_cls, config_cls", MODULES, ids=IDS)
def test_every_init_value_reaches_the_config(module_cls, config_cls):
    values = VALUES[config_cls]
    untested = sorted({f.name for f in _settable(config_cls)} - set(values))
    assert not untested, f"add a test value for {config_cls.__name__} fields {untested}"
    for field in _settable(config_cls):
        assert values[field.name] != field.default, f"the test value of {field.name} is its default: it proves nothing"
    module = module_cls(**values, **MODULE_KWARGS.get(module_cls, {}))
    got = {name: getattr(module.config, name) for name in values}
    assert got == values


def test_rope_base_reaches_the_rotary_tables():
    gpt = TransformerLM(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, rope_base=500000.0)
    cos, sin = rope_cache(16, 8, 500000.0)
    assert torch.equal(gpt.model.rope_cos, cos) and torch.equal(gpt.model.rope_sin, sin)
    assert not torch.allclose(cos, rope_cache(16, 8)[0])  # the default base would give other tables
    hmst = HMSTLanguageModel(**VALUES[HMSTConfig], **MODULE_KWARGS[HMSTLanguageModel])
    h_cos, _ = hmst.model.rope(0, 8, "cpu")
    assert torch.equal(h_cos, rope_cache(32, hmst.config.head_dim, 500000.0)[0][:8])


def test_hamt_reset_token_follows_the_tokenizer():
    tok = build_tokenizer("byte")
    on = HAMTLanguageModel(vocab_size=tok.vocab_size, n_layer=1, n_embd=16)
    on.set_tokenizer(tok)
    assert on.config.reset_token_id == tok.eos_id is not None
    off = HAMTLanguageModel(vocab_size=tok.vocab_size, n_layer=1, n_embd=16, reset_on_eos=False)
    off.set_tokenizer(tok)
    assert off.config.reset_token_id is None


def test_hebbian_teacher_settings_reach_the_teacher():
    module = HebbianLanguageModel(**VALUES[LearnerConfig])
    teacher = module.learner.teacher
    assert teacher.url == "http://127.0.0.1:9/v1" and teacher.model == "tiny-teacher"
    assert (teacher.timeout, teacher.retries, teacher.system_prompt) == (3.0, 0, "Be brief.")


def test_cli_rope_base_changes_the_rope_cache(tmp_path):
    argv = ["--config", str(ROOT / "configs" / "transformer_micro.yaml"), "--run.root", str(tmp_path),
            "--run.logger=[none]", "--data.init_args.tokenizer=byte", "--model.init_args.n_layer=1",
            "--model.init_args.n_head=2", "--model.init_args.n_embd=16", "--model.init_args.block_size=32",
            "--data.init_args.block_size=32", "--model.init_args.rope_base", "500000"]
    try:
        cli = MemLMCLI(L.LightningModule, L.LightningDataModule, args=argv, run=False)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    model = cli.model.model
    assert model.cfg.rope_base == 500000.0 and cli.model.hparams.rope_base == 500000.0
    assert torch.equal(model.rope_cos, rope_cache(32, 8, 500000.0)[0])
    assert not torch.allclose(model.rope_cos, rope_cache(32, 8, 10000.0)[0])
