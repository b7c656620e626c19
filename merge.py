"""Merge a LoRA adapter into its base model and save a plain checkpoint (safetensors,
Phi3ForCausalLM).

    python merge.py --adapter runs/phi3-lora/final --output merged/

The checkpoint is written into a temporary directory beside --output and renamed into place, so
--output holds one whole checkpoint: never a mix with an older one's shards or index.
Exit status: 0 done, 1 a runtime failure (a file system error), 2 a usage or input error.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

from lorakernels.adapters import merge_lora
from lorakernels.weight_files import replace_directory
from adapter_base import TRAINER_STATE, preset_seed, resolve_base_model
from model.build import load_model, resolve_device, resolve_dtype
from model.chat import stop_ids
from model.config import DTYPE_CHOICES, ArgumentError


def build_parser() -> argparse.ArgumentParser:
    # The first paragraph (argparse refills it onto one line).
    parser = argparse.ArgumentParser(prog="merge.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="preset, checkpoint directory or hub id (default: the "
                                         "base the adapter records)")
    parser.add_argument("--adapter", type=Path, required=True, help="a PEFT adapter directory")
    parser.add_argument("--output", type=Path, required=True,
                        help="directory for the merged model: new or empty (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output (swapped in whole once the merge is "
                             "written)")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="use --model even where it is not the base the adapter records")
    parser.add_argument("--tokenizer",
                        help="tokenizer.json or its directory (default: the model's)")
    parser.add_argument("--seed", type=int,
                        help="for a preset: its random base's seed (default: the training --seed "
                             "recorded beside the adapter, else 42)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="the merged weights' dtype: auto (bf16 on a GPU, fp32 on a CPU), "
                             "float32, bfloat16 or float16 (default: auto)")
    parser.add_argument("--device", default="cpu",
                        help="where the merge runs: cpu, cuda or cuda:N (default: cpu)")
    return parser


def adapter_run(adapter: Path) -> Path:
    """What merging must never write over: the run directory of a train.py checkpoint (its
    adapter, optimizer state and other checkpoints), else the adapter directory itself."""
    adapter = adapter.resolve()
    return adapter.parent if (adapter / TRAINER_STATE).is_file() else adapter


def overlap(a: Path, b: Path) -> bool:
    """Whether one of two resolved directories is, contains or lies inside the other."""
    return a == b or a in b.parents or b in a.parents


def check_output(parser: argparse.ArgumentParser, output: Path, adapter: Path,
                 overwrite: bool) -> None:
    """--output is a new or empty directory (or replaced with --overwrite), apart from the
    adapter's run and from the working directory, which a swap into place would replace."""
    run, target = adapter_run(adapter), output.resolve()
    if overlap(target, run):
        parser.error(f"--output {output} overlaps the adapter's run {run}: the merge would "
                     f"replace or delete it; choose a directory outside it")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        parser.error(f"--output {output} is or contains the current directory; choose a new "
                     f"directory")
    if output.exists() and not output.is_dir():
        parser.error(f"--output {output} is a file, not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        parser.error(f"--output {output} is not empty; pass --overwrite to replace it or choose "
                     f"a new directory")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_output(parser, args.output, args.adapter, args.overwrite)
    try:
        device = resolve_device(args.device)
    except ArgumentError as error:
        parser.error(error.as_flag())
    tmp = args.output.with_name(f".{args.output.name}.tmp-{os.getpid()}")
    try:  # the dense base: merging into 4-bit weights is refused
        args.model = resolve_base_model(args.model, args.adapter, args.allow_base_mismatch,
                                        lambda line: print(line, file=sys.stderr))
        seed = preset_seed(args.model, args.adapter, args.seed)
        model, tokenizer = load_model(args.model, resolve_dtype(args.dtype, device), device,
                                      seed, None, args.tokenizer, args.adapter)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        merge_lora(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp, stop_ids(tokenizer))  # with its template and stop ids
        replace_directory(tmp, args.output)
    except ArgumentError as error:
        parser.exit(2, f"merge.py: error: {error.as_flag()}\n")
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"merge.py: error: {error}\n")
    except OSError as error:  # disk full, read-only: nothing half-written is left
        parser.exit(1, f"merge.py: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\nmerge.py: interrupted; --output was left as it was\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {args.adapter} into {args.model} (seed {seed}): wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
