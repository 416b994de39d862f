"""HMST Mixture-of-Experts: sparse dispatch vs a dense reference, balance and z losses, capacity."""
import pytest
import torch

from memlm.models.hmst.moe import MoEFeedForward, load_balance_loss, router_z_loss


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one intra-op thread is faster and immune to CPU oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _moe(**kw):
    torch.manual_seed(0)
    return MoEFeedForward(d_model=16, d_ff=24, n_experts=kw.pop("n_experts", 4), top_k=kw.pop("top_k", 2), init_std=0.3, **kw).double()


def test_sparse_dispatch_equals_dense_reference_forward_and_grad():
    moe = _moe()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    y, stats = moe(x)
    ref = moe.dense_reference(x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # gradients w.r.t. input and every expert weight agree as well
    g = torch.randn_like(y)
    gs = torch.autograd.grad((y * g).sum(), [x, *moe.parameters()])
    gr = torch.autograd.grad((ref * g).sum(), [x, *moe.parameters()])
    for a, b in zip(gs, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert abs(stats["load"].sum().item() - 1.0) < 1e-9
    assert stats["dropped"].item() == 0.0


def test_top1_and_router_bias_steer_dispatch():
    moe = _moe(top_k=1)
    x = torch.randn(20, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x)[0], moe.dense_reference(x))
    bias = torch.tensor([0.0, 0.0, 50.0, 0.0], dtype=torch.float64)
    y, stats = moe(x, bias=bias)
    assert stats["load"][2].item() == 1.0  # a large bias sends every token to expert 2
    torch.testing.assert_close(y, moe.experts.expert_forward(2, x))
    torch.testing.assert_close(y, moe.dense_reference(x, bias))


def test_load_balance_loss_is_minimal_for_uniform_routing():
    E, N, k = 8, 64, 2
    uniform_p = torch.full((N, E), 1.0 / E)
    uniform_counts = torch.full((E,), N * k // E)
    uni = load_balance_loss(uniform_p, uniform_counts, N * k).item()
    assert abs(uni - 1.0) < 1e-6
    torch.manual_seed(0)
    for _ in range(50):
        # when the dispatch fractions follow the router probabilities (f = P), the loss is
        # E * sum P^2 >= 1 with equality only at uniform routing (Cauchy-Schwarz)
        p = (torch.randn(E) * 2).softmax(-1)
        loss = load_balance_loss(p.expand(N, E), p * N * k, N * k).item()
        assert loss >= uni - 1e-6
        # a real skewed top-k routing costs clearly more than uniform
        bias = torch.randn(E) * 4
        pr = (torch.randn(N, E) + bias).softmax(-1)
        counts = torch.bincount(pr.topk(k, -1).indices.reshape(-1), minlength=E)
        assert load_balance_loss(pr, counts, N * k).item() > uni
    collapsed_p = torch.zeros(N, E)
    collapsed_p[:, 0] = 1.0
    collapsed = load_balance_loss(collapsed_p, torch.tensor([N] + [0] * (E - 1)), N)
    assert abs(collapsed.item() - E) < 1e-6


def test_balance_loss_uses_real_dispatch_counts_and_z_loss():
    moe = _moe()
    x = torch.randn(50, 16, dtype=torch.float64)
    _, stats = moe(x)
    r = moe.route(x)
    counts = torch.bincount(r.topk_idx.reshape(-1), minlength=4)
    expected = 4 * ((counts.double() / (50 * 2)) * r.probs.mean(0)).sum()
    torch.testing.assert_close(stats["balance"], expected)
    torch.testing.assert_close(stats["z"], (torch.logsumexp(r.logits, -1) ** 2).mean())
    assert abs(router_z_loss(torch.zeros(5, 4)).item() - torch.log(torch.tensor(4.0)).item() ** 2) < 1e-6
    # the balance loss trains the router: its gradient reaches the router weights
    (g,) = torch.autograd.grad(stats["balance"], [moe.router.weight])
    assert g.abs().sum() > 0


def test_capacity_drops_overflow_with_first_choice_priority():
    moe = _moe(top_k=2, capacity_factor=0.5)
    x = torch.randn(40, 16, dtype=torch.float64)
    y, stats = moe(x)
    cap = moe.capacity(40)  # ceil(0.5 * 40 * 2 / 4) = 10
    assert cap == 10
    assert (stats["load"] * 80).round().max().item() <= cap
    assert stats["dropped"].item() > 0
    # reference: mix only the kept assignments (k-major priority, token order within a choice)
    r = moe.route(x)
    used = torch.zeros(4, dtype=torch.long)
    gates = torch.zeros(40, 4, dtype=torch.float64)
    for j in range(2):
        for n in range(40):
            e = int(r.topk_idx[n, j])
            if used[e] < cap:
                used[e] += 1
                gates[n, e] = r.topk_weight[n, j]
    ref = torch.einsum("ne,end->nd", gates, moe.experts.dense_forward(x))
    torch.testing.assert_close(y, ref)


def _pair(**kw):
    """The same fp32 MoE with grouped (torch._grouped_mm) and per-expert loop dispatch."""
    torch.manual_seed(0)
    grouped = MoEFeedForward(d_model=16, d_ff=24, n_experts=4, top_k=2, init_std=0.3, dispatch="grouped", **kw)
    loop = MoEFeedForward(d_model=16, d_ff=24, n_experts=4, top_k=2, init_std=0.3, dispatch="loop", **kw)
    loop.load_state_dict(grouped.state_dict())
    return grouped, loop


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_grouped_dispatch_equals_loop_and_dense_reference_forward_and_grad(capacity_factor):
    grouped, loop = _pair(capacity_factor=capacity_factor)
    x = torch.randn(3, 11, 16, requires_grad=True)
    bias = torch.tensor([0.0, 0.5, 0.0, -0.5])
    yg, sg = grouped(x, bias)
    yl, sl = loop(x, bias)
    torch.testing.assert_close(yg, yl, rtol=1e-6, atol=1e-6)
    if capacity_factor is None:
        torch.testing.assert_close(yg, grouped.dense_reference(x, bias), rtol=1e-5, atol=1e-6)
    else:
        assert sg["dropped"].item() > 0
    for k in ("balance", "z", "load", "dropped"):
        torch.testing.assert_close(sg[k], sl[k])
    g = torch.randn_like(yg)
    gg = torch.autograd.grad((yg * g).sum() + sg["balance"], [x, *grouped.parameters()])
    gl = torch.autograd.grad((yl * g).sum() + sl["balance"], [x, *loop.parameters()])
    for a, b in zip(gg, gl):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_dispatch_with_idle_experts_and_autocast():
    grouped, loop = _pair()
    x = torch.randn(9, 16, requires_grad=True)
    bias = torch.tensor([0.0, 40.0, 0.0, 40.0])  # experts 0 and 2 receive no token
    yg, sg = grouped(x, bias)
    assert sg["load"][0].item() == 0.0 and sg["load"][2].item() == 0.0
    torch.testing.assert_close(yg, loop(x, bias)[0], rtol=1e-6, atol=1e-6)
    (gw,) = torch.autograd.grad(yg.square().sum(), [grouped.experts.w_up])
    assert gw[0].abs().sum() == 0 and gw[1].abs().sum() > 0  # an idle expert gets no gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yg16, _ = grouped(x)
        yl16, _ = loop(x)
    assert yg16.dtype == yl16.dtype == torch.bfloat16
    torch.testing.assert_close(yg16.float(), yl16.float(), rtol=2e-2, atol=2e-3)


def test_auto_dispatch_is_grouped_for_fp32_cpu_and_loop_for_fp64():
    grouped, _ = _pair()
    auto = MoEFeedForward(d_model=16, d_ff=24, n_experts=4, top_k=2)
    assert auto._use_grouped(torch.zeros(1, 16)) and not auto._use_grouped(torch.zeros(1, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grouped"):
        grouped(torch.zeros(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="dispatch"):
        MoEFeedForward(d_model=16, d_ff=24, dispatch="fast")


def test_flop_counter_counts_grouped_dispatch_like_the_loop():
    from torch.utils.flop_counter import FlopCounterMode

    grouped, loop = _pair()
    x = torch.randn(40, 16, requires_grad=True)
    counts = {}
    for name, m in (("grouped", grouped), ("loop", loop)):
        mode = FlopCounterMode(display=False)
        with mode:
            y, _ = m(x)
            y.square().sum().backward()
        counts[name] = mode.get_total_flops()
    # router (2 N D E) + 3 expert matmuls per assignment (2 N k D F each), forward and 2x backward
    assert counts["grouped"] == counts["loop"] > 3 * 3 * 2 * 40 * 2 * 16 * 24
