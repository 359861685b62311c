"""rcmseg: MED-Net segmentation of reflectance confocal microscopy (RCM) mosaics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rcmseg")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
