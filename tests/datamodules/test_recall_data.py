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


def test_curriculum_length_walks_the_lengths_then_holds_the_last():
    from memlm.datamodules.recall import curriculum_length

    got = [curriculum_length(s, 100, [16, 32, 64], final_fraction=0.5) for s in range(100)]
    assert got[:25] == [16] * 25 and got[25:50] == [32] * 25 and got[50:] == [64] * 50
    assert [curriculum_length(s, 10, [8]) for s in (0, 9)] == [8, 8]
    with pytest.raises(MemLMError):
        curriculum_length(0, 10, [])


def test_epoch_curriculum_trains_short_sequences_first_with_matching_answers():
    dm = RecallDataModule(task="mqar", seq_len=64, num_kv_pairs=3, num_keys=8, num_values=8, num_train=8,
                          batch_size=4, stream_chunk=16, curriculum=[16, 32])
    loader = dm.train_dataloader()
    epoch = {"e": 0}
    loader.epoch_fn = lambda: epoch["e"]
    for e, length in enumerate([16, 32, 64, 64]):
        epoch["e"] = e
        batches = list(loader)
        # 2 groups of 4 rows, each row delivered as length // 16 chunks; `first` starts every row group
        assert len(batches) == 2 * length // 16
        assert sum(b["first"] for b in batches) == 2
        x = torch.cat([b["input_ids"] for b in batches[: length // 16]], 1).numpy()
        y = torch.cat([b["targets"] for b in batches[: length // 16]], 1).numpy()
        assert x.shape == (4, length)
        for row in range(4):  # every answer is the value stored with the queried key, at any length
            pairs = {x[row, 2 * i]: x[row, 2 * i + 1] for i in range(3)}
            ans = np.nonzero(y[row] != -100)[0]
            assert len(ans) == 3 and all(pairs[x[row, p]] == y[row, p] for p in ans)
    with pytest.raises(MemLMError):
        RecallDataModule(task="mqar", seq_len=64, stream_chunk=16, curriculum=[24])  # not a chunk multiple
    with pytest.raises(MemLMError):
        RecallDataModule(task="mqar", seq_len=64, curriculum=[128])  # longer than seq_len


def test_small_filler_passkey_shares_no_character_with_the_key_sentence():
    dm = RecallDataModule(task="passkey", seq_len=160, eval_lengths=[640], num_val=4, max_key=999, filler="small")
    sentence_chars = set("The pass key is . Remember it. What is the pass key? 0123456789")
    for n in (160, 640):
        x, y = dm.eval_set(n)
        for row in range(4):
            text = dm.tokenizer.decode(x[row])
            key = dm.tokenizer.decode(y[row][y[row] != -100])
            start = text.index(" The pass key is ")
            sentence = f" The pass key is {key}. Remember it. {key} is the pass key. "
            filler = text[:start] + text[start + len(sentence): text.index(" What is the pass key?")]
            assert text[start: start + len(sentence)] == sentence
            assert len(filler) == n - len(sentence) - len(" What is the pass key? The pass key is ") - len(key) + 1
            assert set(filler) <= set("~-=") and not set(filler) & sentence_chars
    assert dm.vocab_size < RecallDataModule(task="passkey", seq_len=160).vocab_size
    with pytest.raises(MemLMError):
        RecallDataModule(task="passkey", filler="lorem")
