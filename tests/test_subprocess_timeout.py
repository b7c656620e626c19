"""tests/conftest.py's subprocess_timeout: the limits grow with the machine's load."""
import os

import pytest

from conftest import subprocess_timeout


@pytest.mark.parametrize("load, expected", [(0.5, 100), (2.0, 100), (6.0, 300)])
def test_limit_scales_with_the_load_per_core(monkeypatch, load, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load / 2, load / 3))
    assert subprocess_timeout(100) == pytest.approx(expected)


def test_without_a_load_average_the_base_limit_holds(monkeypatch):
    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert subprocess_timeout(100) == 100
