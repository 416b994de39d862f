"""Chat with a MemLM checkpoint or any OpenAI-compatible server, optionally with LTML memory.

    python chat.py --ckpt runs/transformer_micro/version_0/checkpoints/last.ckpt --prompt "ROMEO:"
    python chat.py --ckpt CKPT                                  # interactive; 'quit' exits
    python chat.py --base-url http://127.0.0.1:8000/v1 [--model NAME] [--api-key KEY]
    python chat.py --ckpt CKPT --memory ltml.sqlite --explain   # LTML: log, inject, sleep
    python chat.py --learner hebbian [--teacher-url URL] [--teacher-model M] [--state PATH]

Tokens are printed as they are generated. With ``--memory`` every turn is logged to the
LTML database, the relevant memories are injected into the system prompt (``--explain``
shows which and why), and the memory is consolidated ("sleep") on exit and after
``--idle-sleep`` seconds without input.

Template: a lone ``--prompt`` to a local checkpoint is continued as plain text (what a
base LM does); the interactive loop, ``--system`` and ``--memory`` use the chat template
of :func:`memlm.apps.chat_backends.format_chat`. ``--template`` overrides this.
"""
from __future__ import annotations

import argparse
import os
import sys

from memlm.core.errors import MemLMError, run_main
from memlm.core.sampling import InvalidSamplingParam, SamplingParams

DEFAULT_HEBBIAN_STATE = os.path.join("~", ".memlm", "hebbian_state.pt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a MemLM checkpoint or an OpenAI-compatible server")
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", help="MemLM checkpoint (any architecture)")
    src.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (Ollama, LM Studio, vLLM, serve.py)")
    src.add_argument("--model", help="model name on the server (default: the first in /v1/models)")
    src.add_argument("--api-key", default=None, help="API key for --base-url (default: $OPENAI_API_KEY)")
    src.add_argument("--device", default="cpu")
    src.add_argument("--learner", choices=["hebbian"], help="chat with a continual learner instead")
    src.add_argument("--teacher-url", help="hebbian: OpenAI-compatible teacher server")
    src.add_argument("--teacher-model", help="hebbian: teacher model name (default: the server's first in /v1/models)")
    src.add_argument("--teacher-api-key", default=None,
                     help="hebbian: teacher API key (default: $MEMLM_TEACHER_API_KEY, then $OPENAI_API_KEY)")
    src.add_argument("--lesson-every", type=int, default=0,
                     help="hebbian with --teacher-url: the teacher speaks first and gives a lesson every K turns (0: never)")
    src.add_argument("--state", help=f"hebbian: learner state or train.py checkpoint (default {DEFAULT_HEBBIAN_STATE})")
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", help="answer this one prompt and exit (otherwise: interactive loop)")
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--template", choices=["auto", "chat", "none"], default="auto")
    mem = p.add_argument_group("LTML memory")
    mem.add_argument("--memory", help="LTML SQLite database (created if missing)")
    mem.add_argument("--embedder", default="auto", help="auto | minilm | hash | openai[:MODEL] | module | ckpt:PATH")
    mem.add_argument("--memory-budget", type=int, default=200, help="tokens of memories injected per turn")
    mem.add_argument("--idle-sleep", type=float, default=300.0, help="consolidate after this many idle seconds (0 = never)")
    mem.add_argument("--no-sleep-on-exit", action="store_true", help="do not consolidate when the chat ends")
    mem.add_argument("--explain", action="store_true", help="show which memories were injected and why (HMST: every "
                     "gate decision, retrieved item, critic score, metered compute and latency)")
    lrn = p.add_argument_group("online learning and log")
    lrn.add_argument("--learn", action="store_true", help="the model learns from each exchange (models that learn online: HTM)")
    lrn.add_argument("--learn-state", default=None, help="learned-state file (default: CKPT.learned.pt), loaded if present")
    lrn.add_argument("--save-every", type=int, default=1, help="save the learned state every N turns (and at exit)")
    lrn.add_argument("--learn-replies", action="store_true", help="learn the model's replies too, not only the user's turns")
    lrn.add_argument("--learn-passes", type=int, default=10,
                     help="rehearsals of each learned turn (a new segment needs 3 to connect; 10 let a taught "
                          "sentence settle, docs/htm.md)")
    lrn.add_argument("--log", default=None, help="append every exchange to this JSONL file")
    args = p.parse_args(argv)
    if args.learner is None and not args.ckpt and not args.base_url:
        raise MemLMError("nothing to chat with: pass --ckpt PATH or --base-url URL (or --learner hebbian)")
    if args.ckpt and args.base_url:
        raise MemLMError("pass either --ckpt or --base-url, not both")
    if args.max_new_tokens < 1:
        raise MemLMError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:  # the ranges every generate() accepts, checked before a model is loaded
        SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)
    except InvalidSamplingParam as exc:
        raise MemLMError(exc.message_for("--" + exc.field.replace("_", "-"))) from None
    return args


def make_backend(args):
    from memlm.apps.chat_backends import LocalBackend, OpenAIBackend

    if args.base_url:
        return OpenAIBackend(args.base_url, model=args.model, api_key=args.api_key)
    from memlm.checkpoint import load_module

    module = load_module(args.ckpt, map_location=args.device)
    template = args.template
    if template == "auto":
        template = "chat" if (args.prompt is None or args.memory or args.system) else "none"
    return LocalBackend(module, name=os.path.basename(args.ckpt), template=template)


def run_hebbian(args) -> int:
    try:
        from memlm.apps.hebbian_chat import run_hebbian_chat
    except ImportError as exc:
        raise MemLMError(f"the Hebbian learner is not available ({exc})") from exc
    if args.state and args.ckpt and os.path.abspath(args.state) != os.path.abspath(args.ckpt):
        raise MemLMError("--learner hebbian: pass the learner's file as --state or --ckpt, not both")
    # either flag names the learner: its own state file or a train.py checkpoint (the format is detected)
    state = os.path.expanduser(args.state or args.ckpt or DEFAULT_HEBBIAN_STATE)
    extra = {"teacher_api_key": args.teacher_api_key} if args.teacher_api_key else {}
    if args.lesson_every:
        extra["lesson_every"] = args.lesson_every
    return int(run_hebbian_chat(state, args.teacher_url, args.teacher_model, args.prompt, **extra) or 0)


class Chat:
    def __init__(self, args, backend, out=None, err=None) -> None:
        self.args, self.backend = args, backend
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.history: list[dict] = []
        self.memory = None
        self.session = None
        self.learner = self.chat_log = None
        self.engine = None  # HMST: answers come from HMSTInferenceEngine (gates, retrieval, verification)
        if type(getattr(backend, "module", None)).__name__ == "HMSTLanguageModel":
            from memlm.apps.hmst_engine import EngineConfig, HMSTInferenceEngine

            self.engine = HMSTInferenceEngine(backend.module, EngineConfig(max_new_tokens=args.max_new_tokens))
        if getattr(args, "learn", False):
            from memlm.apps.chat_learning import OnlineLearner, default_state_path

            if not getattr(args, "ckpt", None) and not args.learn_state:
                raise MemLMError("--learn needs a local checkpoint (--ckpt) or a --learn-state path")
            path = os.path.expanduser(args.learn_state or default_state_path(args.ckpt))
            self.learner = OnlineLearner(backend, path, save_every=args.save_every, learn_replies=args.learn_replies,
                                         passes=args.learn_passes, log=lambda m: print(m, file=self.err))
        if getattr(args, "log", None):
            from memlm.apps.chat_learning import ChatLog

            self.chat_log = ChatLog(os.path.expanduser(args.log))
        if args.memory:
            from memlm.apps.ltml_session import LTMLMemory
            from memlm.memory.ltml.wake import WakeConfig

            count = backend.count_tokens if hasattr(backend, "tokenizer") else None
            budget = args.memory_budget
            limit = getattr(backend, "context_limit", None)
            if limit:  # a short-context model keeps at least half its window for the conversation
                budget = min(budget, max(0, (limit - args.max_new_tokens) // 2))
            self.memory = LTMLMemory(args.memory, embedder=args.embedder, backend=backend, count_tokens=count,
                                     wake_config=WakeConfig(budget_tokens=budget),
                                     log=lambda m: print(m, file=self.err))
            self.session = self.memory.start_session(backend.name)
            print(f"[memory] {args.memory}: embedder {self.memory.embedder.name}", file=self.err)
            if args.explain:
                start = self.memory.session_start_injection()
                print("[memory] at session start: " + start.explain().replace("[memory] ", "", 1), file=self.err)

    def after_exchange(self, user_text: str, reply: str) -> None:
        """Online learning and the chat log, after every reply."""
        if self.learner is not None:
            self.learner.after_turn(user_text, reply)
        if self.chat_log is not None:
            self.chat_log.write(self.backend.name, user_text, reply.strip(), learned=self.learner is not None)

    def turn(self, user_text: str) -> str:
        a = self.args
        if not user_text.strip():  # nothing was asked: an empty reply, nothing learned or logged
            self.out.write("\n")
            self.out.flush()
            return ""
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + self.history
        messages.append({"role": "user", "content": user_text})
        if self.memory is not None:
            messages, injection = self.memory.prepare(messages)
            if a.explain:
                print(injection.explain(), file=self.err)
        pieces = []
        if self.engine is not None:
            from memlm.apps.hmst_engine import explain_lines, memory_command

            done = memory_command(self.engine, user_text)
            if done is not None:  # /ingest TEXT, /forget ID..., /memory: the engine's semantic memory
                self.out.write(done + "\n")
                self.out.flush()
                return done
            res = self.engine.answer(self.backend.render(messages, a.max_new_tokens), query=user_text,
                                     params=self.engine.sampling(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed))
            pieces.append(res.text)
            self.out.write(res.text)
            if a.explain:
                print("\n".join(explain_lines(res)), file=self.err)
        else:
            for piece in self.backend.stream_chat(messages, max_tokens=a.max_new_tokens, temperature=a.temperature,
                                                  top_k=a.top_k, top_p=a.top_p, seed=a.seed):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        self.out.write("\n")
        self.out.flush()
        reply = "".join(pieces)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply.strip()}]
        if self.memory is not None:
            self.memory.record(self.session, user_text, reply.strip())
            self.memory.touch_idle(a.idle_sleep)
        self.after_exchange(user_text, reply)
        return reply

    def loop(self, inp=None) -> None:
        inp = inp if inp is not None else sys.stdin
        interactive = inp.isatty()
        while True:
            if interactive:
                self.out.write("you> ")
                self.out.flush()
            line = inp.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text.lower() in ("quit", "exit", "/quit", "/exit"):
                break
            if interactive:
                self.out.write("bot> ")
            self.turn(text)

    def close(self) -> None:
        if self.learner is not None:
            self.learner.close()
        if self.chat_log is not None:
            self.chat_log.close()
        if self.memory is None:
            return
        self.memory.end_session(self.session)
        if not self.args.no_sleep_on_exit:
            stats = self.memory.sleep()
            if stats is not None and self.args.explain:
                print(f"[memory] slept: {stats['added']} added, {stats['merged']} merged, {stats['superseded']} "
                      f"superseded, {stats['archived']} archived", file=self.err)
        self.memory.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.learner == "hebbian":
        return run_hebbian(args)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    backend = make_backend(args)
    chat = Chat(args, backend)
    try:
        if args.prompt is not None:
            if not args.prompt.strip():  # an empty prompt gets an empty reply
                sys.stdout.write("\n")
            elif getattr(backend, "template", "chat") == "none" and chat.memory is None and chat.engine is None:
                pieces = []
                for piece in backend.stream_prompt(args.prompt, max_tokens=args.max_new_tokens, temperature=args.temperature,
                                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed):
                    pieces.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                chat.after_exchange(args.prompt, "".join(pieces))
            else:
                chat.turn(args.prompt)
        else:
            if sys.stdin.isatty():
                print(f"chatting with {backend.name}; type 'quit' to exit", file=sys.stderr)
            chat.loop()
    finally:
        chat.close()
    return 0


def main_entry() -> None:
    run_main(main)


if __name__ == "__main__":
    main_entry()
