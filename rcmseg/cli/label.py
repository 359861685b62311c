"""`rcmseg label serve`: run the MONAI Label server with rcmseg's app (needs ``rcmseg[label]``)."""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from rcmseg.classes import MOSAIC_MPP
from rcmseg.cli.common import (
    BUNDLE_DEFAULT,
    BackendOption,
    DeviceOption,
    OpenVINOCacheOption,
    PrecisionOption,
    PresetOption,
    ThreadsOption,
    console,
    exit_on_interrupt,
    user_errors,
)
from rcmseg.errors import InputError, Terminated, os_reason
from rcmseg.io.atomic import check_output_folder
from rcmseg.label_app.pixel_sizes import StudyPixelSizes

label_app = typer.Typer(
    help="Annotate mosaics in QuPath with the bundle's network in the loop (MONAI Label).",
    no_args_is_help=True,
)

APP_SHIM = (
    '"""MONAI Label app folder made by `rcmseg label serve`: the app is rcmseg.label_app."""\n\n'
    "from rcmseg.label_app.main import RCMSegApp  # noqa: F401\n"
)


def check_label_extra() -> None:
    """Refuse with one line when MONAI Label is not installed."""
    if importlib.util.find_spec("monailabel") is None:
        raise InputError(None, "MONAI Label is not installed: pip install 'rcmseg[label]'")


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program holds, before MONAI Label prints a long traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise InputError(None, f"cannot listen on {host}:{port} ({os_reason(error)})") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_app_dir(studies: Path, bundle: Path | None) -> Path:
    """Seed the working bundle copy and write MONAI Label's app folder under STUDIES/.rcmseg.

    MONAI Label creates ``model/``, ``logs/``, ``lib/`` and ``bin/`` inside its app folder; this
    one-line app keeps them beside the studies instead of inside the installed package.
    """
    from rcmseg.bundle import default_bundle_dir
    from rcmseg.label_app.workspace import Workspace

    workspace = Workspace.for_studies(studies)
    workspace.ensure_bundle(bundle if bundle is not None else default_bundle_dir())
    workspace.app_dir.mkdir(parents=True, exist_ok=True)
    main_py = workspace.app_dir / "main.py"
    if not main_py.is_file() or main_py.read_text(encoding="utf-8") != APP_SHIM:
        main_py.write_text(APP_SHIM, encoding="utf-8")
    return workspace.app_dir


def server_command(
    app_dir: Path, studies: Path, host: str, port: int, conf: dict[str, str]
) -> list[str]:
    """``python -m monailabel.main start_server ...`` in this Python environment."""
    command = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        str(studies),
        "--host",
        host,
        "--port",
        str(port),
    ]
    for key, value in conf.items():
        command += ["--conf", key, value]
    return command


def register(app: typer.Typer) -> None:
    """Add ``rcmseg label serve`` to the rcmseg application."""
    app.add_typer(label_app, name="label")


@label_app.command("serve")
def serve(
    studies: Annotated[
        Path,
        typer.Option(help="Folder of mosaics to annotate (MONAI Label's datastore)."),
    ],
    bundle: Annotated[
        Path | None,
        typer.Option(help=f"Bundle to serve ({BUNDLE_DEFAULT}); copied to STUDIES/.rcmseg."),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    preset: PresetOption = "fast",
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    backend: BackendOption = "torch",
    openvino_cache: OpenVINOCacheOption = None,
    threads: ThreadsOption = None,
    epochs: Annotated[
        int | None, typer.Option(help="Fine-tuning epochs (default: the bundle's train.json).")
    ] = None,
    mpp: Annotated[
        float,
        typer.Option(
            help="µm/px of mosaics whose file carries no pixel size and that "
            "STUDIES/manifest.csv (column mosaic_mpp) does not size."
        ),
    ] = MOSAIC_MPP,
) -> None:
    """Start the MONAI Label server with rcmseg's app (infer, train, active learning)."""
    with user_errors():
        check_label_extra()
        if not studies.is_dir():
            raise InputError(studies, "not a folder (the mosaics to annotate go here)")
        check_output_folder(studies, "--studies (MONAI Label keeps its records and labels there)")
        if bundle is not None and not bundle.is_dir():
            raise InputError(bundle, "bundle folder not found")
        from rcmseg.inference import check_backend, check_threads, resolve_device

        check_threads(threads)
        # A bad --mpp or manifest is refused now, in one line, not at the first request.
        StudyPixelSizes(studies, mpp).declared()
        check_port_free(host, port)
        check_backend(backend, resolve_device(device))
        studies = studies.resolve()
        app_dir = prepare_app_dir(studies, bundle.resolve() if bundle else None)
        conf = {"preset": preset, "device": device, "precision": precision, "backend": backend}
        conf["mpp"] = str(mpp)
        if openvino_cache is not None:
            conf["openvino_cache"] = str(openvino_cache.resolve())
        if epochs is not None:
            conf["epochs"] = str(epochs)
        if threads is not None:
            conf["threads"] = str(threads)
        if bundle is not None:
            conf["bundle"] = str(bundle.resolve())
        reach = (
            "local only; pass --host 0.0.0.0 to let other machines connect"
            if is_loopback(host)
            else "[yellow]reachable from other machines: MONAI Label has no login by default[/]"
        )
        console.print(
            f"MONAI Label for {escape(str(studies))} on http://{host}:{port} ({reach})",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"served model: {escape(str(app_dir.parent / 'bundle' / 'models' / 'model.pt'))}",
            highlight=False,
            soft_wrap=True,
        )
    with exit_on_interrupt(None):  # the server stopped: nothing to keep
        returncode = run_server(server_command(app_dir, studies, host, port, conf))
    raise typer.Exit(code=returncode)


def run_server(command: list[str], grace_s: float = 30.0) -> int:
    """Run the MONAI Label server until it exits; return its exit status.

    Ctrl-C at a terminal reaches the server too; SIGTERM (``kill PID``, a service stopped) is
    passed on to it. Either way the server gets ``grace_s`` to stop its training and scoring
    tasks before it is killed, and the interruption is raised again.
    """
    server = subprocess.Popen(command)
    try:
        return server.wait()
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, Terminated):
            server.terminate()
        try:
            server.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        raise
