"""``rcmseg label serve`` as a child process on 127.0.0.1, for tests, benchmarks and scripts.

The server runs in its own process group: MONAI Label starts training and scoring subprocesses
that write to the studies folder too, so stopping it means waiting until the whole group is gone.
The calling process needs only the standard library; the child needs the ``rcmseg[label]`` extra.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(log: Path, lines: int = 40) -> str:
    """The last lines of the server's log (errors quote it: a temporary log folder goes)."""
    if not log.is_file():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class LocalServer:
    """``rcmseg label serve --studies STUDIES --port <free>`` started and ready to answer.

    ``options`` are further ``serve`` options (``--bundle``, ``--preset``, ``--device``, ...);
    ``env`` is added to this process's environment. Output goes to ``log``. Raises
    ``RuntimeError`` with the log's tail when the server exits or is not ready within
    ``start_timeout_s``. Use as a context manager, or call :meth:`stop`.
    """

    def __init__(
        self,
        studies: Path,
        log: Path,
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "rcmseg.cli.main",
            "label",
            "serve",
            "--studies",
            str(studies),
            "--port",
            str(self.port),
            *options,
        ]
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                command,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        try:
            self._wait_until_ready(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited ({self.process.returncode}):\n{log_tail(self.log)}"
                )
            try:
                with urllib.request.urlopen(self.url + "/info/", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{log_tail(self.log)}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``; wait."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while group_alive(self.process.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                deadline = float("inf")
            self.process.poll()  # reap the leader so that the group can empty
            time.sleep(0.2)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
