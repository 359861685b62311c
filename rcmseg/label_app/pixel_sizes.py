"""Pixel sizes of the studies' mosaics whose files carry none (PNG, JPEG and BMP exports, TIFFs
without resolution tags): the ``mosaic_mpp`` column of ``STUDIES/manifest.csv`` where it lists
the mosaic, else ``rcmseg label serve --mpp`` (default 0.5 µm/px). A pixel size in the file wins.

Only the manifest directly in STUDIES counts (MONAI Label's datastore lists only the files
directly there; the fine-tuning runs' manifests under ``STUDIES/.rcmseg`` are copies). It is
read again when it changes, so a corrected pixel size applies without restarting the server.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rcmseg.classes import MOSAIC_MPP
from rcmseg.io.dataset import declared_mpps, has_rows, manifest_path, read_manifest
from rcmseg.io.mosaics import check_fallback_mpp


class StudyPixelSizes:
    """µm/px to read each mosaic of a studies folder at when its file carries no pixel size.

    Args:
        studies: the studies folder (MONAI Label's datastore).
        default_mpp: µm/px of mosaics the manifest does not size.
    """

    def __init__(self, studies: Path, default_mpp: float = MOSAIC_MPP) -> None:
        self.manifest = manifest_path(studies)
        self.default_mpp = check_fallback_mpp(default_mpp)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._declared: dict[Path, float] = {}

    def fallback_mpp(self, mosaic: Path) -> float:
        """µm/px for ``mosaic`` when its file carries none.

        Raises:
            InputError: the manifest cannot be read (see :func:`rcmseg.io.dataset.read_manifest`).
        """
        return self.declared().get(Path(mosaic).resolve(), self.default_mpp)

    def declared(self) -> dict[Path, float]:
        """The manifest's pixel sizes by resolved mosaic path (empty without a manifest)."""
        try:
            stat = self.manifest.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                cases = read_manifest(self.manifest.parent) if has_rows(self.manifest) else []
                self._declared = declared_mpps(cases)
                self._stamp = stamp
            return self._declared
