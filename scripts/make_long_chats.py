"""Long conversations for long-context runs: a document to read back, a few turns about it.

    python scripts/make_long_chats.py --tokens 131072 --count 4 --out long.jsonl

Each conversation is a system prompt, a user turn carrying a long numbered "document" and
a question, an assistant reply quoting a line of it, and a follow-up turn: about --tokens
tokens under the tiny tokenizer (roughly the same under Phi-3's), the same output every run
for a seed. With --max-seq-len 131072, packing puts as many as fit in a row; --no-packing
gives each its own row.
"""
import argparse
import json
import random
from pathlib import Path
from typing import List

WORDS = ["cat", "house", "river", "apple", "garden", "music", "window", "pencil", "cloud",
         "bread", "stone", "paper", "light", "green", "north", "seven"]
TOKENS_PER_LINE = 25  # "line 123: six words ...\n" under the tiny tokenizer, about


def document(rng: random.Random, lines: int) -> List[str]:
    return [f"line {i}: " + " ".join(rng.choice(WORDS) for _ in range(6)) for i in range(lines)]


def long_chat(rng: random.Random, tokens: int) -> dict:
    lines = document(rng, max(1, tokens // TOKENS_PER_LINE))
    asked = rng.randrange(len(lines))
    return {"messages": [
        {"role": "system", "content": "You read long documents and answer from them."},
        {"role": "user", "content": "\n".join(lines) + f"\nWhat does line {asked} say?"},
        {"role": "assistant", "content": f"It says: {lines[asked].split(': ', 1)[1]}."},
        {"role": "user", "content": "How many lines are there?"},
        {"role": "assistant", "content": f"There are {len(lines)} lines."}]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072, help="about this many per chat")
    parser.add_argument("--count", type=int, default=4, help="conversations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="the .jsonl to write")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.count < 1:
        parser.error("--tokens and --count must be positive")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: no directory {args.out.parent}")
    rng = random.Random(args.seed)
    chats = [long_chat(rng, args.tokens) for _ in range(args.count)]
    args.out.write_text("".join(json.dumps(chat) + "\n" for chat in chats))


if __name__ == "__main__":
    main()
