"""Peak live tensor bytes of one training step: ours vs transformers + PEFT, counted the same way.

    python benchmarks/bench_memory.py            # the table in benchmarks/results/memory.{md,json}
    python benchmarks/bench_memory.py --smoke    # phi3-tiny, a few tokens (tests)

Both sides run one optimizer step on fake weights (FakeTensorMode) under
lorakernels.memory_count.LiveBytes: ours is train.py --plan-memory --device cuda (the CUDA
path, bf16); theirs a random-init transformers Phi3ForCausalLM with PEFT LoRA r 16 on the
four projections, the loss on full logits (labels=), clipping and AdamW. Live tensors
only: a GPU's caching allocator adds its own slack to both.
"""
import argparse
import json
from pathlib import Path

import common  # noqa: F401  (first: it puts this checkout on sys.path)
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lorakernels.memory_count import LiveBytes
from model.config import Phi3Config
from training.config import TrainConfig
from training.memory_plan import planned_batch, plan_memory

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
ROWS = [("phi3-mini-4k", 4, 2048), ("phi4-mini", 4, 2048), ("phi4", 1, 4096)]
SMOKE_ROWS = [("phi3-tiny", 1, 64)]


def ours(model: str, batch: int, seq: int, checkpointing: bool, quantize: str = "none") -> dict:
    config = TrainConfig(model=model, device="cuda", batch_size=batch, max_seq_len=seq,
                         grad_checkpointing=checkpointing, quantize=quantize, lora_r=16,
                         target_modules=TARGETS, plan_memory=True)
    plan = plan_memory(config)
    return {"peak_bytes": plan.peak_bytes, **plan.categories}


def hf_config(model: str):
    from transformers import Phi3Config as HFPhi3Config

    numbers = {k: v for k, v in vars(Phi3Config.from_name(model)).items()
               if isinstance(v, (int, float, str, bool, dict, type(None)))}
    return HFPhi3Config(**numbers)


def hf_peft(model: str, batch: int, seq: int, checkpointing: bool) -> dict:
    """transformers + PEFT's step on fake weights, counted like ours."""
    cfg = hf_config(model)
    micro = planned_batch(batch, seq, cfg.vocab_size)
    return _hf_peft_step(cfg, micro, checkpointing, LiveBytes())


def _hf_peft_step(cfg, micro: dict, checkpointing: bool, count: LiveBytes) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3ForCausalLM as HFPhi3

    with torch.device("meta"):  # built on meta, then fake storage: as ours
        net = HFPhi3._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=TARGETS))
    with FakeTensorMode(allow_non_fake_inputs=True):
        net.to_empty(device="cpu")
        if checkpointing:
            net.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-4)
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: count.label([p.grad], "grads"))
        with count:
            count.track_module(net)
            loss = net(input_ids=micro["input_ids"], labels=micro["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            count.label([t for s in optimizer.state.values() for t in s.values()
                         if isinstance(t, torch.Tensor)], "optimizer_state")
    return {"peak_bytes": count.peak_bytes, **count.breakdown()}


def measure(rows) -> list:
    records = []
    for model, batch, seq in rows:
        for checkpointing in (False, True):
            theirs = hf_peft(model, batch, seq, checkpointing)
            for quantize in ("none", "nf4"):
                mine = ours(model, batch, seq, checkpointing, quantize)
                ratio = mine["peak_bytes"] / theirs["peak_bytes"]
                records.append({"model": model, "batch": batch, "seq_len": seq,
                                "grad_checkpointing": checkpointing, "quantize": quantize,
                                "ours": mine, "hf_peft": theirs,
                                "ratio_vs_hf_peft": round(ratio, 3)})
                print(json.dumps(records[-1]), flush=True)
    return records


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(records) -> str:
    lines = ["| model | batch × tokens | checkpointing | ours | peak ours GiB | weights | "
             "activations | temporaries | peak HF+PEFT GiB | HF activations | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        o, h = r["ours"], r["hf_peft"]
        lines.append(f"| {r['model']} | {r['batch']} × {r['seq_len']} | "
                     f"{'on' if r['grad_checkpointing'] else 'off'} | "
                     f"{'QLoRA nf4' if r['quantize'] == 'nf4' else 'LoRA bf16'} | "
                     f"{gib(o['peak_bytes'])} | {gib(o['frozen_weights'])} | "
                     f"{gib(o['activations'])} | {gib(o['temporaries'])} | "
                     f"{gib(h['peak_bytes'])} | {gib(h['activations'])} | "
                     f"{r['ratio_vs_hf_peft']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="phi3-tiny, 64 tokens")
    parser.add_argument("--out-dir", type=Path, default=RESULTS,
                        help="directory for memory.{md,json}")
    args = parser.parse_args(argv)
    records = measure(SMOKE_ROWS if args.smoke else ROWS)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"smoke": args.smoke, "records": records}
    (args.out_dir / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "memory.md").write_text(
        "# Peak live tensor bytes of one step: ours vs transformers + PEFT\n\n"
        "Fake-tensor count (`python benchmarks/bench_memory.py`), bf16, LoRA r 16 on the four "
        "projections, AdamW; ours on the CUDA path. Live tensors only.\n\n" + table(records))
    print(table(records))


if __name__ == "__main__":
    main()
