"""Generate or chat with a Phi-3 or Phi-4 model plus a trained LoRA adapter.

    python generate.py --adapter runs/phi3-lora/final --prompt "What is 2 plus 2?"
    python generate.py --adapter runs/phi3-lora/final --chat

Exit status: 0 done, 1 a runtime failure (a file system error), 2 a usage or input error,
130 interrupted by Ctrl-C.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

from adapter_base import preset_seed, resolve_base_model
from model.build import base_config, load_model, resolve_device, resolve_dtype
from model.chat import stop_ids, tokenize_chat
from model.config import DTYPE_CHOICES, QUANTIZE_CHOICES, ArgumentError


# Below this, logits / temperature overflow: greedy (0) is what such a value means.
MIN_TEMPERATURE = 1e-3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="preset, checkpoint directory or hub id (default: the "
                                         "base the adapter records, else phi3-tiny)")
    parser.add_argument("--adapter", type=Path, help="a PEFT adapter directory (e.g. runs/x/final)")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="use --model even where it is not the base the adapter records")
    parser.add_argument("--tokenizer",
                        help="tokenizer.json or its directory (default: the model's)")
    parser.add_argument("--prompt", help="one user message to answer")
    parser.add_argument("--system", help="an optional system message")
    parser.add_argument("--chat", action="store_true", help="interactive chat on stdin")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="most tokens generated per answer, within the model's context "
                             "(default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1: off (default)")
    parser.add_argument("--seed", type=int,
                        help="sampling seed; for a preset, also the seed its random base was "
                             "built with (default: the training --seed recorded beside the "
                             "adapter, else 42)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto (bf16 on a GPU, fp32 on a CPU), float32, bfloat16 or float16 "
                             "(default: auto)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="nf4: the decoder's linear weights in 4 bits (QLoRA's base)")
    parser.add_argument("--device", default="auto",
                        help="auto (a GPU when there is one), cpu, cuda or cuda:N (default: auto)")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Ranges and the device, at parse time: each bad value is one usage line naming its flag."""
    if not args.prompt and not args.chat:
        parser.error("give --prompt TEXT or --chat")
    if args.max_new_tokens <= 0:
        parser.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf):
        parser.error(f"--temperature must be 0 (greedy) or from {MIN_TEMPERATURE:g}, got "
                     f"{args.temperature}")
    for name in ("prompt", "system"):
        try:
            (getattr(args, name) or "").encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
            parser.error(f"--{name} is not valid UTF-8 text")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        resolve_device(args.device)
    except ArgumentError as error:
        parser.error(error.as_flag())


def note(message: str) -> None:
    print(message, file=sys.stderr)


def load(args):
    """Base model and tokenizer, with the adapter's LoRA layers and weights when given."""
    device = resolve_device(args.device)
    args.model = resolve_base_model(args.model, args.adapter, args.allow_base_mismatch, note)
    args.seed = preset_seed(args.model, args.adapter, args.seed)
    config = base_config(args.model)
    if config is not None and args.max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} is beyond the model's context "
                         f"of {config.max_position_embeddings} tokens")
    model, tokenizer = load_model(args.model, resolve_dtype(args.dtype, device), device, args.seed,
                                  getattr(args, "quantize", "none"), args.tokenizer, args.adapter)
    return model.eval(), tokenizer, device


def reply(model, tokenizer, messages, args, device) -> str:
    ids, _ = tokenize_chat(tokenizer, messages, add_generation_prompt=True)
    context = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > context:
        note(f"warning: the prompt ({len(ids)} tokens) and --max-new-tokens "
             f"{args.max_new_tokens} exceed the model's context of {context} tokens")
    prompt = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, stop_ids=stop_ids(tokenizer), pad_id=tokenizer.pad_id,
                         generator=generator)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        model, tokenizer, device = load(args)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt:
            turns = messages + [{"role": "user", "content": args.prompt}]
            print(reply(model, tokenizer, turns, args, device))
            return 0
        print("chat: an empty line ends it")
        for line in sys.stdin:
            if not line.strip():
                break
            messages.append({"role": "user", "content": line.strip()})
            answer = reply(model, tokenizer, messages, args, device)
            messages.append({"role": "assistant", "content": answer})
            print(f"assistant: {answer}")
    except ArgumentError as error:
        parser.exit(2, f"generate.py: error: {error.as_flag()}\n")
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"generate.py: error: {error}\n")
    except OSError as error:
        parser.exit(1, f"generate.py: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ngenerate.py: interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
