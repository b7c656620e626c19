"""benchmarks/bench_qlora.py runs end to end in its smoke mode and writes its results."""
import json

import torch

from conftest import run_bench_smoke

PROVIDERS = ("bf16", "nf4_fused", "nf4_dequant", "nf4_default")
MODES = ("forward", "both")


def test_smoke_run_writes_json_and_markdown(tmp_path):
    json_path = run_bench_smoke("bench_qlora.py", tmp_path)
    data = json.loads(json_path.read_text())
    for key in ("device", "date", "torch", "triton", "python"):
        assert data[key]

    # Memory: Phi-3-mini's computed bytes are arithmetic, so the 0.3x target holds on any machine.
    mini = data["memory"]["computed"]["phi3-mini-4k"]
    assert mini["nf4_bytes"] < mini["bf16_bytes"] and mini["ratio"] <= 0.3
    measured = data["memory"]["measured"]
    assert measured["nf4"]["held_bytes"] < measured["bf16"]["held_bytes"]
    if not torch.cuda.is_available():
        assert "not a GPU measurement" in measured["method"]

    # Layers: every provider and mode at every M, each NF4 path as forced or dispatched.
    tokens = data["config"]["tokens"]
    rows = data["rows"]
    assert {(r["provider"], r["mode"], r["M"]) for r in rows} == {
        (p, m, M) for p in PROVIDERS for m in MODES for M in tokens
    } and len(rows) == len(PROVIDERS) * len(MODES) * len(tokens)
    shipped = data["config"]["shipped_nf4_fused_max_rows"]
    assert min(tokens) <= shipped < max(tokens)  # the default dispatch takes both paths
    for r in rows:
        assert r["median_ms"] > 0 and r["floor_ms"] > 0
        assert r["floor_bound"] in ("memory", "compute")
        expected = {"bf16": "dense", "nf4_fused": "fused", "nf4_dequant": "dequant",
                    "nf4_default": "fused" if r["M"] <= shipped else "dequant"}[r["provider"]]
        assert r["path"] == expected
        if r["provider"] == "bf16":
            assert r["ratio_to_bf16"] == 1.0

    assert {(c["shape"], c["mode"]) for c in data["crossovers"]} == {("tiny", m) for m in MODES}
    assert "NF4_FUSED_MAX_ROWS" in data["recommendation"]["text"]
    assert any("M=4096" in t["target"] and t["met"] is None for t in data["targets"])

    markdown = json_path.with_suffix(".md").read_text()
    assert "| shape | M |" in markdown and "--smoke" in markdown
    assert "times mean nothing" in markdown and "Recommendation:" in markdown
