"""Training MED-Net (and the baselines) with the paper's protocol.

``train(TrainConfig(data_dir=..., output_dir=...))`` samples patches per epoch, augments, trains
with mixed precision on CUDA, validates on whole mosaics every epoch, keeps best and last
checkpoints, resumes exactly and exports the best weights to ``model.pt``. The same function runs
behind ``rcmseg train``, the bundle's ``train.json``, ``rcmseg cv`` and the MONAI Label train task.
"""

from rcmseg.training.config import TrainConfig, TrainResult
from rcmseg.training.loop import check_patch_size, train

__all__ = ["TrainConfig", "TrainResult", "check_patch_size", "train"]
