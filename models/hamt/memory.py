"""The holographic slot memory of one HAMT layer.

State per layer: ``M`` [B, S, E] (S slots of E-dim superposed bindings, E = mem_expand * D; the item,
keys and read probe are projected up to E and the read back down to D) and the short causal
convolution's last K-1 inputs. One token costs O(S·D) time and the state never grows.

Write (per token t, slot s)::

    b_t     = bind(i_t, k_t)                                   # item bound to its key
    g_t,s   = sigmoid(W_g[q_t; i_t]_s + bias_s [+ w_s · rms(M_t-1,s)])   # write gate
    M_t,s   = lambda_s · M_t-1,s + g_t,s · b_t                 # passive decay, gated write

Read::

    u_t     = key_fn(W_u q_t)                                  # learned retrieval head: unbinding key
    r_t,s   = gamma * unbind(M_t,s / rms(M_t,s), u_t)          # RMS normalisation at read time, learnable scale
    a_t     = softmax_s(<W_a q_t, r~_t,s> / sqrt(D) + c_s)     # per-slot read weights
    c_t     = sum_s a_t,s r~_t,s ;  out_t = W_o [h_t; c_t]      # context fused with the hidden state

Because normalisation happens at read time, the write recurrence is *linear in M* when the gate does
not look at the state (``gate_mode="parallel"``): a chunk of C tokens is computed at once as
``M_chunk = L @ (g*b) + lambda^(c+1) M_0`` with ``L[s, c, c'] = lambda_s^(c-c')`` (log-space
decays, causal mask, document-boundary segments), carrying only ``M`` between chunks, like gated
linear attention. ``gate_mode="recurrent"`` adds the slot-state term to the gate, which makes the
recurrence nonlinear; it then runs as a sequential scan over cheap tensors (optionally compiled).

Keys (``key_source``): ``position`` = fixed keys per absolute position (seeded hash, see
:mod:`binding`); ``content`` = keys computed from the token context (bipolar via tanh, or unitary
for circular binding). Recall of a value by its key needs content keys, because a query cannot
know at which position its key was written; positional keys give a position-indexed sequence
memory. ``mix`` = the first half of the key dimensions from content, the second half positional (an
ablation between the two). All are deterministic in eval mode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memlm.models.hamt import binding as hb

EPS = 1e-6


def rms_normalize(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# -- the linear scan, three ways ------------------------------------------------------------
def scan_reference(
    b: torch.Tensor, g: torch.Tensor, log_decay: torch.Tensor, m0: torch.Tensor, reset: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token loop of ``M_t = lambda*M_{t-1} + g_t*b_t`` (the ground truth for tests).

    b [B,T,D], g [B,T,S], log_decay [S], m0 [B,S,D], reset [B,T] bool (clear before writing t).
    Returns M for every step: [B,S,T,D].
    """
    lam = log_decay.exp()[None, :, None]
    m = m0
    out = []
    for t in range(b.size(1)):
        if reset is not None:
            m = m * (~reset[:, t]).to(m.dtype)[:, None, None]
        m = lam * m + g[:, t, :, None] * b[:, t, None, :]
        out.append(m)
    return torch.stack(out, dim=2)


def scan_chunk(
    b: torch.Tensor, g: torch.Tensor, log_decay: torch.Tensor, m0: torch.Tensor, reset: torch.Tensor | None = None
) -> torch.Tensor:
    """The same recurrence for one chunk, computed in parallel (no loop over tokens).

    M_c = sum_{c'<=c, same segment} lambda^(c-c') g_c' b_c' + lambda^(c+1) [no reset up to c] M_0
    """
    B, C, D = b.shape
    if C == 1:  # one token (generation): M = lambda * M_0 [unless reset] + g * b
        keep = 1.0 if reset is None else (~reset[:, 0]).to(b.dtype)[:, None, None]
        m = log_decay.exp()[None, :, None] * m0 * keep + g[:, 0, :, None] * b[:, 0, None, :]
        return m.unsqueeze(2)
    idx = torch.arange(C, device=b.device)
    diff = (idx[:, None] - idx[None, :]).to(log_decay.dtype)  # [C, C]
    causal = idx[:, None] >= idx[None, :]
    logL = diff[None] * log_decay[:, None, None]  # [S, C, C]
    L = torch.exp(logL.masked_fill(~causal[None], float("-inf")))  # [S, C, C]
    carry = torch.exp((idx + 1).to(log_decay.dtype)[None, :] * log_decay[:, None])  # [S, C]
    gb = g.transpose(1, 2).unsqueeze(-1) * b.unsqueeze(1)  # [B, S, C, D]
    if reset is not None and bool(reset.any()):
        seg = reset.long().cumsum(1)  # [B, C]
        same = (seg[:, :, None] == seg[:, None, :]).to(b.dtype)  # [B, C, C]
        m = torch.matmul(L[None] * same[:, None], gb)
        carry = carry[None] * (seg == 0).to(b.dtype)[:, None, :]  # [B, S, C]
        return m + carry.unsqueeze(-1) * m0.unsqueeze(2)
    return torch.matmul(L[None], gb) + carry[None, :, :, None] * m0.unsqueeze(2)


def _entry_closed(ends: torch.Tensor, log_a: torch.Tensor, r: torch.Tensor | None):
    """Closed form of ``x_{k+1} = a_k x_k + ends_k`` from ``x_0 = 0`` over n steps, with ``a_k = exp(log_a)``
    per slot, or 0 where ``r_k`` (a reset inside step k). Returns (entries [B, n, S, E], coef [B|1, n, S]:
    the factor of the initial state in each entry, after [B, S, E]: the state after the last step,
    total [B|1, S]: the factor of the initial state in it)."""
    n = ends.size(1)
    kk = torch.arange(n, device=ends.device)
    steps = (kk[:, None] - 1 - kk[None, :]).to(log_a.dtype)  # k-1-j
    Lc = torch.exp((steps[None] * log_a[:, None, None]).masked_fill(~(kk[:, None] > kk[None, :])[None], float("-inf")))
    coef = torch.exp(kk.to(log_a.dtype)[None, :] * log_a[:, None])[None]  # [1, S, n]
    after_w = torch.exp((n - 1 - kk).to(log_a.dtype)[None, :] * log_a[:, None])[None]  # [1, S, n]
    total = torch.exp(n * log_a)[None]  # [1, S]
    if r is None:
        entries = torch.einsum("skj,bjse->bkse", Lc, ends)
    else:  # a term survives only when no reset lies strictly after it and before the step it reaches
        r = r.long()
        before = r.cumsum(1) - r  # resets in steps < k
        upto = before + r  # resets in steps <= j
        count = r.sum(1, keepdim=True)
        Lc = Lc[None] * (before[:, :, None] == upto[:, None, :]).to(ends.dtype).unsqueeze(1)  # [B, S, n, n]
        entries = torch.einsum("bskj,bjse->bkse", Lc, ends)
        coef = coef * (before == 0).to(ends.dtype)[:, None, :]
        after_w = after_w * (upto == count).to(ends.dtype)[:, None, :]
        total = total * (count == 0).to(ends.dtype)
    after = torch.einsum("bsj,bjse->bse", after_w.expand(ends.size(0), -1, -1), ends)
    return entries, coef.transpose(1, 2), after, total


def entry_states(ends: torch.Tensor, log_a: torch.Tensor, r: torch.Tensor | None, x0: torch.Tensor,
                 block: int = 16) -> torch.Tensor:
    """The states entering each of n steps of ``x_{k+1} = a_k x_k + ends_k`` (``x_0 = x0``; ``a_k`` =
    exp(log_a) per slot, 0 where ``r_k``): ends [B, n, S, E] -> [B, n, S, E].

    Closed form inside blocks of ``block`` steps (one batched matmul); the block-entry states are the
    same problem one level up (block decay a^block, a block reset where any step resets), so the
    cost is O(n * block) instead of O(n^2) for one closed form, and there is no n-step Python loop."""
    B, n, S, E = ends.shape
    if n <= block:
        entries, coef, _, _ = _entry_closed(ends, log_a, r)
        return entries + coef.unsqueeze(-1) * x0[:, None]
    Q = -(-n // block)
    pad = Q * block - n
    if pad:  # steps past the end: they change no earlier entry
        ends = F.pad(ends, (0, 0, 0, 0, 0, pad))
        r = None if r is None else F.pad(r, (0, pad))
    rb = None if r is None else r.reshape(B * Q, block)
    entries, coef, after, _ = _entry_closed(ends.reshape(B * Q, block, S, E), log_a, rb)
    x_blocks = entry_states(after.view(B, Q, S, E), block * log_a, None if r is None else rb.any(-1).view(B, Q), x0, block)
    coef = coef.expand(B * Q, -1, -1).reshape(B, Q, block, S, 1)
    out = entries.view(B, Q, block, S, E) + coef * x_blocks[:, :, None]
    return out.reshape(B, Q * block, S, E)[:, :n]


class ChunkedSlotStates:
    """The per-token slot states ``M_t,s`` of the parallel recurrence, used without materialising them.

    ``M_t,s = sum_{c'<=t, same segment} W[s, t, c'] b_c' + carry[s, t] M0_s`` inside each chunk of C
    tokens, with ``W[s, t, c'] = lambda_s^(t-c') g_c',s`` and ``carry[s, t] = lambda_s^(t+1)`` (0 after a
    reset in the chunk), and ``M0`` the state entering the chunk. Everything a read needs from
    ``M_t,s`` is linear or quadratic in it, so it is computed from [C, C] matrices per chunk and slot
    (like chunked gated linear attention) instead of a [B, S, T, E] tensor:

    - ``dots(p)``: <p_t, M_t,s> = sum_c' W P[t, c'] + carry <p_t, M0_s> with P = p b^T;
    - ``sq_norms()``: ||M_t,s||^2 = diag(W G W^T) + 2 carry (W R) + carry^2 ||M0_s||^2, G = b b^T, R = b M0^T;
    - ``mix(a)``: sum_s a_t,s M_t,s = (sum_s a_t,s W[s, t, :]) b + (a carry) M0.

    Chunks are processed all at once; only the chunk-entry states ``M0`` (one per chunk, [B, n, S, E])
    come from a short sequential recurrence over the n chunks. Per token the cost is O(C (E + S C))
    instead of O(S E) elementwise work on a state per token and slot, and memory traffic is 1/C.
    Tested equal (values and gradients) to :func:`scan_reference` and to the materialised path.
    """

    def __init__(self, b: torch.Tensor, g: torch.Tensor, log_decay: torch.Tensor, m0: torch.Tensor,
                 reset: torch.Tensor | None, chunk: int) -> None:
        B, T, E = b.shape
        S = g.size(-1)
        C = max(1, min(int(chunk), T))
        n = -(-T // C)
        pad = n * C - T
        if pad:  # zero writes past the end: the states of real tokens are unchanged
            b = F.pad(b, (0, 0, 0, pad))
            g = F.pad(g, (0, 0, 0, pad))
            reset = None if reset is None else F.pad(reset, (0, pad))
        self.T, self.C, self.n = T, C, n
        self.b = b.reshape(B, n, C, E)
        idx = torch.arange(C, device=b.device)
        diff = (idx[:, None] - idx[None, :]).to(log_decay.dtype)
        logL = (diff[None] * log_decay[:, None, None]).masked_fill(~(idx[:, None] >= idx[None, :])[None], float("-inf"))
        gc = g.reshape(B, n, C, S).permute(0, 1, 3, 2)  # [B, n, S, C]
        W = torch.exp(logL)[None, None] * gc.unsqueeze(-2)  # [B, n, S, C(t), C(c')]
        carry = torch.exp((idx + 1).to(log_decay.dtype)[None, :] * log_decay[:, None])  # [S, C]
        if reset is not None and bool(reset.any()):
            seg = reset.reshape(B, n, C).long().cumsum(-1)  # segment index inside each chunk
            W = W * (seg[..., :, None] == seg[..., None, :]).to(W.dtype).unsqueeze(2)
            self.carry = carry[None, None] * (seg == 0).to(W.dtype).unsqueeze(2)  # [B, n, S, C]
        else:
            self.carry = carry[None, None].expand(B, n, S, C)
        self.W = W
        # chunk-entry states: M0_{k+1} = lambda^C M0_k + end_k (0 * M0_k after a reset in chunk k)
        ends = torch.einsum("bnsj,bnje->bnse", W[..., -1, :], self.b)  # [B, n, S, E]: chunk k's own writes
        r = reset.reshape(B, n, C).any(-1) if reset is not None and bool(reset.any()) else None
        self.M0 = entry_states(ends, C * log_decay, r, m0)  # [B, n, S, E]
        last = (T - 1) - (n - 1) * C  # the real last token of the last chunk
        self.final = self.carry[:, -1, :, last, None] * self.M0[:, -1] + torch.einsum(
            "bsj,bje->bse", W[:, -1, :, last], self.b[:, -1])

    def _chunks(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        pad = self.n * self.C - T
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, self.n, self.C, x.size(-1))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, C, F] -> [B, T, F]
        return x.reshape(x.size(0), self.n * self.C, x.size(-1))[:, : self.T]

    def dots(self, p: torch.Tensor) -> torch.Tensor:
        """<p_t, M_t,s> for p [B, T, E] -> [B, T, S]."""
        pc = self._chunks(p)
        P = pc @ self.b.transpose(-1, -2)  # [B, n, C, C]
        out = torch.einsum("bnstj,bntj->bnts", self.W, P)
        out = out + torch.einsum("bnte,bnse->bnts", pc, self.M0) * self.carry.transpose(-1, -2)
        return self._tokens(out)

    def sq_norms(self) -> torch.Tensor:
        """||M_t,s||^2 -> [B, T, S]."""
        G = self.b @ self.b.transpose(-1, -2)  # [B, n, C, C]
        WG = self.W @ G.unsqueeze(2)  # [B, n, S, C, C]
        t1 = (WG * self.W).sum(-1)  # [B, n, S, C]
        R = torch.einsum("bnje,bnse->bnsj", self.b, self.M0)  # [B, n, S, C]
        t2 = 2.0 * self.carry * (self.W @ R.unsqueeze(-1)).squeeze(-1)
        t3 = self.carry.pow(2) * self.M0.pow(2).sum(-1, keepdim=True)
        return self._tokens((t1 + t2 + t3).clamp_min(0.0).transpose(-1, -2))

    def mix(self, a: torch.Tensor) -> torch.Tensor:
        """sum_s a_t,s M_t,s for a [B, T, S] -> [B, T, E]."""
        ac = self._chunks(a)  # [B, n, C, S]
        A = torch.einsum("bnts,bnstj->bntj", ac, self.W)  # [B, n, C, C]
        out = A @ self.b + (ac * self.carry.transpose(-1, -2)) @ self.M0
        return self._tokens(out)


class HolographicMemory(nn.Module):
    def __init__(
        self,
        dim: int,
        n_slots: int = 8,
        binding: str = "elementwise",
        key_source: str = "content",
        gate_mode: str = "parallel",
        scan_chunk: int = 8,
        conv_kernel: int = 4,
        tau_min: float = 4.0,
        tau_max: float = 4096.0,
        key_seed: int = 0,
        compile_scan: bool = False,
        mem_expand: int = 1,
        scan_impl: str = "fused",
    ) -> None:
        super().__init__()
        if scan_impl not in ("fused", "materialized"):
            raise ValueError(f"scan_impl must be fused or materialized, got {scan_impl!r}")
        self.scan_impl = scan_impl
        if binding not in ("elementwise", "circular"):
            raise ValueError(f"binding must be elementwise or circular, got {binding!r}")
        if key_source not in ("content", "position", "mix"):
            raise ValueError(f"key_source must be content, position or mix, got {key_source!r}")
        if gate_mode not in ("parallel", "recurrent"):
            raise ValueError(f"gate_mode must be parallel or recurrent, got {gate_mode!r}")
        self.dim, self.n_slots = dim, n_slots
        # key/item dimension of the slots: crosstalk between n superposed bindings falls like sqrt(n / mem_dim)
        self.mem_dim = E = dim * int(mem_expand)
        self.binding, self.key_source, self.gate_mode = binding, key_source, gate_mode
        self.scan_chunk, self.conv_kernel, self.key_seed = scan_chunk, conv_kernel, key_seed
        # short causal depthwise convolution: lets a write see the previous tokens (key -> value)
        self.conv = nn.Conv1d(dim, dim, conv_kernel, groups=dim, bias=True)
        # fused projections (one matmul each): z -> [query, item, (content key)]; query -> [unbinding key, read probe]
        self.n_zin = 2 if key_source == "position" else 3
        self.w_zin = nn.Linear(dim, dim + (self.n_zin - 1) * E, bias=False)  # [query D | item E | key E]
        self.w_qout = nn.Linear(dim, 2 * E, bias=False)  # retrieval head (unbinding key) + read-weight probe
        self.w_gate = nn.Linear(dim + E, n_slots, bias=True)
        self.w_gate_state = nn.Parameter(torch.zeros(n_slots, E)) if gate_mode == "recurrent" else None
        taus = torch.logspace(math.log10(tau_min), math.log10(tau_max), n_slots)
        lam = 1.0 - 1.0 / taus
        self.decay_logit = nn.Parameter(torch.log(lam) - torch.log1p(-lam))  # sigmoid^-1(lambda)
        self.slot_bias = nn.Parameter(torch.zeros(n_slots))
        self.read_scale = nn.Parameter(torch.ones(E))  # learnable scale after RMS normalisation
        self.w_out = nn.Linear(dim + E, dim, bias=False)
        with torch.no_grad():
            self.conv.weight.normal_(0.0, 0.02)
            self.conv.weight[:, 0, -1] += 1.0  # start close to identity on the current token
            self.conv.bias.zero_()
        self._step = torch.compile(self._recurrent_step, dynamic=False) if compile_scan else self._recurrent_step

    # -- pieces --------------------------------------------------------------------------
    def log_decay(self) -> torch.Tensor:
        return F.logsigmoid(self.decay_logit.float())

    def _key_fn(self, v: torch.Tensor) -> torch.Tensor:
        if self.binding == "elementwise":
            return torch.tanh(2.0 * rms_normalize(v))  # ~bipolar at any weight scale; exact inverse at +-1
        return hb.unitary(v)  # unit-modulus spectrum: correlation inverts convolution exactly

    def write_keys(self, z: torch.Tensor, pos0: int, key_pre: torch.Tensor | None = None) -> torch.Tensor:
        if self.key_source == "content":
            return self._key_fn(key_pre)
        pos = torch.arange(pos0, pos0 + z.size(1), device=z.device)
        fixed = hb.positional_keys(pos, self.mem_dim, self.binding, self.key_seed).to(z.dtype).expand(z.size(0), -1, -1)
        if self.key_source == "position":
            return fixed
        half = self.mem_dim // 2
        return torch.cat([self._key_fn(key_pre)[..., :half], fixed[..., half:]], dim=-1)

    def _unbind(self, m: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """m [B, S, C, D] with key [B, C, D]."""
        return hb.unbind(m, key.unsqueeze(1), self.binding)

    def _causal_conv(self, xin: torch.Tensor, T: int, reset: torch.Tensor | None) -> torch.Tensor:
        """Depthwise causal conv over [buffer; x]; taps never reach across a document boundary."""
        K = self.conv_kernel
        w = self.conv.weight[:, 0, :]  # [D, K]; tap k looks back K-1-k tokens
        seg = None
        if reset is not None and bool(reset.any()):
            seg = torch.cat([reset.new_zeros(reset.size(0), K - 1), reset], 1).long().cumsum(1)  # [B, K-1+T]
        out = self.conv.bias
        for k in range(K):
            tap = xin[:, k : k + T] * w[:, k]
            if seg is not None and k < K - 1:
                tap = tap * (seg[:, k : k + T] == seg[:, K - 1 :]).unsqueeze(-1).to(tap.dtype)
            out = out + tap
        return out

    def _recurrent_step(self, m, base_t, b_t, lam, keep):
        m = m * keep
        slot = (rms_normalize(m) * self.w_gate_state).sum(-1) / math.sqrt(self.mem_dim)
        g = torch.sigmoid(base_t + slot)
        m = lam * m + g.unsqueeze(-1) * b_t.unsqueeze(1)
        return m, g

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        h: torch.Tensor,
        state: dict | None = None,
        pos0: int = 0,
        reset: torch.Tensor | None = None,
        want_aux: bool = True,
        want_stats: bool = False,
    ) -> tuple[torch.Tensor, dict, dict]:
        """h [B,T,D] (normalised hidden). Returns (out [B,T,D], new state, extras)."""
        B, T, D = h.shape
        K, E = self.conv_kernel, self.mem_dim
        if state is None:
            m0 = h.new_zeros(B, self.n_slots, E, dtype=torch.float32)
            conv_in = h.new_zeros(B, K - 1, D)
        else:  # the memory is kept in float32 (decays near 1 are not representable in bf16)
            m0, conv_in = state["M"].float(), state["conv"].to(h.dtype)
        xin = torch.cat([conv_in, h], dim=1)
        z = F.silu(self._causal_conv(xin, T, reset))  # [B, T, D]
        new_conv = xin[:, -(K - 1) :] if K > 1 else conv_in
        zin = self.w_zin(z)
        q, item = zin[..., :D], zin[..., D : D + E]
        key = self.write_keys(z, pos0, zin[..., D + E :] if self.n_zin == 3 else None)
        qout = self.w_qout(q)
        ukey = self._key_fn(qout[..., :E])
        attn_q = qout[..., E:]
        b = hb.bind(item, key, self.binding)
        gate_logits = self.w_gate(zin[..., : D + E])  # from [query, item]: [B, T, S]
        log_decay = self.log_decay()  # float32

        C = max(1, int(self.scan_chunk))
        if self.gate_mode == "parallel" and self.scan_impl == "fused" and T > 1:  # one token: the direct update
            out, read_w, g_all, m, rec = self._forward_fused(h, b, gate_logits, log_decay, m0, reset, ukey, attn_q, key,
                                                             want_aux, C)
        else:
            out, read_w, g_all, m, rec = self._forward_materialized(h, b, gate_logits, log_decay, m0, reset, ukey, attn_q,
                                                                    key, want_aux, C)
        new_state = {"M": m, "conv": new_conv}
        extras: dict = {}
        if want_aux:
            target = rms_normalize(item.detach().float())
            extras["recon_mse"] = F.mse_loss(rec.float(), target)
            extras["fidelity"] = F.cosine_similarity(rec.float(), item.detach().float(), dim=-1).mean().detach()
        if want_stats:
            with torch.no_grad():
                extras["gate_mean_slot"] = g_all.float().mean(dim=(0, 1))  # [S]
                extras["read_weight_slot"] = read_w.float().mean(dim=(0, 1))  # [S]
                extras["slot_norm"] = m.float().pow(2).mean(-1).sqrt().mean(0)  # [S]
                extras["decay"] = log_decay.exp().float()
                extras["gate_hist"] = g_all.float().flatten()[:4096]
        extras["gate_mean"] = g_all.float().mean().detach()
        extras["read_entropy"] = (-(read_w.clamp_min(1e-9).log() * read_w).sum(-1)).float().mean().detach()
        return out, new_state, extras

    def _forward_fused(self, h, b, gate_logits, log_decay, m0, reset, ukey, attn_q, key, want_aux, C):
        """The parallel recurrence and every read through :class:`ChunkedSlotStates` (no per-token states)."""
        E = self.mem_dim
        g_all = torch.sigmoid(gate_logits)
        with torch.autocast(device_type=h.device.type, enabled=False):  # the memory runs in float32
            st = ChunkedSlotStates(b.float(), g_all.float(), log_decay, m0, reset, C)
            inv = torch.rsqrt(st.sq_norms() / E + EPS)  # [B, T, S]: 1 / RMS of every slot at every token
            ukey_f = ukey.float()
            probe = hb.unbind_adjoint(attn_q.float() * self.read_scale, ukey_f, self.binding)
            logits = st.dots(probe) * inv / math.sqrt(E) + self.slot_bias
            w = torch.softmax(logits, dim=-1)
            ctx = hb.unbind(st.mix(w * inv), ukey_f, self.binding) * self.read_scale
            rec = self._reconstruct_fused(st, inv, key.float(), g_all.float()) if want_aux else None
        out = self.w_out(torch.cat([h, ctx.to(h.dtype)], dim=-1))
        return out, w, g_all, st.final, rec

    def _reconstruct_fused(self, st: "ChunkedSlotStates", inv: torch.Tensor, key: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """:meth:`_reconstruct` through the chunked states: unbind each token's own item from M_t."""
        w = g / g.sum(-1, keepdim=True).clamp_min(EPS)  # [B, T, S]
        return rms_normalize(hb.unbind(st.mix(w * inv), key, self.binding))

    def _forward_materialized(self, h, b, gate_logits, log_decay, m0, reset, ukey, attn_q, key, want_aux, C):
        """Per-token slot states [B, S, c, E] chunk by chunk: the recurrent gate mode, and the reference
        the fused parallel path is tested against."""
        outs, gates, rec_sum = [], [], []
        m = m0
        # split once: slicing inside the loop would make every slice's backward write a full-size tensor
        ukey_c, attn_c, h_c, key_c = (t.split(C, dim=1) for t in (ukey, attn_q, h, key))
        if self.gate_mode == "recurrent":
            lam = log_decay.exp()[None, :, None]
            ms, gs = [], []
            keep_all = None if reset is None else (~reset).to(h.dtype).unbind(1)
            one = torch.ones_like(m[:, :1, :1])
            for t, (base_t, b_t) in enumerate(zip(gate_logits.unbind(1), b.unbind(1))):
                keep = one if keep_all is None else keep_all[t][:, None, None]
                m, g_t = self._step(m, base_t, b_t, lam, keep)
                ms.append(m)
                gs.append(g_t)
            m_chunks = torch.stack(ms, dim=2).split(C, dim=2)  # [B, S, c, D] each
            g_chunks = torch.stack(gs, dim=1).split(C, dim=1)  # [B, c, S] each
        else:
            g_chunks = torch.sigmoid(gate_logits).split(C, dim=1)
            b_c = b.split(C, dim=1)
            r_c = [None] * len(b_c) if reset is None else reset.split(C, dim=1)
            m_chunks = []
            for b_i, g_i, r_i in zip(b_c, g_chunks, r_c):
                with torch.autocast(device_type=h.device.type, enabled=False):  # the scan runs in float32
                    m_all = scan_chunk(b_i.float(), g_i.float(), log_decay, m, r_i)  # [B, S, c, D]
                m = m_all[:, :, -1]
                m_chunks.append(m_all)
        for i, (m_all, g_i) in enumerate(zip(m_chunks, g_chunks)):
            inv = self._slot_inv_rms(m_all)
            outs.append(self._read(m_all, inv, ukey_c[i], attn_c[i], h_c[i]))
            gates.append(g_i)
            if want_aux:
                rec_sum.append(self._reconstruct(m_all, inv, key_c[i], g_i))
        out = torch.cat([o[0] for o in outs], dim=1)
        read_w = torch.cat([o[1] for o in outs], dim=1)  # [B, T, S]
        g_all = torch.cat(gates, dim=1)  # [B, T, S]
        rec = torch.cat(rec_sum, dim=1) if want_aux else None  # [B, T, D]
        return out, read_w, g_all, m, rec

    def _slot_inv_rms(self, m_all: torch.Tensor) -> torch.Tensor:
        """1 / RMS of every slot state: [B, c, S] (normalisation at read time, not in the recurrence)."""
        norm = torch.linalg.vector_norm(m_all, dim=-1) / math.sqrt(self.mem_dim)  # [B, S, c]
        return torch.rsqrt(norm.pow(2) + EPS).transpose(1, 2)

    def _read(self, m_all: torch.Tensor, inv: torch.Tensor, ukey: torch.Tensor, attn_q: torch.Tensor, h: torch.Tensor):
        """r_s = gamma * unbind(M_s / rms(M_s), u); a = softmax(<W_a q, r_s>); c = sum_s a_s r_s.

        Computed without unbinding every slot: <p, unbind(M_s, u)> = <adjoint(p, u), M_s> and
        sum_s a_s unbind(M_s, u) = unbind(sum_s a_s M_s, u) (unbinding is linear).
        """
        probe = hb.unbind_adjoint(attn_q * self.read_scale, ukey, self.binding)  # [B, c, D]
        logits = torch.einsum("bcd,bscd->bcs", probe, m_all) * inv / math.sqrt(self.mem_dim) + self.slot_bias
        w = torch.softmax(logits.float(), dim=-1).to(m_all.dtype)  # [B, c, S]
        mix = torch.einsum("bcs,bscd->bcd", w * inv, m_all)
        ctx = hb.unbind(mix, ukey, self.binding) * self.read_scale
        return self.w_out(torch.cat([h, ctx], dim=-1)), w

    def _reconstruct(self, m_all: torch.Tensor, inv: torch.Tensor, key: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Unbind each token's item from M_t with its own write key; gate-weighted mean over the slots."""
        w = g / g.sum(-1, keepdim=True).clamp_min(EPS)  # [B, c, S]
        mix = torch.einsum("bcs,bscd->bcd", w * inv, m_all)
        return rms_normalize(hb.unbind(mix, key, self.binding))
