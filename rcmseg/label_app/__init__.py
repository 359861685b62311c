"""The MONAI Label app of rcmseg: annotate RCM mosaics with the bundle's network in the loop.

A normal MONAI Label app (``main.py`` holds the :class:`~monailabel.interfaces.app.MONAILabelApp`
subclass); start it with ``rcmseg label serve --studies DIR`` or with MONAI Label's own
``monailabel start_server --app <this folder> --studies DIR``. Everything here needs the
``rcmseg[label]`` extra; importing this package alone does not.
"""

from pathlib import Path

APP_DIR: Path = Path(__file__).resolve().parent
