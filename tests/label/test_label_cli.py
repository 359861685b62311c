"""`rcmseg label serve`: one-line refusals before any server starts."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rcmseg.label_app.local_server import LocalServer

HAS_MONAILABEL = importlib.util.find_spec("monailabel") is not None


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rcmseg.cli.main", "label", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.skipif(HAS_MONAILABEL, reason="checks an environment without the label extra")
def test_serve_without_the_label_extra_says_how_to_install(tmp_path: Path):
    assert_one_line_error(serve("--studies", str(tmp_path)), "pip install 'rcmseg[label]'")


@pytest.mark.skipif(not HAS_MONAILABEL, reason="needs the rcmseg[label] extra (see .ci/label)")
def test_serve_refuses_a_missing_studies_folder_and_a_bad_bundle(tmp_path: Path):
    assert_one_line_error(serve("--studies", str(tmp_path / "nope")), "nope", "not a folder")
    studies = tmp_path / "studies"
    studies.mkdir()
    assert_one_line_error(
        serve("--studies", str(studies), "--bundle", str(tmp_path)), "not a trained bundle"
    )
    assert not (studies / ".rcmseg" / "bundle").exists()


@pytest.mark.skipif(not HAS_MONAILABEL, reason="needs the rcmseg[label] extra (see .ci/label)")
def test_serve_refuses_a_bad_pixel_size_or_thread_count(tmp_path: Path):
    assert_one_line_error(serve("--studies", str(tmp_path), "--mpp", "0"), "--mpp 0")
    assert_one_line_error(serve("--studies", str(tmp_path), "--threads", "0"), "--threads 0")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "manifest.csv").write_text(
        "mosaic,labels,patient,lesion,clinic,mosaic_mpp\na.png,,p,l,,-1\n"
    )
    assert_one_line_error(serve("--studies", str(tmp_path)), "manifest.csv", "line 2")
    assert not (tmp_path / ".rcmseg").exists()


@pytest.mark.skipif(not HAS_MONAILABEL, reason="needs the rcmseg[label] extra (see .ci/label)")
def test_serve_refuses_a_studies_folder_it_cannot_write():
    """MONAI Label writes its records and the submitted labels into STUDIES: a folder this user
    may not write is one line before any server starts, not a traceback. Run as `nobody`,
    since root writes everywhere."""
    import os
    import shutil
    import tempfile

    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no user here is refused a folder")
    shared = Path(tempfile.mkdtemp())  # pytest's tmp_path is private to root
    try:
        shared.chmod(0o777)
        studies = shared / "studies"
        studies.mkdir()
        studies.chmod(0o555)
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        command = [sys.executable, "-m", "rcmseg.cli.main", "label", "serve"]
        result = subprocess.run(
            [*(user if os.geteuid() == 0 else []), *command, "--studies", str(studies)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "HOME": str(shared), "COLUMNS": "300"},
        )
        assert_one_line_error(result, f"{studies}: cannot be written to (Permission denied)")
        assert list(studies.iterdir()) == []
    finally:
        shutil.rmtree(shared)


@pytest.mark.skipif(not HAS_MONAILABEL, reason="needs the rcmseg[label] extra (see .ci/label)")
def test_serve_refuses_a_port_in_use(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--studies", str(tmp_path), "--port", str(port))
    assert_one_line_error(result, f"127.0.0.1:{port}")


def test_local_server_that_cannot_start_raises_with_the_log_tail(tmp_path: Path):
    # Without the label extra serve refuses the extra; with it, the missing studies folder.
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError) as raised:
        LocalServer(tmp_path / "nope", log, start_timeout_s=120)
    message = str(raised.value)
    assert message.startswith("server exited (2):")
    assert "error:" in message
    assert ("not a folder" if HAS_MONAILABEL else "rcmseg[label]") in message


@pytest.mark.skipif(not HAS_MONAILABEL, reason="needs the rcmseg[label] extra (see .ci/label)")
def test_sigterm_to_serve_stops_its_server_too(tmp_path: Path):
    """`kill PID` on `rcmseg label serve` (a service being stopped) must not leave the MONAI
    Label server running on the port: the signal is passed on, the whole process group ends,
    and serve exits 143."""
    import os
    import signal
    import time

    from rcmseg.label_app.local_server import group_alive

    studies = tmp_path / "studies"
    studies.mkdir()
    server = LocalServer(studies, tmp_path / "server.log", start_timeout_s=300)
    try:
        os.kill(server.process.pid, signal.SIGTERM)  # serve alone, not its group
        assert server.process.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 60
        while group_alive(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(server.process.pid)
        with socket.socket() as probe:
            # As a new server binds it: connections the old one closed may linger in TIME_WAIT,
            # which SO_REUSEADDR allows; a socket still listening on the port does not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", server.port))
            probe.listen()
    finally:
        server.stop()
