"""rcmseg: MED-Net segmentation of reflectance confocal microscopy (RCM) mosaics."""

import os
from importlib.metadata import PackageNotFoundError, version

# OpenMP threads that sleep when idle instead of spinning: beside another busy process a batch
# then slows by about the fair share (1.4-2.0x on 2 cores) instead of 3.2-3.8x, at no measured
# cost alone (docs/benchmarks.md, "Threads"). Read by libgomp when torch loads, so it only takes
# effect when rcmseg is imported first (the CLI, the bundle configs); a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("rcmseg")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
