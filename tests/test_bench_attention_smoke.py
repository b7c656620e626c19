"""benchmarks/bench_attention.py runs end to end in its smoke mode and writes its results."""
import json

import torch
from conftest import run_bench_smoke


def test_smoke_run_writes_json_and_markdown(tmp_path):
    json_path = run_bench_smoke("bench_attention.py", tmp_path)
    data = json.loads(json_path.read_text())
    providers = (["masked", "conversations", "causal"]
                 + (["flex"] if torch.cuda.is_available() else []))
    assert {(row["provider"], row["mode"]) for row in data["rows"]} == {
        (provider, mode) for provider in providers for mode in ("both", "forward")}
    assert all(row["median_ms"] > 0 and 0 < row["blocks_computed"] <= 1 for row in data["rows"])
    assert all(row["T"] == 128 and row["conversations"] >= 2 for row in data["rows"])

    markdown = json_path.with_suffix(".md").read_text()
    assert "| layout | heads | T |" in markdown and "--smoke" in markdown
