"""benchmarks/bench_memory.py --smoke: both sides counted, one record per row with its ratio."""
import json

from conftest import run_bench_smoke


def test_bench_memory_smoke(tmp_path):
    records = json.loads(run_bench_smoke("bench_memory.py", tmp_path).read_text())["records"]
    assert len(records) == 4  # checkpointing off/on × LoRA bf16 / QLoRA nf4
    for r in records:
        ours, theirs = r["ours"]["peak_bytes"], r["hf_peft"]["peak_bytes"]
        assert ours > 0 and theirs > 0
        assert abs(r["ratio_vs_hf_peft"] - ours / theirs) < 1e-3
    assert "| phi3-tiny | 1 × 64 |" in (tmp_path / "memory.md").read_text()
