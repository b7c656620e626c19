"""benchmarks/bench_data.py: the smoke run checks ours against the prefix-render path (equal ids
and masks) and writes a tokens_per_s row per provider and template."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_each_provider_and_template(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--smoke",
                             "--out-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "data_smoke.json").read_text())
    found = {(row["template"], row["provider"]) for row in data["rows"]}
    assert {("phi3", "ours"), ("phi3", "prefix_renders"), ("phi4", "ours"),
            ("phi4", "prefix_renders")} <= found
    assert all(row["tokens_per_s"] > 0 and row["tokens"] > 0 for row in data["rows"])
    assert "| phi4 | ours |" in (tmp_path / "data_smoke.md").read_text()
