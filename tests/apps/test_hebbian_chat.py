"""The interactive session: learns as you talk, reports what it learned, saves and resumes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from memlm.apps.hebbian_chat import main, run_hebbian_chat
from memlm.models.hebbian.learner import ContinualLearner

ROOT = Path(__file__).resolve().parents[2]


def _script(lines):
    it = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(it)
        except StopIteration:
            raise EOFError

    return fake_input


def test_interactive_session_learns_saves_and_resumes(tmp_path):
    state = tmp_path / "state" / "hebbian.pt"
    out: list[str] = []
    rc = run_hebbian_chat(str(state), None, None, None, input_fn=_script(["the cat sat on the mat"] * 8 + ["quit"]),
                          print_fn=out.append)
    assert rc == 0 and state.is_file()
    learned = [line for line in out if line.startswith("[learned]")]
    assert len(learned) == 8 and "weight change" in learned[0] and "synapses" in learned[0]
    assert any("new units:" in line and "none" not in line.split("|")[0] for line in learned)
    first = ContinualLearner.load(state)
    assert first.utterances == 8

    out2: list[str] = []
    rc = run_hebbian_chat(str(state), None, None, None, input_fn=_script(["the cat sat on the"]), print_fn=out2.append)
    assert rc == 0
    assert "resumed from" in out2[0]
    assert "hebbian> mat" in out2
    assert ContinualLearner.load(state).utterances == 9  # saved on EOF too


def test_prompt_mode_and_teacher_down(tmp_path):
    state = tmp_path / "h.pt"
    out: list[str] = []
    rc = run_hebbian_chat(str(state), "http://127.0.0.1:9/v1", "m", "hello there", input_fn=_script([]),
                          print_fn=out.append)
    assert rc == 0 and state.is_file()
    assert any(line.startswith("warning: teacher at http://127.0.0.1:9") for line in out)
    assert ContinualLearner.load(state).utterances == 1


def test_module_entry_point(tmp_path, capsys):
    state = tmp_path / "cli.pt"
    assert main(["--state", str(state), "--prompt", "hi", "--quiet"]) == 0
    assert "hebbian>" in capsys.readouterr().out and state.is_file()
    bad = tmp_path / "bad.pt"
    bad.write_text("garbage")
    proc = subprocess.run([sys.executable, "-m", "memlm.apps.hebbian_chat", "--state", str(bad), "--prompt", "hi"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read Hebbian learner state")
