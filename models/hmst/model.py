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

The semantic memory and the episodic store are passed in by the caller (the
LightningModule owns them); the model returns the keys/values to write
(``mem_keys``/``mem_values``) and never writes itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.models.hmst.controller import GATES, GateDecision, MetaController
from memlm.models.hmst.critic import Critic
from memlm.models.hmst.moe import MoEFeedForward
from memlm.models.hmst.ssm import MambaBlock
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
    episodic_top_k: int = 2
    # controller and critic
    controller_hidden: int = 64
    critic_d_model: int = 128
    critic_layers: int = 2
    critic_heads: int = 4
    critic_max_len: int = 128

    def __post_init__(self) -> None:
        if self.exit_layer is None:
            self.exit_layer = max(1, self.n_layer // 2)
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

    def detach(self) -> "HMSTState":
        return HMSTState(
            ssm=[(c.detach(), s.detach()) for c, s in self.ssm],
            pos=self.pos,
            prev_pooled=None if self.prev_pooled is None else self.prev_pooled.detach(),
            kv=self.kv,
            decision=self.decision,
            prev_valid=self.prev_valid,
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
    mem_keys: torch.Tensor | None = None  # [B, T, D] keys to write (exit-layer states)
    retrieved_ids: torch.Tensor | None = None  # [B, T/stride, k] semantic ids read
    exit_rows: torch.Tensor | None = None  # [B] bool: rows whose upper layers were skipped
    layers_run: float = 0.0  # blocks executed per row, averaged over the batch


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

    def forward(self, h: torch.Tensor, mem: torch.Tensor, mask: torch.Tensor, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, D]; mem [B, Tq, M, Dv] and mask [B, Tq, M] per query position; token t reads
        query position t // stride (memory is projected once per query, then shared)."""
        B, T, D = h.shape
        Tq, M = mem.size(1), mem.size(2)
        hn = self.ln(h)
        q = self.q(hn).view(B, T, self.n_head, self.hd)
        kv = self.kv(self.ln_mem(mem.to(h.dtype))).view(B, Tq, M, 2, self.n_head, self.hd)
        if stride > 1 or Tq != T:
            kv = kv.repeat_interleave(stride, dim=1)[:, :T]
            mask = mask.repeat_interleave(stride, dim=1)[:, :T]
        k, v = kv.unbind(3)
        scale = self.hd**-0.5
        s_mem = torch.einsum("bthd,btmhd->bthm", q, k) * scale
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
        self.critic = Critic(cfg.vocab_size, cfg.critic_d_model, cfg.critic_layers, cfg.critic_heads, cfg.critic_max_len)
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

    def _retrieve(self, queries: torch.Tensor, memory, stride: int):
        """Per-token kNN read: search every ``stride``-th query; token t uses the last query <= t."""
        B, T, D = queries.shape
        k = self.cfg.mem_top_k
        if memory is None or k <= 0 or len(memory) == 0:
            return None
        qpos = torch.arange(0, T, stride, device=queries.device)
        q = queries[:, qpos].reshape(-1, D).detach()
        res = memory.search(q, k)
        nq = qpos.numel()
        values = res.values.view(B, nq, k, -1).to(queries.dtype)  # per query position
        mask = res.mask.view(B, nq, k)
        scores = res.scores.view(B, nq, k).float()
        ids = res.ids.view(B, nq, k)
        best = torch.where(mask[..., 0], scores[..., 0], torch.zeros_like(scores[..., 0]))  # [B, nq]
        return values, mask, best, ids

    def _episodes(self, query: torch.Tensor | None, store, Tq: int):
        k = self.cfg.episodic_top_k
        if store is None or query is None or k <= 0 or len(store) == 0:
            return None
        scores, slots = store.retrieve(query.float(), k)  # [B, k']
        vals = store.get(slots.reshape(-1))["pooled"].view(query.size(0), slots.size(1), -1).to(query.device, query.dtype)
        return vals.unsqueeze(1).expand(-1, Tq, -1, -1)  # [B, Tq, k', D]

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
    ) -> HMSTOutput:
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
            return self._segmented(input_ids, state, memory, episodic_store, gate_mode, schedule, decision,
                                   return_exit_logits, generator)
        cos, sin = self.rope(start, T, dev)
        want_exit_logits = self.training if return_exit_logits is None else return_exit_logits

        x = self.drop(self.wte(input_ids))
        # 1) episodic SSM over the token stream (always advanced, so its state stays in sync)
        e, new_ssm = x, []
        for norm, blk, s in zip(self.ssm_norms, self.ssm, state.ssm):
            y, s2 = blk(norm(e), s)
            e = e + y
            new_ssm.append(s2)

        # 2) lower MoE blocks
        stats_all = []
        h = x
        for i in range(cfg.exit_layer):
            h, st = self.blocks[i](h, cos, sin, kv, i)
            stats_all.append(st)
        h_exit = self.exit_norm(h)
        pooled = h.mean(1)

        # 3) memory retrieval and controller state features
        retr = self._retrieve(h_exit, memory, max(1, cfg.mem_query_stride))
        last_logits = self.lm_head(h_exit[:, -1])
        lp = F.log_softmax(last_logits.float(), -1)
        exit_entropy = -(lp.exp() * lp).sum(-1).detach()
        best_sim = retr[2].amax(1) if retr is not None else torch.zeros(B, device=dev)
        occupancy = memory.occupancy() if memory is not None and hasattr(memory, "occupancy") else 0.0
        features = self.controller.state_features(exit_entropy, torch.full((B,), float(state.pos + T), device=dev),
                                                  torch.full((B,), float(occupancy), device=dev), best_sim)
        if decision is None and kv is not None and state.decision is not None and start > 0:
            decision = state.decision  # hold the gates fixed while the KV cache grows
        if decision is None:
            decision = self.controller(pooled, features, mode=gate_mode, schedule=schedule, generator=generator)
        if kv is not None:
            state.decision = decision

        exit_rows = decision.exit > 0.5
        if kv is not None:
            # the gates are held for the whole cached sequence: if every row exits, the upper
            # layers are never needed (their caches stay empty); a mixed batch runs all rows so
            # that the batched caches stay aligned, and exiting rows still take the exit head
            run_idx = torch.arange(B, device=dev) if not bool(exit_rows.all()) else exit_rows.nonzero().squeeze(1)[:0]
        else:
            run_idx = torch.nonzero(~exit_rows).squeeze(1)
        exit_idx = torch.nonzero(exit_rows).squeeze(1)
        if want_exit_logits:  # deep supervision needs the exit head on every row
            exit_logits = self.lm_head(h_exit)
            logits = exit_logits.clone()
        else:  # only the rows that exit pay for the exit head
            exit_logits = None
            logits = h_exit.new_zeros(B, T, cfg.vocab_size)
            if exit_idx.numel():
                lx = self.lm_head(h_exit[exit_idx])
                logits = logits.to(lx.dtype).index_copy(0, exit_idx, lx)

        # 4) upper path for the rows that continue
        hidden = h_exit.clone()
        mem_attn = torch.zeros((), device=dev)
        n_up = run_idx.numel()
        if n_up:
            hu, eu = h[run_idx], e[run_idx]
            ep_on = decision.episodic[run_idx].to(hu.dtype).view(-1, 1, 1)
            sem_on = decision.semantic[run_idx].view(-1, 1, 1).bool()
            g = torch.sigmoid(self.ep_gate(torch.cat([self.ep_norm(hu), eu], dim=-1)))
            hu = hu + ep_on * g * self.ep_proj(eu)
            items, masks = [], []
            if retr is not None:
                items.append(retr[0][run_idx])
                masks.append(retr[1][run_idx] & sem_on)
            stride = max(1, cfg.mem_query_stride)
            Tq = (T + stride - 1) // stride
            eps = self._episodes(state.prev_pooled, episodic_store, Tq)
            if eps is not None:
                items.append(eps[run_idx])
                ep_mask = torch.ones(eps.shape[:3], dtype=torch.bool, device=dev)
                if state.prev_valid is not None:
                    ep_mask = ep_mask & state.prev_valid.to(dev).view(-1, 1, 1)
                masks.append(ep_mask[run_idx] & (ep_on > 0.5))
            if items:
                read, mem_attn = self.reader(hu, torch.cat(items, 2), torch.cat(masks, 2), stride)
                hu = hu + read
            bias = decision.expert_bias[run_idx].unsqueeze(1)
            for i in range(cfg.exit_layer, cfg.n_layer):
                hu, st = self.blocks[i](hu, cos, sin, kv, i, bias)
                stats_all.append(st)
            hu = self.ln_f(hu)
            lu = self.lm_head(hu)
            if kv is None:
                sel, src = run_idx, torch.arange(n_up, device=dev)
            else:
                sel = src = torch.nonzero(~exit_rows).squeeze(1)
            logits = logits.index_copy(0, sel, lu[src].to(logits.dtype))
            hidden = hidden.index_copy(0, sel, hu[src].to(hidden.dtype))
        if kv is not None:
            kv.length = start + T
            self._trim_cache(kv)

        # 5) aux losses and statistics
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
        metrics["semantic_best_sim"] = best_sim.float().mean()
        metrics["semantic_occupancy"] = torch.tensor(float(occupancy))
        metrics["memory_attention_mass"] = mem_attn.detach().float()
        metrics["ssm_state_norm"] = new_ssm[-1][1].float().norm(dim=(1, 2)).mean() if new_ssm else torch.zeros(())

        new_state = HMSTState(ssm=new_ssm, pos=state.pos + T, prev_pooled=pooled.detach(), kv=kv,
                              decision=state.decision if kv is not None else None)
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
            mem_keys=h_exit.detach(),
            retrieved_ids=retr[3] if retr is not None else None,
            exit_rows=exit_rows,
            layers_run=layers_run,
        )
