"""README's set-up commands stay in sync with CI: .ci/run runs the README's test command verbatim."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_bash_block(text: str) -> list[str]:
    m = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert m, "README.md needs a ```bash block with the set-up commands"
    return [ln for ln in m.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim():
    lines = first_bash_block((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(lines) >= 2, "the first bash block holds two commands: install+train, install+test"
    test_cmd = lines[1].strip()
    assert "pytest" in test_cmd and "torch==" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert test_cmd in ci_lines, f"README's test command {test_cmd!r} is not a line of .ci/run"


def test_readme_quickstart_names_real_files():
    lines = first_bash_block((ROOT / "README.md").read_text(encoding="utf-8"))
    for cfg in re.findall(r"--config\s+(\S+\.yaml)", lines[0]):
        assert (ROOT / cfg).is_file(), f"README quickstart config {cfg} does not exist"
    assert "train.py" in lines[0] and (ROOT / "train.py").is_file()
