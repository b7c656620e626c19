"""Tokenization speed: train.py's data path against the one it replaced, on the same data.

1,000 conversations of 16 messages (8 consecutive example chats each, their user and assistant
turns), tokenized with loss masks under Phi-3's and Phi-4's templates on the tiny tokenizer
(given Phi-4's tokens). Providers: ``ours`` (training.data.tokenize_chats: one batch encode,
cached layouts), ``prefix_renders`` (model.chat.tokenize_chat per conversation, the code path
before: every prefix rendered and encoded) and, when transformers is installed,
``transformers`` (apply_chat_template(tokenize=True) per conversation, ids only, as TRL calls
it). The ids and masks of ours and prefix_renders are checked equal.

    python benchmarks/bench_data.py            # writes benchmarks/results/data.{md,json}
    python benchmarks/bench_data.py --smoke    # 20 conversations, into --out-dir
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.chat import tokenize_chat  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from training.data import read_chats, tokenize_chats  # noqa: E402

DATA = ROOT / "examples" / "chat.jsonl"
MAX_SEQ_LEN = 4096  # no conversation is cut: the providers tokenize the same whole texts
# The path before, as issue 29 measured it on this set (11.7 s for 232,745 tokens): the
# prefix_renders row of a run varies 3-4x with the shared host's load.
ISSUE_BASELINE_TOKENS_PER_S = 232_745 / 11.7
PHI4_TOKENS = ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system"
    "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}"
    "{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")


def conversations(count: int, messages: int = 16) -> list:
    """``count`` conversations of ``messages`` turns: consecutive example chats, cycling."""
    chats = [[m for m in chat if m["role"] != "system"][:2] for chat in read_chats(DATA)]
    built = []
    for index in range(count):
        turns, chat = [], index * messages // 2
        while len(turns) < messages:
            turns += chats[chat % len(chats)]
            chat += 1
        built.append(turns[:messages])
    return built


def template_directory(template: str, directory: Path) -> Path:
    """The tiny tokenizer with Phi-4's tokens and ``template``, saved hub-style."""
    from tokenizers import AddedToken, Tokenizer

    from model.tokenizer import TINY_TOKENIZER_DIR

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(TINY_TOKENIZER_DIR / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in PHI4_TOKENS])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    if template == "phi4":
        config["chat_template"] = PHI4_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def timed(work) -> tuple:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def measure(template: str, chats: list, directory: Path, repeats: int) -> list:
    """One row per provider: tokens, seconds (best of ``repeats``), tokens_per_s."""
    tokenizer = load_tokenizer(template_directory(template, directory / template))
    ours, seconds = min((timed(lambda: tokenize_chats(chats, tokenizer, MAX_SEQ_LEN, False))
                         for _ in range(repeats)), key=lambda pair: pair[1])
    tokens = len(ours[0].ids)
    rows = [{"provider": "ours", "template": template, "tokens": tokens, "seconds": seconds}]
    old, seconds = timed(lambda: [tokenize_chat(tokenizer, c) for c in chats])
    flat_old = [t for ids, _ in old for t in ids]
    if flat_old != ours[0].ids.tolist() or [m for _, mask in old for m in mask] != \
            ours[0].targets.tolist():
        raise SystemExit(f"{template}: ours and prefix_renders disagree on ids or masks")
    rows.append({"provider": "prefix_renders", "template": template, "tokens": tokens,
                 "seconds": seconds})
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return rows
    theirs = AutoTokenizer.from_pretrained(str(directory / template))
    encoded, seconds = timed(lambda: [theirs.apply_chat_template(c, tokenize=True) for c in chats])
    rows.append({"provider": "transformers", "template": template,
                 "tokens": sum(len(e["input_ids"] if hasattr(e, "keys") else e) for e in encoded),
                 "seconds": seconds})
    return rows


def report(result: dict) -> str:
    lines = [f"# Tokenization: {result['settings']['conversations']} conversations of 16 "
             "messages", "",
             f"Command: `{result['settings']['command']}`; host load (uptime) before: "
             f"{result['settings']['load_before']}, after: {result['settings']['load_after']}.",
             "", "| template | provider | tokens | seconds | tokens/s | × prefix_renders |",
             "|---|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['template']} | {row['provider']} | {row['tokens']:,} | "
                     f"{row['seconds']:.3f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['vs_prefix_renders']:.1f} |")
    ours = [f"{row['template']} {row['tokens_per_s'] / ISSUE_BASELINE_TOKENS_PER_S:.0f}×"
            for row in result["rows"] if row["provider"] == "ours"]
    lines += ["", f"Ours against the issue's figure for the path before "
              f"({ISSUE_BASELINE_TOKENS_PER_S:,.0f} tokens/s): {', '.join(ours)}."]
    return "\n".join(lines) + "\n"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="20 conversations, one repeat")
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    count = 20 if args.smoke else args.conversations
    chats = conversations(count)
    before = load_average()
    with tempfile.TemporaryDirectory() as directory:
        rows = [row for template in ("phi3", "phi4")
                for row in measure(template, chats, Path(directory), 1 if args.smoke else 5)]
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
    for row in rows:
        base = next(r for r in rows if r["template"] == row["template"]
                    and r["provider"] == "prefix_renders")
        row["vs_prefix_renders"] = row["tokens_per_s"] / base["tokens_per_s"]
    command = "python benchmarks/bench_data.py" + (" --smoke" if args.smoke else "")
    result = {"settings": {"conversations": count, "smoke": args.smoke, "command": command,
                           "cpu_count": os.cpu_count(), "load_before": before,
                           "load_after": load_average()}, "rows": rows}
    name = "data_smoke" if args.smoke else "data"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{name}.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
