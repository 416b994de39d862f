"""The continual learner: a growing vocabulary + a columnar Hebbian network + an optional teacher.

Every call to :meth:`ContinualLearner.process_input_and_respond` (and to the ``learn_*``
methods) changes the network's weights with local plasticity; nothing is trained offline.

Utterances are sequences ``<bos> u1 .. un <eos>``. A teacher's reply continues the same
chain (``<bos> user.. <eos> reply.. <eos>``), so the ``<eos>`` neurons that end this
user's utterance learn to predict the reply.

Responding: the network runs over ``<eos> + input`` without learning and then samples the
predicted next units. If it expects the input to go on, the answer is the completion
("the cat sat on the" -> " mat"); if it expects ``<eos>``, that unit is fed and the answer
is what it predicts after it (a reply learned from the teacher). Generation stops at
``<eos>``, when nothing is predicted any more, or at ``max_response_units``.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memlm.models.hebbian.lif import LIFColumnNetwork
from memlm.models.hebbian.network import NO_CONTEXT, ColumnNetwork
from memlm.models.hebbian.readout import ReadoutCalibration, unit_probability
from memlm.models.hebbian.teacher import DEFAULT_SYSTEM_PROMPT, TeacherClient, TeacherUnavailable
from memlm.models.hebbian.vocab import BOS_ID, EOS_ID, GrowingVocab
from memlm.core.errors import MemLMError

NEURON_MODELS = {"rate": ColumnNetwork, "lif": LIFColumnNetwork}
TURN_SEPARATOR = "\x1e"  # separates the turns of one dialogue inside a single string
STATE_FORMAT = 1
READOUT_GAIN = 8.0  # softmax gain of sampling in chat (per w_max of drive, divided by the temperature)


@dataclass
class LearnerConfig:
    # vocabulary
    initial_vocab_size: int = 128  # specials + most frequent characters + syllable seeds
    max_vocab_size: int = 2048  # live units at most (learned units are evicted/forgotten beyond)
    merge_threshold: int = 3  # a pair of units seen this many times becomes a unit
    max_unit_len: int = 12
    max_new_units_per_input: int = 4
    usage_half_life: float = 5000.0  # in utterances; decay of unit usage counts
    forget_below: float = 0.5  # forget() floor on decayed usage
    # network: "rate" (one threshold decision per unit) or "lif" (spiking, memlm.models.hebbian.lif)
    neuron_model: str = "rate"
    neurons_per_column: int = 64
    synapses_per_neuron: int = 48
    k_winners: int = 4  # k-winners-take-all inside an active column
    trace_len: int = 2  # recent winner sets that drive predictions and learn (STDP window)
    trace_decay: float = 0.5  # weight of lag l in the trace: trace_decay**l
    learning_rate: float = 0.3
    hebbian_strength: float = 1.0  # potentiation gain relative to learning_rate
    depression: float = 0.05  # misprediction depression (x learning_rate)
    stdp_ltd: float = 0.05  # post-before-pre depression (x learning_rate)
    weight_decay: float = 0.002  # heterosynaptic decay of a learning neuron's synapses (x learning_rate)
    weight_max: float = 1.0
    activation_threshold: float = 0.2  # drive needed for a neuron to count as predicted
    # lif only: T steps per unit, membrane, refractory period, STDP windows, adaptive thresholds
    lif_steps: int = 8
    lif_tau_m: float = 10.0
    lif_threshold: float = 3.0
    lif_reset: float = 0.0
    lif_refractory: int = 2
    lif_input: float = 1.0  # external current into the presented column, per step
    lif_recurrent_gain: float = 2.0  # synaptic current per unit of context drive
    stdp_tau_plus: float = 8.0
    stdp_tau_minus: float = 8.0
    theta_plus: float = 0.05  # threshold increase per spike (homeostasis)
    theta_tau: float = 20000.0  # threshold recovery time constant, in steps
    # read-out: every calibrate_every-th utterance is scored before it is learned, to fit the
    # temperature of the val/loss distribution on training data (0: never; the defaults stay)
    calibrate_every: int = 4
    # consolidation against re-segmentation: keep the last replay_memory utterances; when a merge
    # creates a unit, re-learn up to replay_per_merge of the kept ones that contain it (0: off)
    replay_memory: int = 0
    replay_per_merge: int = 8
    # responding
    temperature: float = 0.7  # <= 0: greedy
    max_response_units: int = 48
    # teacher
    teacher_api_url: str | None = None
    teacher_model: str | None = None
    teacher_timeout: float = 20.0
    teacher_retries: int = 1
    teacher_system_prompt: str = DEFAULT_SYSTEM_PROMPT
    learn_from_teacher: bool = True
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LearnerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MemLMError(f"unknown LearnerConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**data)


class ContinualLearner:
    def __init__(self, config: LearnerConfig | None = None, teacher: TeacherClient | None = None) -> None:
        self.config = cfg = config or LearnerConfig()
        self.vocab = GrowingVocab(
            initial_vocab_size=cfg.initial_vocab_size,
            max_vocab_size=cfg.max_vocab_size,
            merge_threshold=cfg.merge_threshold,
            max_unit_len=cfg.max_unit_len,
            max_new_units_per_text=cfg.max_new_units_per_input,
            usage_half_life=cfg.usage_half_life,
            forget_below=cfg.forget_below,
        )
        if cfg.neuron_model not in NEURON_MODELS:
            raise MemLMError(f"neuron_model must be one of {sorted(NEURON_MODELS)}, got {cfg.neuron_model!r}")
        lif = {} if cfg.neuron_model == "rate" else dict(
            steps=cfg.lif_steps, tau_m=cfg.lif_tau_m, v_threshold=cfg.lif_threshold, v_reset=cfg.lif_reset,
            refractory=cfg.lif_refractory, input_current=cfg.lif_input, recurrent_gain=cfg.lif_recurrent_gain,
            tau_plus=cfg.stdp_tau_plus, tau_minus=cfg.stdp_tau_minus, theta_plus=cfg.theta_plus,
            theta_tau=cfg.theta_tau)
        try:
            self.net = NEURON_MODELS[cfg.neuron_model](
                self.vocab.id_space,
                **lif,
                cells_per_column=cfg.neurons_per_column,
                synapses_per_cell=cfg.synapses_per_neuron,
                learning_rate=cfg.learning_rate,
                hebbian_strength=cfg.hebbian_strength,
                depression=cfg.depression,
                stdp_ltd=cfg.stdp_ltd,
                decay=cfg.weight_decay,
                w_max=cfg.weight_max,
                threshold=cfg.activation_threshold,
                k_winners=cfg.k_winners,
                trace_len=cfg.trace_len,
                trace_decay=cfg.trace_decay,
                seed=cfg.seed,
            )
        except ValueError as exc:
            raise MemLMError(f"invalid Hebbian network settings: {exc}") from exc
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.readout = ReadoutCalibration()
        self.replay: collections.deque[str] = collections.deque(maxlen=max(1, cfg.replay_memory))
        self._replaying = False
        if teacher is None and cfg.teacher_api_url:
            teacher = TeacherClient(
                cfg.teacher_api_url,
                model=cfg.teacher_model,
                timeout=cfg.teacher_timeout,
                retries=cfg.teacher_retries,
                system_prompt=cfg.teacher_system_prompt,
            )
        self.teacher = teacher
        self.learning = True  # False: the learner answers but no weight or vocabulary changes
        self.last_teacher_error: str | None = None
        self.last_turn: dict = {}
        self.units_learned = 0  # units presented with learning on
        self.correct = 0  # of those, how many the network had predicted
        self.utterances = 0
        self.learn_seconds = 0.0

    # -- learning ---------------------------------------------------------------------
    def _grow_for(self, text: str) -> tuple[list[int], list[int]]:
        new, removed = self.vocab.observe(text)
        if removed:
            self.net.retire(removed)
        self.net.grow(self.vocab.id_space)
        return new, removed

    def _feed(self, ids: list[int], learn: bool, calibrate: bool = False) -> tuple[int, int]:
        """Present units in order; returns (correct predictions, predictions scored).

        ``calibrate``: score each unit before it is presented, for the read-out calibration (one
        kernel call per unit instead of one per sequence; the network ends in the same state)."""
        if not ids:
            return 0, 0
        if calibrate:
            net = self.net
            preds = np.empty(len(ids), dtype=np.int64)
            for i, u in enumerate(ids):
                if net.has_context:
                    self.readout.add(net.unit_scores(), u, net.alive, net.w_max)
                preds[i] = net.feed([u], learn=learn)[0]
        else:
            preds = self.net.feed(ids, learn=learn)
        scored = preds != NO_CONTEXT
        return int((preds[scored] == np.asarray(ids)[scored]).sum()), int(scored.sum())

    def learn_utterance(self, text: str, continue_context: bool = False, close: bool = True, start: bool = True) -> dict:
        """Learn one utterance.

        ``continue_context``: it follows the current context (a reply) instead of a fresh start;
        ``start``: prepend the ``<bos>`` start marker (off for a reply, which starts from the
        ``<eos>`` that closed the previous turn); ``close``: append the closing ``<eos>``.
        """
        t0 = time.perf_counter()
        learn = self.learning
        new, removed = self._grow_for(text) if learn else ([], [])
        ids = self.vocab.encode(text, grow=False)
        if not continue_context:
            self.net.reset()
        seq = ([BOS_ID] if start else []) + ids + ([EOS_ID] if close else [])
        every = self.config.calibrate_every
        calibrate = learn and every > 0 and self.utterances % every == 0
        correct, scored = self._feed(seq, learn=learn, calibrate=calibrate)
        if learn:
            self.units_learned += scored
            self.correct += correct
            self.utterances += 1
        if learn and self.config.replay_memory > 0 and not self._replaying:
            if new:
                self._remap(new)
            if start:  # whole utterances only: a reply replayed alone would lose its question
                self.replay.append(text)
        self.learn_seconds += time.perf_counter() - t0
        return {"ids": ids, "new_units": new, "removed_units": removed, "correct": correct, "scored": scored}

    def _remap(self, new_units: list[int]) -> None:
        """Re-learn kept utterances that the new units re-segment, so their chains exist over
        the new units too (the old chains stay); counters and the current context are kept."""
        pieces = [p for p in (self.vocab.unit_text(u) for u in new_units) if p]
        todo = [t for t in reversed(self.replay) if any(p in t for p in pieces)]
        todo = todo[: self.config.replay_per_merge * len(pieces)]
        if not todo:
            return
        snap = self.net.snapshot()
        counters = (self.units_learned, self.correct, self.utterances)
        self._replaying = True
        try:
            for t in todo:
                self.learn_utterance(t)
        finally:
            self._replaying = False
            self.units_learned, self.correct, self.utterances = counters
            self.net.restore(snap)

    def learn_text(self, text: str) -> dict:
        """Learn a plain utterance, or a dialogue whose turns are joined by ``TURN_SEPARATOR``."""
        turns = [t for t in text.split(TURN_SEPARATOR) if t.strip()] if TURN_SEPARATOR in text else [text]
        total = {"new_units": [], "removed_units": [], "correct": 0, "scored": 0, "units": 0}
        for i, turn in enumerate(turns):
            # a following turn starts from the <eos> that closed the previous one
            info = self.learn_utterance(turn, continue_context=i > 0, close=True, start=i == 0)
            total["new_units"] += info["new_units"]
            total["removed_units"] += info["removed_units"]
            total["correct"] += info["correct"]
            total["scored"] += info["scored"]
            total["units"] += len(info["ids"]) + 1
        return total

    def evaluate_text(self, text: str) -> tuple[int, int]:
        """Next-unit accuracy counts on ``text`` without learning: (correct, scored)."""
        r = self.score_text(text, with_nll=False)
        return r["correct"], r["scored"]

    def score_text(self, text: str, with_nll: bool = True) -> dict:
        """Next-unit accuracy and the NLL of a normalised read-out on ``text`` without learning.

        The read-out is ``p = (1 - eps) * softmax(gain * scores) + eps * uniform`` over live
        units, with ``gain`` and ``eps`` fitted on prequential training positions
        (:mod:`memlm.models.hebbian.readout`), never on the text scored here.
        """
        snap = self.net.snapshot()
        net = self.net
        turns = [t for t in text.split(TURN_SEPARATOR) if t.strip()] if TURN_SEPARATOR in text else [text]
        seq: list[int] = []
        for i, turn in enumerate(turns):
            seq += ([BOS_ID] if i == 0 else []) + self.vocab.encode(turn) + [EOS_ID]
        net.reset()
        correct = scored = 0
        nll = 0.0
        nbytes = 0
        token_bytes = self.vocab.token_bytes() if with_nll else None
        alive = net.alive
        gain, eps = self.readout.fit() if with_nll else (0.0, 0.0)
        for u in seq:
            if net.has_context:
                scores = net.unit_scores()
                best = int(scores.argmax())
                pred = best if float(scores[best]) >= net.threshold else -1
                correct += int(pred == u)
                scored += 1
                if with_nll:
                    nll -= math.log(max(unit_probability(scores, u, alive, net.w_max, gain, eps), 1e-300))
                    nbytes += token_bytes[u]
            net.step(u, learn=False)
        net.restore(snap)
        return {"correct": correct, "scored": scored, "nll": nll, "bytes": nbytes}

    # -- responding -------------------------------------------------------------------
    def _sample(self, temperature: float) -> int:
        scores = self.net.unit_scores()
        if scores.numel() == 0 or float(scores.max()) < self.net.threshold:
            return -1
        if temperature <= 0:
            return int(scores.argmax())
        ok = scores >= self.net.threshold
        logits = (scores * (READOUT_GAIN / (self.net.w_max * temperature))).masked_fill(~ok, float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))

    def respond(self, text: str, temperature: float | None = None, max_units: int | None = None) -> str:
        """Run the network over the input's context and sample the continuation / reply (no learning)."""
        temp = self.config.temperature if temperature is None else float(temperature)
        cap = self.config.max_response_units if max_units is None else int(max_units)
        snap = self.net.snapshot()
        self.net.reset()
        self._feed([BOS_ID] + self.vocab.encode(text), learn=False)
        out = self._generate(temp, cap)
        self.net.restore(snap)
        return self.vocab.decode(out).strip()

    def _generate(self, temp: float, cap: int) -> list[int]:
        out: list[int] = []
        first = self._sample(temp)
        if first == EOS_ID:  # the input is complete: answer with what follows it
            self.net.step(EOS_ID, learn=False)
        elif first >= 0:
            out.append(first)
            self.net.step(first, learn=False)
        else:
            return out
        while len(out) < cap:
            u = self._sample(temp)
            if u < 0 or u == EOS_ID:
                break
            out.append(u)
            self.net.step(u, learn=False)
        return out

    def process_input_and_respond(self, text: str) -> str:
        """Learn from ``text``, answer it, and learn from the teacher's reply if one is configured."""
        before_syn = self.net.n_synapses()
        change0 = self.net.abs_change
        steps0 = self.net.learning_steps
        info = self.learn_utterance(text, continue_context=False, close=False)
        snap = self.net.snapshot()
        response = self._generate(self.config.temperature, self.config.max_response_units)
        self.net.restore(snap)
        response_text = self.vocab.decode(response).strip()
        teacher_reply = None
        self.last_teacher_error = None
        if self.teacher is not None:
            try:
                teacher_reply = self.teacher.ask(text)
            except TeacherUnavailable as exc:
                self.last_teacher_error = str(exc)
        new_units = list(info["new_units"])
        removed = list(info["removed_units"])
        self._feed([EOS_ID], learn=self.learning)  # close the user's utterance
        if teacher_reply and self.config.learn_from_teacher and self.learning:
            rinfo = self.learn_utterance(teacher_reply, continue_context=True, close=True, start=False)
            new_units += rinfo["new_units"]
            removed += rinfo["removed_units"]
        steps = self.net.learning_steps - steps0
        change = self.net.abs_change - change0
        self.last_turn = {
            "new_units": [self.vocab.unit_text(u) for u in new_units if self.vocab.unit_text(u) is not None],
            "removed_units": removed,
            "units_in_input": len(info["ids"]),
            "predicted_correctly": info["correct"],
            "learning_steps": steps,
            "weight_change": change,
            "mean_weight_change": change / max(1, steps),
            "synapses": self.net.n_synapses(),
            "synapses_added": self.net.n_synapses() - before_syn,
            "teacher_reply": teacher_reply,
            "teacher_error": self.last_teacher_error,
            "response": response_text,
        }
        return response_text

    # -- reporting --------------------------------------------------------------------
    def stats(self) -> dict:
        net = self.net
        return {
            "vocab_size": len(self.vocab),
            "unit_ids_allocated": self.vocab.id_space,
            "neurons": net.n_neurons,
            "synapses": net.n_synapses(),
            "learned_patterns": net.n_connected(),
            "mean_weight_change": net.abs_change / max(1, net.learning_steps),
            "learning_steps": net.learning_steps,
            "utterances": self.utterances,
            "units_learned": self.units_learned,
            "online_accuracy": self.correct / max(1, self.units_learned),
            "tokens_per_sec": self.units_learned / self.learn_seconds if self.learn_seconds > 0 else 0.0,
        }

    # -- persistence ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors + JSON strings only (loadable with ``torch.load(weights_only=True)``)."""
        sd = {f"net.{k}": v for k, v in self.net.state_tensors().items()}
        sd["format"] = STATE_FORMAT
        sd["config"] = json.dumps(self.config.to_dict())
        sd["vocab"] = self.vocab.to_json()
        sd["rng"] = self.generator.get_state()
        sd.update({f"readout.{k}": v for k, v in self.readout.state_tensors().items()})
        sd["replay"] = json.dumps(list(self.replay))
        sd["counters"] = torch.tensor(
            [self.units_learned, self.correct, self.utterances, self.learn_seconds], dtype=torch.float64
        )
        return sd

    def load_state_dict(self, sd: dict) -> None:
        try:
            if int(sd.get("format", -1)) != STATE_FORMAT:
                raise MemLMError(f"unsupported Hebbian state format {sd.get('format')!r}")
            cfg = LearnerConfig.from_dict(json.loads(sd["config"]))
            vocab = GrowingVocab.from_json(sd["vocab"])
            net_state = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
        except (KeyError, ValueError, TypeError) as exc:
            raise MemLMError(f"corrupt Hebbian learner state ({exc}); delete it to start afresh") from exc
        teacher = self.teacher
        self.__init__(cfg, teacher=teacher)
        self.vocab = vocab
        try:
            self.net.load_state_tensors(net_state)
        except (KeyError, ValueError) as exc:
            raise MemLMError(f"corrupt Hebbian network state ({exc}); delete it to start afresh") from exc
        self.generator.set_state(sd["rng"])
        readout = {k[8:]: v for k, v in sd.items() if k.startswith("readout.")}
        if readout:  # states saved before the calibration keep its defaults
            self.readout.load_state_tensors(readout)
        self.replay.extend(json.loads(sd.get("replay", "[]")))
        c = sd["counters"].tolist()
        self.units_learned, self.correct, self.utterances, self.learn_seconds = int(c[0]), int(c[1]), int(c[2]), c[3]

    def save(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, teacher: TeacherClient | None = None) -> "ContinualLearner":
        path = Path(path).expanduser()
        if not path.is_file():
            raise MemLMError(f"Hebbian learner state not found: {path}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged file
            raise MemLMError(f"cannot read Hebbian learner state {path} ({type(exc).__name__}); delete it to start afresh") from exc
        if not isinstance(sd, dict):
            raise MemLMError(f"{path} is not a Hebbian learner state; delete it to start afresh")
        learner = cls(teacher=teacher)
        learner.load_state_dict(sd)
        return learner
