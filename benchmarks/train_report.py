"""bench_train.py's markdown report: its result document as the tables and prose of
``train_<device>.md``."""
from pathlib import Path
from typing import Dict, List

from common import SEED
from train_worker import LR, PROFILE_ROWS


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown_row(r: dict) -> str:
    ckpt = {True: "on", False: "off", None: "–"}[r["grad_checkpointing"]]
    losses = ", ".join(f"{x:.5f}" for x in r["check_losses"]) if r.get("check_losses") else "–"
    if r.get("tokens_per_s"):
        timing = (f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} "
                  f"| {r['data_tokens_per_step']:.0f} | {r['tokens_per_step']:.0f} "
                  f"| {r['conversations_per_step']:.1f} | {fmt(r['peak_memory_mb'], '.0f')} "
                  f"| {ratio(r.get('speedup_vs_hf_peft'))} | {ratio(r.get('memory_vs_hf_peft'))}")
    else:
        error = "OOM" if r["error"] == "out of memory" else (r["error"] or "no timing")
        timing = f"{error} | – | – | – | – | {fmt(r.get('peak_memory_mb'), '.0f')} | – | –"
    return (f"| {r['provider']} | {ckpt} | {timing} | {fmt(r.get('first_step_s'), '.2f')} "
            f"| {losses} | {fmt(r.get('step1_grad_norm'), '.6g')} |")


def markdown_table(rows: List[dict], device: str) -> str:
    memory = "peak MB" if device == "cuda" else "RSS growth MB"
    return "\n".join([
        f"| provider | grad ckpt | data tokens/s | ms/step | data tokens/step | tokens/step "
        f"with padding | conversations/step | {memory} | data tokens/s vs hf_peft "
        f"| memory vs hf_peft | 1st step s | losses, first steps (dropout 0) "
        f"| step-1 LoRA grad norm |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *map(markdown_row, rows)])


def settings_paragraph(result: dict) -> str:
    """What was trained: the config, model, LoRA, optimizer, data and steps."""
    s, c = result["settings"], result["model_config"]
    chats = ("" if s["chats_per_conversation"] == 1 else
             f" ({s['chats_per_conversation']} consecutive chats joined into each conversation)")
    repeats = ("" if s["repeats"] == 1 else f"; each provider run {s['repeats']} times in turn, "
               "the repeat with the most data tokens/s counts")
    return (f"Config {s['config']}: {s['preset']} architecture ({c['num_hidden_layers']} layers, "
            f"hidden {c['hidden_size']}, vocab {c['vocab_size']}), random weights (seed {SEED}), "
            f"{s['dtype']} base, fp32 LoRA r {s['lora']['r']} / alpha "
            f"{s['lora']['lora_alpha']:g} / dropout {s['lora']['lora_dropout']} on "
            f"{', '.join(s['targets'])}; AdamW lr {LR:g}, clip_grad_norm_({s['max_grad_norm']:g}); "
            f"{s['data']}{chats}, batch {s['batch_size']} × up to {s['max_seq_len']} tokens; "
            f"{s['check_steps']} check + {s['warmup_steps']} warm-up + {s['steps']} timed "
            f"steps{repeats}.")


def check_paragraph(result: dict) -> str:
    """How memory was measured, and the loss check's verdict."""
    check, cuda = result["loss_check"], result["device_type"] == "cuda"
    memory = ("peak: torch.cuda.max_memory_allocated over each run's steps (weights + optimizer "
              "state + activations)" if cuda else
              f"RSS growth: ru_maxrss after the steps minus before them, each provider in its own "
              f"process ({result['num_threads']} torch threads)")
    verdict = (f"PASSED: step-1 loss and LoRA grad norm of every run within relative "
               f"{check['tolerance']:g} of {check.get('reference')}'s (worst: loss "
               f"{check.get('max_rel_error_loss', float('nan')):.2g}, grad norm "
               f"{check.get('max_rel_error_grad_norm', float('nan')):.2g})"
               if check["passed"] else "FAILED: " + "; ".join(check["failures"]))
    return (f"Memory: {memory}. Loss check (dropout 0, same init, step 1 on the same "
            f"{fmt(check.get('conversations'), 'd')} conversations, "
            f"{fmt(check.get('data_tokens'), 'd')} tokens: packed for ours, one per row for "
            f"hf_peft): {verdict}.")


def markdown_report(result: dict, command: str) -> str:
    s, v, cuda = result["settings"], result["versions"], result["device_type"] == "cuda"
    smoke = " (smoke test: times mean nothing)" if s["smoke"] else ""
    packing = "packed " if s["packing"] else "one conversation a row (--no-packing) "
    return "\n".join([
        f"# train.py's training step on {result['device_name']}{smoke}", "",
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"triton {v['triton']}, python {v['python']}"
        + (f", CUDA {result['cuda']}" if cuda else "") + f"; {result['date']}", "",
        settings_paragraph(result), "",
        f"ours_*: train.py's step (training.loop.training_step) on train.py's batches, {packing}"
        "(MicroBatches over prepare_rows); hf_peft: a transformers + PEFT script's step on "
        f"{s['batch_size']} conversations a batch, right-padded. Data tokens/s = the timed "
        "steps' non-padding tokens / their time; ms/step their mean.", "",
        f"Command: `{command}`", "",
        check_paragraph(result), "",
        markdown_table(result["rows"], result["device_type"]), "",
        "ours_fused: the default backend, auto (" + ("the Triton kernels" if cuda else
                                                      "the oneDNN path for fp32 CPU tensors")
        + "); ours_eager: backend eager. 1st step s: the first check step, never timed.", "",
    ])


def write_profiles(profiles: Dict[str, str], path: Path) -> None:
    """Each provider's torch.profiler table, one after the other."""
    text = "\n\n".join(f"== {p}: one step, top {PROFILE_ROWS} ops by self time\n{t}"
                       for p, t in profiles.items())
    path.write_text(text + "\n")
    print(f"wrote {path}")
