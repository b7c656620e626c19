"""benchmarks/bench_lora_linear.py runs end to end in its smoke mode and writes its results."""
import json

from conftest import run_bench_smoke

PROVIDERS = ("base", "eager", "addmm", "fused")
MODES = ("forward", "backward", "both")


def test_smoke_run_writes_json_and_markdown(tmp_path):
    json_path = run_bench_smoke("bench_lora_linear.py", tmp_path)
    data = json.loads(json_path.read_text())
    assert {(row["provider"], row["mode"]) for row in data["rows"]} == {
        (provider, mode) for provider in PROVIDERS for mode in MODES
    }
    assert all(row["median_ms"] > 0 for row in data["rows"])
    assert all(row["ratio_to_base"] == 1.0 for row in data["rows"] if row["provider"] == "base")

    markdown = json_path.with_suffix(".md").read_text()
    assert "| shape | M |" in markdown and "--smoke" in markdown
