"""Checkpoints that resume a run exactly, and the weights-only export.

A checkpoint holds the network (and, with ``ema_decay``, the moving average of its weights),
optimiser, scheduler and gradient-scaler states, the epoch, the best validation Dice so far, the
history and the random-number states of torch, numpy and Python. Everything in it is a tensor
or a plain value, so ``torch.load(weights_only=True)`` reads it and nothing in it runs code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcmseg.io.atomic import save_torch_atomic


def rng_states() -> dict[str, Any]:
    """The global random states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    npy = states["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(item) for item in value] if isinstance(value, tuple) else value


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`rcmseg.io.atomic.atomic_path` (fsync, rename)."""
    save_torch_atomic(obj, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (tensors and plain values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def inference_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint validates and exports with: the moving average of the weights
    when the run kept one (``ema_decay``), else the weights as trained."""
    return checkpoint.get("ema_network") or checkpoint["network"]


def export_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write a weights-only ``model.pt``: the network's ``state_dict`` with tensors on the CPU."""
    save_atomic({key: value.detach().cpu() for key, value in state_dict.items()}, path)
