"""HMST stage-2 data: answers lie beyond the attention window, only they are scored in
validation, train and validation facts share no names, parts are selectable, bad input is a
one-line error; and HMST's task evaluation logs exact match and removes what it ingested."""
import pytest
import torch

from memlm.core.errors import MemLMError
from memlm.datamodules.hmst_stage2 import HMSTStage2DataModule
from memlm.datamodules.facts import name_split
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.hmst.task_eval import TaskEval

KW = dict(source="builtin", tokenizer="byte", block_size=64, segments=4, batch_size=2, train_rows=6, val_rows=2,
          facts_per_row=1)


def chunks(loader):
    return list(iter(loader))


def test_answers_are_beyond_the_window_and_only_they_are_scored_in_validation():
    dm = HMSTStage2DataModule(**KW)
    dm.setup("fit")
    tok = dm.tokenizer
    recall, facts = dm.val_dataloader()[1:]
    batches = chunks(recall)
    assert [b["first"] for b in batches] == [True, False, False, False] and all(b["stream"] for b in batches)
    assert all((b["targets"] == -100).all() for b in batches[:-1])  # scored tokens only in the last chunk
    x = torch.cat([b["input_ids"] for b in batches], 1)
    y = torch.cat([b["targets"] for b in batches], 1)
    text = tok.decode(x[0].tolist())
    key = text.split("The pass key is ")[1].split(".")[0]
    assert tok.decode(y[0][y[0] >= 0].tolist()).strip() == key
    assert text.index("pass key is") < 64 and x.size(1) - int((y[0] >= 0).nonzero()[0]) < 64  # > 2 windows apart
    fb = chunks(facts)
    assert fb[0]["write_memory"] and not fb[-1]["write_memory"] and fb[-1]["em_metric"] == "fact_em"


def test_train_and_validation_facts_use_disjoint_names_and_parts_are_selectable():
    dm = HMSTStage2DataModule(**{**KW, "parts": ["facts"]})
    dm.setup("fit")
    assert dm.val_names == ["facts"] and len(dm.val_dataloader()) == 1

    def subjects(loader):
        xs = torch.cat([b["input_ids"] for b in chunks(loader)][:1], 1)
        return {w.strip(".?") for w in dm.tokenizer.decode(xs[0].tolist()).split() if w[:1].isupper()} - {"The", "What", "Who", "How"}

    train_names = subjects(dm.train_dataloader())
    val_names = subjects(dm.val_dataloader()[0])
    invented = {n for n in train_names | val_names if n.isalpha() and name_split(n) in ("train", "eval")}
    assert {name_split(n) for n in val_names & invented} <= {"eval"}
    assert not (train_names & val_names & invented)
    assert {b["task"] for b in chunks(dm.train_dataloader())} == {"facts"}


def test_bad_parts_and_too_short_rows_are_one_line_errors():
    with pytest.raises(MemLMError, match="data.parts must be"):
        HMSTStage2DataModule(**{**KW, "parts": ["poems"]})
    with pytest.raises(MemLMError, match="segments must be >= 2"):
        HMSTStage2DataModule(**{**KW, "segments": 1})
    dm = HMSTStage2DataModule(**{**KW, "block_size": 16, "facts_per_row": 4, "parts": ["facts"]})
    dm.setup("fit")
    with pytest.raises(MemLMError, match="raise data.segments"):
        dm.val_dataloader()


def test_task_eval_counts_exact_rows_and_removes_ingested_items():
    m = HMSTLanguageModel(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=8, d_ff=8, n_experts=2, top_k=1,
                          exit_layer=1, ssm_d_state=2, ssm_expand=1, mem_write_stride=2, episodic_capacity=4,
                          controller_hidden=4, critic_d_model=4, critic_layers=1, critic_heads=2, critic_max_len=8).eval()
    ev = TaskEval()
    x = torch.randint(0, 32, (3, 8))
    with torch.no_grad():
        out = m(x)
    pred = out.logits.argmax(-1)
    y = torch.full((3, 8), -100)
    y[:, 6:] = pred[:, 6:]
    y[1, 7] = (pred[1, 7] + 1) % 32  # row 1 has one wrong answer token
    y[2] = -100  # row 2 is not scored
    ev.update(m, {"targets": y, "input_ids": x, "em_metric": "fact_em", "write_memory": True}, out)
    assert ev.results() == {"fact_em": 0.5}
    assert len(m.semantic) == 12  # 3 rows x 4 items, ingested for the evaluation only
    ev.reset(m)
    assert len(m.semantic) == 0 and ev.results() == {}


def test_stage2_config_builds_on_meta_without_reading_the_checkpoint(tmp_path):
    with torch.device("meta"):
        m = HMSTLanguageModel(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=8, d_ff=8, n_experts=2, top_k=1,
                              critic_d_model=4, critic_heads=2, init_checkpoint=str(tmp_path / "absent.ckpt"))
    assert m.model.wte.weight.is_meta
