"""LoRA fine-tuning of Phi-3 on chat data.

    python train.py --data examples/chat.jsonl
    python train.py --help

Exit status: 0 done (or a finished run left as it was), 1 a runtime failure (divergence, a
file system error), 2 a usage or data error; 130, 143 or 129 (128 + the signal) stopped by
Ctrl-C, SIGTERM or SIGHUP, with a checkpoint saved once training had begun (docs/outputs.md).
"""
import sys

from model.config import ArgumentError
from training.config import build_parser, parse_config
from training.interrupts import Interrupted, exit_status, signal_name


def fail(status: int, message: str):
    build_parser().exit(status, f"train.py: error: {message}\n")


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
    except (ValueError, FileNotFoundError) as error:  # bad flags or config: one line
        fail(2, str(error))
    # Imported once the flags are read: torch takes seconds to load, --help needs none of it.
    from training.divergence import TrainingDiverged
    from training.loop import out_of_memory_message, train
    from training.memory_plan import PlanFailed, run_plan

    try:
        if config.plan_memory:
            run_plan(config, config.plan_json)
            return 0
        summary = train(config)
    except ArgumentError as error:  # a --model or --device the machine cannot serve
        fail(2, error.as_flag())
    except (ValueError, FileNotFoundError) as error:  # bad data, paths or settings: one line
        fail(2, str(error))
    except (TrainingDiverged, PlanFailed, OSError) as error:  # runtime failures, not usage
        fail(1, str(error))
    except (RuntimeError, MemoryError) as error:  # out of memory: one line; anything else: a bug
        message = out_of_memory_message(error, config)
        if message is None:
            raise
        fail(1, message)
    except KeyboardInterrupt as error:  # a signal before the first step, or a second one
        signum = error.signum if isinstance(error, Interrupted) else 2
        build_parser().exit(exit_status(signum), f"\ntrain.py: interrupted by "
                                                 f"{signal_name(signum)}: stopped at once; "
                                                 "checkpoints saved before are intact\n")
    return exit_status(summary["signal"]) if summary.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
