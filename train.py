"""LoRA fine-tuning of Phi-3 on chat data.

    python train.py --data examples/chat.jsonl
    python train.py --help

Exit status: 0 done (or a finished run left as it was), 1 a runtime failure (divergence, a
file system error), 2 a usage or data error, 130 interrupted by Ctrl-C.
"""
import sys

from training.config import build_parser, parse_config


def fail(status: int, message: str):
    build_parser().exit(status, f"train.py: error: {message}\n")


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
    except (ValueError, FileNotFoundError) as error:  # bad flags or config: one line
        fail(2, str(error))
    # Imported once the flags are read: torch takes seconds to load, --help needs none of it.
    from training.divergence import TrainingDiverged
    from training.loop import train

    try:
        summary = train(config)
    except (ValueError, FileNotFoundError) as error:  # bad data, paths or settings: one line
        fail(2, str(error))
    except (TrainingDiverged, OSError) as error:  # runtime failures (disk full, ...), not usage
        fail(1, str(error))
    except KeyboardInterrupt:  # Ctrl-C before the first step, or a second one: stop at once
        build_parser().exit(130, "\ntrain.py: interrupted: stopped at once; checkpoints saved "
                                 "before are intact\n")
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
