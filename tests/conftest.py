"""Without a GPU, Triton kernels run in its interpreter (must be set before triton decorates them)."""
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
    lines = (Path(__file__).resolve().parents[1] / "examples" / "chat.jsonl").read_text().splitlines()
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("\n".join(lines[:48]) + "\n")
    return str(path)


def run_bench_smoke(script: str, tmp_path: Path) -> Path:
    """Run ``benchmarks/<script> --smoke`` (the interpreter without a GPU); its one JSON result."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    result = subprocess.run([sys.executable, str(path), "--smoke", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    [json_path] = tmp_path.glob("*.json")
    assert json.loads(json_path.read_text())["smoke"] is True
    return json_path
