"""Interactive session with the Hebbian continual learner: it learns while you talk.

    python -m memlm.apps.hebbian_chat --state ~/.memlm/hebbian_state.pt [--teacher-url URL] [--prompt TEXT]
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

from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig
from memlm.models.hebbian.teacher import TeacherClient
from memlm.core.errors import run_main

DEFAULT_STATE_PATH = "~/.memlm/hebbian_state.pt"
QUIT_WORDS = {"quit", "exit", ":q", "/quit", "/exit"}


def load_or_create(state_path: str | Path, teacher_url: str | None, teacher_model: str | None) -> tuple[ContinualLearner, bool]:
    """The learner saved at ``state_path`` (teacher settings replaced), or a fresh one."""
    path = Path(state_path).expanduser()
    teacher = TeacherClient(teacher_url, model=teacher_model, timeout=30.0, retries=1) if teacher_url else None
    if path.is_file():
        learner = ContinualLearner.load(path, teacher=teacher)
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
) -> int:
    """Chat with (and teach) the Hebbian learner; returns an exit code."""
    learner, resumed = load_or_create(state_path, teacher_url, teacher_model)
    path = Path(state_path).expanduser()

    def turn(text: str) -> None:
        reply = learner.process_input_and_respond(text)
        print_fn(f"hebbian> {reply}" if reply else "hebbian> (nothing predicted yet - I am still learning)")
        if learner.last_teacher_error:
            print_fn(f"warning: {learner.last_teacher_error}")
        if show_learning:
            print_fn(describe_turn(learner))

    if prompt is not None:
        turn(prompt)
        learner.save(path)
        return 0

    st = learner.stats()
    print_fn(
        f"Hebbian learner {'resumed from' if resumed else 'starting fresh; state will be saved to'} {path} "
        f"(vocab {st['vocab_size']}, neurons {st['neurons']}, synapses {st['synapses']}). "
        f"Teacher: {learner.teacher.url if learner.teacher else 'none'}. Type 'quit' to save and leave."
    )
    try:
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
    finally:
        learner.save(path)
        print_fn(f"saved learner state to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memlm.apps.hebbian_chat", description=__doc__.splitlines()[0])
    p.add_argument("--state", default=DEFAULT_STATE_PATH, help=f"learner state file (default {DEFAULT_STATE_PATH})")
    p.add_argument("--teacher-url", default=None, help="OpenAI-compatible chat-completions URL of a teacher model")
    p.add_argument("--teacher-model", default=None, help="model name sent to the teacher")
    p.add_argument("--prompt", default=None, help="learn from and answer one input, save, and exit")
    p.add_argument("--quiet", action="store_true", help="do not print what was learned after each turn")
    args = p.parse_args(argv)
    return run_hebbian_chat(args.state, args.teacher_url, args.teacher_model, args.prompt, show_learning=not args.quiet)


if __name__ == "__main__":
    run_main(main)
