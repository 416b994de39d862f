"""memlm.core.state: the RecurrentState protocol check and the helpers its implementations share."""
import pytest
import torch

from memlm.core.state import (
    RecurrentState, flatten_tensors, leading_batch_size, reset_tensor_rows, row_mask, unflatten_tensors,
)


def nested_state(batch=3, layers=12):
    g = torch.Generator().manual_seed(0)
    return {
        "pos": torch.tensor(40),
        "layers": [{"M": torch.randn(batch, 2, 4, generator=g), "conv": torch.randn(batch, 3, 4, generator=g)}
                   for _ in range(layers)],
    }


def test_flatten_then_unflatten_rebuilds_the_nested_state_exactly():
    state = nested_state()
    flat = flatten_tensors(state)
    assert set(flat) == {"pos"} | {f"layers.{i}.{k}" for i in range(12) for k in ("M", "conv")}
    assert flat["layers.10.M"] is state["layers"][10]["M"]
    back = unflatten_tensors(flat)
    assert back.keys() == state.keys() and len(back["layers"]) == 12
    assert torch.equal(back["pos"], state["pos"])
    for i in range(12):  # numeric order: layer 10 is not read back as layer 2
        for k in ("M", "conv"):
            assert torch.equal(back["layers"][i][k], state["layers"][i][k]), (i, k)


def test_flatten_and_unflatten_refuse_what_cannot_be_saved_or_rebuilt():
    with pytest.raises(TypeError, match="only tensors"):
        flatten_tensors({"pos": 3})
    with pytest.raises(ValueError, match="contains '.'"):
        flatten_tensors({"a.b": torch.zeros(1)})
    with pytest.raises(ValueError, match="not 0..1"):
        unflatten_tensors({"layers.0.M": torch.zeros(1), "layers.2.M": torch.zeros(1)})
    with pytest.raises(ValueError, match="nests under a tensor"):
        unflatten_tensors({"a": torch.zeros(1), "a.b": torch.zeros(1)})
    assert flatten_tensors(None) == {} and flatten_tensors({"prev": None}) == {}


def test_reset_tensor_rows_touches_only_the_masked_rows():
    t = torch.arange(24, dtype=torch.float32).view(4, 3, 2)
    mask = torch.tensor([False, True, False, True])
    out = reset_tensor_rows(t, mask)
    assert torch.equal(out[[0, 2]], t[[0, 2]]) and torch.equal(out[[1, 3]], torch.zeros(2, 3, 2))
    fresh = torch.full_like(t, -1.0)
    out = reset_tensor_rows(t, mask, fresh)
    assert torch.equal(out[[1, 3]], fresh[[1, 3]]) and torch.equal(out[[0, 2]], t[[0, 2]])
    v = torch.tensor([5, 6, 7, 8])  # a [B] tensor (one value per row) works the same way
    assert reset_tensor_rows(v, mask).tolist() == [5, 0, 7, 0]
    assert torch.equal(t, torch.arange(24, dtype=torch.float32).view(4, 3, 2))  # the input is not modified


def test_row_mask_checks_dtype_and_rows():
    assert row_mask([True, False], 2).tolist() == [True, False]
    with pytest.raises(ValueError, match="holds 3 rows"):
        row_mask(torch.tensor([True, False]), 3)
    with pytest.raises(TypeError, match="bool"):
        row_mask(torch.tensor([1, 0]), 2)


def test_leading_batch_size_skips_shared_scalars():
    assert leading_batch_size(nested_state(batch=5)) == 5
    assert leading_batch_size({"pos": torch.tensor(3)}) is None


class _Complete:
    carried_state = None

    def init_state(self, batch_size, device=None):
        return torch.zeros(batch_size, 2)

    def detach_state(self, state):
        return state.detach()

    def reset_rows(self, state, mask):
        return reset_tensor_rows(state, mask)

    def state_batch_size(self, state):
        return state.shape[0]

    def state_to_dict(self, state):
        return {"h": state}

    def state_from_dict(self, tensors):
        return tensors["h"]


class _NoCarriedState:
    init_state = _Complete.init_state
    detach_state = _Complete.detach_state
    reset_rows = _Complete.reset_rows
    state_batch_size = _Complete.state_batch_size
    state_to_dict = _Complete.state_to_dict
    state_from_dict = _Complete.state_from_dict


def test_the_protocol_needs_every_method_and_the_carried_state():
    assert isinstance(_Complete(), RecurrentState)
    assert not isinstance(_NoCarriedState(), RecurrentState)
    assert not isinstance(object(), RecurrentState)
