"""benchmarks/common.py's prepare_script: a note when the package measured is another
checkout's, and without CUDA a Triton script re-run under the interpreter."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # as when run as a script: Python adds its folder
common = pytest.importorskip("common")


@pytest.fixture
def execve(monkeypatch):
    """os.execve recorded, not run; no CUDA; TRITON_INTERPRET unset."""
    calls = []
    monkeypatch.setattr(common.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(common, "ON_CUDA", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return calls


def test_a_triton_script_without_cuda_runs_again_under_the_interpreter(execve, capsys):
    common.prepare_script(triton_interpreter=True)
    [(executable, argv, env)] = execve
    assert executable == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["TRITON_INTERPRET"] == "1"
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_no_rerun_for_other_scripts_on_cuda_or_with_the_variable_set(execve, monkeypatch):
    common.prepare_script()  # not a Triton script
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the user's choice: smoke_mode explains it
    common.prepare_script(triton_interpreter=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(common, "ON_CUDA", True)
    common.prepare_script(triton_interpreter=True)
    assert execve == []


def test_a_package_from_another_checkout_is_named(monkeypatch, capsys):
    common.prepare_script()
    assert capsys.readouterr().err == ""  # this checkout's (the tests import it)
    monkeypatch.setattr(common.lorakernels, "__file__", "/elsewhere/lorakernels/__init__.py")
    common.prepare_script()
    [line] = capsys.readouterr().err.splitlines()
    assert "/elsewhere" in line and str(ROOT) in line and "pip install -e ." in line
