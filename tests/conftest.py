"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

SignalWhen = Callable[[subprocess.Popen, Callable[[], bool], int], str]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject.toml): one worker per core this process may run on, not per core
    of the host, so a CI container limited to 2 of 64 cores runs 2 workers, not 64."""
    return max(1, len(os.sched_getaffinity(0)))


@pytest.fixture
def signal_when() -> SignalWhen:
    """``signal_when(process, ready, stop)``: send the signal ``stop`` to a running ``process``
    once ``ready()`` holds (polled every 10 ms for at most 300 s; sent then even if it never
    held, so that the test fails on what it asserts, not on a hang), and return the process's
    output once it has ended (at most 120 s later)."""

    def send(process: subprocess.Popen, ready: Callable[[], bool], stop: int) -> str:
        deadline = time.monotonic() + 300
        while process.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.poll() is None:
            process.send_signal(stop)
        return process.communicate(timeout=120)[0]

    return send
