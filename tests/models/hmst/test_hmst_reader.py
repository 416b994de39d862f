"""HMST MemoryReader: the grouped read (tokens grouped by query position, memory never
repeated per token) equals the reference that repeats each query position's memory."""
import pytest
import torch

from memlm.models.hmst.model import MemoryReader


@pytest.mark.parametrize("T,stride", [(16, 4), (13, 4), (9, 1), (7, 3)])
def test_grouped_read_equals_repeated_reference_forward_and_grad(T, stride):
    torch.manual_seed(0)
    rd = MemoryReader(16, 12, 4).double()
    torch.nn.init.normal_(rd.o.weight, std=0.3)
    torch.nn.init.normal_(rd.null_k, std=0.5)
    Tq, M = (T + stride - 1) // stride, 5
    h = torch.randn(3, T, 16, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(3, Tq, M, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, Tq, M) > 0.4
    mask[0] = False  # a row with no memory reads exactly zero (only the null slot)
    y, mass = rd(h, mem, mask, stride)
    y_ref, mass_ref = rd.forward_reference(h, mem, mask, stride)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mass, mass_ref, rtol=1e-10, atol=1e-12)
    assert y[0].abs().max() == 0 and y[1:].abs().max() > 0
    g = torch.randn_like(y)
    params = [h, mem, *rd.parameters()]
    ga = torch.autograd.grad((y * g).sum() + mass, params)
    gb = torch.autograd.grad((y_ref * g).sum() + mass_ref, params)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_more_query_positions_than_tokens_reads_the_first_ones():
    torch.manual_seed(0)
    rd = MemoryReader(8, 8, 2).double()
    h = torch.randn(2, 10, 8, dtype=torch.float64)
    mem = torch.randn(2, 12, 3, 8, dtype=torch.float64)  # stride 1 with more query positions than tokens
    mask = torch.ones(2, 12, 3, dtype=torch.bool)
    torch.testing.assert_close(rd(h, mem, mask, 1)[0], rd.forward_reference(h, mem, mask, 1)[0])


@pytest.mark.parametrize("T,stride", [(16, 4), (9, 1)])
def test_score_bias_is_the_same_in_both_reads_and_shifts_the_read_to_the_best_match(T, stride):
    torch.manual_seed(0)
    rd = MemoryReader(16, 12, 4).double()
    torch.nn.init.normal_(rd.o.weight, std=0.3)
    Tq, M = (T + stride - 1) // stride, 5
    h = torch.randn(3, T, 16, dtype=torch.float64)
    mem = torch.randn(3, Tq, M, 12, dtype=torch.float64)
    mask = torch.ones(3, Tq, M, dtype=torch.bool)
    bias = torch.zeros(3, Tq, M, dtype=torch.float64)
    bias[..., 2] = 50.0  # item 2 is a verbatim match
    y, _ = rd(h, mem, mask, stride, bias)
    torch.testing.assert_close(y, rd.forward_reference(h, mem, mask, stride, bias)[0], rtol=1e-10, atol=1e-12)
    only = torch.zeros_like(mask)
    only[..., 2] = True  # the other four items add nothing to the biased read
    torch.testing.assert_close(y, rd(h, mem, only, stride, bias)[0], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(y, rd(h, mem, mask, stride)[0])
