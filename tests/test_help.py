"""train.py --help: fast (no torch import before the flags are read), each default said once."""
import subprocess
import sys
from pathlib import Path

from training.config import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_flags_are_read_without_importing_torch():
    code = ("import sys; from training.config import parse_config; parse_config([]); "
            "import lorakernels.settings; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_each_default_is_said_once():
    helps = [action.help for action in build_parser()._actions if action.help]
    assert len(helps) >= 40
    twice = [text for text in helps if text.count("(default:") > 1]
    assert not twice
    tokenizer = next(a.help for a in build_parser()._actions if "--tokenizer" in a.option_strings)
    assert tokenizer.count("default") == 1
