"""Interactive session with the Hebbian continual learner: it learns while you talk.

    python -m memlm.apps.hebbian_chat --state ~/.memlm/hebbian_state.pt [--teacher-url URL] [--prompt TEXT]
    python -m memlm.apps.hebbian_chat --state runs/hebbian_micro/version_0/checkpoints/last.ckpt   # a train.py checkpoint
    python chat.py --learner hebbian [--teacher-url URL]          # the same, through the main chat entry point

After each turn it prints what it learned (new vocabulary units, weight change, synapses).
The learner state is saved to ``--state`` on exit and resumed from there next time.
With ``--teacher-url`` (any OpenAI-compatible chat-completions server: LM Studio, Ollama,
``python serve.py``) the teacher's reply to each input is learned as the answer to it; when
the teacher is down the learner says so once per turn and keeps learning from you alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig
from memlm.models.hebbian.teacher import TEACHER_API_KEY_ENV, TeacherClient, TeacherUnavailable
from memlm.models.hebbian.trainer import ConversationalTrainer
from memlm.core.errors import MemLMError, run_main

DEFAULT_STATE_PATH = "~/.memlm/hebbian_state.pt"
QUIT_WORDS = {"quit", "exit", ":q", "/quit", "/exit"}


class StateFile:
    """Where a learner lives on disk, in either format: the learner's own state file, or a
    ``train.py`` Lightning checkpoint (the learner in ``checkpoint["hebbian_state"]``). The format
    is detected on load and kept on save, so a checkpoint keeps working with load_module/serve.py."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.checkpoint: dict | None = None  # the whole Lightning checkpoint when the file is one

    def load(self, teacher: TeacherClient | None) -> ContinualLearner | None:
        if not self.path.is_file():
            return None
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged file
            raise MemLMError(f"cannot read Hebbian learner state {self.path} ({type(exc).__name__}); "
                             "delete it to start afresh") from exc
        if isinstance(sd, dict) and "state_dict" in sd:  # a train.py checkpoint
            if "hebbian_state" not in sd:
                raise MemLMError(f"{self.path} is a checkpoint of another architecture, not of the Hebbian learner; "
                                 "chat with it through chat.py --ckpt")
            self.checkpoint = sd
            sd = sd["hebbian_state"]
        if not isinstance(sd, dict):
            raise MemLMError(f"{self.path} is not a Hebbian learner state; delete it to start afresh")
        learner = ContinualLearner(teacher=teacher)
        learner.load_state_dict(sd)
        return learner

    def save(self, learner: ContinualLearner) -> None:
        if self.checkpoint is None:
            learner.save(self.path)
            return
        self.checkpoint["hebbian_state"] = learner.state_dict()
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        torch.save(self.checkpoint, tmp)
        tmp.replace(self.path)


def make_teacher(teacher_url: str | None, teacher_model: str | None, api_key: str | None = None) -> TeacherClient | None:
    """The teacher, its model name resolved now (``teacher_model``, else the server's first in
    /v1/models): a wrong URL or a server without models is one error line before the chat starts."""
    if not teacher_url:
        return None
    teacher = TeacherClient(teacher_url, model=teacher_model, timeout=30.0, retries=1, api_key=api_key)
    if teacher_model is None:
        try:
            teacher.model  # noqa: B018 - one /v1/models request
        except TeacherUnavailable as exc:
            raise MemLMError(f"cannot pick a teacher model: {exc}; or name one with --teacher-model") from exc
    return teacher


def load_or_create(state_path: str | Path, teacher_url: str | None, teacher_model: str | None,
                   api_key: str | None = None, state_file: StateFile | None = None) -> tuple[ContinualLearner, bool]:
    """The learner saved at ``state_path`` (either format; teacher settings replaced), or a fresh one."""
    state_file = state_file or StateFile(state_path)
    teacher = make_teacher(teacher_url, teacher_model, api_key)
    learner = state_file.load(teacher)
    if learner is not None:
        learner.config.teacher_api_url = teacher_url
        learner.config.teacher_model = teacher_model
        return learner, True
    cfg = LearnerConfig(teacher_api_url=teacher_url, teacher_model=teacher_model)
    return ContinualLearner(cfg, teacher=teacher), False


def describe_turn(learner: ContinualLearner) -> str:
    t = learner.last_turn
    new = t.get("new_units") or []
    shown = ", ".join(repr(u) for u in new[:8]) + (f", ... (+{len(new) - 8})" if len(new) > 8 else "")
    parts = [
        f"new units: {shown}" if new else "new units: none",
        f"predicted {t.get('predicted_correctly', 0)}/{t.get('units_in_input', 0)} of your units",
        f"weight change {t.get('weight_change', 0.0):.3f} over {t.get('learning_steps', 0)} steps",
        f"synapses {t.get('synapses', 0)} ({t.get('synapses_added', 0):+d})",
        f"vocab {len(learner.vocab)}",
    ]
    if t.get("teacher_reply"):
        parts.append(f"teacher: {t['teacher_reply']!r}")
    return "[learned] " + " | ".join(parts)


def run_hebbian_chat(
    state_path: str,
    teacher_url: str | None,
    teacher_model: str | None,
    prompt: str | None,
    show_learning: bool = True,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., None] = print,
    teacher_api_key: str | None = None,
    lesson_every: int = 0,
) -> int:
    """Chat with (and teach) the Hebbian learner; returns an exit code.

    ``lesson_every`` K > 0 (interactive, with a teacher): the teacher speaks first with a lesson
    of the curriculum (memlm.models.hebbian.trainer) and gives another after every K turns of yours."""
    if lesson_every < 0:
        raise MemLMError(f"--lesson-every must be >= 0, got {lesson_every}")
    state_file = StateFile(state_path)
    learner, resumed = load_or_create(state_path, teacher_url, teacher_model, teacher_api_key, state_file)
    path = state_file.path

    def turn(text: str) -> None:
        reply = learner.process_input_and_respond(text)
        print_fn(f"hebbian> {reply}" if reply else "hebbian> (nothing predicted yet - I am still learning)")
        if learner.last_teacher_error:
            print_fn(f"warning: {learner.last_teacher_error}")
        if show_learning:
            print_fn(describe_turn(learner))

    if prompt is not None:
        turn(prompt)
        state_file.save(learner)
        return 0

    lessons = ConversationalTrainer(learner, learner.teacher) if lesson_every and learner.teacher else None

    def lesson() -> None:
        ep = lessons.run_episode()
        print_fn(f"teacher> {ep['opening']}")
        print_fn(f"hebbian> {ep['answer'] or '(nothing yet)'}")
        if ep["feedback"]:
            print_fn(f"teacher> {ep['feedback']}")
        if ep["warning"]:
            print_fn(f"warning: {ep['warning']}")

    st = learner.stats()
    print_fn(
        f"Hebbian learner {'resumed from' if resumed else 'starting fresh; state will be saved to'} {path} "
        f"(vocab {st['vocab_size']}, neurons {st['neurons']}, synapses {st['synapses']}). "
        f"Teacher: {learner.teacher.url if learner.teacher else 'none'}. Type 'quit' to save and leave."
    )
    user_turns = 0
    try:
        if lessons is not None:
            lesson()
        while True:
            try:
                text = input_fn("you> ")
            except EOFError:
                break
            if text is None:
                break
            text = text.strip()
            if not text:
                continue
            if text.lower() in QUIT_WORDS:
                break
            if text.lower() in ("/stats", "stats?"):
                print_fn(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in learner.stats().items()))
                continue
            turn(text)
            user_turns += 1
            if lessons is not None and user_turns % lesson_every == 0:
                lesson()
    finally:
        state_file.save(learner)
        print_fn(f"saved learner state to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memlm.apps.hebbian_chat", description=__doc__.splitlines()[0])
    p.add_argument("--state", default=DEFAULT_STATE_PATH, help=f"learner state file (default {DEFAULT_STATE_PATH})")
    p.add_argument("--teacher-url", default=None, help="OpenAI-compatible chat-completions URL of a teacher model")
    p.add_argument("--teacher-model", default=None, help="model name sent to the teacher (default: the server's first in /v1/models)")
    p.add_argument("--teacher-api-key", default=None, help=f"teacher API key (default: ${TEACHER_API_KEY_ENV}, then $OPENAI_API_KEY)")
    p.add_argument("--lesson-every", type=int, default=0,
                   help="with --teacher-url: the teacher opens with a lesson and gives one every K of your turns (0: never)")
    p.add_argument("--prompt", default=None, help="learn from and answer one input, save, and exit")
    p.add_argument("--quiet", action="store_true", help="do not print what was learned after each turn")
    args = p.parse_args(argv)
    return run_hebbian_chat(args.state, args.teacher_url, args.teacher_model, args.prompt, show_learning=not args.quiet,
                            teacher_api_key=args.teacher_api_key, lesson_every=args.lesson_every)


if __name__ == "__main__":
    run_main(main)
