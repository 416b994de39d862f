"""HMST selective scan: chunked scan == step recurrence (forward, grads, state), Mamba block carry."""
import pytest
import torch

from memlm.models.hmst.ssm import (
    MambaBlock,
    linear_scan,
    mamba_available,
    selective_scan_chunked,
    selective_scan_mamba,
    selective_scan_ref,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread is faster and immune to CPU oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(b=2, d=5, l=37, n=4, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    return dict(
        u=r(b, d, l), delta=r(b, d, l), A=-torch.exp(r(d, n)), B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l),
        delta_bias=r(d) * 0.5, initial_state=r(b, d, n),
    )


@pytest.mark.parametrize(
    "chunk,method", [(1, "doubling"), (4, "doubling"), (16, "doubling"), (64, "doubling"), (64, "sequential"), (64, "fused")]
)
def test_chunked_scan_equals_step_recurrence(chunk, method):
    kw = _inputs()
    y_ref, h_ref = selective_scan_ref(**kw, delta_softplus=True, return_last_state=True)
    y, h = selective_scan_chunked(**kw, delta_softplus=True, return_last_state=True, chunk=chunk, method=method)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["doubling", "sequential", "fused"])
def test_chunked_scan_gradients_equal_recurrence_gradients(method):
    kw = {k: v.requires_grad_() for k, v in _inputs(l=23).items()}
    y_ref = selective_scan_ref(**kw, delta_softplus=True)
    y = selective_scan_chunked(**kw, delta_softplus=True, chunk=8, method=method)
    g = torch.randn_like(y)
    names = list(kw)
    gr = torch.autograd.grad((y_ref * g).sum(), [kw[k] for k in names])
    gc = torch.autograd.grad((y * g).sum(), [kw[k] for k in names])
    for name, a, b in zip(names, gc, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_linear_scan_gradcheck_and_stability():
    a = torch.rand(9, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    for method in ("doubling", "sequential"):
        assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, chunk=4, method=method), (a, b, h0))
    # very strong decays (delta * A << -100) stay finite: decays are multiplied, never divided
    kw = _inputs(dtype=torch.float32)
    kw["delta"] = kw["delta"].abs() * 200
    for method in ("doubling", "sequential", "fused"):
        y = selective_scan_chunked(**kw, chunk=16, method=method)
        torch.testing.assert_close(y, selective_scan_ref(**kw), rtol=1e-4, atol=1e-4)
        assert torch.isfinite(y).all()


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return {type(f).__name__ for f in seen}


def test_fused_scan_gradients_through_the_last_state_and_gradcheck():
    """The fused node's own backward (adjoint scan, recomputation-free X = lam * dA * h_prev)
    against the step recurrence, with a loss on the last state too, and against finite differences."""
    kw = {k: v.requires_grad_() for k, v in _inputs(l=19).items()}
    names = list(kw)
    outs = {}
    for name, fn in [("ref", selective_scan_ref), ("fused", lambda **a: selective_scan_chunked(**a, method="fused"))]:
        y, h = fn(**kw, delta_softplus=True, return_last_state=True)
        g = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
        outs[name] = torch.autograd.grad(loss, [kw[k] for k in names])
    for name, a, b in zip(names, outs["fused"], outs["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")
    small = {k: v.detach().clone() for k, v in _inputs(b=2, d=3, l=5, n=2).items()}
    args = [small[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "initial_state")]

    def f(u, delta, A, B, C, h0):
        return selective_scan_chunked(u, delta, A, B, C, small["D"], None, delta_softplus=True, initial_state=h0,
                                      return_last_state=True, method="fused")

    assert torch.autograd.gradcheck(f, args)


def test_mamba_block_uses_the_fused_scan_on_cpu_and_matches_the_reference_backend():
    torch.manual_seed(0)
    fast = MambaBlock(d_model=8, d_state=4, d_conv=4, expand=2).double()
    ref = MambaBlock(d_model=8, d_state=4, d_conv=4, expand=2, backend="ref").double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    y_f, (c_f, s_f) = fast(x)
    y_r, (c_r, s_r) = ref(x)
    torch.testing.assert_close(y_f, y_r)
    torch.testing.assert_close(s_f, s_r)
    assert "_FusedSelectiveScanBackward" in _graph_nodes(y_f) and "_FusedSelectiveScanBackward" not in _graph_nodes(y_r)
    gf = torch.autograd.grad(y_f.square().sum(), [x, *fast.parameters()])
    gr = torch.autograd.grad(y_r.square().sum(), [x, *ref.parameters()])
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b)


def test_mamba_block_carries_state_exactly_across_segments():
    torch.manual_seed(0)
    blk = MambaBlock(d_model=8, d_state=4, d_conv=4, expand=2).double()
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    y_full, s_full = blk(x)
    y1, s1 = blk(x[:, :11])
    y2, s2 = blk(x[:, 11:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(s2[1], s_full[1])
    torch.testing.assert_close(s2[0], s_full[0])
    # a token 2 segments back changes the output of the current segment through the carried state
    x2 = x.clone()
    x2[:, 2] += 1.0
    _, a = blk(x2[:, :10])
    _, a = blk(x2[:, 10:20], a)
    y_changed, _ = blk(x2[:, 20:], a)
    _, b = blk(x[:, :10])
    _, b = blk(x[:, 10:20], b)
    y_orig, _ = blk(x[:, 20:], b)
    assert (y_changed - y_orig).abs().max() > 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not mamba_available(), reason="needs mamba_ssm (pip install mamba-ssm)")
def test_pure_scan_equals_mamba_ssm_cuda_kernel():
    kw = _inputs(b=2, d=64, l=256, n=16, dtype=torch.float32, device="cuda")
    y_m, h_m = selective_scan_mamba(**kw, delta_softplus=True, return_last_state=True)
    y_c, h_c = selective_scan_chunked(**kw, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(y_m, y_c, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(h_m, h_c, rtol=2e-3, atol=2e-3)
