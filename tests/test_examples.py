"""The README's examples run as written."""
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]


def test_loralib_quickstart_runs_and_merges():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "loralib_quickstart.py")],
        capture_output=True, text=True, timeout=subprocess_timeout(120), check=True,
    )
    assert "unexpected keys: []" in result.stdout
    assert "merged: True" in result.stdout
