"""format_error and run_main: user errors are one ``error:`` line and exit code 2; bugs are not hidden."""
from __future__ import annotations

import pytest

from memlm.core.errors import MemLMError, format_error, run_main


def exit_of(main, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        run_main(main)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.mark.parametrize("exc, line", [
    (MemLMError("bad value for --x; use 3"), "error: bad value for --x; use 3"),
    (MemLMError("\n  first line\nsecond line\nthird"), "error: first line"),  # only the first line
    (MemLMError("error: already prefixed"), "error: already prefixed"),  # no double prefix
    (MemLMError(""), "error: MemLMError"),  # an empty message still says something
    (FileNotFoundError(2, "No such file or directory", "data/x.txt"), "error: [Errno 2] No such file or directory: 'data/x.txt'"),
    (FileNotFoundError("data/y.txt missing"), "error: data/y.txt missing"),
])
def test_format_error_is_one_line(exc, line):
    assert format_error(exc) == line


def test_format_error_names_the_missing_file_once(tmp_path):
    missing = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(FileNotFoundError) as info:
        open(missing)
    line = format_error(info.value)
    assert line.startswith("error: ") and line.count(str(missing)) == 1 and "\n" not in line


def test_user_errors_exit_2_with_one_line_on_stderr(capsys, monkeypatch):
    monkeypatch.delenv("MEMLM_DEBUG", raising=False)

    def bad_config():
        print("started")
        raise MemLMError("n_embd must be divisible by n_head\n(details)")

    code, out, err = exit_of(bad_config, capsys)
    assert (code, out, err) == (2, "started\n", "error: n_embd must be divisible by n_head\n")
    code, _, err = exit_of(lambda: open("/definitely/not/here.txt"), capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "/definitely/not/here.txt" in err


def test_return_codes_interrupts_and_bugs(capsys, monkeypatch):
    monkeypatch.delenv("MEMLM_DEBUG", raising=False)
    assert exit_of(lambda: None, capsys)[0] == 0
    assert exit_of(lambda: 0, capsys)[0] == 0
    assert exit_of(lambda: 5, capsys)[0] == 5
    assert exit_of(lambda: "done", capsys)[0] == 0  # a non-int result is success

    def interrupted():
        raise KeyboardInterrupt

    code, _, err = exit_of(interrupted, capsys)
    assert (code, err) == (130, "interrupted\n")

    def bug():
        raise ZeroDivisionError("a bug, not a user error")

    with pytest.raises(ZeroDivisionError):  # programming errors keep their traceback
        run_main(bug)


@pytest.mark.parametrize("value, raises", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_memlm_debug_keeps_the_traceback(value, raises, capsys, monkeypatch):
    monkeypatch.setenv("MEMLM_DEBUG", value)

    def boom():
        raise MemLMError("bad input")

    if raises:
        with pytest.raises(MemLMError, match="bad input"):
            run_main(boom)
    else:
        assert exit_of(boom, capsys)[0] == 2
