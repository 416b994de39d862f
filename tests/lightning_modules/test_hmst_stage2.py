"""HMST stage 2: start from a stage-1 checkpoint (weights, tokenizer, memories), freeze or slow
the base, one-line errors for a missing checkpoint or one of another architecture/shape."""

import pytest
import torch

from memlm.core.errors import MemLMError
from memlm.core.tokenizer import build_tokenizer
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.hmst.stage2 import is_memory_param
from memlm.lightning_modules.language_model import OptimizerConfig

SMALL = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=16, n_experts=2, top_k=1, exit_layer=1,
             ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_max_items=100, episodic_capacity=4, controller_hidden=8,
             critic_d_model=8, critic_layers=1, critic_heads=2, critic_max_len=16, optimizer=OptimizerConfig(warmup_steps=1))


def save(module, path, class_path=None):
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    if class_path:
        ckpt["memlm"]["class_path"] = class_path
    torch.save(ckpt, path)
    return path


def test_stage2_loads_weights_and_memories_and_freezes_the_base(tmp_path):
    torch.manual_seed(0)
    stage1 = HMSTLanguageModel(**SMALL)
    stage1.semantic.add(torch.randn(5, 16), torch.randn(5, 16), ["a", "b", "c", "d", "e"])
    path = save(stage1, tmp_path / "s1.ckpt")
    torch.manual_seed(1)
    s2 = HMSTLanguageModel(**SMALL, init_checkpoint=str(path), base_lr_scale=0.0)
    for k, v in stage1.state_dict().items():
        assert torch.equal(v, s2.state_dict()[k]), k
    assert len(s2.semantic) == 5 and s2.semantic.get_texts(torch.tensor([2])) == ["c"]
    frozen = {n for n, p in s2.named_parameters() if not p.requires_grad}
    assert "model.blocks.0.attn.qkv.weight" in frozen and "model.wte.weight" in frozen
    assert not any(is_memory_param(n) for n in frozen)
    assert s2.model.reader.q.weight.requires_grad and s2.model.ssm[0].in_proj.weight.requires_grad
    opt = s2.configure_optimizers()["optimizer"]
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not trained & {id(p) for n, p in s2.named_parameters() if n in frozen}


def test_lower_base_learning_rate_groups(tmp_path):
    m = HMSTLanguageModel(**SMALL, base_lr_scale=0.1)
    res = m.configure_optimizers()
    opt = res["optimizer"]
    names = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        kinds = {is_memory_param(names[id(p)]) for p in g["params"]}
        assert len(kinds) <= 1
        if kinds == {False}:
            assert g["lr"] == pytest.approx(0.1 * m.optimizer_config.learning_rate * res["lr_scheduler"]["scheduler"].lr_lambdas[0](0))
    assert {len(g["params"]) > 0 for g in opt.param_groups} == {True}


def test_stage2_errors_are_one_line(tmp_path):
    with pytest.raises(MemLMError, match="stage-1 checkpoint.*does not exist"):
        HMSTLanguageModel(**SMALL, init_checkpoint=str(tmp_path / "missing.ckpt"))
    other = save(HMSTLanguageModel(**SMALL), tmp_path / "t.ckpt", "memlm.lightning_modules.transformer.TransformerLM")
    with pytest.raises(MemLMError, match="TransformerLM checkpoint, not an HMST"):
        HMSTLanguageModel(**SMALL, init_checkpoint=str(other))
    bigger = save(HMSTLanguageModel(**{**SMALL, "d_ff": 32}), tmp_path / "b.ckpt")
    with pytest.raises(MemLMError, match="does not fit this stage-2 model"):
        HMSTLanguageModel(**SMALL, init_checkpoint=str(bigger))
    with pytest.raises(MemLMError, match="base_lr_scale"):
        HMSTLanguageModel(**SMALL, base_lr_scale=2.0)


def test_next_token_items_hold_the_embedding_of_the_token_that_followed():
    """mem_value: next_token (a kNN-LM memory): each item's value is the embedding of the token
    after its key's position, so the document's last token (no successor) writes no item, and
    an item's text ends with the token it names."""
    torch.manual_seed(0)
    tok = build_tokenizer("byte")
    m = HMSTLanguageModel(**{**SMALL, "vocab_size": tok.vocab_size}, mem_value="next_token", mem_ingest_stride=1).eval()
    m.tokenizer = tok
    text = "abcdefghijklmnopqrstuvwxyz0123456789"  # 36 tokens: 3 segments of block_size 16
    ids = m.tokenizer.encode(text)
    new = m.ingest(text)
    assert len(new) == len(ids) - 1
    values, found = m.semantic.get_values(new)
    assert found.all()
    want = m.model.wte.weight[torch.tensor(ids[1:])].detach()
    assert torch.allclose(values.float(), want, atol=1e-6)  # across the segment boundaries too
    texts = m.semantic.get_texts(new)
    assert [t[-1] for t in texts] == list(text[1:])
    # a chunk (no successor known) writes its last token only when next_ids names it
    x = torch.tensor([ids[:16]])
    with torch.no_grad():
        out = m(x)
    k, v, _ = m._memory_items(x, out, 1)
    assert k.size(0) == 15
    nxt = torch.cat([x[:, 1:], torch.tensor([[ids[16]]])], 1)
    k, v, _ = m._memory_items(x, out, 1, next_ids=nxt)
    assert k.size(0) == 16 and torch.allclose(v[-1], m.model.wte.weight[ids[16]].detach())


def test_hidden_items_are_unchanged_and_bad_memory_options_are_one_line_errors():
    torch.manual_seed(0)
    tok = build_tokenizer("byte")
    m = HMSTLanguageModel(**{**SMALL, "vocab_size": tok.vocab_size}, mem_write_stride=4).eval()
    m.tokenizer = tok
    x = torch.tensor([m.tokenizer.encode("abcdefghijklmnop")])
    with torch.no_grad():
        out = m(x)
    k, v, _ = m._memory_items(x, out, 4)
    assert torch.equal(v, out.hidden[0, 3::4]) and torch.equal(k, out.mem_keys[0, 3::4])
    assert len(m.ingest("abcdefghij")) == 3  # default ingest stride = mem_write_stride (4): tokens 3, 7 and the tail
    with pytest.raises(MemLMError, match="mem_value must be one of hidden, next_token"):
        HMSTLanguageModel(**SMALL, mem_value="values")
    with pytest.raises(MemLMError, match="mem_ingest_stride must be an integer >= 1"):
        HMSTLanguageModel(**SMALL, mem_ingest_stride=0)


def test_a_stage2_that_changes_mem_value_starts_with_an_empty_semantic_memory(tmp_path):
    stage1 = HMSTLanguageModel(**SMALL)
    stage1.semantic.add(torch.randn(3, 16), torch.randn(3, 16), ["a", "b", "c"])
    ckpt = {"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}
    stage1.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "s1.ckpt")
    same = HMSTLanguageModel(**SMALL, init_checkpoint=str(tmp_path / "s1.ckpt"))
    other = HMSTLanguageModel(**SMALL, mem_value="next_token", init_checkpoint=str(tmp_path / "s1.ckpt"))
    window = HMSTLanguageModel(**SMALL, mem_key_window=2, init_checkpoint=str(tmp_path / "s1.ckpt"))
    assert len(same.semantic) == 3 and len(other.semantic) == 0 and len(window.semantic) == 0


def test_next_token_items_of_a_batch_whose_rows_all_exited_are_none():
    tok = build_tokenizer("byte")
    m = HMSTLanguageModel(**{**SMALL, "vocab_size": tok.vocab_size}, mem_value="next_token").eval()
    m.tokenizer = tok
    x = torch.tensor([tok.encode("abcdefghijklmnop")] * 2)
    m.eval_schedule = {**m.eval_schedule, "exit": 1.0}
    with torch.no_grad():
        out = m(x)
    assert out.exit_rows.all()
    k, v, texts = m._memory_items(x, out, 1)
    assert k.size(0) == v.size(0) == len(texts) == 0
