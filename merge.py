"""Merge a LoRA adapter into its base model and save a plain Phi-3 checkpoint (safetensors).

    python merge.py --adapter runs/phi3-lora/final --output merged/
"""
import argparse
import sys
from pathlib import Path

from lorakernels.adapters import merge_lora
from model.build import load_model, resolve_device, resolve_dtype


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="merge.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="phi3-tiny", help="preset, checkpoint directory or hub id")
    parser.add_argument("--adapter", type=Path, required=True, help="a PEFT adapter directory")
    parser.add_argument("--output", type=Path, required=True, help="directory for the merged model")
    parser.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the model's)")
    parser.add_argument("--seed", type=int, default=42, help="for a preset: its random base's seed")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    try:  # the dense base: merging into 4-bit weights is refused
        model, tokenizer = load_model(args.model, resolve_dtype(args.dtype, device), device,
                                      args.seed, None, args.tokenizer, args.adapter)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"merge.py: error: {error}\n")
    merge_lora(model).save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)  # with its chat template and stop ids
    print(f"merged {args.adapter} into {args.model}: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
