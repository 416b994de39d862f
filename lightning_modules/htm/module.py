"""``HTMLanguageModel``: encoder -> spatial pooler -> temporal memory -> SDR classifier.

No backprop and no optimizer (``automatic_optimization = False``; ``configure_optimizers``
returns None). Every training step feeds each row of the batch, in order, through the
pipeline with learning on; validation and generation run with learning off and leave the
learned state untouched.

Streams: with ``sampler: stream`` row b of consecutive batches continues stream b. The
learned connections are shared by all rows; the only per-stream state of the temporal
memory is (previous active cells, previous winner cells), kept per row (separately for
training and validation) and swapped in before the row is processed. Rows are processed
one after another (row 0's chunk, then row 1's chunk, ...), exactly as if the streams
were read in turn, and every row starts from its own previous context. The per-row state
is cleared when ``batch["first"]`` is set (start of an epoch), at validation start and,
with ``reset_on_eos``, after every end-of-text token (document boundary). The training
rows' context is the module's :class:`memlm.core.state.RecurrentState`: the TBPTT callback
(added unless the trainer has one) resets it at epoch start and keeps it in
``checkpoint["tbptt"]``, so a resumed run continues every stream where it stopped.

Everything the model has learned lives in numpy arrays outside ``nn.Parameter`` and is
stored as tensors in ``checkpoint["htm_state"]`` (no pickle); loading restores it exactly.
"""
from __future__ import annotations

import time
from typing import Iterator, Literal

import numpy as np
import torch

from memlm.callbacks.throughput import TokenThroughput
from memlm.lightning_modules.base import MemLMModule, sample_next
from memlm.models.htm.classifier import SDRClassifier
from memlm.models.htm.context import WordContext, merge_csr
from memlm.models.htm.encoder import TokenEncoder
from memlm.models.htm.spatial_pooler import SpatialPooler
from memlm.models.htm.temporal_memory import StreamState, TemporalMemory
from memlm.core.checks import require_positive
from memlm.core.errors import MemLMError
from memlm.core.state import flatten_tensors, row_mask, unflatten_tensors
from memlm.core.sampling import SamplingParams, resolve_params


def _to_tensors(state: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in state.items()}


def _to_numpy(state: dict) -> dict:
    return {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in state.items()}


class HTMLanguageModel(MemLMModule):
    """Hierarchical Temporal Memory language model trained online without backprop.

    Encoder: ``encoder_size`` bits, ``encoder_active_bits`` active, ``encoder_overlap`` of
    them shared through character n-grams. Spatial pooler (``use_spatial_pooler``):
    ``columns`` columns, ``sp_density`` active. Without it the encoder bits are the active
    columns (``columns`` must then equal ``encoder_size``). Temporal memory and classifier
    arguments carry htm.core's names in snake case. ``classifier_input`` picks the bits the
    classifier reads: ``active`` cells or ``winners`` (one cell per active column).
    """

    # jsonargparse builds the config schema from this signature, so it repeats SpatialPooler's and TemporalMemory's parameters
    def __init__(
        self,
        vocab_size: int = 256,
        encoder_size: int = 1024,
        encoder_active_bits: int = 40,
        encoder_overlap: float = 0.0,
        encoder_ngram: int = 3,
        use_spatial_pooler: bool = True,
        sp_learn: bool = True,
        columns: int = 1024,
        potential_pct: float = 0.5,
        sp_density: float = 0.04,
        stimulus_threshold: float = 0.0,
        syn_perm_active_inc: float = 0.05,
        syn_perm_inactive_dec: float = 0.008,
        syn_perm_connected: float = 0.1,
        min_pct_overlap_duty_cycles: float = 0.001,
        duty_cycle_period: int = 1000,
        boost_strength: float = 0.0,
        cells_per_column: int = 16,
        activation_threshold: int = 13,
        min_threshold: int = 10,
        initial_permanence: float = 0.21,
        connected_permanence: float = 0.5,
        max_new_synapse_count: int = 20,
        permanence_increment: float = 0.1,
        permanence_decrement: float = 0.1,
        predicted_segment_decrement: float = 0.004,
        max_segments_per_cell: int = 255,
        max_synapses_per_segment: int = 255,
        classifier_alpha: float = 1.0,
        classifier_input: Literal["active", "winners"] = "winners",
        prob_floor: float = 1e-5,
        narrow_bursts: bool = False,
        context_words: int = 0,
        context_bits: int = 2048,
        context_bits_per_word: int = 4,
        context_positional: bool = False,
        reset_on_eos: bool = True,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        require_positive("model", vocab_size=vocab_size, encoder_size=encoder_size,
                         encoder_active_bits=encoder_active_bits, columns=columns, cells_per_column=cells_per_column)
        if classifier_input not in ("active", "winners"):
            raise MemLMError(f"classifier_input={classifier_input!r}: use active or winners")
        if not use_spatial_pooler and columns != encoder_size:
            raise MemLMError(
                f"without the spatial pooler the encoder bits are the columns: set columns={encoder_size} "
                f"(= encoder_size) or use_spatial_pooler: true"
            )
        self.vocab_size = int(vocab_size)
        self.encoder = TokenEncoder(encoder_size, encoder_active_bits, seed, encoder_overlap, encoder_ngram)
        self.encoder_table: np.ndarray | None = None  # [V, active_bits], built on first use, saved
        self.sp = (
            SpatialPooler(
                encoder_size, columns, potential_pct=potential_pct, density=sp_density,
                stimulus_threshold=stimulus_threshold, syn_perm_active_inc=syn_perm_active_inc,
                syn_perm_inactive_dec=syn_perm_inactive_dec, syn_perm_connected=syn_perm_connected,
                min_pct_overlap_duty_cycles=min_pct_overlap_duty_cycles, duty_cycle_period=duty_cycle_period,
                boost_strength=boost_strength, seed=seed,
            )
            if use_spatial_pooler
            else None
        )
        self.tm = TemporalMemory(
            columns, cells_per_column, activation_threshold=activation_threshold, min_threshold=min_threshold,
            initial_permanence=initial_permanence, connected_permanence=connected_permanence,
            max_new_synapse_count=max_new_synapse_count, permanence_increment=permanence_increment,
            permanence_decrement=permanence_decrement, predicted_segment_decrement=predicted_segment_decrement,
            max_segments_per_cell=max_segments_per_cell, max_synapses_per_segment=max_synapses_per_segment, seed=seed,
            narrow_bursts_in_inference=narrow_bursts,
        )
        n_in = columns * cells_per_column
        # the prompt-level context signal (models/htm/context.py): classifier inputs after the cells
        self.context = (WordContext(context_bits, context_bits_per_word, context_words, seed, context_positional)
                        if context_words > 0 else None)
        if self.context is not None:
            n_in += self.context.size
        self.classifier = SDRClassifier(n_in, self.vocab_size, alpha=classifier_alpha, prob_floor=prob_floor)
        self.sp_learn = bool(sp_learn)
        self.reset_on_eos = bool(reset_on_eos)
        self.classifier_input = classifier_input
        self._streams: dict[str, list[StreamState]] = {"train": [], "val": []}
        self._anomaly = [0.0, 0]  # evaluation: summed per-batch mean anomaly, batches

    # -- Lightning plumbing ------------------------------------------------------------
    def configure_optimizers(self):
        return None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._trainer is not None and self.trainer.world_size > 1:
            raise MemLMError(
                "HTMLanguageModel learns sequentially in one process and has no multi-process policy; "
                "run it with --trainer.devices=1"
            )

    def configure_callbacks(self):
        from memlm.callbacks.tbptt import default_tbptt

        return default_tbptt(self)

    # -- recurrent state (memlm.core.state.RecurrentState) ----------------------------------
    # The carried training state is the per-row temporal-memory context (one StreamState per
    # stream: previous active and winner cells); the learned connections are in htm_state.
    @property
    def carried_state(self) -> list[StreamState] | None:
        return self._streams["train"] or None

    @carried_state.setter
    def carried_state(self, state: list[StreamState] | None) -> None:
        self._streams["train"] = [] if state is None else list(state)

    def init_state(self, batch_size: int, device=None) -> list[StreamState]:
        return [StreamState.empty() for _ in range(batch_size)]

    def detach_state(self, state: list[StreamState] | None) -> list[StreamState] | None:
        return state  # numpy cell ids: there is no graph to cut

    def reset_rows(self, state: list[StreamState], mask: torch.Tensor) -> list[StreamState]:
        mask = row_mask(mask, len(state)).tolist()
        return [StreamState.empty() if reset else row for row, reset in zip(state, mask)]

    def state_batch_size(self, state: list[StreamState]) -> int:
        return len(state)

    def state_to_dict(self, state: list[StreamState]) -> dict[str, torch.Tensor]:
        # cell counts differ per row, so each row is its own pair of tensors (HTM runs on one rank)
        rows = [_to_tensors({"active": s.active, "winners": s.winners, "context": s.context}) for s in state]
        return flatten_tensors({"streams": rows})

    def state_from_dict(self, tensors: dict[str, torch.Tensor]) -> list[StreamState]:
        rows = unflatten_tensors(dict(tensors)).get("streams", []) if tensors else []
        return [StreamState(r["active"].cpu().numpy().astype(np.int32), r["winners"].cpu().numpy().astype(np.int32),
                            r["context"].cpu().numpy().astype(np.int64) if "context" in r else np.zeros(0, np.int64))
                for r in rows]

    def _table(self) -> np.ndarray:
        if self.encoder_table is None:
            texts = None
            if self.encoder.overlap > 0 and self.tokenizer is not None:
                texts = [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.tokenizer.vocab_size)]
            self.encoder_table = self.encoder.table(self.vocab_size, texts)
        return self.encoder_table

    # -- the pipeline --------------------------------------------------------------------
    def process(self, tokens: np.ndarray, targets: np.ndarray, learn: bool, want_logp: bool = False):
        """Feed one stream chunk through encoder, SP, TM and classifier (TM stream state = self.tm.stream).

        Returns (nll[T], argmax[T], anomaly[T], logp[T,V] or None): at step t the classifier
        reads the cells after token t and predicts targets[t] (then learns it if ``learn``).
        With ``reset_on_eos`` the temporal memory is reset after every end-of-text token
        (a document boundary is a sequence boundary)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise MemLMError(f"token id outside 0..{self.vocab_size - 1}; use the model's tokenizer")
        eos = self.tokenizer.eos_id if (self.reset_on_eos and self.tokenizer is not None) else None
        ends = np.flatnonzero(tokens == eos) + 1 if eos is not None else np.zeros(0, dtype=np.int64)
        if len(ends) == 0:
            return self._process_piece(tokens, targets, learn, want_logp)
        parts, start = [], 0
        for end in list(ends) + [len(tokens)]:
            if end > start:
                parts.append(self._process_piece(tokens[start:end], targets[start:end], learn, want_logp))
                if end in ends:
                    self.tm.reset()
            start = end
        joined = [np.concatenate([p[i] for p in parts]) for i in range(3)]
        logp = np.concatenate([p[3] for p in parts]) if want_logp else None
        return joined[0], joined[1], joined[2], logp

    def _process_piece(self, tokens: np.ndarray, targets: np.ndarray, learn: bool, want_logp: bool):
        table = self._table()
        w = table.shape[1]
        flat = table[tokens].reshape(-1)
        off = np.arange(len(tokens) + 1, dtype=np.int64) * w
        if self.sp is not None:
            flat, off = self.sp.run(flat, off, learn=learn and self.sp_learn)
        context_before = self.tm.stream.context
        out = self.tm.run(flat, off, learn=learn)
        if self.classifier_input == "active":
            bits, bits_off = out.active, out.active_off
        else:
            bits, bits_off = out.winners, out.winners_off
        if self.context is not None:
            bits, bits_off = self._with_context(tokens, bits, bits_off, context_before)
        nll, pred, logp = self.classifier.run(bits, bits_off, targets, learn=learn, want_logp=want_logp)
        return nll, pred, out.anomaly, logp

    def _context_table(self) -> None:
        if len(self.context.in_word) != self.vocab_size:
            if self.tokenizer is None:
                raise MemLMError("context_words needs the tokenizer's token texts; call set_tokenizer first")
            self.context.set_token_texts(
                [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)])

    def _with_context(self, tokens, bits, bits_off, state):
        """Append the word-context bits (shifted past the cells) to each step's classifier input."""
        self._context_table()
        c_flat, c_off, new_state = self.context.run(tokens, state)
        self.tm.stream.context = new_state
        flat = np.empty(len(bits) + len(c_flat), dtype=np.int32)
        off = np.empty_like(bits_off)
        merge_csr(np.ascontiguousarray(bits, dtype=np.int32), bits_off, c_flat, c_off,
                  self.tm.num_cells, flat, off)
        return flat, off

    def _run_batch(self, batch: dict, mode: str, learn: bool) -> dict:
        x = batch["input_ids"].detach().cpu().numpy()
        y = batch["targets"].detach().cpu().numpy()
        states = self._streams[mode]
        if batch.get("first") or not batch.get("stream") or len(states) != x.shape[0]:
            states = [StreamState.empty() for _ in range(x.shape[0])]
        nll_sum = correct = count = 0.0
        anomaly = []
        saved = self.tm.stream
        for b in range(x.shape[0]):
            self.tm.stream = states[b]
            nll, pred, an, _ = self.process(x[b], y[b], learn=learn)
            states[b] = self.tm.stream
            valid = y[b] >= 0
            nll_sum += float(nll[valid].sum())
            correct += float((pred[valid] == y[b][valid]).sum())
            count += float(valid.sum())
            anomaly.append(an)
        self.tm.stream = saved
        self._streams[mode] = states if batch.get("stream") else []
        return {"nll": nll_sum, "correct": correct, "count": count, "anomaly": float(np.concatenate(anomaly).mean())}

    def training_step(self, batch: dict, batch_idx: int):
        t0 = time.perf_counter()
        r = self._run_batch(batch, "train", learn=True)
        n = max(r["count"], 1.0)
        self.log("train/loss", r["nll"] / n, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/acc", r["correct"] / n, prog_bar=True, on_step=True, on_epoch=False)
        self.log("mem/anomaly", r["anomaly"], prog_bar=True, on_step=True, on_epoch=False)
        self.log("mem/segments", float(self.tm.num_segments), on_step=True, on_epoch=False)
        self.log("mem/synapses", float(self.tm.num_synapses), on_step=True, on_epoch=False)
        self.count_online_step()
        callbacks = getattr(self.trainer, "callbacks", []) if self._trainer is not None else []
        if not any(isinstance(c, TokenThroughput) for c in callbacks):  # a plain Trainer: measure here
            tps = batch["input_ids"].numel() / max(time.perf_counter() - t0, 1e-9)
            self.log("train/tokens_per_sec", tps, on_step=True, on_epoch=False)
        return None

    # -- evaluation (learning off; validation and test share the "val" stream states) -------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._streams["val"] = []
        self._anomaly = [0.0, 0]

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._streams["val"] = []
        self._anomaly = [0.0, 0]

    def _eval_batch(self, batch: dict, dataloader_idx: int) -> None:
        r = self._run_batch(batch, "val", learn=False)
        nbytes = self.bytes_of(batch["targets"].to(self.token_bytes.device))
        self.eval_sums(dataloader_idx).update(r["nll"], r["count"], nbytes, r["correct"])
        self._anomaly[0] += r["anomaly"]
        self._anomaly[1] += 1

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._anomaly[1]:
            self.log("mem/val_anomaly", self._anomaly[0] / self._anomaly[1])

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self._anomaly[1]:
            self.log("mem/test_anomaly", self._anomaly[0] / self._anomaly[1])

    # -- checkpoint -------------------------------------------------------------------------
    def num_learned_values(self) -> int:
        """HTM learns no nn.Parameters: its learned values are the temporal memory's live synapse
        permanences, the spatial pooler's potential-pool permanences and the classifier's weights."""
        n = int(self.tm.num_synapses) + int(self.classifier.weights.size)
        if self.sp is not None:
            n += int(self.sp.potential.sum())
        return n

    def htm_state(self) -> dict:
        """All learned state as tensors (nested dicts), as stored in ``checkpoint["htm_state"]``."""
        state = {
            "encoder_table": torch.from_numpy(self._table().copy()),
            "tm": _to_tensors(self.tm.state_dict()),
            "classifier": _to_tensors(self.classifier.state_dict()),
        }  # the per-stream context is carried training state: checkpoint["tbptt"] (RecurrentState)
        if self.sp is not None:
            state["sp"] = _to_tensors(self.sp.state_dict())
        return state

    def load_htm_state(self, state: dict) -> None:
        if state is None:
            raise MemLMError("checkpoint has no htm_state; it was not written by HTMLanguageModel")
        table = state["encoder_table"].cpu().numpy().astype(np.int32)
        if table.shape != (self.vocab_size, self.encoder.active_bits):
            raise MemLMError(f"encoder table shape {tuple(table.shape)} does not fit this model; use the checkpoint's config")
        self.encoder_table = table
        if self.sp is not None:
            if "sp" not in state:
                raise MemLMError("checkpoint has no spatial pooler state; set use_spatial_pooler: false")
            self.sp.load_state_dict(_to_numpy(state["sp"]))
        self.tm.load_state_dict(_to_numpy(state["tm"]))
        self.classifier.load_state_dict(_to_numpy(state["classifier"]))
        # checkpoints written before the RecurrentState protocol kept the stream context here
        self._streams["train"] = [
            StreamState(s["active"].numpy().astype(np.int32), s["winners"].numpy().astype(np.int32))
            for s in state.get("train_streams", [])
        ]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["htm_state"] = self.htm_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.load_htm_state(checkpoint.get("htm_state"))

    # -- learning while chatting --------------------------------------------------------------
    @torch.no_grad()
    def learn_text(self, ids: list[int], passes: int = 1) -> None:
        """Learn a token sequence online (SP, TM and classifier), each pass from a fresh context.

        A fact seen once grows segments at ``initial_permanence``, below ``connected_permanence``;
        a few passes (rehearsal) connect them so the sequence is predicted, not only matched."""
        ids_np = np.asarray(list(ids), dtype=np.int64)
        if len(ids_np) < 2:
            return
        saved = self.tm.stream
        try:
            for _ in range(max(1, int(passes))):
                self.tm.reset()
                self.process(ids_np[:-1], ids_np[1:], learn=True)
        finally:
            self.tm.stream = saved

    def config_fingerprint(self) -> str:
        """Identifies the configuration (init args and tokenizer) a learned state belongs to."""
        import hashlib
        import json

        args = {k: v for k, v in dict(self.hparams).items() if not str(k).startswith("_")}
        tok = self.tokenizer.fingerprint() if self.tokenizer is not None else ""
        return hashlib.sha256(json.dumps([args, tok], sort_keys=True, default=str).encode()).hexdigest()[:16]

    def save_learned_state(self, path: str) -> None:
        """Write the learned state (tensors only) to ``path`` atomically: a temporary file in the
        same folder, flushed to disk, then renamed over the target, so a kill leaves the old or the new file."""
        import os
        import tempfile

        payload = {"htm_state": self.htm_state(), "memlm_learned_state": {"config": self.config_fingerprint()}}
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".htm-state-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load_learned_state(self, path: str) -> None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MemLMError(f"cannot read the learned state {path} ({type(exc).__name__}); delete it or pass another path") from exc
        meta = payload.get("memlm_learned_state") if isinstance(payload, dict) else None
        if meta is None or "htm_state" not in payload:
            raise MemLMError(f"{path} is not an HTM learned-state file; pass another path")
        if meta.get("config") != self.config_fingerprint():
            raise MemLMError(f"{path} was learned by another configuration (config {meta.get('config')}, this "
                             f"checkpoint {self.config_fingerprint()}); pass another state path or delete it")
        self.load_htm_state(payload["htm_state"])

    # -- embedding ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        """A text's vector: how often each spatial-pooler column was active over the text (its bag
        of SDRs), then the word-context union at the end when the model has one; each part L2-normalised.

        Learning is off and the learned state is untouched; texts that share characters and words
        share columns and bits, so cosine similarity measures their overlap."""
        ids_np = np.asarray(list(ids), dtype=np.int64)
        if len(ids_np) == 0:
            raise MemLMError("embed() needs at least one token; pass a non-empty text")
        table = self._table()
        flat = table[ids_np].reshape(-1)
        off = np.arange(len(ids_np) + 1, dtype=np.int64) * table.shape[1]
        if self.sp is not None:
            flat, off = self.sp.run(flat, off, learn=False)
        cols = np.bincount(flat, minlength=self.tm.columns).astype(np.float32)
        parts = [cols / max(float(np.linalg.norm(cols)), 1e-12)]
        if self.context is not None:
            self._context_table()
            _, _, state = self.context.run(ids_np, self.context.empty_state())
            words = np.zeros(self.context.size, dtype=np.float32)
            words[self.context.state_bits(state)] = 1.0
            parts.append(words / max(float(np.linalg.norm(words)), 1e-12))
        return torch.from_numpy(np.concatenate(parts))

    # -- chat protocol ----------------------------------------------------------------------
    @torch.no_grad()
    def next_token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(next token | ids) from a fresh context, learning off."""
        saved = self.tm.stream
        self.tm.reset()
        try:
            ids_np = np.asarray(ids, dtype=np.int64)
            _, _, _, logp = self.process(ids_np, np.full(len(ids_np), -1), learn=False, want_logp=True)
        finally:
            self.tm.stream = saved
        return torch.from_numpy(logp[-1]).float()

    # the one generate(prompt_ids, params, generator) signature that MemLMModule defines and every module overrides
    @torch.no_grad()
    def generate(
        self,
        prompt_ids,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Feed the prompt with learning off, then sample from the classifier and feed the sample back.

        Only a private copy of the per-step cell state changes; the learned state does not.
        ``params.use_cache`` has no effect: the cell state is always carried step to step."""
        params = resolve_params(params)
        eos_id = params.eos_id
        if generator is None:
            generator = params.make_generator("cpu")  # the classifier's log-probabilities live on the CPU
        ids = [int(i) for i in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        if not ids:
            ids = [eos_id if eos_id is not None else 0]
        saved = self.tm.stream
        self.tm.reset()
        try:
            ids_np = np.asarray(ids, dtype=np.int64)
            _, _, _, logp = self.process(ids_np, np.full(len(ids_np), -1), learn=False, want_logp=True)
            last = torch.from_numpy(logp[-1]).float()
            for _ in range(params.max_new_tokens):
                nxt = int(sample_next(last[None], params, generator)[0])
                yield nxt
                if eos_id is not None and nxt == eos_id:
                    break
                _, _, _, logp = self.process(np.array([nxt]), np.array([-1]), learn=False, want_logp=True)
                last = torch.from_numpy(logp[-1]).float()
        finally:
            self.tm.stream = saved
