"""In-process batch loaders over a token memmap, resumable mid-epoch.

They are plain iterables (not torch DataLoaders): slicing a memmap is cheap, sharding
by rank is explicit, and ``state_dict()/load_state_dict()`` let Lightning store the data
position in the checkpoint so a resumed run sees exactly the batches an uninterrupted
run would have seen.

The loaders have a length, and Lightning's fetcher does not pre-fetch from an iterable
whose length it knows, so when a checkpoint is written after ``c`` consumed batches the
loader has produced exactly ``c``; ``state_dict`` reports that number.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch


def _to_batch(x: np.ndarray, y: np.ndarray, **extra) -> dict:
    batch = {"input_ids": torch.from_numpy(x.astype(np.int64)), "targets": torch.from_numpy(y.astype(np.int64))}
    batch.update(extra)
    return batch


class ResumableLoader:
    def __init__(self, epoch_fn: Callable[[], int] | None = None) -> None:
        self.epoch_fn = epoch_fn or (lambda: 0)
        self._start = 0  # batches to skip on the next __iter__ (resume)
        self._epoch = 0
        self._produced = 0
        self._exhausted = False

    def __len__(self) -> int:
        return self.num_batches()

    def num_batches(self) -> int:  # overridden
        return 0

    def make_batch(self, epoch: int, index: int) -> dict:  # overridden
        raise TypeError

    def __iter__(self) -> Iterator[dict]:
        self._epoch = int(self.epoch_fn())
        start, self._start = self._start, 0
        self._produced, self._exhausted = start, False
        for i in range(start, self.num_batches()):
            self._produced = i + 1
            yield self.make_batch(self._epoch, i)
        self._exhausted = True

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._produced}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state.get("consumed", 0))
        self._start = consumed if consumed < self.num_batches() else 0


class RandomWindowLoader(ResumableLoader):
    """Batches of ``batch_size`` windows at random offsets (seeded by seed, epoch, rank)."""

    def __init__(self, ids: np.ndarray, block_size: int, batch_size: int, steps: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, epoch_fn=None) -> None:
        super().__init__(epoch_fn)
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        self.steps, self.seed, self.rank, self.world_size = steps, seed, rank, world_size
        self.max_start = len(ids) - block_size - 1
        self._offsets_epoch, self._offsets = None, None

    def num_batches(self) -> int:
        return self.steps

    def make_batch(self, epoch: int, index: int) -> dict:
        if self._offsets_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            self._offsets = rng.integers(0, self.max_start + 1, size=(self.steps, self.batch_size))
            self._offsets_epoch = epoch
        starts = self._offsets[index]
        idx = starts[:, None] + np.arange(self.block_size + 1)[None, :]
        w = np.asarray(self.ids[idx])
        return _to_batch(w[:, :-1], w[:, 1:])


class SequentialWindowLoader(ResumableLoader):
    """Non-overlapping windows covering the split in order (evaluation), sharded by rank."""

    def __init__(self, ids: np.ndarray, block_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_windows: int | None = None) -> None:
        super().__init__(None)
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        n_windows = max(0, (len(ids) - 1) // block_size)
        if max_windows is not None:
            n_windows = min(n_windows, max_windows)
        self.windows = np.arange(n_windows)[rank::world_size]

    def num_batches(self) -> int:
        return (len(self.windows) + self.batch_size - 1) // self.batch_size

    def make_batch(self, epoch: int, index: int) -> dict:
        w = self.windows[index * self.batch_size : (index + 1) * self.batch_size]
        idx = (w * self.block_size)[:, None] + np.arange(self.block_size + 1)[None, :]
        tok = np.asarray(self.ids[idx])
        return _to_batch(tok[:, :-1], tok[:, 1:])


class StreamLoader(ResumableLoader):
    """``batch_size`` contiguous streams per rank, read in order, chunk by chunk (TBPTT).

    The split is cut into ``world_size * batch_size`` equal streams; rank r owns streams
    ``r*B .. r*B+B-1``. Batch k holds chunk k of each of its streams, so row b of batch
    k+1 continues exactly where row b of batch k ended.
    """

    def __init__(self, ids: np.ndarray, block_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_chunks: int | None = None, epoch_fn=None) -> None:
        super().__init__(epoch_fn)
        self.block_size, self.batch_size = block_size, batch_size
        n_streams = batch_size * world_size
        self.stream_len = len(ids) // n_streams
        if self.stream_len < block_size + 1:
            from memlm.core.errors import MemLMError

            raise MemLMError(
                f"split of {len(ids)} tokens is too short for {n_streams} streams of block_size {block_size}; "
                "lower data.batch_size or data.block_size"
            )
        usable = ids[: n_streams * self.stream_len]
        streams = np.asarray(usable).reshape(n_streams, self.stream_len)
        self.streams = streams[rank * batch_size : (rank + 1) * batch_size]
        self.n_chunks = (self.stream_len - 1) // block_size
        if max_chunks is not None:
            self.n_chunks = min(self.n_chunks, max_chunks)

    def num_batches(self) -> int:
        return self.n_chunks

    def make_batch(self, epoch: int, index: int) -> dict:
        a = index * self.block_size
        x = self.streams[:, a : a + self.block_size]
        y = self.streams[:, a + 1 : a + self.block_size + 1]
        return _to_batch(x, y, stream=True, first=(index == 0), chunk=index)
