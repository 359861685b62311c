"""Synthetic RCM mosaics with partial expert-like label maps, for tests, demos and benchmarks."""

from rcmseg.synth.mosaic import make_mosaic
from rcmseg.synth.writer import write_dataset, write_mosaic_tiff

__all__ = ["make_mosaic", "write_dataset", "write_mosaic_tiff"]
