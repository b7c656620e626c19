"""training.run_log.RunLog: metrics rows as strict JSON lines, and a full disk named."""
import json
from pathlib import Path

import pytest

from training.run_log import METRICS_FILE, RunLog


def test_rows_are_flushed_strict_json(tmp_path):
    with RunLog(tmp_path, 0, 2, {}) as run_log:
        run_log.record({"step": 1, "loss": float("nan")})
        run_log.record({})  # a step that logs nothing writes nothing
        written = (tmp_path / METRICS_FILE).read_text()  # flushed before the run ends
    assert [json.loads(line) for line in written.splitlines()] == [{"step": 1, "loss": None}]


def test_other_ranks_record_nothing(tmp_path):
    with RunLog(tmp_path, 0, 2, {}, enabled=False) as run_log:
        run_log.record({"step": 1})
    assert not (tmp_path / METRICS_FILE).exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_names_the_metrics_file(tmp_path):
    with RunLog(tmp_path, 0, 2, {}) as run_log:
        run_log.metrics.close()
        run_log.metrics = open("/dev/full", "a")  # every write ends in ENOSPC
        with pytest.raises(OSError, match=r"^/dev/full: could not write it \(\[Errno 28\]"):
            run_log.record({"step": 1})
