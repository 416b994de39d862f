"""LightningModule for the Hebbian continual learner: online learning, no optimizer, no backprop.

    python train.py fit --config configs/hebbian_tiny.yaml

Each training batch is a list of raw strings from :class:`memlm.datamodules.conversation.ConversationDataModule`;
every string is learned once, in order, by local plasticity (``automatic_optimization = False``,
``configure_optimizers`` returns None). Logged: ``train/acc`` (prequential next-unit accuracy:
predicted before the unit was learned), ``train/vocab_size``, ``train/neurons``,
``train/synapses``, ``train/learned_patterns``, ``train/weight_change``, ``train/new_units``,
``train/tokens_per_sec``; validation and test log ``val/``/``test/`` ``loss``, ``ppl``, ``bpb`` and
``acc`` through the shared evaluation accumulator (the NLL of a normalised softmax read-out of
the network's drive whose temperature is fitted on prequential training positions, see
``memlm.models.hebbian.readout``).

Checkpoints: the whole learner (weights, vocabulary, RNG states, counters) lives in
``checkpoint["hebbian_state"]`` as tensors and JSON strings. The MemLM tokenizer slot
(``checkpoint["memlm"]["tokenizer"]``) is left empty because the vocabulary is not a Hugging
Face tokenizer; ``self.tokenizer`` is a :class:`HebbianTokenizer` adapter over the live
vocabulary (encode/decode/eos_id/vocab_size/token_bytes/to_json/fingerprint) so chat and
serving code written for ``TextTokenizer`` work unchanged.
"""
from __future__ import annotations

import time
import warnings
from typing import Iterator

import torch

from memlm.lightning_modules.base import MemLMModule
from memlm.models.hebbian.learner import READOUT_GAIN, TURN_SEPARATOR, ContinualLearner, LearnerConfig
from memlm.models.hebbian.teacher import DEFAULT_SYSTEM_PROMPT
from memlm.models.hebbian.trainer import ConversationalTrainer, Lesson
from memlm.models.hebbian.vocab import BOS_ID, EOS_ID, GrowingVocab
from memlm.core.errors import MemLMError
from memlm.core.state import reset_tensor_rows, row_mask
from memlm.core.sampling import SamplingParams, resolve_params


class HebbianTokenizer:
    """``TextTokenizer``-shaped view of a learner's growing vocabulary."""

    kind = "hebbian"
    pad_id = None

    def __init__(self, vocab: GrowingVocab | None = None, learner: ContinualLearner | None = None) -> None:
        self._vocab = vocab
        self._learner = learner

    @property
    def vocab(self) -> GrowingVocab:
        return self._learner.vocab if self._learner is not None else self._vocab

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def vocab_size(self) -> int:
        return self.vocab.id_space

    def encode(self, text: str) -> list[int]:
        """Units of ``text``; a ``TURN_SEPARATOR`` between dialogue turns becomes ``<eos>``, the unit
        that closes a turn in training (so a rendered conversation reads as the learner learned it)."""
        if TURN_SEPARATOR not in text:
            return self.vocab.encode(text)
        ids: list[int] = []
        for i, turn in enumerate(text.split(TURN_SEPARATOR)):
            ids += ([EOS_ID] if i else []) + self.vocab.encode(turn)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.vocab.decode(ids, skip_special=skip_special_tokens)

    def token_bytes(self) -> list[int]:
        return self.vocab.token_bytes()

    def to_json(self) -> str:
        return self.vocab.to_json()

    @classmethod
    def from_json(cls, payload: str) -> "HebbianTokenizer":
        return cls(vocab=GrowingVocab.from_json(payload))

    def fingerprint(self) -> str:
        return self.vocab.fingerprint()

    def __repr__(self) -> str:
        return f"HebbianTokenizer(vocab_size={len(self.vocab)}, ids={self.vocab.id_space})"


class HebbianLanguageModel(MemLMModule):
    """Online Hebbian learner as a LightningModule (see the module docstring)."""

    checkpoint_monitor = "val/acc"
    #: chat renders a conversation as the learner's own turns (user/assistant texts joined by
    #: TURN_SEPARATOR, no "User:"/"Assistant:" tags): dialogue data never contains the tags, so a
    #: tagged prompt would leave the network with no learned continuation (empty replies)
    chat_template = "turns"

    # jsonargparse builds the config schema from this signature, so it repeats LearnerConfig's fields
    def __init__(
        self,
        vocab_size: int | None = None,
        initial_vocab_size: int = 128,
        max_vocab_size: int = 2048,
        merge_threshold: int = 3,
        max_unit_len: int = 12,
        max_new_units_per_input: int = 4,
        usage_half_life: float = 5000.0,
        forget_below: float = 0.5,
        neuron_model: str = "rate",
        neurons_per_column: int = 64,
        synapses_per_neuron: int = 48,
        k_winners: int = 4,
        trace_len: int = 2,
        trace_decay: float = 0.5,
        learning_rate: float = 0.3,
        hebbian_strength: float = 1.0,
        depression: float = 0.05,
        stdp_ltd: float = 0.05,
        weight_decay: float = 0.002,
        weight_max: float = 1.0,
        activation_threshold: float = 0.2,
        lif_steps: int = 8,
        lif_tau_m: float = 10.0,
        lif_threshold: float = 3.0,
        lif_reset: float = 0.0,
        lif_refractory: int = 2,
        lif_input: float = 1.0,
        lif_recurrent_gain: float = 2.0,
        stdp_tau_plus: float = 8.0,
        stdp_tau_minus: float = 8.0,
        theta_plus: float = 0.05,
        theta_tau: float = 20000.0,
        calibrate_every: int = 4,
        replay_memory: int = 0,
        replay_per_merge: int = 8,
        temperature: float = 0.7,
        max_response_units: int = 48,
        teacher_api_url: str | None = None,
        teacher_model: str | None = None,
        teacher_timeout: float = 20.0,
        teacher_retries: int = 1,
        teacher_system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        learn_from_teacher: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        cap = int(max_vocab_size) if vocab_size is None else min(int(max_vocab_size), int(vocab_size))
        self.config = LearnerConfig(
            initial_vocab_size=initial_vocab_size,
            max_vocab_size=cap,
            merge_threshold=merge_threshold,
            max_unit_len=max_unit_len,
            max_new_units_per_input=max_new_units_per_input,
            usage_half_life=usage_half_life,
            forget_below=forget_below,
            neuron_model=neuron_model,
            neurons_per_column=neurons_per_column,
            synapses_per_neuron=synapses_per_neuron,
            k_winners=k_winners,
            trace_len=trace_len,
            trace_decay=trace_decay,
            learning_rate=learning_rate,
            hebbian_strength=hebbian_strength,
            depression=depression,
            stdp_ltd=stdp_ltd,
            weight_decay=weight_decay,
            weight_max=weight_max,
            activation_threshold=activation_threshold,
            lif_steps=lif_steps,
            lif_tau_m=lif_tau_m,
            lif_threshold=lif_threshold,
            lif_reset=lif_reset,
            lif_refractory=lif_refractory,
            lif_input=lif_input,
            lif_recurrent_gain=lif_recurrent_gain,
            stdp_tau_plus=stdp_tau_plus,
            stdp_tau_minus=stdp_tau_minus,
            theta_plus=theta_plus,
            theta_tau=theta_tau,
            calibrate_every=calibrate_every,
            replay_memory=replay_memory,
            replay_per_merge=replay_per_merge,
            temperature=temperature,
            max_response_units=max_response_units,
            teacher_api_url=teacher_api_url,
            teacher_model=teacher_model,
            teacher_timeout=teacher_timeout,
            teacher_retries=teacher_retries,
            teacher_system_prompt=teacher_system_prompt,
            learn_from_teacher=learn_from_teacher,
            seed=seed,
        )
        self.learner = ContinualLearner(self.config)
        self.tokenizer = HebbianTokenizer(learner=self.learner)
        self._lesson_trainer: ConversationalTrainer | None = None

    # -- Lightning ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._trainer is not None and self.trainer.world_size > 1:
            raise MemLMError(
                "HebbianLanguageModel learns online in one process (one network, one stream) and has no rule "
                "to merge several learners; run it with --trainer.devices=1"
            )

    def configure_optimizers(self):
        return None

    def configure_callbacks(self):
        from memlm.callbacks.tbptt import default_tbptt

        return default_tbptt(self)

    # -- recurrent state (memlm.core.state.RecurrentState) ----------------------------------
    # One stream (batch size 1): the network's context between inputs (active set, winner
    # history). Every training text starts from a fresh context (learn_text resets), so the
    # TBPTT callback's reset before each batch of raw strings changes nothing; the context is
    # checkpointed through the protocol like every model's carried state, and also stays in
    # hebbian_state with the weights, which are persisted there as before.
    @property
    def carried_state(self) -> dict[str, torch.Tensor]:
        return {k: v.unsqueeze(0) for k, v in self.learner.net.context_tensors().items()}

    @carried_state.setter
    def carried_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is None:
            self.learner.net.reset()
        else:
            self.learner.net.load_context_tensors({k: v[0] for k, v in state.items()})

    def init_state(self, batch_size: int = 1, device=None) -> dict[str, torch.Tensor]:
        if batch_size != 1:
            raise MemLMError(f"the Hebbian learner reads one stream, not {batch_size}")
        return {k: v.unsqueeze(0).to(device) for k, v in self.learner.net.empty_context_tensors().items()}

    def detach_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state  # integer cell ids: there is no graph to cut

    def reset_rows(self, state: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = row_mask(mask, 1)
        fresh = self.init_state(1)
        return {k: reset_tensor_rows(v, mask, fresh[k]) for k, v in state.items()}

    def state_batch_size(self, state: dict[str, torch.Tensor]) -> int:
        return 1

    def state_to_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in state.items()}

    def state_from_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if set(tensors) != {"active", "hist", "hist_n", "cursor"}:
            raise MemLMError(f"saved Hebbian context {sorted(tensors)} is not active/hist/hist_n/cursor")
        return {k: v.cpu().clone() for k, v in tensors.items()}

    def forward(self, texts: list[str]) -> dict:
        """Learn ``texts`` in order; returns the summed learning info."""
        out = {"correct": 0, "scored": 0, "units": 0, "new_units": 0}
        for text in texts:
            info = self.learner.learn_text(text)
            out["correct"] += info["correct"]
            out["scored"] += info["scored"]
            out["units"] += info["units"]
            out["new_units"] += len(info["new_units"])
        return out

    def _check_batch(self, batch) -> list[str]:
        if isinstance(batch, str):
            return [batch]
        if isinstance(batch, (list, tuple)) and all(isinstance(x, str) for x in batch):
            return list(batch)
        raise MemLMError(
            "HebbianLanguageModel learns from raw strings; use data.class_path: "
            "memlm.datamodules.conversation.ConversationDataModule"
        )

    def _run_lessons(self, lessons: list[dict]) -> dict:
        """Teacher-led episodes (``memlm.models.hebbian.trainer``), one per lesson of the batch."""
        if self._lesson_trainer is None:
            if self.learner.teacher is None:
                warnings.warn("no teacher_api_url: every lesson uses its fallback opening and gets no feedback",
                              stacklevel=2)
            self._lesson_trainer = ConversationalTrainer(self.learner, self.learner.teacher)
        out = {"correct": 0, "scored": 0, "units": 0, "new_units": 0, "passed": 0, "feedback": 0}
        for lesson in lessons:
            ep = self._lesson_trainer.run_episode(Lesson(**lesson))
            for k in ("correct", "scored", "units", "new_units"):
                out[k] += ep[k]
            out["passed"] += int(ep["passed"])
            out["feedback"] += int(ep["feedback"] is not None)
            if ep["warning"]:
                warnings.warn(f"lesson {lesson['episode']}: {ep['warning']}", stacklevel=2)
        return out

    def training_step(self, batch, batch_idx):
        lessons = batch if isinstance(batch, list) and batch and all(isinstance(x, dict) for x in batch) else None
        texts = lessons if lessons is not None else self._check_batch(batch)
        net = self.learner.net
        change0, steps0 = net.abs_change, net.learning_steps
        t0 = time.perf_counter()
        out = self._run_lessons(lessons) if lessons is not None else self(texts)
        dt = time.perf_counter() - t0
        n = len(texts)
        if lessons is not None:  # lesson pass rate and how many got the teacher's feedback
            self.log_dict({"train/lesson_pass": out["passed"] / n, "train/teacher_feedback": out["feedback"] / n},
                          on_step=True, on_epoch=False, batch_size=n)
        stats = {
            "train/acc": out["correct"] / max(1, out["scored"]),
            "train/vocab_size": float(len(self.learner.vocab)),
            "train/neurons": float(net.n_neurons),
            "train/synapses": float(net.n_synapses()),
            "train/learned_patterns": float(net.n_connected()),
            "train/weight_change": (net.abs_change - change0) / max(1, net.learning_steps - steps0),
            "train/new_units": float(out["new_units"]),
            "train/tokens_per_sec": out["units"] / max(dt, 1e-9),
        }
        self.log_dict(stats, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/vocab", stats["train/vocab_size"], prog_bar=True, on_step=True, batch_size=n, logger=False)
        self.log("train/acc_bar", stats["train/acc"], prog_bar=True, on_step=True, batch_size=n, logger=False)
        self.count_online_step()
        return None

    # -- evaluation: scored with learning off, through the shared accumulator (MemLMModule) -------
    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        nll = scored = nbytes = correct = 0
        for text in self._check_batch(batch):
            r = self.learner.score_text(text, with_nll=True)
            nll, scored, nbytes, correct = nll + r["nll"], scored + r["scored"], nbytes + r["bytes"], correct + r["correct"]
        self.eval_sums(dataloader_idx).update(float(nll), scored, nbytes, correct)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.validation_step(batch, batch_idx, dataloader_idx)

    # -- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["memlm"]["tokenizer"] = None  # not a Hugging Face tokenizer: see hebbian_state["vocab"]
        checkpoint["memlm"]["tokenizer_kind"] = "hebbian"
        checkpoint["hebbian_state"] = self.learner.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("hebbian_state")
        if state is None:
            raise MemLMError("checkpoint has no hebbian_state; it was not written by HebbianLanguageModel")
        self.learner.load_state_dict(state)
        self._lesson_trainer = None  # rebuilt around the loaded learner
        self.config = self.learner.config
        self.tokenizer = HebbianTokenizer(learner=self.learner)

    # -- chat protocol ------------------------------------------------------------------
    # the one generate(prompt_ids, params, generator) signature that MemLMModule defines and every module overrides
    def generate(
        self,
        prompt_ids,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Run the network over ``<bos> + prompt_ids`` (unit ids) and yield sampled next units.

        Like :meth:`ContinualLearner.respond`: when the network expects the prompt to end
        (``<eos>`` first), that unit is fed silently and the reply that follows is generated;
        otherwise the prompt's continuation is. Only units the network predicts (drive above threshold) are candidates; ``top_k``
        keeps the k strongest of them. Stops at ``<eos>`` (yielded), when nothing is predicted,
        or after ``max_new_tokens``. No learning happens here. ``top_p`` and ``use_cache`` have no
        effect (the candidates are already the predicted units; the network state is always carried).
        """
        params = resolve_params(params)
        temperature, top_k, eos_id = params.temperature, params.top_k, params.eos_id
        ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        learner, net = self.learner, self.learner.net
        stop = EOS_ID if eos_id is None else int(eos_id)
        gen = generator
        if gen is None:  # without a seed, the learner's own (checkpointed) generator keeps sampling reproducible
            gen = learner.generator if params.seed is None else params.make_generator(learner.generator.device)
        snap = net.snapshot()
        net.reset()
        try:
            learner._feed([BOS_ID] + [int(i) for i in ids if 0 <= int(i) < net.n_units], learn=False)
            first = True
            produced = 0
            while produced < params.max_new_tokens:
                scores = net.unit_scores()
                ok = scores >= net.threshold
                if not bool(ok.any()):
                    return
                if params.greedy:
                    u = int(scores.argmax())
                else:
                    logits = (scores * (READOUT_GAIN / (net.w_max * temperature))).masked_fill(~ok, float("-inf"))
                    if top_k is not None and 0 < top_k < int(ok.sum()):
                        kth = torch.topk(logits, top_k).values[-1]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    u = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
                if first and u == EOS_ID:  # the prompt is complete: answer with what follows it
                    first = False
                    net.step(u, learn=False)
                    continue
                first = False
                produced += 1
                yield u
                if u == stop:
                    return
                net.step(u, learn=False)
        finally:
            net.restore(snap)

    def respond(self, text: str, learn: bool = True) -> str:
        """Convenience for chat: learn from ``text`` (if ``learn``) and answer it."""
        self.learner.learning = bool(learn)
        try:
            return self.learner.process_input_and_respond(text)
        finally:
            self.learner.learning = True
