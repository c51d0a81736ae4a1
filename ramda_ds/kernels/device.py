"""What can run where: whether Triton is installed and can run on a device, whether its CPU
interpreter is on, and the launch counter (``bench/optimizer_step.py`` adds it to the op count).
The leaf of :mod:`ramda_ds.kernels`: the kernel modules import it, not the package."""

from __future__ import annotations

import os

import torch

LAUNCHES = [0]


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device``."""
    if triton_version() is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())
