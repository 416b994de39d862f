"""HMSTLanguageModel: stage-1 training of the Hierarchical Memory-State Transformer.

- ``stateful``: trained on contiguous stream chunks; the Mamba state (episodic memory)
  and the previous segment's pooled state are carried, detached, across chunks
  (:class:`memlm.core.state.RecurrentState`). The TBPTT callback (added unless the trainer
  has one) resets them at the first chunk of an epoch and saves every rank's copy in
  ``checkpoint["tbptt"]``; with the training gates drawn from the module's own generator
  (its state in ``checkpoint["hmst_memory"]["gate_rng"]``), a resumed run continues exactly.
- Loss = token cross-entropy + ``balance_loss_weight`` * Switch balance + ``z_loss_weight`` *
  router z-loss + ``exit_loss_weight`` * cross-entropy of the early-exit head (deep
  supervision) + ``critic_loss_weight`` * critic BCE on the rows whose verify gate fired.
- Gates follow ``gate_schedule`` in training (probabilities per gate, sampled per row, so
  every path is trained) and ``eval_gate_schedule`` in validation and generation; with
  ``gate_mode``/``eval_gate_mode`` = ``sample`` or ``greedy`` the meta-controller decides.
- Memory writes (training only): the exit-layer states of every ``mem_write_stride``-th
  token become FAISS keys, their final hidden states the values and the preceding
  ``mem_text_tokens`` tokens the source text; each stream row's segment summary goes to
  the episodic store. ``ingest(text)`` writes documents the same way.
- DDP policy: the semantic memory is replicated; every rank calls
  ``SemanticMemory.replicated_add`` each step (an all-gather), so all replicas hold the
  same ids, keys, values and texts in the same order and reads are identical. The episodic
  store is rank-local (each rank's own streams): the checkpoint keeps every rank's store in
  ``checkpoint["hmst_memory"]["episodic_ranks"]`` (all-gathered, index = global rank) and each rank
  restores its own; ``"episodic"`` is rank 0's copy, what a single-process load (chat) uses.
- The stores live outside ``state_dict`` (they are not parameters or buffers, so DDP's
  buffer broadcast never touches them) and travel in ``checkpoint["hmst_memory"]`` as
  tensors and JSON strings (FAISS via serialize_index).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch

from memlm.models.hmst.model import HMSTConfig, HMSTModel, HMSTOutput, HMSTState
from memlm.lightning_modules.language_model import IGNORE_INDEX, LanguageModel, OptimizerConfig
from memlm.core.checks import require_divisible, require_positive
from memlm.core.errors import MemLMError
from memlm.core.state import reset_tensor_rows, row_mask
from memlm.core.sampling import SamplingParams
from memlm.lightning_modules.hmst.stage2 import apply_base_lr, load_stage1, scale_base_groups
from memlm.lightning_modules.hmst.task_eval import TaskEval
from memlm.memory.episodic import EpisodicStore
from memlm.memory.semantic import SemanticMemory

DEFAULT_TRAIN_SCHEDULE = {"exit": 0.05, "episodic": 0.9, "semantic": 0.9, "verify": 0.25, "expert_bias": 0.1}
DEFAULT_EVAL_SCHEDULE = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 0.0, "expert_bias": 0.0}
MEM_VALUES = ("hidden", "next_token")


class HMSTLanguageModel(LanguageModel):
    stateful = True
    max_seq_len = None  # recurrent episodic memory: unbounded context (attention keeps a block_size window)

    # jsonargparse builds the config schema from this signature, so it repeats HMSTConfig's fields
    def __init__(
        self,
        vocab_size: int,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        d_ff: int = 256,
        n_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = None,
        exit_layer: int | None = None,
        dropout: float = 0.0,
        rope_base: float = 10000.0,
        ssm_layers: int = 1,
        ssm_d_state: int = 16,
        ssm_expand: int = 2,
        ssm_d_conv: int = 4,
        ssm_backend: str = "auto",
        mem_top_k: int = 4,
        mem_query_stride: int = 1,
        mem_score_bias: float = 0.0,
        mem_key_window: int = 1,
        mem_key_source: str = "exit",
        # kNN-LM output over next_token items (HMSTConfig.mem_knn_*; 0 = off)
        mem_knn_lambda: float = 0.0,
        mem_knn_temperature: float = 0.05,
        mem_knn_min_score: float = 0.0,
        mem_index_type: str = "flat",
        mem_max_items: int | None = 65536,
        mem_write: bool = True,
        mem_write_stride: int = 4,
        mem_text_tokens: int = 32,
        # what a semantic item holds as its value: "hidden" (the token's final hidden state) or
        # "next_token" (the embedding of the token that followed it: a kNN-LM memory, so that a
        # fact read back can name its answer; see docs/hmst.md "What a memory item holds")
        mem_value: str = "hidden",
        # stride of ingest() and of chunks flagged write_memory (None = mem_write_stride)
        mem_ingest_stride: int | None = None,
        episodic_capacity: int = 1024,
        episodic_top_k: int = 2,
        controller_hidden: int = 64,
        critic_d_model: int = 128,
        critic_layers: int = 2,
        critic_heads: int = 4,
        critic_max_len: int = 128,
        critic_match_ngram: int = 0,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        exit_loss_weight: float = 0.3,
        critic_loss_weight: float = 0.1,
        gate_mode: str = "schedule",
        gate_schedule: dict | str | None = None,
        eval_gate_mode: str = "schedule",
        eval_gate_schedule: dict | str | None = None,
        exit_entropy_threshold: float | None = None,
        # stage 2 (memory fine-tuning, memlm.lightning_modules.hmst.stage2): start from this
        # stage-1 checkpoint; the base trains at base_lr_scale x the learning rate (0 = frozen)
        init_checkpoint: str | None = None,
        base_lr_scale: float = 1.0,
        # Repeated in each subclass (not **kwargs): LightningCLI and save_hyperparameters read
        # the concrete class's own signature.
        optimizer: OptimizerConfig = OptimizerConfig(),
    ) -> None:
        super().__init__(vocab_size, optimizer)
        self.save_hyperparameters()
        require_positive("model", block_size=block_size, n_layer=n_layer, d_ff=d_ff, n_experts=n_experts,
                         ssm_d_state=ssm_d_state, ssm_expand=ssm_expand, ssm_d_conv=ssm_d_conv)
        require_divisible("model", "d_model", d_model, "n_head", n_head, even_head=True)
        require_divisible("model", "critic_d_model", critic_d_model, "critic_heads", critic_heads)
        if not 1 <= top_k <= n_experts:
            raise MemLMError(f"model.top_k must be in [1, model.n_experts={n_experts}], got {top_k}")
        self.config = HMSTConfig(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, d_model=d_model, d_ff=d_ff,
            n_experts=n_experts, top_k=top_k, capacity_factor=capacity_factor, exit_layer=exit_layer, dropout=dropout,
            rope_base=rope_base, ssm_layers=ssm_layers, ssm_d_state=ssm_d_state, ssm_expand=ssm_expand, ssm_d_conv=ssm_d_conv,
            ssm_backend=ssm_backend, mem_top_k=mem_top_k, mem_query_stride=mem_query_stride, mem_score_bias=mem_score_bias,
            mem_key_window=mem_key_window, mem_key_source=mem_key_source, mem_knn_lambda=mem_knn_lambda, mem_knn_temperature=mem_knn_temperature,
            mem_knn_min_score=mem_knn_min_score, episodic_top_k=episodic_top_k,
            controller_hidden=controller_hidden, critic_d_model=critic_d_model, critic_layers=critic_layers,
            critic_heads=critic_heads, critic_max_len=critic_max_len, critic_match_ngram=critic_match_ngram,
            exit_entropy_threshold=exit_entropy_threshold,
        )
        self.model = HMSTModel(self.config)
        self.gate_mode, self.eval_gate_mode = gate_mode, eval_gate_mode
        self.train_schedule = DEFAULT_TRAIN_SCHEDULE if gate_schedule is None else gate_schedule
        self.eval_schedule = DEFAULT_EVAL_SCHEDULE if eval_gate_schedule is None else eval_gate_schedule
        self.mem_write, self.mem_write_stride, self.mem_text_tokens = mem_write, max(1, int(mem_write_stride)), mem_text_tokens
        if mem_value not in MEM_VALUES:
            raise MemLMError(f"model.mem_value must be one of {', '.join(MEM_VALUES)}, got {mem_value!r}")
        if mem_knn_lambda > 0 and mem_value != "next_token":
            raise MemLMError("model.mem_knn_lambda > 0 needs model.mem_value: next_token (the kNN-LM reads the token an item names)")
        if mem_ingest_stride is not None and (isinstance(mem_ingest_stride, bool) or int(mem_ingest_stride) < 1):
            raise MemLMError(f"model.mem_ingest_stride must be an integer >= 1 (or null = mem_write_stride), got {mem_ingest_stride!r}")
        self.mem_value = mem_value
        self.mem_ingest_stride = self.mem_write_stride if mem_ingest_stride is None else int(mem_ingest_stride)
        self.loss_weights = {"balance": balance_loss_weight, "router_z": z_loss_weight, "exit": exit_loss_weight,
                        "critic": critic_loss_weight}
        self.semantic = SemanticMemory(d_model, d_model, index_type=mem_index_type, max_items=mem_max_items)
        # no SSM copy (see memlm.memory.episodic); each episode keeps its tokens and the one after,
        # what consolidation replays into semantic memory
        self.episodic = EpisodicStore(episodic_capacity, None, d_model, token_len=block_size + 1)
        self._generating = False
        self.task_eval = TaskEval()
        # stage 3 / stage 4: installed by memlm.callbacks.rl_stage.RLStage / critic_stage.CriticStage,
        # they take over training_step (None = stages 1 and 2)
        self.rl_phase = None
        self.critic_phase = None
        # Training gates come from the module's own generator, not the global RNG: its state is
        # saved in the checkpoint, so a resumed run samples the gates the uninterrupted run would.
        # Seeded from the process seed, which seed_everything makes equal on every rank.
        self._gate_seed = int(torch.initial_seed()) % (2**63)
        self._gate_rng: torch.Generator | None = None
        self._gate_rng_state: torch.Tensor | None = None  # from a checkpoint, applied on first use
        self.last_gate_decision = None  # the last training step's GateDecision
        self.base_lr_scale = float(base_lr_scale)
        apply_base_lr(self, self.base_lr_scale)
        # a model built on the meta device (the config hub, size estimates) has no weights to fill
        if init_checkpoint and self.model.wte.weight.device.type != "meta":
            load_stage1(self, init_checkpoint)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: Any = None, **kw) -> HMSTOutput:
        training = self.training and not self._generating
        kw.setdefault("gate_mode", self.gate_mode if training else self.eval_gate_mode)
        kw.setdefault("schedule", self.train_schedule if training else self.eval_schedule)
        kw.setdefault("use_cache", self._generating)
        if training:
            kw.setdefault("generator", self._gate_generator())
        return self.model(input_ids, state=state, memory=self.semantic, episodic_store=self.episodic, **kw)

    def _gate_generator(self) -> torch.Generator:
        if self._gate_rng is None or self._gate_rng.device != self.device:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self._gate_seed)
            state = self._gate_rng_state if self._gate_rng is None else self._gate_rng.get_state()
            if state is not None:
                try:
                    gen.set_state(state)
                except RuntimeError:  # saved by another device type: its RNG state does not transfer
                    warnings.warn(f"HMST gate RNG state does not fit a {self.device.type} generator; gates reseeded")
            self._gate_rng, self._gate_rng_state = gen, None
        return self._gate_rng

    def num_active_parameters(self) -> int:
        """Parameters one token uses: the top-k experts of each MoE layer, not all of them."""
        return int(self.model.param_counts()["active"])

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        counts = self.model.param_counts()
        side = sum(p.numel() for p in self.model.critic.parameters()) + sum(p.numel() for p in self.model.controller.parameters())
        active = counts["active"] - counts["embedding"] - side
        return 6 * active + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.rl_phase is not None:
            return self.rl_phase.training_step(self, batch, batch_idx)
        if self.critic_phase is not None:
            return self.critic_phase.training_step(self, batch, batch_idx)
        x, y = batch["input_ids"], batch["targets"]
        # the TBPTT callback resets carried_state at epoch start, on batch["first"] and when the
        # batch size changes (the model also starts afresh when the rows do not match)
        out: HMSTOutput = self(x, state=self.carried_state)
        self.carried_state = self.detach_state(out.state)
        self.last_gate_decision = out.decision  # for callbacks.histograms.GateHistograms
        n_tokens = (y != IGNORE_INDEX).sum().clamp_min(1)
        token_losses = self._token_losses(out.logits, y)
        loss = token_losses.sum() / n_tokens
        self._check_finite(loss)
        aux = {name: self.loss_weights[name] * value for name, value in out.aux_losses.items()}
        if out.exit_logits is not None and self.loss_weights["exit"] > 0:
            aux["exit"] = self.loss_weights["exit"] * self._token_losses(out.exit_logits, y).sum() / n_tokens
        critic = self._critic_loss(x, out)
        if critic is not None:
            aux["critic"] = self.loss_weights["critic"] * critic
        total = loss + self._log_extras(out, aux=aux, on_step=True, on_epoch=False)
        # a chunk flagged write_memory (stage-2 facts) is ingested, as a document would be
        self._write_memories(x, out, y, token_losses.detach(),
                             stride=self.mem_ingest_stride if batch.get("write_memory") else None)
        if self.step_logs_due():  # other steps' values would be dropped by Lightning anyway
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
            self.log("mem/semantic_items", float(len(self.semantic)), on_step=True, on_epoch=False)
            self.log("mem/episodic_items", float(len(self.episodic)), on_step=True, on_epoch=False)
        return total

    def _critic_loss(self, x: torch.Tensor, out: HMSTOutput) -> torch.Tensor | None:
        """Stage-1 critic data from the stream itself: (prefix, true continuation) is correct,
        (prefix, another row's continuation) is not; facts are the top retrieved memory texts."""
        if self.loss_weights["critic"] <= 0 or out.decision is None:
            return None
        rows = torch.nonzero(out.decision.verify > 0.5).squeeze(1)
        B, T = x.shape
        if rows.numel() == 0 or B < 2 or T < 8:
            return None
        tq = T // 2
        tr = min(T - tq, max(4, self.config.critic_max_len // 4))
        q = x[rows, :tq]
        pos = x[rows, tq:tq + tr]
        neg = x[(rows + 1) % B, tq:tq + tr]
        pad = self.tokenizer.pad_id if self.tokenizer is not None and self.tokenizer.pad_id is not None else -1
        facts = self._fact_ids(out, rows, tq, pad, x.device)
        crit = self.model.critic
        res = crit(torch.cat([q, q]), torch.cat([pos, neg]), torch.cat([facts, facts]), pad_id=pad)
        labels = torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))]).to(x.device)
        if self.step_logs_due():
            self.log("mem/critic_acc", ((res.p_correct > 0.5).float() == labels).float().mean(), on_step=True, on_epoch=False)
        return crit.loss(res, labels)

    def _fact_ids(self, out: HMSTOutput, rows, tq: int, pad: int, device) -> torch.Tensor:
        width = max(0, self.config.critic_max_len // 4)
        if out.retrieved_ids is None or self.tokenizer is None or pad < 0 or width == 0:
            return torch.zeros(len(rows), 0, dtype=torch.long, device=device)
        stride = max(1, self.config.mem_query_stride)
        qi = min((tq - 1) // stride, out.retrieved_ids.size(1) - 1)
        texts = self.semantic.get_texts(out.retrieved_ids[rows, qi, 0].cpu())
        enc = [self.tokenizer.encode(t)[-width:] if t else [] for t in texts]
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, e in enumerate(enc):
            if e:
                ids[i, : len(e)] = torch.tensor(e)
        return ids.to(device)

    # -- memory writes ---------------------------------------------------------------------------
    def _segment_texts(self, x: torch.Tensor, positions: torch.Tensor, shift: int = 0) -> list[str] | None:
        """The text of each (row, position) item: the ``mem_text_tokens`` tokens ending at the
        position + ``shift`` (1 for next-token items, whose text ends with the token they name)."""
        if self.tokenizer is None or self.mem_text_tokens <= 0:
            return None
        rows = x.detach().cpu().tolist()
        out = []
        for row in rows:
            for t in positions.tolist():
                end = t + shift
                out.append(self.tokenizer.decode(row[max(0, end - self.mem_text_tokens + 1): end + 1]))
        return out

    def _memory_items(self, x: torch.Tensor, out: HMSTOutput, stride: int, include_last: bool = False,
                      next_ids: torch.Tensor | None = None):
        """Items for every stride-th token of the rows that ran the full model (rows that exited
        early have no final state and are not written). Keys are exit-layer states; values are
        final hidden states (``mem_value: hidden``) or the embedding of the token that followed
        (``next_token``; ``next_ids`` [B, T] gives it, < 0 where unknown, default ``x`` shifted
        left, so a chunk's last token is written only when ``next_ids`` knows its successor).
        ``include_last`` also writes the segment's last token, so a document's tail (often the
        value of a fact) is never dropped when its length is not a multiple of the stride."""
        T = x.size(1)
        pos = torch.arange(stride - 1, T, stride, device=x.device)
        if include_last and (pos.numel() == 0 or int(pos[-1]) != T - 1):
            pos = torch.cat([pos, torch.tensor([T - 1], device=x.device)])
        rows = torch.arange(x.size(0), device=x.device)
        if out.exit_rows is not None:
            rows = rows[~out.exit_rows.to(x.device)]
        keys = out.mem_keys[rows][:, pos].reshape(-1, self.config.d_model)
        if self.mem_value == "hidden":
            values = out.hidden.detach()[rows][:, pos].reshape(-1, self.config.d_model)
            return keys, values, self._segment_texts(x[rows], pos.cpu())
        if next_ids is None:
            next_ids = torch.cat([x[:, 1:], x.new_full((x.size(0), 1), -1)], 1)
        next_rows = next_ids.to(x.device)[rows]
        nxt = next_rows[:, pos].reshape(-1)
        ok = nxt >= 0
        values = self.model.wte(nxt.clamp_min(0)).detach()
        ext = torch.cat([x[rows], next_rows[:, -1:].clamp_min(0)], 1)  # the successor of the last token appended
        texts = self._segment_texts(ext, pos.cpu(), shift=1)
        if texts is not None:
            texts = [t for t, keep in zip(texts, ok.tolist()) if keep]
        return keys[ok], values[ok], texts

    @torch.no_grad()
    def _write_memories(
        self, x: torch.Tensor, out: HMSTOutput, y: torch.Tensor | None = None, token_losses: torch.Tensor | None = None,
        stride: int | None = None,
    ) -> None:
        """``token_losses``: the step's per-token cross-entropy of ``out.logits`` against ``y``
        when the caller already has it (the episodes' surprise is its row mean), else computed.
        ``stride``: every how many tokens an item is written (default ``mem_write_stride``)."""
        if self.mem_write:
            nxt = None if y is None else torch.cat([x[:, 1:], y[:, -1:]], 1)
            keys, values, texts = self._memory_items(x, out, stride or self.mem_write_stride, next_ids=nxt)
            self.semantic.replicated_add(keys.float(), values.float(), texts)
        st = out.state
        if st is not None and st.ssm:
            T = x.size(1)
            spans = [(st.pos - T, st.pos)] * x.size(0)
            if token_losses is None and y is not None:
                token_losses = self._token_losses(out.logits.detach(), y)
            surprise = token_losses.view(x.size(0), -1).mean(1) if token_losses is not None else None
            after = x.new_full((x.size(0), 1), -1) if y is None else y[:, -1:].clamp_min(-1)  # IGNORE -> unknown
            self.episodic.add_batch(None, out.pooled.detach().float(), spans, surprise, tokens=torch.cat([x, after], 1))

    # -- ingestion -----------------------------------------------------------------------------
    @torch.no_grad()
    def ingest(self, text: str, stride: int | None = None) -> torch.Tensor:
        """Write a document into the semantic memory; returns the new ids.

        The text is tokenized and run through the model in block_size segments (the SSM
        state carried across them); every ``stride``-th token (default mem_ingest_stride)
        becomes one item keyed by its exit-layer state, valued by its final hidden state or
        the next token's embedding (``mem_value``), with the ``mem_text_tokens`` tokens up to
        it (next-token items: up to and including that next token) as its text.

        Under DDP the items are written with one ``replicated_add`` (a collective): every rank
        must call ``ingest`` the same number of times (each with its own text, any length); all replicas
        then hold every rank's items in rank order.
        """
        if self.tokenizer is None:
            raise MemLMError("this HMST module has no tokenizer; load it from a checkpoint (memlm.checkpoint.load_module)")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise MemLMError("nothing to ingest: the text is empty")
        was_training = self.training
        self.eval()
        stride = self.mem_ingest_stride if stride is None else max(1, int(stride))
        items = []
        try:
            state = None
            x_all = torch.tensor(ids, dtype=torch.long, device=self.device).unsqueeze(0)
            for s in range(0, x_all.size(1), self.config.block_size):
                x = x_all[:, s:s + self.config.block_size]
                out = self(x, state=state)
                state = out.state
                last = s + self.config.block_size >= x_all.size(1)
                if x.size(1) < stride and not last:
                    continue
                nxt = x_all[:, s + 1:s + 1 + x.size(1)]
                nxt = torch.cat([nxt, nxt.new_full((1, x.size(1) - nxt.size(1)), -1)], 1)  # the document's end: none
                items.append(self._memory_items(x, out, stride, include_last=last, next_ids=nxt))
        finally:
            self.train(was_training)
        if not items:  # a text shorter than the stride: still take part in the collective
            empty = torch.zeros(0, self.semantic.dim, device=self.device)
            items = [(empty, torch.zeros(0, self.semantic.value_dim, device=self.device), [])]
        keys = torch.cat([k for k, _, _ in items]).float()
        values = torch.cat([v for _, v, _ in items]).float()
        texts = None if any(ts is None for _, _, ts in items) else [t for _, _, ts in items for t in ts]
        return self.semantic.replicated_add(keys, values, texts)

    # -- generation --------------------------------------------------------------------------------
    # the one generate(prompt_ids, params, generator) signature that MemLMModule defines and every module overrides
    def generate(
        self,
        prompt_ids: list[int] | torch.Tensor,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """As the base, with the attention KV cache (sliding block_size window) plus the SSM state."""
        self._generating = True
        try:
            yield from super().generate(prompt_ids, params, generator)
        finally:
            self._generating = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._generating = False

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.critic_phase is not None:  # stage 4 validates the critic on held-out triples
            return self.critic_phase.validation_step(self, batch, batch_idx)
        return super().validation_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        if self.critic_phase is not None:
            self.critic_phase.on_validation_epoch_end(self)
        self.task_eval.log_and_reset(self, "val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self.task_eval.log_and_reset(self, "test")
        super().on_test_epoch_end()

    def _eval_output(self, batch: dict, out: HMSTOutput) -> None:
        # stage-2 data (memlm.datamodules.hmst_stage2): row exact match per task, and chunks
        # flagged write_memory ingested into semantic memory until the evaluation ends
        self.task_eval.update(self, batch, out)

    @classmethod
    def upgrade_hparams(cls, hparams: dict) -> dict:
        # a saved stage-2 checkpoint holds its own weights: never reload the stage-1 file it started from
        return {k: v for k, v in super().upgrade_hparams(hparams).items() if k != "init_checkpoint"}

    def configure_optimizers(self):
        return scale_base_groups(self, super().configure_optimizers(), self.base_lr_scale)

    def configure_callbacks(self):
        from memlm.callbacks.tbptt import default_tbptt

        return default_tbptt(self)

    # -- recurrent state (memlm.core.state.RecurrentState) ------------------------------------
    # What HMST carries between training chunks: the SSM (conv, ssm) state of every Mamba layer,
    # the stream position and the previous segment's pooled state (the episodic query).
    def init_state(self, batch_size: int, device=None) -> HMSTState:
        return self.model.init_state(batch_size, device)

    def detach_state(self, state: HMSTState | None) -> HMSTState | None:
        return None if state is None else state.detach()

    def reset_rows(self, state: HMSTState, mask: torch.Tensor) -> HMSTState:
        """Zero the SSM state of the masked rows and drop their previous segment (they read no
        episodes, like a fresh stream); ``pos`` is the batch's shared stream clock and stays."""
        mask = row_mask(mask, state.batch_size)
        ssm = [(reset_tensor_rows(c, mask), reset_tensor_rows(s, mask)) for c, s in state.ssm]
        pooled, valid = state.prev_pooled, state.prev_valid
        if pooled is not None:
            pooled = reset_tensor_rows(pooled, mask)
            valid = ~mask.to(pooled.device) if valid is None else valid & ~mask.to(valid.device)
        sim = None if state.prev_sim is None else reset_tensor_rows(state.prev_sim, mask)
        tail = None if state.key_tail is None else reset_tensor_rows(state.key_tail, mask)
        count = None if state.key_count is None else reset_tensor_rows(state.key_count, mask)
        return HMSTState(ssm=ssm, pos=state.pos, prev_pooled=pooled, prev_valid=valid, prev_sim=sim, key_tail=tail,
                         key_count=count)

    def state_batch_size(self, state: HMSTState) -> int:
        return state.batch_size

    def state_to_dict(self, state: HMSTState) -> dict[str, torch.Tensor]:
        """``pos``, ``ssm.<i>.conv``, ``ssm.<i>.ssm``, ``prev_pooled`` [B, D] and ``prev_valid`` [B]:
        always the same keys, so every DDP rank gathers the same tensors (no previous segment =
        zero pooled state, not valid)."""
        if state.kv is not None:
            raise ValueError("an HMST state with a KV cache is a generation state, not a carried training state")
        B = state.batch_size
        dev = state.ssm[0][1].device if state.ssm else None
        out = {"pos": torch.tensor(int(state.pos), dtype=torch.long)}
        for i, (conv, ssm) in enumerate(state.ssm):
            out[f"ssm.{i}.conv"], out[f"ssm.{i}.ssm"] = conv.detach().clone(), ssm.detach().clone()
        if state.prev_pooled is None:
            out["prev_pooled"] = torch.zeros(B, self.config.d_model, device=dev)
            out["prev_valid"] = torch.zeros(B, dtype=torch.bool, device=dev)
        else:
            out["prev_pooled"] = state.prev_pooled.detach().clone()
            valid = state.prev_valid if state.prev_valid is not None else torch.ones(B, dtype=torch.bool)
            out["prev_valid"] = valid.to(state.prev_pooled.device, torch.bool).clone()
        out["prev_sim"] = torch.zeros(B, device=dev) if state.prev_sim is None else state.prev_sim.detach().float().clone()
        w = self.config.mem_key_window
        if w > 1:  # the config decides, so every rank has the same keys
            out["key_tail"] = (torch.zeros(B, w - 1, self.config.d_model, device=dev) if state.key_tail is None
                               else state.key_tail.detach().clone())
            out["key_count"] = (torch.zeros(B, dtype=torch.long, device=dev) if state.key_count is None
                                else state.key_count.clone())
        return out

    def state_from_dict(self, tensors: dict[str, torch.Tensor]) -> HMSTState:
        n = self.config.ssm_layers
        need = {"pos", "prev_pooled", "prev_valid"} | {f"ssm.{i}.{k}" for i in range(n) for k in ("conv", "ssm")}
        if self.config.mem_key_window > 1:
            need |= {"key_tail", "key_count"}
        if set(tensors) - {"prev_sim"} != need:  # prev_sim is absent from checkpoints before the gates moved first
            raise MemLMError(
                f"saved HMST state {sorted(tensors)} does not fit this model ({n} SSM layers); resume with the "
                "checkpoint's config"
            )
        ssm = [(tensors[f"ssm.{i}.conv"], tensors[f"ssm.{i}.ssm"]) for i in range(n)]
        valid = tensors["prev_valid"].bool()
        pooled = tensors["prev_pooled"] if bool(valid.any()) else None
        valid = None if pooled is None or bool(valid.all()) else valid
        return HMSTState(ssm=ssm, pos=int(tensors["pos"]), prev_pooled=pooled, prev_valid=valid,
                         prev_sim=tensors.get("prev_sim"), key_tail=tensors.get("key_tail"), key_count=tensors.get("key_count"))

    # -- checkpoint ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        episodic = self.episodic.state_dict()
        checkpoint["hmst_memory"] = {"semantic": self.semantic.state_dict(), "episodic": episodic}
        per_rank = self._gather_episodic(episodic)
        if per_rank is not None:
            checkpoint["hmst_memory"]["episodic_ranks"] = per_rank
        gen_state = self._gate_rng.get_state() if self._gate_rng is not None else self._gate_rng_state
        if gen_state is not None:
            checkpoint["hmst_memory"]["gate_rng"] = gen_state.clone()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        mem = checkpoint.get("hmst_memory")
        if mem:
            self.semantic.load_state_dict(mem["semantic"])
            self.episodic.load_state_dict(self._own_episodic(mem))
            if mem.get("gate_rng") is not None:
                self._gate_rng, self._gate_rng_state = None, mem["gate_rng"].cpu()

    def _gather_episodic(self, own: dict) -> dict | None:
        """Every rank's episodic store under DDP, each tensor stacked over global ranks; None with one process.

        Runs on every rank while the checkpoint is dumped (like the TBPTT callback's carried state):
        the store has a fixed capacity, so every rank holds the same keys and shapes.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        tensors = {k: trainer.strategy.all_gather(v.reshape(v.shape or (1,)).to(self.device).contiguous()).cpu()
                   for k, v in own.items()}
        return {"world_size": trainer.world_size, "tensors": tensors}

    def _own_episodic(self, mem: dict) -> dict:
        """This rank's saved store: its own slice of ``episodic_ranks`` when the world size matches, else rank 0's."""
        ranks, trainer = mem.get("episodic_ranks"), self._trainer
        if not ranks or trainer is None:
            return mem["episodic"]  # single process (chat, eval): rank 0's copy
        if int(ranks["world_size"]) != trainer.world_size:
            warnings.warn(f"episodic stores were saved by {ranks['world_size']} ranks, resuming with "
                          f"{trainer.world_size}: every rank starts from rank 0's store")
            return mem["episodic"]
        own = {k: v[trainer.global_rank] for k, v in ranks["tensors"].items()}
        own["written"] = own["written"].reshape(())
        return own

    def memory_report(self) -> dict:
        return {"semantic_items": len(self.semantic), "episodic_items": len(self.episodic),
                "semantic_index": self.semantic.index_type}

    def verify(self, query_ids: list[int], response_ids: list[int], k: int = 1) -> dict:
        """Critic verdict on a (query, response) pair with the top-k retrieved memory texts as facts."""
        dev = self.device
        q = torch.tensor([query_ids], dtype=torch.long, device=dev)
        r = torch.tensor([response_ids], dtype=torch.long, device=dev)
        facts: list[int] = []
        texts: list[str] = []
        with torch.no_grad():
            if len(self.semantic) and self.tokenizer is not None:
                out = self(q[:, -self.config.block_size:])
                res = self.semantic.search(out.mem_keys[0, -1:].float(), k)
                texts = [t for t in self.semantic.get_texts(res.ids[0].cpu()) if t]
                for t in texts:
                    facts.extend(self.tokenizer.encode(t))
            f = torch.tensor([facts], dtype=torch.long, device=dev) if facts else torch.zeros(1, 0, dtype=torch.long, device=dev)
            pad = self.tokenizer.pad_id if self.tokenizer is not None and self.tokenizer.pad_id is not None else -1
            res = self.model.critic(q, r, f, pad_id=pad)
        return {"p_correct": float(res.p_correct[0]), "confidence": float(res.confidence[0]), "facts": texts}
