"""The app's working state, kept beside the studies: ``STUDIES/.rcmseg/``.

Layout::

    STUDIES/.rcmseg/bundle/          working copy of the bundle; models/model.pt is the served model
    STUDIES/.rcmseg/train/<run>/     one folder per fine-tuning run (data set, checkpoints, log)
    STUDIES/.rcmseg/train_stats.json what the last fine-tuning run reported
    STUDIES/.rcmseg/entropy.json     mean per-pixel entropy of mosaics, per model (strategy cache)
    STUDIES/.rcmseg/app/             MONAI Label's own app folder for ``rcmseg label serve``

The working copy is seeded from the chosen bundle the first time and kept afterwards, so
fine-tuned weights survive restarts and the repository's bundle is never written. MONAI Label's
datastore lists only files directly in STUDIES, so nothing here shows up as a mosaic.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from rcmseg.bundle import WEIGHTS_FILE, LoadedBundle, load_bundle
from rcmseg.errors import InputError
from rcmseg.io.atomic import copy_atomic

WORKSPACE_DIRNAME = ".rcmseg"


@dataclass(frozen=True)
class Workspace:
    """Paths of the app's working state for one studies folder."""

    root: Path

    @classmethod
    def for_studies(cls, studies: str | Path) -> Workspace:
        return cls(Path(studies).resolve() / WORKSPACE_DIRNAME)

    @property
    def studies(self) -> Path:
        """The studies folder this working state belongs to."""
        return self.root.parent

    @property
    def bundle_dir(self) -> Path:
        return self.root / "bundle"

    @property
    def model_path(self) -> Path:
        """The served weights: ``bundle/models/model.pt``."""
        return self.bundle_dir / WEIGHTS_FILE

    @property
    def runs_dir(self) -> Path:
        return self.root / "train"

    @property
    def train_stats_path(self) -> Path:
        return self.root / "train_stats.json"

    @property
    def entropy_path(self) -> Path:
        return self.root / "entropy.json"

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    def ensure_bundle(self, source: str | Path) -> Path:
        """Seed the working copy from ``source`` unless one exists; return the working copy."""
        source = Path(source).resolve()
        if (self.bundle_dir / WEIGHTS_FILE).is_file():
            return self.bundle_dir
        if not (source / WEIGHTS_FILE).is_file():
            raise InputError(source, f"no {WEIGHTS_FILE}: not a trained bundle (see --bundle)")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="bundle-", dir=self.root))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        shutil.rmtree(self.bundle_dir, ignore_errors=True)
        staging.rename(self.bundle_dir)
        return self.bundle_dir


def replace_file(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` in one rename, so a reader sees the old or the new file whole."""
    copy_atomic(new, target)


class ServedModel:
    """The working bundle loaded once and reloaded when its ``model.pt`` changes on disk.

    A finished training run replaces the weights file; the next request then loads it, so the
    server never needs a restart. Safe to share between MONAI Label's request threads.
    """

    def __init__(self, bundle_dir: Path, device: str = "auto") -> None:
        self.bundle_dir = bundle_dir
        self.device = device
        self._lock = threading.Lock()
        self._bundle: LoadedBundle | None = None
        self._stamp: tuple[int, int] | None = None

    @property
    def weights_path(self) -> Path:
        return self.bundle_dir / WEIGHTS_FILE

    def _file_stamp(self) -> tuple[int, int]:
        stat = self.weights_path.stat()
        return stat.st_mtime_ns, stat.st_size

    def get(self) -> LoadedBundle:
        with self._lock:
            stamp = self._file_stamp()
            if self._bundle is None or stamp != self._stamp:
                self._bundle = load_bundle(self.bundle_dir, self.device)
                self._stamp = stamp
            return self._bundle
