"""Mixture-of-Experts feed-forward layer for the HMST working memory.

- A linear top-k router (GShard/Switch style) with an optional additive bias on the router
  logits (the meta-controller's expert-routing gate).
- Switch load-balance loss ``E * sum_e f_e * P_e`` where ``f_e`` is the fraction of the real
  top-k assignments dispatched to expert ``e`` (every one of the k choices counts, after any
  capacity drop) and ``P_e`` the mean router probability; router z-loss
  ``mean(logsumexp(logits)^2)``.
- Dispatch by sorting the (token, choice) assignments by expert and gathering the tokens of
  each expert into one contiguous block; the only Python loop is over experts. An optional
  capacity factor drops assignments beyond ``ceil(cf * N * k / E)`` per expert, first choices
  taking priority over second choices.
- Experts are SwiGLU MLPs whose weights are stored stacked as ``[E, ...]`` tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _register_grouped_mm_flops() -> None:
    """FlopCounterMode has no rule for ``aten._grouped_mm``: count its matmul FLOPs (2 per
    multiply-add, as for mm), so that FLOP counts see the grouped dispatch as the loop."""
    try:
        from torch.utils.flop_counter import flop_registry, register_flop_formula
    except ImportError:  # pragma: no cover
        return
    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is None or op in flop_registry or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        if len(a_shape) == 2 and len(b_shape) == 3:  # [M, K] x [G, K, N], rows split by group
            return 2 * a_shape[0] * a_shape[1] * b_shape[2]
        if len(a_shape) == 2 and len(b_shape) == 2:  # [K, M] x [M, N] -> [G, K, N], M split by group
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        if len(a_shape) == 3 and len(b_shape) == 3:  # batched
            return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]  # [G, M, K] x [K, N], N split by group


if _GROUPED_MM:
    _register_grouped_mm_flops()


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E] router logits (after the optional bias), float32
    probs: torch.Tensor  # [N, E] softmax of logits
    topk_idx: torch.Tensor  # [N, k] chosen experts, best first
    topk_weight: torch.Tensor  # [N, k] combine weights


def load_balance_loss(probs: torch.Tensor, assignment_counts: torch.Tensor, n_assignments: int | torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * P_e``.

    ``probs`` [N, E] router probabilities; ``assignment_counts`` [E] how many top-k assignments
    each expert really received; ``n_assignments`` the total (N * k before drops). Equals 1.0
    for perfectly uniform routing and rises towards E as routing collapses onto one expert.
    """
    n_experts = probs.size(-1)
    f = assignment_counts.to(probs.dtype) / max(float(n_assignments), 1.0)
    p = probs.mean(0)
    return n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).pow(2).mean()


class Experts(nn.Module):
    """E SwiGLU MLPs with stacked weights: w_gate/w_up [E, D, F], w_down [E, F, D]."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, init_std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.init_std, self.out_std = init_std, out_std if out_std is not None else init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w_gate.device.type == "meta":
            return
        nn.init.normal_(self.w_gate, std=self.init_std)
        nn.init.normal_(self.w_up, std=self.init_std)
        nn.init.normal_(self.w_down, std=self.out_std)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate[e]) * (x @ self.w_up[e])) @ self.w_down[e]

    def grouped_forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert (``xs`` [M, D], ``counts`` [E] tokens per expert, in order) through
        their experts with grouped matmuls (``torch._grouped_mm``: one kernel per projection for
        all experts, no per-expert slicing, no host sync). Equals ``loop_forward``."""
        offs = torch.cumsum(counts, 0).to(torch.int32)
        w_gate, w_up, w_down = self.w_gate, self.w_up, self.w_down
        if torch.is_autocast_enabled(xs.device.type):  # the op has no autocast rule: cast as a matmul would
            dt = torch.get_autocast_dtype(xs.device.type)
            xs, w_gate, w_up, w_down = xs.to(dt), w_gate.to(dt), w_up.to(dt), w_down.to(dt)
        # (gate and up as one grouped matmul over concatenated weights measured no faster: the
        # concatenation costs what the saved call gains)
        g, u = torch._grouped_mm(xs, w_gate, offs=offs), torch._grouped_mm(xs, w_up, offs=offs)
        return torch._grouped_mm(F.silu(g) * u, w_down, offs=offs)

    def loop_forward(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The same as ``grouped_forward`` with one Python iteration per expert (any dtype/device)."""
        wg, wu, wd = self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)  # one backward node each
        outs = [(F.silu(c @ wg[e]) * (c @ wu[e])) @ wd[e] for e, c in enumerate(torch.split(xs, counts)) if c.numel()]
        return torch.cat(outs, 0) if outs else xs.new_zeros(0, self.d_model)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: [N, D] -> [E, N, D] (the naive reference)."""
        g = torch.einsum("nd,edf->enf", x, self.w_gate)
        u = torch.einsum("nd,edf->enf", x, self.w_up)
        return torch.einsum("enf,efd->end", F.silu(g) * u, self.w_down)


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts. ``forward(x[..., D], bias[..., E] | None) -> (y, stats)``."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = None,
        normalize_topk: bool = True,
        init_std: float = 0.02,
        out_std: float | None = None,
        dispatch: str = "auto",
    ):
        super().__init__()
        if dispatch not in ("auto", "grouped", "loop"):
            raise ValueError(f"dispatch must be auto, grouped or loop, got {dispatch!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor = capacity_factor
        self.normalize_topk = normalize_topk
        self.router = nn.Linear(d_model, n_experts, bias=False)
        if self.router.weight.device.type != "meta":
            nn.init.normal_(self.router.weight, std=init_std)
        self.experts = Experts(n_experts, d_model, d_ff, init_std, out_std)
        # expert dispatch: "grouped" (torch._grouped_mm over the expert-sorted tokens), "loop"
        # (one matmul chain per expert) or "auto" (grouped where the op supports the tensors:
        # CPU float32/bfloat16; the loop elsewhere, e.g. float64 or CUDA float32)
        self.dispatch = dispatch

    def _use_grouped(self, xs: torch.Tensor) -> bool:
        if self.dispatch == "loop":
            return False
        ok = _GROUPED_MM and xs.device.type == "cpu" and xs.dtype in (torch.float32, torch.bfloat16)
        if self.dispatch == "grouped" and not ok:
            raise RuntimeError(f"grouped expert dispatch needs torch._grouped_mm on CPU float32/bfloat16, got {xs.device.type} {xs.dtype}")
        return ok

    # -- routing -----------------------------------------------------------------------
    def route(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> RouterOutput:
        dt = torch.promote_types(x.dtype, torch.float32)  # route in at least fp32 (also under bf16)
        logits = F.linear(x.to(dt), self.router.weight.to(dt))
        if bias is not None:
            logits = logits + bias.to(dt)
        probs = logits.softmax(-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_topk and self.top_k > 1:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-9)
        return RouterOutput(logits, probs, idx, w)

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None or self.capacity_factor <= 0:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        n = xf.size(0)
        if bias is not None:  # [..., E] broadcastable to x's leading dims
            bias = bias.expand(*shape[:-1], self.n_experts).reshape(-1, self.n_experts)
        r = self.route(xf, bias)
        k, E = self.top_k, self.n_experts
        # k-major flattening: all first choices come before all second choices, so that a
        # stable sort by expert gives first choices priority under a capacity limit.
        flat_e = r.topk_idx.t().reshape(-1)
        flat_t = torch.arange(n, device=x.device).repeat(k)
        flat_w = r.topk_weight.t().reshape(-1)
        e_sorted, order = torch.sort(flat_e, stable=True)
        t_sorted, w_sorted = flat_t[order], flat_w[order]
        counts = torch.bincount(e_sorted, minlength=E)
        dropped = torch.zeros((), device=x.device)
        cap = self.capacity(n)
        if cap is not None:
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(e_sorted.numel(), device=x.device) - starts[e_sorted]
            keep = pos < cap
            dropped = 1.0 - keep.float().mean()
            e_sorted, t_sorted, w_sorted = e_sorted[keep], t_sorted[keep], w_sorted[keep]
            counts = torch.bincount(e_sorted, minlength=E)
        xs = xf[t_sorted]
        if self._use_grouped(xs):
            ys = self.experts.grouped_forward(xs, counts)
        else:
            ys = self.experts.loop_forward(xs, counts.tolist())
        y = ys.new_zeros(n, shape[-1]).index_add_(0, t_sorted, ys * w_sorted.to(ys.dtype).unsqueeze(-1))
        p = r.probs
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        stats = {
            "balance": load_balance_loss(p, counts, n * k),
            "z": router_z_loss(r.logits),
            "load": counts.detach().float() / max(n * k, 1),  # fraction of assignments per expert
            "entropy": entropy.detach(),
            "dropped": dropped.detach(),
        }
        return y.reshape(shape), stats

    def dense_reference(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Naive reference without capacity: run all experts densely and mix by the gate."""
        xf = x.reshape(-1, x.size(-1))
        r = self.route(xf, bias)
        gates = torch.zeros_like(r.probs).scatter(-1, r.topk_idx, r.topk_weight)  # [N, E]
        all_out = self.experts.dense_forward(xf)  # [E, N, D]
        return torch.einsum("ne,end->nd", gates.to(all_out.dtype), all_out).reshape(x.shape)

    def param_counts(self) -> tuple[int, int]:
        """(expert parameters, router parameters)."""
        return sum(p.numel() for p in self.experts.parameters()), self.router.weight.numel()
