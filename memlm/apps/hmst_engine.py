"""HMSTInferenceEngine: answer with a trained HMST model and say what it decided and why.

One call, :meth:`HMSTInferenceEngine.answer`:

1. encode the query (the last ``block_size - max_new_tokens`` tokens of the prompt);
2. the meta-controller decides the gates on the prompt (``gate_mode``: ``controller`` =
   the trained policy, greedy; ``schedule`` = the module's fixed eval schedule; ``all_on``);
3. retrieve: the semantic memory is searched with the last prompt token's memory key
   (``mem_key_source``: its exit-layer or token-embedding window mean)
   (``retrieve_k`` items, scores and texts; metered as FAISS queries);
4. generate with the chosen exit, memory reads and expert bias held fixed for the whole
   answer (the model's KV-cache path, the forward it trains with);
5. verify when the verify gate fired (``verify: gate``), always or never: the memory is
   searched again with the memory key at each word end of the draft (``evidence: draft``;
   the key of "...of Zorbia is Dakebre" finds the stored sentence that holds the claimed
   value, while the prompt's key, which ends before the answer, finds items whose text stops
   where the answer begins), the best item of each is the evidence, and the critic scores the
   answer against those texts (the prompt's with ``evidence: prompt``; metered as FAISS
   queries and a critic call). Below ``threshold``,
   retrieve twice as much with the semantic read forced on and regenerate (``max_retries``
   times), then abstain with :attr:`EngineConfig.abstain_message`.

The result holds the answer and every attempt's decisions (gates, gate probabilities, expert
choice, retrieved items with scores, critic score), the merged compute meter and the latency.
``ingest``, ``forget`` and ``list`` work on the engine's semantic memory.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from memlm.core.errors import MemLMError
from memlm.core.meter import CRITIC_CALLS, FAISS_QUERIES, ComputeMeter
from memlm.core.sampling import SamplingParams, sample_next

GATE_MODES = ("controller", "schedule", "all_on")
VERIFY_MODES = ("gate", "always", "never")
EVIDENCE_MODES = ("draft", "prompt")
ALL_ON = {"exit": 0.0, "episodic": 1.0, "semantic": 1.0, "verify": 1.0, "expert_bias": 0.0}


@dataclass(frozen=True)
class EngineConfig:
    gate_mode: str = "controller"
    verify: str = "gate"
    threshold: float = 0.5
    max_retries: int = 1
    retrieve_k: int = 2
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)
    retry_temperature: float = 0.0  # 0: a retry differs only by what it retrieved
    evidence: str = "draft"  # what the critic checks against: items found with the draft tokens' keys, or the prompt's only
    seed: int = 0
    abstain_message: str = "I don't know: I could not verify an answer against my memory."

    def __post_init__(self) -> None:
        if self.gate_mode not in GATE_MODES:
            raise MemLMError(f"engine gate_mode must be one of {', '.join(GATE_MODES)}, got {self.gate_mode!r}")
        if self.verify not in VERIFY_MODES:
            raise MemLMError(f"engine verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise MemLMError(f"engine threshold must be in [0, 1], got {self.threshold}")
        if self.evidence not in EVIDENCE_MODES:
            raise MemLMError(f"engine evidence must be one of {', '.join(EVIDENCE_MODES)}, got {self.evidence!r}")
        if self.max_retries < 0 or self.retrieve_k < 1 or self.max_new_tokens < 1:
            raise MemLMError("engine max_retries must be >= 0, retrieve_k and max_new_tokens >= 1")


@dataclass
class Attempt:
    gates: dict
    gate_probs: dict
    expert_choice: int | None  # None = no expert bias
    retrieved: list  # [{"id", "score", "text"}]
    answer: str
    verified: bool  # the critic ran
    critic_score: float | None
    accepted: bool
    evidence: list = field(default_factory=list)  # the best item of each word-end key of the draft (when verified)


@dataclass
class EngineResult:
    text: str
    abstained: bool
    attempts: list = field(default_factory=list)
    compute: dict = field(default_factory=dict)
    latency_s: float = 0.0

    @property
    def critic_score(self) -> float | None:
        return self.attempts[-1].critic_score if self.attempts else None

    @property
    def compute_total(self) -> float:
        return float(self.compute.get("total", 0.0))

    def to_dict(self) -> dict:
        return {"text": self.text, "abstained": self.abstained, "critic_score": self.critic_score,
                "attempts": [asdict(a) for a in self.attempts], "compute": self.compute,
                "latency_s": round(self.latency_s, 6)}


class HMSTInferenceEngine:
    """See the module docstring. ``module`` is a loaded ``HMSTLanguageModel``."""

    def __init__(self, module, config: EngineConfig | None = None) -> None:
        from memlm.lightning_modules.hmst.module import HMSTLanguageModel

        if not isinstance(module, HMSTLanguageModel):
            raise MemLMError(f"the HMST engine needs an HMST checkpoint, got a {type(module).__name__}")
        if module.tokenizer is None:
            raise MemLMError("this HMST module has no tokenizer; load it with memlm.checkpoint.load_module")
        self.module, self.cfg = module, config or EngineConfig()
        self.model, self.tok = module.model, module.tokenizer
        self.pad = self.tok.pad_id if self.tok.pad_id is not None else -1
        self._critic_cost: float | None = None

    def sampling(self, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None, seed=None) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, eos_id=self.tok.eos_id)

    # -- memory -----------------------------------------------------------------------------------
    def ingest(self, text: str) -> list[int]:
        return [int(i) for i in self.module.ingest(text).tolist()]

    def forget(self, ids) -> int:
        return int(self.module.semantic.remove(torch.as_tensor(list(ids), dtype=torch.long)))

    def list(self, limit: int | None = None) -> list[dict]:
        ids = self.module.semantic.ids()
        if limit is not None:
            ids = ids[-int(limit):]
        return [{"id": int(i), "text": t} for i, t in zip(ids.tolist(), self.module.semantic.get_texts(ids))]

    # -- steps ------------------------------------------------------------------------------------
    def _schedule(self):
        if self.cfg.gate_mode == "controller":
            return "greedy", None
        if self.cfg.gate_mode == "all_on":
            return "schedule", ALL_ON
        return "schedule", self.module.eval_schedule

    def _forward(self, ids, state, meter: ComputeMeter, **kw):
        out = self.model(ids, state, memory=self.module.semantic, episodic_store=self.module.episodic, use_cache=True,
                         return_exit_logits=False, **kw)
        if isinstance(getattr(out, "compute", None), ComputeMeter):
            meter.merge(out.compute)
        return out

    def _retrieve(self, key: torch.Tensor, k: int, meter: ComputeMeter) -> list[dict]:
        sem = self.module.semantic
        if len(sem) == 0:
            return []
        res = sem.search(key.float().reshape(1, -1), k)
        meter.add(FAISS_QUERIES, 1, sem.query_cost(k) if hasattr(sem, "query_cost") else 0.0)
        ids, scores = res.ids[0].tolist(), res.scores[0].tolist()
        texts = sem.get_texts(torch.tensor(ids))
        return [{"id": int(i), "score": round(float(s), 6), "text": t} for i, s, t in zip(ids, scores, texts) if i >= 0]

    def _evidence(self, keys: torch.Tensor, meter: ComputeMeter) -> list[dict]:
        """The best item for each word-end key of the draft ([n, D], one metered query each),
        distinct, in the draft's order: the claimed value comes first in a cloze answer."""
        sem = self.module.semantic
        if len(sem) == 0:
            return []
        res = sem.search(keys.float().reshape(keys.size(0), -1), 1)
        meter.add(FAISS_QUERIES, keys.size(0), sem.query_cost(1) if hasattr(sem, "query_cost") else 0.0)
        top: dict[int, float] = {}
        for i, sc in zip(res.ids[:, 0].tolist(), res.scores[:, 0].tolist()):
            if i >= 0 and i not in top:
                top[i] = sc
        texts = sem.get_texts(torch.tensor(list(top), dtype=torch.long)) if top else []
        return [{"id": int(i), "score": round(float(sc), 6), "text": t} for (i, sc), t in zip(top.items(), texts)]

    def critic_cost(self) -> float:
        if self._critic_cost is None:
            from memlm.lightning_modules.hmst.rl_phase import critic_call_cost

            self._critic_cost = critic_call_cost(self.model.critic, self.module.config.critic_max_len)
        return self._critic_cost

    def score(self, query_ids: list[int], answer: str, retrieved: list[dict], meter: ComputeMeter) -> float:
        """The critic's P(correct) of ``answer`` given the retrieved texts (one metered critic call)."""
        dev = self.module.device
        texts = list(dict.fromkeys(r["text"] for r in retrieved if r.get("text")))
        facts = self.tok.encode(" ".join(texts)) if texts else []
        resp = self.tok.encode(" " + answer.strip()) or [self.pad]
        as_row = lambda ids: torch.tensor([ids if ids else [self.pad]], dtype=torch.long, device=dev)  # noqa: E731
        with torch.no_grad():
            out = self.model.critic(as_row(query_ids), as_row(resp), as_row(facts), pad_id=self.pad)
        meter.add(CRITIC_CALLS, 1, self.critic_cost())
        return float(out.p_correct[0])

    def _generate(self, ids: torch.Tensor, mode: str, schedule, force_read: bool, params: SamplingParams,
                  meter: ComputeMeter, k: int):
        state = self.model.init_state(1, ids.device, use_cache=True)
        # the prefill samples from its last position only: no logits (nor, for a row that exits,
        # kNN-LM memory searches) for the prompt positions before it
        out = self._forward(ids, state, meter, gate_mode=mode, schedule=schedule, logits_to_keep=1)
        decision = out.decision
        if force_read:  # a retry after a failed verification reads semantic memory in full
            decision.exit = torch.zeros_like(decision.exit)
            decision.semantic = torch.ones_like(decision.semantic)
            out = self._forward(ids, self.model.init_state(1, ids.device, use_cache=True), meter, decision=decision,
                                logits_to_keep=1)
        retrieved = self._retrieve(out.mem_keys[0, -1], k, meter)
        draft_keys = []  # the memory key at each draft token fed back
        gen = torch.Generator(device=ids.device).manual_seed(self.cfg.seed)
        new: list[int] = []
        state, logits = out.state, out.logits[:, -1]
        text = ""
        for _ in range(params.max_new_tokens):
            nxt = sample_next(logits, params, gen)
            t = int(nxt[0])
            if params.eos_id is not None and t == params.eos_id:
                break
            new.append(t)
            text = self.tok.decode(new)
            if any(s in text for s in self.cfg.stop):
                break
            out = self._forward(nxt.view(1, 1), state, meter, decision=decision)
            state, logits = out.state, out.logits[:, -1]
            draft_keys.append(out.mem_keys[0, -1])
        for s in self.cfg.stop:
            text = text.split(s)[0]
        # the keys at the draft's word ends (a token followed by one that does not continue a
        # word, or the last one fed): "...Dridri is 80" finds the fact that binds the value to
        # its subject, while the key inside a word finds items whose text stops mid-word
        ends = [i for i in range(len(draft_keys))
                if i == len(draft_keys) - 1 or not self.tok.decode([new[i + 1]])[:1].isalnum()]
        keys = torch.stack([draft_keys[i] for i in ends]) if ends else out.mem_keys[0, -1:]
        return decision, retrieved, text.strip(), keys

    # -- the call ---------------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, prompt: str, query: str | None = None, params: SamplingParams | None = None) -> EngineResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        was_training = self.module.training
        self.module.eval()
        params = params or SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, eos_id=self.tok.eos_id)
        room = max(1, self.module.config.block_size - params.max_new_tokens)
        ids = self.tok.encode(prompt)[-room:]
        if not ids:
            raise MemLMError("the engine needs a non-empty prompt")
        query_ids = self.tok.encode(query)[-room:] if query else ids
        x = torch.tensor([ids], dtype=torch.long, device=self.module.device)
        mode, schedule = self._schedule()
        meter = ComputeMeter()
        attempts: list[Attempt] = []
        k = cfg.retrieve_k
        text, abstained = "", False
        top_k = self.model.cfg.mem_top_k
        try:
            for attempt in range(cfg.max_retries + 1):
                p = params if attempt == 0 or cfg.retry_temperature <= 0 else \
                    SamplingParams(max_new_tokens=params.max_new_tokens, temperature=cfg.retry_temperature,
                                   eos_id=params.eos_id, seed=cfg.seed + attempt)
                if attempt:
                    self.model.cfg.mem_top_k = max(top_k, k)  # the reader sees the wider retrieval too
                decision, retrieved, text, draft_keys = self._generate(x, mode, schedule, attempt > 0, p, meter, k)
                run_critic = cfg.verify == "always" or (cfg.verify == "gate" and bool(decision.verify[0] > 0.5))
                evidence = self._evidence(draft_keys, meter) if run_critic and cfg.evidence == "draft" else []
                # with evidence, the prompt's items stay out: their text stops inside the value
                # ("The capital of Zorbia is D"), which reads as the subject's fact contradicting it
                score = self.score(query_ids, text, evidence or retrieved, meter) if run_critic else None
                accepted = score is None or score >= cfg.threshold
                attempts.append(Attempt(
                    gates={g: bool(getattr(decision, g)[0] > 0.5) for g in ("exit", "episodic", "semantic", "verify")},
                    gate_probs={g: round(float(v[0]), 4) for g, v in decision.probs.items() if g != "expert"},
                    expert_choice=None if int(decision.expert_choice[0]) >= self.model.cfg.n_experts
                    else int(decision.expert_choice[0]),
                    retrieved=retrieved, answer=text, verified=run_critic,
                    critic_score=None if score is None else round(score, 6), accepted=accepted,
                    evidence=evidence,
                ))
                if accepted:
                    break
                k *= 2
            else:
                abstained, text = True, cfg.abstain_message
        finally:
            self.model.cfg.mem_top_k = top_k
            self.module.train(was_training)
        return EngineResult(text=text, abstained=abstained, attempts=attempts, compute=meter.to_dict(),
                            latency_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------- CLI helpers (chat.py)
def explain_lines(res: EngineResult) -> list[str]:
    """What chat.py --explain prints: one block per attempt, then compute and latency."""
    lines = []
    for i, a in enumerate(res.attempts):
        on = [g for g, v in a.gates.items() if v]
        probs = ", ".join(f"{g} {p:.2f}" for g, p in a.gate_probs.items())
        expert = "none" if a.expert_choice is None else str(a.expert_choice)
        lines.append(f"[hmst] attempt {i + 1}: gates on: {', '.join(on) or 'none'} (P(on): {probs}); expert bias: {expert}")
        for r in a.retrieved:
            lines.append(f"[hmst]   retrieved #{r['id']} score {r['score']:.3f}: {(r['text'] or '').strip()[:80]!r}")
        for r in a.evidence:
            lines.append(f"[hmst]   evidence #{r['id']} score {r['score']:.3f}: {(r['text'] or '').strip()[:80]!r}")
        verdict = "not verified" if not a.verified else f"critic {a.critic_score:.3f} -> {'accept' if a.accepted else 'reject'}"
        lines.append(f"[hmst]   answer {a.answer!r}: {verdict}")
    counts = res.compute.get("counts", {})
    lines.append(f"[hmst] {'abstained' if res.abstained else 'answered'}; compute {res.compute_total:.4g} FLOP-eq "
                 f"(FAISS queries {counts.get(FAISS_QUERIES, 0):g}, critic calls {counts.get(CRITIC_CALLS, 0):g}); "
                 f"latency {res.latency_s * 1000:.1f} ms")
    return lines


def memory_command(engine: HMSTInferenceEngine, text: str) -> str | None:
    """``/ingest TEXT``, ``/forget ID [ID...]``, ``/memory [N]`` on the engine's semantic memory; None otherwise."""
    cmd, _, rest = text.strip().partition(" ")
    if cmd == "/ingest":
        if not rest.strip():
            raise MemLMError("/ingest needs the text to remember, e.g. /ingest The capital of Zorbia is Quelt.")
        return f"ingested ids {engine.ingest(rest.strip())}"
    if cmd == "/forget":
        try:
            ids = [int(x) for x in rest.split()]
        except ValueError:
            raise MemLMError("/forget takes memory ids, e.g. /forget 3 4 (see /memory)") from None
        return f"forgot {engine.forget(ids)} item(s)"
    if cmd == "/memory":
        limit = int(rest) if rest.strip().isdigit() else 20
        return "\n".join(f"#{it['id']}: {(it['text'] or '').strip()!r}" for it in engine.list(limit)) or "(empty)"
    return None
