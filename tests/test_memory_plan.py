"""The memory plan (train.py --plan-memory): the live-bytes counter, the plan of a fake step
against the count of the same step on real tensors, the CUDA path on a CPU, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lorakernels.memory_count import LiveBytes
from lorakernels.ops.linear_cross_entropy import linear_cross_entropy
from model.config import Phi3Config
from training.config import TrainConfig
from training.memory_plan import plan_memory

ROOT = Path(__file__).resolve().parents[1]


def test_counter_peak_and_categories():
    weight = torch.zeros(1000)  # 4000 bytes, counted as a frozen weight
    with LiveBytes() as count:
        count.track([weight], "frozen_weights")
        a = torch.ones(2000)          # +8000
        b = a * 2                     # +8000: the peak, 20000
        del a                         # -8000
        c = torch.ones(10, dtype=torch.float64)  # +80
        del b, c
    assert count.peak_bytes == 20000
    assert count.breakdown()["frozen_weights"] == 4000
    assert count.breakdown()["temporaries"] == 16000
    assert count.live_bytes == 4000
    assert count.peak_op == "mul in forward"


def test_counter_views_share_their_storage():
    with LiveBytes() as count:
        a = torch.ones(1000)
        views = [a[:10], a.view(10, 100), a.t() if a.dim() == 2 else a[::2]]
        del views
    assert count.peak_bytes == 4000


def test_fake_labels_skip_the_range_check_real_ones_keep_it():
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(5, 8)
    bad = torch.tensor([0, 1, 7, 2, -100, 3])
    with pytest.raises(ValueError, match=r"label 7 at row 2 is outside \[0, 5\)"):
        linear_cross_entropy(hidden, weight, bad)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_labels = mode.from_tensor(bad)
        loss = linear_cross_entropy(torch.randn(6, 8, requires_grad=True), torch.randn(5, 8),
                                    fake_labels)
        loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32


def tiny(**options) -> TrainConfig:
    chosen = dict(model="phi3-tiny", device="cpu", batch_size=2, max_seq_len=128, plan_memory=True)
    return TrainConfig(**{**chosen, **options})


@pytest.mark.parametrize("options", [
    {}, {"grad_checkpointing": True}, {"grad_accum": 2, "max_grad_norm": 0.5},
    {"quantize": "nf4"}, {"use_dora": True, "lora_dropout": 0.0}, {"dtype": "bfloat16"},
], ids=["plain", "checkpointing", "accumulation", "nf4", "dora", "bf16"])
def test_plan_equals_the_real_step_phi3_tiny(options):
    planned = plan_memory(tiny(**options))
    real = plan_memory(tiny(**options), fake=False)
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    assert planned.categories == pytest.approx(real.categories, rel=0.01, abs=4096)
    assert planned.peak_bytes > sum(real.categories[c] for c in ("frozen_weights", "lora_params"))


def test_plan_equals_the_real_step_at_phi3_mini_width(tmp_path):
    """Two layers of Phi-3-mini's width (3072 hidden, 8192 MLP, 32 heads) in bf16, a small
    vocabulary: a checkpoint directory's config.json is all the plan reads."""
    config = Phi3Config.from_name("phi3-mini-4k")
    numbers = {k: v for k, v in vars(config).items()
               if isinstance(v, (int, float, str, type(None)))}
    numbers.update(num_hidden_layers=2, vocab_size=2048)
    (tmp_path / "config.json").write_text(json.dumps(numbers))
    options = dict(model=str(tmp_path), device="cpu", batch_size=1, max_seq_len=64,
                   dtype="bfloat16")
    planned = plan_memory(TrainConfig(**options))
    real = plan_memory(TrainConfig(**options), fake=False)
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    assert planned.categories["frozen_weights"] > 2 * 113e6 * 2  # two layers' bf16 linears


def test_cuda_path_plan_on_a_cpu():
    """--device cuda plans the CUDA path (Triton kernels' allocations, bf16) without a GPU;
    checkpointing keeps less, NF4 holds a quarter of the decoder's weights."""
    plain = plan_memory(tiny(device="cuda"))
    checkpointed = plan_memory(tiny(device="cuda", grad_checkpointing=True))
    nf4 = plan_memory(tiny(device="cuda", quantize="nf4"))
    assert plain.device_path == "cuda" and plain.settings["dtype"] == "bfloat16"
    assert checkpointed.categories["activations"] < plain.categories["activations"] / 4
    assert nf4.categories["frozen_weights"] < plain.categories["frozen_weights"]
    assert plain.categories["lora_params"] == nf4.categories["lora_params"] > 0


def run_train(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                               "PATH": "/usr/bin:/bin",
                                                               "OMP_NUM_THREADS": "1"})


def test_cli_prints_writes_json_and_no_run_directory(tmp_path):
    result = run_train("--plan-memory", "--plan-json", str(tmp_path / "plan.json"),
                       "--batch-size", "1", "--max-seq-len", "64", "--output",
                       str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "peak of live tensors" in result.stdout and "live tensors only" in result.stdout
    record = json.loads((tmp_path / "plan.json").read_text())
    for key in ("peak_bytes", "device_bytes", "host_bytes", "frozen_weights", "lora_params",
                "grads", "optimizer_state", "activations", "temporaries", "settings"):
        assert key in record
    assert record["settings"]["batch_size"] == 1 and record["settings"]["max_seq_len"] == 64
    assert record["settings"]["world_size"] == 1 and record["settings"]["strategy"] == "ddp"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, flag", [
    (["--plan-memory", "--device", "tpu"], "--device tpu"),
    (["--plan-json", "/no/such/dir/plan.json"], "--plan-json"),
    (["--plan-memory", "--model", "/no/such/checkpoint"], "--model"),
    (["--plan-memory", "--plan-world-size", "0"], "--plan-world-size"),
    (["--plan-memory", "--plan-world-size", "3", "--global-batch-size", "4"],
     "--global-batch-size"),
])
def test_cli_bad_input_is_one_line_naming_the_flag(tmp_path, args, flag):
    result = run_train(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and flag in result.stderr


def test_ddp_rank_holds_the_one_process_plan_and_its_buckets():
    """DDP's buckets (a copy of the LoRA gradients, made at the wrap) live through the step;
    the same step on real weights (the fake process group, collectives no-ops) agrees."""
    alone = plan_memory(tiny())
    rank = plan_memory(tiny(plan_world_size=2, strategy="ddp"))
    real = plan_memory(tiny(plan_world_size=2, strategy="ddp"), fake=False)
    buckets = alone.categories["lora_params"]
    assert rank.peak_bytes == alone.peak_bytes + buckets
    assert rank.categories["grads"] == buckets
    assert real.peak_bytes == pytest.approx(rank.peak_bytes, rel=0.01)
    assert rank.settings["world_size"] == 2 and rank.settings["strategy"] == "ddp"


def test_fsdp_rank_holds_its_shards():
    """FSDP2 shards the base and LoRA weights: a rank of 2 or 4 holds a half or a quarter."""
    alone = plan_memory(tiny(strategy="fsdp"))
    ranks = {n: plan_memory(tiny(plan_world_size=n, strategy="fsdp")) for n in (2, 4)}
    for n, plan in ranks.items():
        assert plan.categories["frozen_weights"] == pytest.approx(
            alone.categories["frozen_weights"] / n, rel=0.01)
        assert plan.categories["lora_params"] == alone.categories["lora_params"] // n
    assert ranks[4].peak_bytes < ranks[2].peak_bytes
    # FSDP2 frees each layer's gathered weights (a storage resize no op reports): a rank never
    # holds the whole model again on top of its shards.
    assert ranks[2].peak_bytes < alone.peak_bytes + alone.categories["frozen_weights"] / 2
    real = plan_memory(tiny(plan_world_size=2, strategy="fsdp"), fake=False)
    assert real.peak_bytes == pytest.approx(ranks[2].peak_bytes, rel=0.01)


def test_global_batch_is_split_per_rank():
    plan = plan_memory(tiny(plan_world_size=2, global_batch_size=4))
    assert plan.settings["batch_size"] == 2
