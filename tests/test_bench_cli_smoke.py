"""benchmarks/bench_cli.py: the smoke run trains with train.py and the HF + PEFT script and
counts the same data tokens on both sides."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import checkout_env, subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_cli.py"


def test_smoke_run_writes_both_sides(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, env=checkout_env(),
                            timeout=subprocess_timeout(300))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "cli_cpu_smoke.json").read_text())
    assert (tmp_path / "cli_cpu_smoke.md").read_text().count("| 1 |") == 2
    assert data["settings"]["smoke"] is True and data["settings"]["steps"] == 4
    runs = {run["side"]: run for run in data["runs"]}
    assert set(runs) == {"ours", "hf_peft"} and len(data["runs"]) == 2
    for run in runs.values():
        assert run["tokens_per_s"] > 0 and run["ms_per_step"] > 0 and run["process_s"] > 0
        assert len(run["losses"]) == 4 and all(loss > 0 for loss in run["losses"])
        # Data tokens only: at most batch × max_seq_len per step, and the HF side's
        # unpacked batches hold fewer than train.py's packed rows.
        assert 0 < run["data_tokens_per_step"] <= 4 * 256
    assert runs["hf_peft"]["data_tokens_per_step"] < runs["ours"]["data_tokens_per_step"]
    # The same base and the same tokens: the first-step losses (random init, B = 0 in both, so
    # the base's loss, dropout aside) agree closely although the batches differ.
    assert abs(runs["ours"]["losses"][0] - runs["hf_peft"]["losses"][0]) < 0.1
    assert data["summary"]["ratio"] == pytest.approx(
        runs["ours"]["tokens_per_s"] / runs["hf_peft"]["tokens_per_s"])
