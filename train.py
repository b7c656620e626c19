"""LoRA fine-tuning of Phi-3 on chat data.

    python train.py --data examples/chat.jsonl
    python train.py --help
"""
import sys

from training.config import build_parser, parse_config
from training.loop import TrainingDiverged, train


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
        train(config)
    except (ValueError, FileNotFoundError) as error:  # bad flags, config, data or paths: no traceback
        build_parser().exit(2, f"train.py: error: {error}\n")
    except (TrainingDiverged, OSError) as error:  # runtime failures (disk full, ...), not usage
        build_parser().exit(1, f"train.py: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
