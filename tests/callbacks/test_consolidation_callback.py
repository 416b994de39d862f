"""MemoryConsolidation on a real HMST module: episodes become semantic items, the state survives
a checkpoint, two DDP ranks with different episodes end identical, and an ingested fact changes
what the model reads and predicts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlm.callbacks.consolidation import MemoryConsolidation
from memlm.core.errors import MemLMError
from memlm.core.tokenizer import build_tokenizer
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
from memlm.lightning_modules.language_model import OptimizerConfig

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(vocab_size=259, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=16, n_experts=2, top_k=1, exit_layer=1,
             ssm_d_state=4, ssm_expand=1, mem_top_k=2, mem_max_items=1000, episodic_capacity=8, controller_hidden=8,
             critic_d_model=8, critic_layers=1, critic_heads=2, critic_max_len=16, optimizer=OptimizerConfig(warmup_steps=1))


def fill(module, seed, n=6):
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(n, 16, generator=g)
    tokens = torch.randint(0, 259, (n, 17), generator=g)
    module.episodic.add_batch(None, pooled, [(16 * i, 16 * i + 16) for i in range(n)], torch.rand(n, generator=g), tokens=tokens)


def test_episodes_become_semantic_items_and_the_state_persists():
    torch.manual_seed(0)
    m = HMSTLanguageModel(**SMALL)
    fill(m, 1)
    cb = MemoryConsolidation(capacity=4, merge_threshold=0.99)
    res = cb.consolidate(m)
    assert res["candidates"] == 6 and res["written"] == 4 and len(m.semantic) == 4
    assert cb.consolidate(m)["candidates"] == 0  # nothing new since the last run
    restored = MemoryConsolidation(capacity=4, merge_threshold=0.99)
    restored.load_state_dict(cb.state_dict())
    assert torch.equal(restored.consolidator.ids, cb.consolidator.ids)
    fill(m, 2, n=2)  # two newer episodes: only they are candidates after the restore
    assert restored.consolidate(m)["candidates"] == 2


def test_capacity_zero_is_a_one_line_error():
    with pytest.raises(MemLMError, match="capacity must be an integer >= 1"):
        MemoryConsolidation(capacity=0)


WORKER = r'''
import hashlib, json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, os.environ["TEST_DIR"])
from test_consolidation_callback import SMALL, fill
from memlm.callbacks.consolidation import MemoryConsolidation
from memlm.lightning_modules.hmst.module import HMSTLanguageModel
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
m = HMSTLanguageModel(**SMALL)
fill(m, 10 + rank)  # every rank holds different episodes
cb = MemoryConsolidation(capacity=5, merge_threshold=0.9, replay=True)  # replayed tokens must agree too
cb.consolidate(m)
sd = m.semantic.state_dict()
digest = hashlib.sha256()
for k in ("ids", "values"):
    if k in sd:
        digest.update(sd[k].numpy().tobytes())
digest.update(json.dumps(m.semantic.get_texts(m.semantic.ids())).encode())
digest.update(cb.consolidator.ids.numpy().tobytes())
open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w").write(json.dumps(
    {"digest": digest.hexdigest(), "n": len(m.semantic), "ranks": sorted({p[0] for ps in cb.consolidator.provenance for p in ps})}))
dist.destroy_process_group()
'''


@pytest.mark.slow  # two fresh Python processes importing torch + lightning: ~60 s on 2 loaded cores
def test_ddp_ranks_end_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "WORLD_SIZE": "2",
           "TEST_DIR": str(Path(__file__).parent), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], env={**env, "RANK": str(r)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outs = [p.communicate(timeout=120)[0].decode()[-2000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    import json
    r0, r1 = (json.loads((tmp_path / f"rank{r}.txt").read_text()) for r in range(2))
    assert r0 == r1 and r0["n"] == 5 + 5 * 16  # 5 centroids, each with its episode's 16 replayed tokens
    assert r0["ranks"] == [0, 1]  # the survivors came from both ranks' episodes


def test_an_ingested_fact_changes_the_prediction_only_through_the_semantic_read():
    torch.manual_seed(0)
    m = HMSTLanguageModel(**SMALL).eval()
    m.tokenizer = build_tokenizer("byte")
    with torch.no_grad():
        torch.nn.init.normal_(m.model.reader.o.weight, std=0.5)  # a reader that matters (trained ones do)
    q = torch.tensor([m.tokenizer.encode("The capital of Zorbia is")[-16:]])
    with torch.no_grad():
        before = m(q).logits[0, -1]
        m.ingest("The capital of Zorbia is Quelt.")
        after = m(q)
        m.eval_schedule = {**m.eval_schedule, "semantic": 0.0}
        off = m(q).logits[0, -1]
    assert (after.retrieved_ids >= 0).any()
    assert not torch.allclose(before, after.logits[0, -1], atol=1e-4)
    assert torch.allclose(before, off, atol=1e-6)  # semantic gate off: the ingested fact is never read


def test_a_fact_streamed_once_is_read_back_after_a_replaying_consolidation():
    """A fact seen only in the stream (episodes written, nothing ingested) reaches semantic
    memory through replay: a fresh prompt of the same words retrieves, at its last token, the
    item whose value is the next token of the fact; without replay only a centroid arrives."""
    torch.manual_seed(0)
    tok = build_tokenizer("byte")
    m = HMSTLanguageModel(**SMALL, mem_value="next_token", mem_query_stride=1).eval()
    m.tokenizer = tok
    m.mem_write = False  # the stream writes episodes only
    ids = tok.encode("The capital of Zorbia is Quelt.")
    x, after = torch.tensor([ids[:16]]), torch.tensor([ids[1:17]])
    with torch.no_grad():
        out = m(x)
    m._write_memories(x, out, after)
    assert len(m.semantic) == 0
    assert MemoryConsolidation(capacity=4).consolidate(m)["replayed"] == 0 and len(m.semantic) == 1
    m.semantic.clear()
    m.episodic.clear()
    m._write_memories(x, out, after)
    cb = MemoryConsolidation(capacity=4, replay=True)
    res = cb.consolidate(m)
    assert res["written"] == 1 and res["replayed"] == 16 and len(m.semantic) == 17
    prompt = torch.tensor([ids[:10]])  # a fresh context ending where the fact continues with ids[10]
    with torch.no_grad():
        got = m(prompt).retrieved_ids[0, -1, 0]
    value, found = m.semantic.get_values(got.view(1))
    assert found.all() and torch.allclose(value[0], m.model.wte.weight[ids[10]].detach(), atol=1e-6)
    assert m.semantic.get_texts(got.view(1))[0].endswith(tok.decode(ids[:11]))
    # evicting the cluster removes its replayed items with it
    cb.consolidator.capacity = 1
    m.episodic.add_batch(None, 5 * torch.randn(1, 16), [(16, 32)], torch.tensor([100.0]), tokens=torch.tensor([ids[1:18]]))
    res = cb.consolidate(m)
    assert res["evicted"] == 1 and len(m.semantic) == 1 + 16 and len(cb.consolidator.replayed[0]) == 16
