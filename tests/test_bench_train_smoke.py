"""benchmarks/bench_train.py: the smoke run trains every provider and their losses agree."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
PROVIDERS = {"hf_peft", "ours_eager", "ours_fused"}


def load_script():
    if str(SCRIPT.parent) not in sys.path:  # as when run as a script: it imports benchmarks/common.py
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_rows_with_agreeing_losses(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path),
         "--providers", *sorted(PROVIDERS)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    [json_path] = tmp_path.glob("train_*_smoke.json")
    data = json.loads(json_path.read_text())
    assert data["settings"]["smoke"] is True and data["loss_check"]["passed"] is True
    rows = {row["provider"]: row for row in data["rows"]}
    assert set(rows) == PROVIDERS and len(data["rows"]) == len(PROVIDERS)
    assert len({row["trainable_parameters"] for row in rows.values()}) == 1
    tol = data["loss_check"]["tolerance"]
    reference = rows["hf_peft"]
    for row in rows.values():
        assert row["error"] is None and row["tokens_per_s"] > 0 and row["median_ms"] > 0
        assert len(row["step_ms"]) == data["settings"]["steps"]
        assert len(row["check_losses"]) == data["settings"]["check_steps"]
        assert all(math.isfinite(loss) for loss in row["check_losses"] + row["timed_losses"])
        assert math.isclose(row["check_losses"][0], reference["check_losses"][0], rel_tol=tol)
        assert math.isclose(row["step1_grad_norm"], reference["step1_grad_norm"], rel_tol=tol)
    assert reference["speedup_vs_hf_peft"] == 1.0

    markdown = json_path.with_suffix(".md").read_text()
    assert "| provider | grad ckpt | tokens/s |" in markdown and "--smoke" in markdown
    assert "PASSED" in markdown


def test_loss_check_names_the_provider_that_disagrees():
    bench = load_script()
    rows = [
        {"provider": "hf_peft", "grad_checkpointing": False, "check_losses": [7.0, 6.9],
         "step1_grad_norm": 1.0},
        {"provider": "ours_eager", "grad_checkpointing": False, "check_losses": [7.0, 6.9],
         "step1_grad_norm": 1.00001},
        {"provider": "ours_fused", "grad_checkpointing": True, "check_losses": [7.0, 6.9],
         "step1_grad_norm": 1.1},
    ]
    check = bench.loss_check(rows, "float32")
    assert not check["passed"]
    [failure] = check["failures"]
    assert "ours_fused" in failure and "grad_norm" in failure
    assert bench.loss_check(rows[:2], "float32")["passed"]
