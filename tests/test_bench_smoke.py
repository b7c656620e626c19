"""benchmarks/bench_lora_linear.py runs end to end in its smoke mode and writes its results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora_linear.py"
PROVIDERS = ("base", "eager", "addmm", "fused")
MODES = ("forward", "backward", "both")


def test_smoke_run_writes_json_and_markdown(tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    [json_path] = tmp_path.glob("lora_linear_*.json")
    data = json.loads(json_path.read_text())
    assert data["smoke"] is True
    assert {(row["provider"], row["mode"]) for row in data["rows"]} == {
        (provider, mode) for provider in PROVIDERS for mode in MODES
    }
    assert all(row["median_ms"] > 0 for row in data["rows"])
    assert all(row["ratio_to_base"] == 1.0 for row in data["rows"] if row["provider"] == "base")

    markdown = json_path.with_suffix(".md").read_text()
    assert "| shape | M |" in markdown and "--smoke" in markdown
