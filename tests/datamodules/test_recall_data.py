"""The synthetic recall datamodule: MQAR and passkey, seeded, answers only at answer positions."""
import numpy as np
import pytest
import torch

from memlm.datamodules.recall import RecallDataModule
from memlm.core.errors import MemLMError


def test_mqar_targets_are_the_values_of_queried_keys():
    dm = RecallDataModule(task="mqar", seq_len=64, num_kv_pairs=6, num_keys=16, num_values=16, num_val=32)
    x, y = dm.eval_set(64)
    tok = dm.tokenizer
    for row in range(len(x)):
        words = tok.decode(x[row]).split()
        assert len(words) == 64
        pairs = {words[2 * i]: words[2 * i + 1] for i in range(6)}
        assert len(pairs) == 6 and all(k.startswith("k") and v.startswith("v") for k, v in pairs.items())
        ans = np.nonzero(y[row] != -100)[0]
        assert len(ans) == 6 and ans.min() >= 12  # queries come after the pairs
        for p in ans:
            assert words[p] in pairs and tok.decode([y[row, p]]) == pairs[words[p]]
    # seeded: the same set twice, different seeds differ
    again = RecallDataModule(task="mqar", seq_len=64, num_kv_pairs=6, num_keys=16, num_values=16, num_val=32)
    assert np.array_equal(again.eval_set(64)[0], x)
    other = RecallDataModule(task="mqar", seq_len=64, num_kv_pairs=6, num_keys=16, num_values=16, num_val=32, seed=5)
    assert not np.array_equal(other.eval_set(64)[0], x)


def test_passkey_answer_is_the_key_and_the_text_is_exact_length():
    dm = RecallDataModule(task="passkey", seq_len=200, eval_lengths=[800], num_val=8, max_key=50000)
    assert dm.val_names == ["len200", "len800"]
    for n in (200, 800):
        x, y = dm.eval_set(n)
        assert x.shape == (8, n)
        for row in range(8):
            text = dm.tokenizer.decode(x[row])
            key = dm.tokenizer.decode(y[row][y[row] != -100])
            assert key.isdigit() and 1 <= int(key) <= 50000
            assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
            full = text + key[-1]
            assert full.endswith(f"What is the pass key? The pass key is {key}")
    with pytest.raises(MemLMError):
        RecallDataModule(task="passkey", seq_len=50).eval_set(50)


def test_stream_chunks_and_val_loaders():
    dm = RecallDataModule(task="mqar", seq_len=32, eval_lengths=[32, 128], num_kv_pairs=2, num_keys=8,
                          num_values=8, num_train=16, num_val=8, batch_size=4, stream_chunk=16)
    loaders = dm.val_dataloader()
    assert len(loaders) == 2 and dm.val_names == ["len32", "len128"]
    batches = list(loaders[1])
    # 128-token sequences: 1 per batch (4 * 32 // 128), 8 chunks of 16 each, first flags on chunk 0
    assert len(batches) == 8 * 8 and [b["first"] for b in batches[:9]] == [True] + [False] * 7 + [True]
    x, _ = dm.eval_set(128)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches[:8]], 1)[0], torch.from_numpy(x[0]))
    train = list(dm.train_dataloader())
    assert len(train) == 4 * 2 and all(b["stream"] for b in train)
    assert dm.vocab_size == dm.tokenizer.vocab_size == 3 + 8 + 8 + 1
    with pytest.raises(MemLMError):
        RecallDataModule(seq_len=32, eval_lengths=[40], stream_chunk=16)
