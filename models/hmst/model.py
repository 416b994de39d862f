"""HMSTModel: the Hierarchical Memory-State Transformer as a plain ``nn.Module``.

One forward over a segment ``ids[B, T]``::

    x = embed(ids)
    e, ssm_state' = MambaSSM(x, ssm_state)          episodic memory over the token stream,
                                                     state carried across segments
    h = lower MoE blocks 0..exit_layer-1 (x)         working memory (RoPE + SDPA + top-k MoE)
    exit head: logits_exit = lm_head(exit_norm(h))   deep-supervised in stage 1
    queries = exit_norm(h) every mem_query_stride tokens -> FAISS top-k (semantic memory),
    episodic store top-k episodes (query = previous segment's pooled state, causal)
    gates = MetaController(mean_t h, [exit entropy, context length, occupancy, best similarity])
    rows with gate exit=1 stop here (upper layers are not computed for them);
    other rows: h += episodic * g_ep * W e           learned gate on the SSM output
                h += MemoryReader(h, [semantic values ; episode vectors], mask by gates)
                upper MoE blocks with the expert-bias gate added to every router's logits
                logits = lm_head(ln_f(h))
    with mem_knn_lambda > 0 (kNN-LM output), every row whose semantic gate is on, exited or
    not, also searches memory, and its prediction becomes (1 - λ) p_model + λ p_kNN

The semantic memory and the episodic store are passed in by the caller (the
LightningModule owns them); the model returns the keys/values to write
(``mem_keys``/``mem_values``) and never writes itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.models.hmst.controller import GATES, GateDecision, MetaController
from memlm.models.hmst.critic import Critic
from memlm.models.hmst.moe import MoEFeedForward
from memlm.models.hmst.ssm import MambaBlock
from memlm.core.meter import FAISS_QUERIES, ComputeMeter
from memlm.core.outputs import ModelOutput
from memlm.models.transformer import CausalSelfAttention, GPTConfig, KVCache, rope_cache
from memlm.core.errors import MemLMError


@dataclass
class HMSTConfig:
    vocab_size: int = 256
    block_size: int = 128  # attention window (training segment length)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 256  # hidden size of each expert
    n_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    exit_layer: int | None = None  # early-exit head after this many blocks (default n_layer // 2)
    dropout: float = 0.0
    rope_base: float = 10000.0
    # episodic SSM
    ssm_layers: int = 1
    ssm_d_state: int = 16
    ssm_expand: int = 2
    ssm_d_conv: int = 4
    ssm_backend: str = "auto"
    # memory reads
    mem_top_k: int = 4
    mem_query_stride: int = 1
    # added to the reader's attention logits: this x the item's retrieval score (cosine) for
    # semantic items (0 = the reader alone decides what to read)
    mem_score_bias: float = 0.0
    # a semantic key (and query) is the mean of the exit-layer states of the last this many
    # tokens (carried across segments): "capital of Zorbia is" then matches on the name, not
    # on the last word alone (1 = the token's own state)
    mem_key_window: int = 1
    # what a semantic key (and query) is the window mean of: "exit" = exit-layer states (they
    # carry the context, so the same words after another context give another key), "embedding"
    # = the token embeddings (context-free: a fact's words match wherever they occur; with a
    # window of ~10 characters this is an n-gram key)
    mem_key_source: str = "exit"
    # kNN-LM output (mem_value: next_token items): the next-token distribution of a row that
    # reads semantic memory is (1 - lambda) p_model + lambda p_kNN, where p_kNN puts each
    # retrieved item's softmax(score / temperature) weight on the token the item names; an item
    # counts only when its score is >= min_score, and a query with none keeps p_model. With
    # lambda > 0 a row that exits early reads semantic memory too (the query is its exit-layer
    # state), so "exit + retrieve" is a cheap path that can still copy a stored fact.
    mem_knn_lambda: float = 0.0
    mem_knn_temperature: float = 0.05
    mem_knn_min_score: float = 0.0
    episodic_top_k: int = 2
    # controller and critic
    controller_hidden: int = 64
    critic_d_model: int = 128
    critic_layers: int = 2
    critic_heads: int = 4
    critic_max_len: int = 128
    critic_match_ngram: int = 0  # exact-match flags of n-grams across query / response / facts (0 = none)
    # per-row early exit out of training: a row exits when the exit head's entropy (nats) on its
    # last token is below this threshold, overriding the exit gate (None = the gate decides)
    exit_entropy_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.exit_layer is None:
            self.exit_layer = max(1, self.n_layer // 2)
        if int(self.mem_key_window) != self.mem_key_window or self.mem_key_window < 1:
            raise MemLMError(f"mem_key_window must be an integer >= 1, got {self.mem_key_window}")
        if self.mem_key_source not in ("exit", "embedding"):
            raise MemLMError(f"mem_key_source must be exit or embedding, got {self.mem_key_source!r}")
        if not 0.0 <= self.mem_knn_lambda < 1.0:
            raise MemLMError(f"mem_knn_lambda must be in [0, 1), got {self.mem_knn_lambda}")
        if not self.mem_knn_temperature > 0:
            raise MemLMError(f"mem_knn_temperature must be > 0, got {self.mem_knn_temperature}")
        if not 1 <= self.exit_layer < self.n_layer:
            raise MemLMError(f"exit_layer must be in [1, n_layer-1] = [1, {self.n_layer - 1}], got {self.exit_layer}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise MemLMError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}) with an even head size")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class HMSTState:
    """What HMST carries between calls (stream chunks in training, steps in generation)."""

    ssm: list  # per SSM layer: (conv_state [B, Di, K-1], ssm_state [B, Di, N])
    pos: int = 0  # tokens of the stream seen so far
    prev_pooled: torch.Tensor | None = None  # [B, D] pooled state of the previous segment
    kv: KVCache | None = None  # attention cache (generation only), trimmed to block_size
    decision: GateDecision | None = None  # gates held fixed while a KV cache is in use
    # [B] bool, None = all True: False for a row whose memory was reset (its prev_pooled is not a
    # previous segment of its stream), so that row reads no episodes, like a fresh stream
    prev_valid: torch.Tensor | None = None
    # [B] best semantic-retrieval similarity of the row's latest search (a controller feature
    # known before this segment's search; rows that did not search keep their last value)
    prev_sim: torch.Tensor | None = None
    # mem_key_window > 1: the last window-1 exit-layer states [B, w-1, D] (zeros where not yet
    # seen) and how many of them are real [B]
    key_tail: torch.Tensor | None = None
    key_count: torch.Tensor | None = None

    def detach(self) -> "HMSTState":
        return HMSTState(
            ssm=[(c.detach(), s.detach()) for c, s in self.ssm],
            pos=self.pos,
            prev_pooled=None if self.prev_pooled is None else self.prev_pooled.detach(),
            kv=self.kv,
            decision=self.decision,
            prev_valid=self.prev_valid,
            prev_sim=None if self.prev_sim is None else self.prev_sim.detach(),
            key_tail=None if self.key_tail is None else self.key_tail.detach(),
            key_count=self.key_count,
        )

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv.length

    @property
    def batch_size(self) -> int:
        return self.ssm[0][1].shape[0] if self.ssm else 0


@dataclass
class HMSTOutput(ModelOutput):
    exit_logits: torch.Tensor | None = None  # [B, T, V] (training / when requested)
    decision: GateDecision | None = None
    features: torch.Tensor | None = None  # [B, 4] controller state features
    pooled: torch.Tensor | None = None  # [B, D] controller input
    mem_keys: torch.Tensor | None = None  # [B, T, D] keys to write (exit-layer states, mem_key_window mean)
    retrieved_ids: torch.Tensor | None = None  # [B, T/stride, k] semantic ids read
    exit_rows: torch.Tensor | None = None  # [B] bool: rows whose upper layers were skipped
    layers_run: float = 0.0  # blocks executed per row, averaged over the batch
    compute: ComputeMeter = field(default_factory=ComputeMeter)  # what this forward actually ran


class HMSTBlock(nn.Module):
    """Pre-norm block: RoPE causal self-attention (the baseline's) + top-k MoE feed-forward."""

    def __init__(self, cfg: HMSTConfig) -> None:
        super().__init__()
        gcfg = GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_head=cfg.n_head, n_embd=cfg.d_model,
                         dropout=cfg.dropout, bias=False)
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(gcfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=False)
        out_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.moe = MoEFeedForward(cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.top_k, cfg.capacity_factor, out_std=out_std)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, bias=None):
        x = x + self.attn(self.ln1(x), cos, sin, cache, layer)
        y, stats = self.moe(self.ln2(x), bias)
        return x + self.drop(y), stats


class MemoryReader(nn.Module):
    """Gated cross-attention from each token to its retrieved memory vectors (kNN memory).

    A learned null slot (zero value) is always attendable, so rows with no memory (or with
    the read gates off) read exactly zero. The output is scaled by a per-head sigmoid gate
    computed from the token's state.
    """

    def __init__(self, d_model: int, value_dim: int, n_head: int) -> None:
        super().__init__()
        self.n_head, self.hd = n_head, d_model // n_head
        self.ln = nn.LayerNorm(d_model, bias=False)
        self.ln_mem = nn.LayerNorm(value_dim, bias=False)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(value_dim, 2 * d_model, bias=False)
        self.null_k = nn.Parameter(torch.zeros(n_head, self.hd))
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, n_head)
        if self.o.weight.device.type != "meta":
            nn.init.normal_(self.o.weight, std=0.005)
            nn.init.constant_(self.gate.bias, -1.0)

    def forward(self, h: torch.Tensor, mem: torch.Tensor, mask: torch.Tensor, stride: int = 1,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, D]; mem [B, Tq, M, Dv] and mask [B, Tq, M] per query position; token t reads
        query position t // stride (memory is projected once per query, then shared). ``bias``
        [B, Tq, M] (optional) is added to every head's attention logits: the retrieval score
        times ``mem_score_bias``, so a near-verbatim match wins the read before the reader has
        learned to tell it apart.

        The tokens are grouped by query position ([B, Tq, stride, ...]), so the keys and values
        of a query position are never copied to its ``stride`` tokens; :meth:`forward_reference`
        repeats them per token (the same numbers, the test oracle)."""
        B, T, D = h.shape
        Tq, M = mem.size(1), mem.size(2)
        S = max(1, int(stride))
        if Tq * S < T:
            return self.forward_reference(h, mem, mask, stride, bias)
        H, hd = self.n_head, self.hd
        hn = self.ln(h)
        q = self.q(hn)
        if Tq * S > T:  # pad the last query position's group to full
            q = F.pad(q, (0, 0, 0, Tq * S - T))
        q = q.view(B, Tq, S, H, hd)
        k, v = self.kv(self.ln_mem(mem.to(h.dtype))).view(B, Tq, M, 2, H, hd).unbind(3)
        scale = hd**-0.5
        s_mem = torch.einsum("bqshd,bqmhd->bqshm", q, k) * scale
        if bias is not None:
            s_mem = s_mem + bias[:, :, None, None, :].to(s_mem.dtype)
        s_mem = s_mem.masked_fill(~mask[:, :, None, None, :], float("-inf"))
        s_null = torch.einsum("bqshd,hd->bqsh", q, self.null_k.to(q.dtype)).unsqueeze(-1) * scale
        att = torch.cat([s_null, s_mem], dim=-1).float().softmax(-1).to(h.dtype)[..., 1:]
        out = torch.einsum("bqshm,bqmhd->bqshd", att, v).reshape(B, Tq * S, H, hd)[:, :T]
        g = torch.sigmoid(self.gate(hn)).unsqueeze(-1)
        mass = att.reshape(B, Tq * S, H, M)[:, :T].sum(-1).mean()
        return self.o((out * g).reshape(B, T, D)), mass

    def forward_reference(self, h: torch.Tensor, mem: torch.Tensor, mask: torch.Tensor, stride: int = 1,
                          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with the memory of each query position repeated to its tokens."""
        B, T, D = h.shape
        Tq, M = mem.size(1), mem.size(2)
        hn = self.ln(h)
        q = self.q(hn).view(B, T, self.n_head, self.hd)
        kv = self.kv(self.ln_mem(mem.to(h.dtype))).view(B, Tq, M, 2, self.n_head, self.hd)
        if stride > 1 or Tq != T:
            kv = kv.repeat_interleave(stride, dim=1)[:, :T]
            mask = mask.repeat_interleave(stride, dim=1)[:, :T]
            bias = None if bias is None else bias.repeat_interleave(stride, dim=1)[:, :T]
        k, v = kv.unbind(3)
        scale = self.hd**-0.5
        s_mem = torch.einsum("bthd,btmhd->bthm", q, k) * scale
        if bias is not None:
            s_mem = s_mem + bias[:, :, None, :].to(s_mem.dtype)
        s_mem = s_mem.masked_fill(~mask[:, :, None, :], float("-inf"))
        s_null = torch.einsum("bthd,hd->bth", q, self.null_k.to(q.dtype)).unsqueeze(-1) * scale
        att = torch.cat([s_null, s_mem], dim=-1).float().softmax(-1).to(h.dtype)
        out = torch.einsum("bthm,btmhd->bthd", att[..., 1:], v)
        g = torch.sigmoid(self.gate(hn)).unsqueeze(-1)
        return self.o((out * g).reshape(B, T, D)), att[..., 1:].sum(-1).mean()


class HMSTModel(nn.Module):
    """See the module docstring. ``forward(ids, state, memory=..., episodic_store=..., ...)``."""

    def __init__(self, cfg: HMSTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(HMSTBlock(cfg) for _ in range(cfg.n_layer))
        self.exit_norm = nn.LayerNorm(D, bias=False)
        self.ln_f = nn.LayerNorm(D, bias=False)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (exit head shares it too)
        # episodic memory: Mamba layers over the token stream, gated into the residual
        self.ssm_norms = nn.ModuleList(nn.LayerNorm(D, bias=False) for _ in range(cfg.ssm_layers))
        self.ssm = nn.ModuleList(
            MambaBlock(D, cfg.ssm_d_state, cfg.ssm_d_conv, cfg.ssm_expand, backend=cfg.ssm_backend)
            for _ in range(cfg.ssm_layers)
        )
        self.ep_norm = nn.LayerNorm(D, bias=False)
        self.ep_proj = nn.Linear(D, D, bias=False)
        self.ep_gate = nn.Linear(2 * D, D)
        # semantic memory read (kNN cross-attention over retrieved values and episode vectors)
        self.reader = MemoryReader(D, D, cfg.n_head)
        self.controller = MetaController(D, cfg.n_experts, 4, cfg.controller_hidden, vocab_size=cfg.vocab_size,
                                         init_gate_probs={"exit": 0.1, "episodic": 0.9, "semantic": 0.9, "verify": 0.1})
        self.critic = Critic(cfg.vocab_size, cfg.critic_d_model, cfg.critic_layers, cfg.critic_heads, cfg.critic_max_len,
                             match_ngram=cfg.critic_match_ngram)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.wte.weight.device.type != "meta":
            self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if name.startswith(("controller", "critic", "ssm.", "blocks")):
                continue  # these sub-modules initialise themselves
            if isinstance(m, nn.Linear) and m is not self.reader.o:
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=0.02)
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.ep_proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
        nn.init.constant_(self.ep_gate.bias, -1.0)
        nn.init.normal_(self.reader.o.weight, std=0.005)
        nn.init.constant_(self.reader.gate.bias, -1.0)

    # -- parameter accounting -------------------------------------------------------------------
    def param_counts(self) -> dict:
        """total, active (expert params scaled by top_k/n_experts), expert and embedding counts."""
        total = sum(p.numel() for p in self.parameters())
        expert = sum(p.numel() for b in self.blocks for p in b.moe.experts.parameters())
        inactive = expert * (self.cfg.n_experts - self.cfg.top_k) // self.cfg.n_experts
        return {"total": total, "active": total - inactive, "expert": expert, "embedding": self.wte.weight.numel()}

    # -- helpers ------------------------------------------------------------------------------------
    def init_state(self, batch: int, device, use_cache: bool = False) -> HMSTState:
        dtype = self.wte.weight.dtype
        return HMSTState(
            ssm=[blk.init_state(batch, device, dtype) for blk in self.ssm],
            kv=KVCache(self.cfg.n_layer) if use_cache else None,
        )

    def rope(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        need = start + T
        if self._rope is None or self._rope[0].size(0) < need or self._rope[0].device != torch.device(device):
            size = max(need, 2 * self.cfg.block_size, 1 if self._rope is None else 2 * self._rope[0].size(0))
            self._rope = rope_cache(size, self.cfg.head_dim, self.cfg.rope_base, device=device)
        cos, sin = self._rope
        return cos[start:need], sin[start:need]

    def _trim_cache(self, kv: KVCache) -> None:
        W = self.cfg.block_size
        for i in range(len(kv.keys)):
            if kv.keys[i] is not None and kv.keys[i].size(2) > W:
                kv.keys[i] = kv.keys[i][:, :, -W:]
                kv.values[i] = kv.values[i][:, :, -W:]

    def _retrieve(self, queries: torch.Tensor, memory, stride: int, meter: ComputeMeter, need=None):
        """Per-token kNN read for the rows given (``queries`` [n, T, D]): search every ``stride``-th
        query; token t uses the last query <= t. ``need`` [n, nq] (bool) searches only those
        queries; the others come back empty (no items). Counts the searches on ``meter``."""
        n, T, D = queries.shape
        k = self.cfg.mem_top_k
        if memory is None or k <= 0 or len(memory) == 0 or n == 0:
            return None
        qpos = torch.arange(0, T, stride, device=queries.device)
        nq = qpos.numel()
        q = queries[:, qpos].detach()
        q = q.reshape(-1, D) if need is None else q[need]
        cost = memory.query_cost(k) if hasattr(memory, "query_cost") else 0.0
        meter.add(FAISS_QUERIES, q.size(0), cost)
        res = memory.search(q, k)
        if need is None:
            values = res.values.view(n, nq, k, -1).to(queries.dtype)  # per query position
            mask = res.mask.view(n, nq, k)
            scores = res.scores.view(n, nq, k).float()
            ids = res.ids.view(n, nq, k)
        else:  # the unsearched queries: no items (a kNN-LM position without items keeps p_model)
            values = queries.new_zeros(n, nq, k, res.values.size(-1))
            values[need] = res.values.view(-1, k, res.values.size(-1)).to(queries.dtype)
            mask = torch.zeros(n, nq, k, dtype=torch.bool, device=queries.device)
            mask[need] = res.mask.view(-1, k)
            scores = torch.zeros(n, nq, k, device=queries.device)
            scores[need] = res.scores.view(-1, k).float()
            ids = torch.full((n, nq, k), -1, dtype=torch.long, device=queries.device)
            ids[need] = res.ids.view(-1, k).to(ids.device)
        best = torch.where(mask[..., 0], scores[..., 0], torch.zeros_like(scores[..., 0]))  # [n, nq]
        return values, mask, best, ids, scores

    def _episodes(self, query: torch.Tensor, store, Tq: int, meter: ComputeMeter):
        """Top-k stored episode summaries for each query row [n, D] -> [n, Tq, k', D] (None if none)."""
        k = self.cfg.episodic_top_k
        if store is None or k <= 0 or len(store) == 0 or query.size(0) == 0:
            return None
        meter.add_flops("episodic_store", 2.0 * query.size(0) * len(store) * query.size(1))
        scores, slots = store.retrieve(query.float(), k)  # [n, k']
        if hasattr(store, "record_hits"):
            store.record_hits(slots)
        vals = store.get(slots.reshape(-1))["pooled"].view(query.size(0), slots.size(1), -1).to(query.device, query.dtype)
        return vals.unsqueeze(1).expand(-1, Tq, -1, -1)

    def knn_output_flops(self, queries: int, positions: int) -> float:
        """The kNN-LM output's FLOPs: naming the items' tokens of ``queries`` searches (cosine
        against the vocabulary) and the mixture at ``positions`` logit rows."""
        c = self.cfg
        return 2.0 * queries * c.mem_top_k * c.d_model * c.vocab_size + 4.0 * positions * c.vocab_size

    # -- exact matmul FLOPs of each part (FlopCounterMode's convention: 2 per multiply-add) ------
    def _block_flops(self, rows: int, T: int, Tk: int) -> float:
        c = self.cfg
        D = c.d_model
        attn = 2 * T * D * 3 * D + 4 * T * Tk * D + 2 * T * D * D
        moe = 2 * T * D * c.n_experts + T * c.top_k * 6 * D * c.d_ff
        return float(rows) * (attn + moe)

    def _ssm_flops(self, rows: int, T: int) -> tuple[float, float]:
        """(matmul + conv FLOPs, elementwise scan operations) of the SSM layers on ``rows`` rows."""
        mm = scan = 0.0
        for blk in self.ssm:
            Di, N, R, D = blk.d_inner, blk.d_state, blk.dt_rank, blk.d_model
            mm += 2 * T * D * 2 * Di + 2 * Di * T * blk.d_conv + 2 * T * Di * (R + 2 * N) + 2 * T * R * Di + 2 * T * Di * D
            mm += 2 * T * Di * N  # the read-out C . h (a batched matmul)
            scan += 4 * T * Di * N  # exp(delta A), delta B u, a h + b per state element
        return rows * mm, rows * scan

    def _reader_flops(self, rows: int, T: int, Tq: int, M: int) -> float:
        D, H = self.cfg.d_model, self.cfg.n_head
        return float(rows) * (2 * T * D * D + 2 * Tq * M * D * 2 * D + 4 * T * M * D + 2 * T * D + 2 * T * D * D + 2 * T * D * H)

    def _controller_flops(self, rows: int) -> float:
        c = self.controller
        hid = c.trunk[2].in_features
        return float(rows) * 2 * ((c.d_model + c.n_state_features) * hid + hid * hid + hid * (len(GATES) + c.n_experts + 2))

    def _knn_mix(self, logits: torch.Tensor, retr, stride: int, meter: ComputeMeter, need=None) -> torch.Tensor:
        """The kNN-LM output of the searched rows: log((1 - lambda) p_model + lambda p_kNN) [n, T, V].

        An item's token is the vocabulary entry whose embedding is nearest (cosine) its value: a
        ``next_token`` value is that token's embedding when it was written (the LM head is tied).
        p_kNN at a query position puts softmax(score / temperature) over its items with score >=
        ``mem_knn_min_score`` on their tokens; a position with no such item keeps p_model."""
        cfg = self.cfg
        values, mask, _, _, scores = retr
        n, Tq, k, Dv = values.shape
        T, V = logits.size(1), logits.size(2)
        emb = F.normalize(self.wte.weight.detach().float(), dim=-1)
        if need is None:
            tok = (F.normalize(values.float(), dim=-1) @ emb.t()).argmax(-1)  # [n, Tq, k]
        else:  # only the searched queries have items to name
            tok = torch.zeros(n, Tq, k, dtype=torch.long, device=logits.device)
            tok[need] = (F.normalize(values[need].float(), dim=-1) @ emb.t()).argmax(-1)
        ok = mask & (scores >= cfg.mem_knn_min_score)
        any_ok = ok.any(-1, keepdim=True)
        w = (scores / cfg.mem_knn_temperature).masked_fill(~ok, float("-inf")).softmax(-1)
        w = torch.where(any_ok, w, torch.zeros_like(w))  # no usable item: all -inf gives NaN weights
        p_knn = torch.zeros(n, Tq, V, device=logits.device).scatter_add_(-1, tok, w)
        lam = cfg.mem_knn_lambda * any_ok.float()  # [n, Tq, 1]
        if stride > 1 or Tq != T:  # token t reads query position t // stride
            p_knn = p_knn.repeat_interleave(stride, 1)[:, :T]
            lam = lam.repeat_interleave(stride, 1)[:, :T]
        n_q = n * Tq if need is None else int(need.sum())
        meter.add_flops("knn_output", self.knn_output_flops(n_q, n * T))
        mixed = torch.logaddexp(torch.log1p(-lam) + F.log_softmax(logits.float(), -1), torch.log(lam) + torch.log(p_knn))
        return mixed

    @torch.no_grad()
    def _window_keys(self, h_exit: torch.Tensor, state: HMSTState):
        """Retrieval keys [B, T, D]: the causal mean of the last ``mem_key_window`` exit-layer
        states (the carried tail first), with the new tail and count."""
        w = int(self.cfg.mem_key_window)
        if w <= 1:
            return h_exit.detach(), None, None
        B, T, D = h_exit.shape
        dev = h_exit.device
        tail = state.key_tail.to(dev, h_exit.dtype) if state.key_tail is not None else h_exit.new_zeros(B, w - 1, D)
        cnt = state.key_count.to(dev) if state.key_count is not None else torch.zeros(B, dtype=torch.long, device=dev)
        full = torch.cat([tail, h_exit.detach()], 1)  # [B, w-1+T, D]; unseen tail entries are zeros
        csum = F.pad(full.float().cumsum(1), (0, 0, 1, 0))
        end = torch.arange(T, device=dev) + w  # prefix-sum index one past each position
        sums = csum[:, end] - csum[:, end - w]
        n = (cnt[:, None] + torch.arange(1, T + 1, device=dev)[None]).clamp(max=w)
        keys = (sums / n[..., None]).to(h_exit.dtype)
        return keys, full[:, -(w - 1):], (cnt + T).clamp(max=w - 1)

    @staticmethod
    def _knn_need(sem_idx, go_rows, T: int, N: int, score_mask, stride: int):
        """[n, nq] the queries each searched row needs (None = all): every query for a row that
        runs the upper path; for a row that exits, those read by its kept (last N), scored positions."""
        n = sem_idx.numel()
        if n == 0 or (N >= T and score_mask is None):
            return None
        dev = sem_idx.device
        scored = (torch.arange(T, device=dev) >= T - N).unsqueeze(0).expand(n, T)
        if score_mask is not None:
            scored = scored & score_mask.to(dev)[sem_idx].bool()
        nq = (T + stride - 1) // stride
        need = F.pad(scored, (0, nq * stride - T)).view(n, nq, stride).any(-1)  # token t reads query t // stride
        need = need | go_rows[sem_idx].unsqueeze(1)
        return None if bool(need.all()) else need

    def _cache_len(self, kv: KVCache | None, layer: int) -> int:
        return 0 if kv is None or kv.keys[layer] is None else kv.keys[layer].size(2)

    def _segmented(self, ids, state, memory, store, gate_mode, schedule, decision, return_exit_logits, generator):
        """Longer inputs without a KV cache: consecutive block_size segments, state carried
        (exactly what stream training does)."""
        outs = []
        for s in range(0, ids.size(1), self.cfg.block_size):
            out = self(ids[:, s:s + self.cfg.block_size], state, memory, store, gate_mode, schedule, decision,
                       False, return_exit_logits, generator)
            state = out.state
            outs.append(out)
        last = outs[-1]
        cat = lambda name: None if getattr(last, name) is None else torch.cat([getattr(o, name) for o in outs], 1)  # noqa: E731
        last.logits, last.hidden, last.mem_keys = cat("logits"), cat("hidden"), cat("mem_keys")
        last.exit_logits = cat("exit_logits") if all(o.exit_logits is not None for o in outs) else None
        last.retrieved_ids = cat("retrieved_ids") if all(o.retrieved_ids is not None for o in outs) else None
        for o in outs[:-1]:
            last.compute.merge(o.compute)
        last.metrics.update(last.compute.as_metrics())
        return last

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        state: HMSTState | None = None,
        memory=None,
        episodic_store=None,
        gate_mode: str = "schedule",
        schedule: Any = None,
        decision: GateDecision | None = None,
        use_cache: bool = False,
        return_exit_logits: bool | None = None,
        generator: torch.Generator | None = None,
        logits_to_keep: int = 0,
        score_mask: torch.Tensor | None = None,
    ) -> HMSTOutput:
        """``logits_to_keep`` = N > 0 returns (and pays for) the logits of the last N positions
        only, as a prefill that samples from the last one needs (HF's argument of the same
        name). ``score_mask`` [B, T] marks the positions whose logits will be used (a loss's
        targets; None = all). A row that exits reads semantic memory only through the kNN-LM
        output, so it searches memory only for kept, scored positions (its other positions
        keep the exit head's logits); a row that runs the upper path searches every queried
        position, since its reader feeds later tokens."""
        cfg = self.cfg
        B, T = input_ids.shape
        dev = input_ids.device
        if state is None or state.batch_size != B:
            state = self.init_state(B, dev, use_cache)
        if use_cache and state.kv is None:
            state.kv = KVCache(cfg.n_layer)
        kv = state.kv if use_cache else None
        start = kv.length if kv is not None else 0
        if kv is None and T > cfg.block_size:
            out = self._segmented(input_ids, state, memory, episodic_store, gate_mode, schedule, decision,
                                  return_exit_logits, generator)
            if logits_to_keep > 0:
                out.logits = out.logits[:, -logits_to_keep:]
                out.exit_logits = None if out.exit_logits is None else out.exit_logits[:, -logits_to_keep:]
            return out
        N = T if logits_to_keep <= 0 else min(int(logits_to_keep), T)  # positions whose logits are made
        cos, sin = self.rope(start, T, dev)
        want_exit_logits = self.training if return_exit_logits is None else return_exit_logits
        meter = ComputeMeter()
        D, V = cfg.d_model, cfg.vocab_size
        stride = max(1, cfg.mem_query_stride)
        Tq = (T + stride - 1) // stride

        emb = self.wte(input_ids)
        x = self.drop(emb)
        # 1) lower MoE blocks, every row
        stats_all = []
        h = x
        for i in range(cfg.exit_layer):
            tk = self._cache_len(kv, i) + T
            h, st = self.blocks[i](h, cos, sin, kv, i)
            meter.add_flops("lower", self._block_flops(B, T, tk))
            stats_all.append(st)
        h_exit = self.exit_norm(h)
        pooled = h.mean(1)
        keys, key_tail, key_count = self._window_keys(emb if cfg.mem_key_source == "embedding" else h_exit, state)

        # 2) the gates decide before any memory work: every feature is known at this point
        # (exit-head entropy of the last token, position, occupancy, the previous segment's
        # best retrieval similarity), so a gate that is off really skips its work
        last_logits = self.lm_head(h_exit[:, -1])
        meter.add_flops("exit_probe", 2.0 * B * D * V)
        lp = F.log_softmax(last_logits.float(), -1)
        exit_entropy = -(lp.exp() * lp).sum(-1).detach()
        prev_sim = state.prev_sim.to(dev) if state.prev_sim is not None else torch.zeros(B, device=dev)
        occupancy = memory.occupancy() if memory is not None and hasattr(memory, "occupancy") else 0.0
        features = self.controller.state_features(exit_entropy, torch.full((B,), float(state.pos + T), device=dev),
                                                  torch.full((B,), float(occupancy), device=dev), prev_sim)
        if decision is None and kv is not None and state.decision is not None and start > 0:
            decision = state.decision  # hold the gates fixed while the KV cache grows
        if decision is None:
            decision = self.controller(pooled, features, mode=gate_mode, schedule=schedule, generator=generator)
            meter.add_flops("controller", self._controller_flops(B))
            if cfg.exit_entropy_threshold is not None and not self.training:
                decision.exit = (exit_entropy < cfg.exit_entropy_threshold).to(decision.exit.dtype)
        if kv is not None:
            state.decision = decision

        exit_rows = decision.exit > 0.5
        go_rows = ~exit_rows  # rows that read memory and whose upper layers matter
        if kv is not None:
            # the gates are held for the whole cached sequence: if every row exits, the upper
            # layers are never needed (their caches stay empty); a mixed batch runs all rows'
            # upper blocks so that the batched caches stay aligned (exiting rows read no memory
            # and take the exit head)
            run_idx = torch.arange(B, device=dev) if not bool(exit_rows.all()) else exit_rows.nonzero().squeeze(1)[:0]
        else:
            run_idx = torch.nonzero(go_rows).squeeze(1)
        exit_idx = torch.nonzero(exit_rows).squeeze(1)
        # when every row runs the upper path (no KV cache), the final logits are the upper head's
        # alone: no [B, T, V] buffer of exit logits to fill and then overwrite
        all_up = kv is None and run_idx.numel() == B
        if want_exit_logits:  # deep supervision needs the exit head on every row
            exit_logits = self.lm_head(h_exit[:, T - N:])
            meter.add_flops("exit_head", 2.0 * B * N * D * V)
            logits = exit_logits if all_up else exit_logits.clone()
        else:  # only the rows that exit pay for the exit head
            exit_logits = None
            logits = h_exit.new_zeros(B if not all_up else 0, N, V)
            if exit_idx.numel():
                lx = self.lm_head(h_exit[exit_idx, T - N:])
                meter.add_flops("exit_head", 2.0 * exit_idx.numel() * N * D * V)
                logits = logits.to(lx.dtype).index_copy(0, exit_idx, lx)

        # 3) episodic SSM, only for rows that read it; a row that does not keeps its state
        # unchanged (that segment is not folded into its episodic memory)
        ep_rows = go_rows & (decision.episodic > 0.5)
        ep_idx = torch.nonzero(ep_rows).squeeze(1)
        new_ssm = list(state.ssm)
        e = None
        if ep_idx.numel() and self.ssm:
            every = ep_idx.numel() == B
            e = x if every else x[ep_idx]
            for li, (norm, blk, s) in enumerate(zip(self.ssm_norms, self.ssm, state.ssm)):
                y, s2 = blk(norm(e), s if every else (s[0][ep_idx], s[1][ep_idx]))
                e = e + y
                new_ssm[li] = s2 if every else (s[0].index_copy(0, ep_idx, s2[0].to(s[0].dtype)),
                                                s[1].index_copy(0, ep_idx, s2[1].to(s[1].dtype)))
            mm, scan = self._ssm_flops(ep_idx.numel(), T)
            meter.add_flops("ssm", mm)
            meter.add("ssm_scan_ops", scan, 1.0)

        # 4) semantic memory search (FAISS), only for rows whose semantic gate is on and that read
        # it: the rows that run the upper path, and with the kNN-LM output (mem_knn_lambda > 0)
        # the rows that exit as well
        hidden = h_exit.clone()
        mem_attn = torch.zeros((), device=dev)
        new_sim = prev_sim.clone()
        retrieved_ids = None
        knn = cfg.mem_knn_lambda > 0
        sem_on = decision.semantic > 0.5
        sem_idx = torch.nonzero(sem_on if knn else sem_on & go_rows).squeeze(1)
        # searched rows that all exit only need the positions whose logits are kept
        need = self._knn_need(sem_idx, go_rows, T, N, score_mask, stride) if knn else None
        retr = self._retrieve(keys[sem_idx], memory, stride, meter, need)
        if retr is not None:
            new_sim[sem_idx] = retr[2].amax(1).to(new_sim.dtype)
            retrieved_ids = torch.full((B, retr[3].size(1), retr[3].size(2)), -1, dtype=torch.long,
                                       device=dev).index_copy(0, sem_idx, retr[3])

        # 5) upper path
        n_up = run_idx.numel()
        if n_up:
            hu = h if n_up == B else h[run_idx]  # n_up == B means run_idx = arange(B)
            pos_in_run = torch.full((B,), -1, dtype=torch.long, device=dev)
            pos_in_run[run_idx] = torch.arange(n_up, device=dev)
            if e is not None:  # gated SSM output into the residual
                ep_local = pos_in_run[ep_idx]
                hu_e = hu[ep_local]
                g = torch.sigmoid(self.ep_gate(torch.cat([self.ep_norm(hu_e), e], dim=-1)))
                hu = hu.index_add(0, ep_local, (g * self.ep_proj(e)).to(hu.dtype))
                meter.add_flops("episodic_read", 2.0 * ep_idx.numel() * T * 3 * D * D)
            # semantic memory: the reader reads the retrieved items of the rows that run on
            items, masks, biases, read_rows = [], [], [], torch.zeros(n_up, dtype=torch.bool, device=dev)
            if retr is not None:
                up = go_rows[sem_idx]  # the searched rows that also run the upper path
                sem_local = pos_in_run[sem_idx[up]]
                k = retr[0].size(2)
                vals = retr[0].new_zeros(n_up, Tq, k, retr[0].size(-1)).index_copy(0, sem_local, retr[0][up])
                msk = torch.zeros(n_up, Tq, k, dtype=torch.bool, device=dev).index_copy(0, sem_local, retr[1][up])
                items.append(vals)
                masks.append(msk)
                biases.append(retr[4].new_zeros(n_up, Tq, k).index_copy(0, sem_local, retr[4][up] * cfg.mem_score_bias))
                read_rows[sem_local] = True
            # episodic store: rows with the episodic gate on and a valid previous segment
            if state.prev_pooled is not None and e is not None:
                valid = ep_rows if state.prev_valid is None else ep_rows & state.prev_valid.to(dev)
                epq_idx = torch.nonzero(valid).squeeze(1)
                eps = self._episodes(state.prev_pooled[epq_idx], episodic_store, Tq, meter)
                if eps is not None:
                    epq_local = pos_in_run[epq_idx]
                    ke = eps.size(2)
                    items.append(eps.new_zeros(n_up, Tq, ke, eps.size(-1)).index_copy(0, epq_local, eps))
                    masks.append(torch.zeros(n_up, Tq, ke, dtype=torch.bool, device=dev).index_fill(0, epq_local, True))
                    biases.append(torch.zeros(n_up, Tq, ke, device=dev))
                    read_rows[epq_local] = True
            if items:
                rd = torch.nonzero(read_rows).squeeze(1)
                mem = torch.cat(items, 2)[rd]
                bias = torch.cat(biases, 2)[rd] if cfg.mem_score_bias else None
                read, mem_attn = self.reader(hu[rd], mem, torch.cat(masks, 2)[rd], stride, bias)
                meter.add_flops("reader", self._reader_flops(rd.numel(), T, Tq, mem.size(2)))
                hu = hu.index_add(0, rd, read.to(hu.dtype))
            bias = decision.expert_bias[run_idx].unsqueeze(1)
            for i in range(cfg.exit_layer, cfg.n_layer):
                tk = self._cache_len(kv, i) + T
                hu, st = self.blocks[i](hu, cos, sin, kv, i, bias)
                meter.add_flops("upper", self._block_flops(n_up, T, tk))
                stats_all.append(st)
            hu = self.ln_f(hu)
            if kv is None:
                sel, src = run_idx, torch.arange(n_up, device=dev)
            else:
                sel = src = torch.nonzero(go_rows).squeeze(1)
            every_row = kv is None and n_up == B  # run_idx = arange(B): the upper path wrote every row
            lu = self.lm_head((hu if every_row else hu[src])[:, T - N:])
            meter.add_flops("head", 2.0 * src.numel() * N * D * V)
            if every_row:  # no [B, T, V] copy of the exit logits to overwrite entirely
                logits, hidden = lu.to(logits.dtype), hu.to(hidden.dtype)
            else:
                logits = logits.index_copy(0, sel, lu.to(logits.dtype))
                hidden = hidden.index_copy(0, sel, hu[src].to(hidden.dtype))
        if knn and retr is not None:
            if N < T:  # the kept positions' queries (token t reads query t // stride)
                kept_q = torch.arange(T - N, T, device=dev) // stride
                mixed = self._knn_mix(logits[sem_idx], tuple(r[:, kept_q] for r in retr), 1, meter,
                                      None if need is None else need[:, kept_q])
            else:
                mixed = self._knn_mix(logits[sem_idx], retr, stride, meter, need)
            logits = logits.index_copy(0, sem_idx, mixed.to(logits.dtype))
        if kv is not None:
            kv.length = start + T
            self._trim_cache(kv)

        # 6) aux losses and statistics
        balance = torch.stack([s["balance"] for s in stats_all]).mean()
        zloss = torch.stack([s["z"] for s in stats_all]).mean()
        load = torch.stack([s["load"] for s in stats_all]).mean(0)
        metrics = {f"expert_load_{i}": load[i] for i in range(cfg.n_experts)}
        metrics["router_entropy"] = torch.stack([s["entropy"] for s in stats_all]).mean()
        metrics["router_dropped"] = torch.stack([s["dropped"] for s in stats_all]).mean()
        for gname in GATES:
            metrics[f"gate_{gname}"] = getattr(decision, gname).float().mean()
        metrics["gate_expert_bias"] = (decision.expert_choice < cfg.n_experts).float().mean()
        layers_run = (cfg.exit_layer * B + (cfg.n_layer - cfg.exit_layer) * n_up) / max(B, 1)
        metrics["exit_layers_skipped_frac"] = torch.tensor(1.0 - layers_run / cfg.n_layer)
        metrics["semantic_best_sim"] = new_sim.float().mean()
        metrics["semantic_occupancy"] = torch.tensor(float(occupancy))
        metrics["memory_attention_mass"] = mem_attn.detach().float()
        metrics["ssm_state_norm"] = new_ssm[-1][1].float().norm(dim=(1, 2)).mean() if new_ssm else torch.zeros(())
        metrics.update(meter.as_metrics())

        new_state = HMSTState(ssm=new_ssm, pos=state.pos + T, prev_pooled=pooled.detach(), kv=kv,
                              decision=state.decision if kv is not None else None, prev_sim=new_sim.detach(),
                              key_tail=key_tail, key_count=key_count)
        return HMSTOutput(
            logits=logits,
            state=new_state,
            aux_losses={"balance": balance, "router_z": zloss},
            metrics=metrics,
            hidden=hidden,
            exit_logits=exit_logits,
            decision=decision,
            features=features,
            pooled=pooled,
            mem_keys=keys,
            retrieved_ids=retrieved_ids,
            exit_rows=exit_rows,
            layers_run=layers_run,
            compute=meter,
        )
