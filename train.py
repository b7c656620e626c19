"""LoRA fine-tuning of Phi-3 on chat data.

    python train.py --data examples/chat.jsonl
    python train.py --help

Exit status: 0 done (or a finished run left as it was), 1 a runtime failure (divergence, a
file system error), 2 a usage or data error, 130 interrupted by Ctrl-C.
"""
import sys

from training.config import build_parser, parse_config
from training.loop import TrainingDiverged, train
from training.memory_plan import PlanFailed, run_plan


def fail(status: int, message: str):
    build_parser().exit(status, f"train.py: error: {message}\n")


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
        if config.plan_memory:
            run_plan(config, config.plan_json)
            return 0
        summary = train(config)
    except (ValueError, FileNotFoundError) as error:  # bad flags, config, data or paths: no traceback
        fail(2, str(error))
    except (TrainingDiverged, OSError, PlanFailed) as error:  # runtime failures (disk full, ...), not usage
        fail(1, str(error))
    except KeyboardInterrupt:  # Ctrl-C before the first step, or a second one: stop at once
        build_parser().exit(130, "\ntrain.py: interrupted: stopped at once; checkpoints saved before "
                                 "are intact\n")
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
