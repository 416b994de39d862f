"""detach_state: every tensor of a nested carried state is cut from the graph, the structure is kept."""
from __future__ import annotations

import torch

from memlm.core.outputs import ModelOutput, detach_state


class Carried:
    """A state object with its own detach() (e.g. a cache class)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def detach(self) -> "Carried":
        return Carried(self.t.detach())


def test_nested_state_is_detached_and_keeps_its_shape():
    w = torch.ones(3, requires_grad=True)
    h = w * 2
    state = {"pos": 7, "name": "x", "layers": [{"M": h, "conv": (h + 1, None)}, Carried(h * 3)], "empty": None}
    out = detach_state(state)
    assert out["pos"] == 7 and out["name"] == "x" and out["empty"] is None
    assert isinstance(out["layers"], list) and isinstance(out["layers"][0]["conv"], tuple)
    m, (c, nothing) = out["layers"][0]["M"], out["layers"][0]["conv"]
    carried = out["layers"][1]
    assert nothing is None and isinstance(carried, Carried)
    for t, want in ((m, 2.0), (c, 3.0), (carried.t, 6.0)):
        assert not t.requires_grad and t.grad_fn is None and torch.equal(t, torch.full((3,), want))
    assert m.data_ptr() == h.data_ptr()  # a view of the same memory, not a copy
    assert state["layers"][0]["M"].requires_grad  # the input is left as it was


def test_gradient_stops_at_the_detached_state():
    w = torch.ones(2, requires_grad=True)
    state = detach_state({"h": w * 3})
    (state["h"] * w).sum().backward()  # only the direct use of w contributes
    assert torch.equal(w.grad, torch.full((2,), 3.0))


def test_none_and_model_output_defaults():
    assert detach_state(None) is None
    out = ModelOutput(logits=torch.zeros(1, 2, 3))
    assert out.state is None and out.hidden is None and out.aux_losses == {} and out.metrics == {}
    assert ModelOutput(logits=torch.zeros(1)).aux_losses is not out.aux_losses  # no shared mutable default
