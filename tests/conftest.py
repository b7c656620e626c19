"""Without a GPU, Triton kernels run in its interpreter (must be set before triton decorates
them)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The datasets library's cache and train.py's tokenized-data cache (--data-cache auto) in a
# temporary folder, for this process and the train.py processes tests start: the suite writes
# nothing into the real Hugging Face cache.
TEST_DATASETS_CACHE = tempfile.mkdtemp(prefix="lorakernels-datasets-cache-")
os.environ["HF_DATASETS_CACHE"] = TEST_DATASETS_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_DATASETS_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A small chat file: the first 48 example conversations."""
    chat = Path(__file__).resolve().parents[1] / "examples" / "chat.jsonl"
    lines = chat.read_text().splitlines()
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("\n".join(lines[:48]) + "\n")
    return str(path)


ROOT = Path(__file__).resolve().parents[1]


def subprocess_timeout(seconds: float) -> float:
    """A subprocess's time limit: ``seconds``, enough on an idle machine, times the processes
    waiting for each core (the highest load average over the cores this process may use, at
    least 1): a 2-core machine at load 6 gets three times as long. The limits are there to
    catch hangs; a slow, shared machine must not fail a test that would pass."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = max(os.getloadavg())
    except (AttributeError, OSError):  # no load average here (Windows)
        load = 0.0
    return seconds * max(1.0, load / cores)


def checkout_env() -> dict:
    """The environment for a script of this checkout outside its root (benchmarks/): this
    checkout first on the path, whatever is installed, and the interpreter without a GPU."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return env


def run_bench_smoke(script: str, tmp_path: Path) -> Path:
    """Run ``benchmarks/<script> --smoke`` (the interpreter without a GPU); its one JSON result."""
    path = ROOT / "benchmarks" / script
    result = subprocess.run([sys.executable, str(path), "--smoke", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=subprocess_timeout(300),
                            env=checkout_env())
    assert result.returncode == 0, result.stdout + result.stderr
    [json_path] = tmp_path.glob("*.json")
    assert json.loads(json_path.read_text())["smoke"] is True
    return json_path


def use_settings(monkeypatch, **changes):
    """For the rest of the test, ``lorakernels.settings`` changed as ``override(**changes)``
    would change it; monkeypatch restores them at teardown."""
    import dataclasses

    from lorakernels import settings

    monkeypatch.setattr(settings, "_overrides",
                        [*settings._overrides, dataclasses.replace(settings.current(), **changes)])
