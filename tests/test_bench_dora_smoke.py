"""benchmarks/bench_dora.py runs end to end in its smoke mode, and its memory check can tell
PEFT's DoRA (which builds W + s·B·A) from ours (which does not)."""
import json

from conftest import run_bench_smoke


def test_smoke_run_writes_json_and_markdown(tmp_path):
    data = json.loads(run_bench_smoke("bench_dora.py", tmp_path).read_text())
    rows = {row["provider"]: row for row in data["rows"]}
    assert set(rows) == {"lora", "dora", "peft_dora"}
    assert all(row["median_ms"] > 0 for row in rows.values())
    weight_bytes = data["summary"]["weight_bytes"]
    assert rows["peft_dora"]["largest_tensor_bytes"] >= weight_bytes  # the check sees W + s·B·A
    assert rows["dora"]["largest_tensor_bytes"] < weight_bytes
    assert data["summary"]["no_weight_sized_temporary"]
    assert data["summary"]["max_rel_error_vs_peft"] < 1e-4
    assert "| provider | median ms |" in (tmp_path / "dora_cpu_smoke.md").read_text()
