"""Triton kernels for the optimizer step, and the switch that chooses them.

``backend`` (a param-group option of RAMDA): ``"torch"`` — the pure-torch reference, runs
everywhere; ``"triton"`` — the fused kernels of :mod:`ramda_ds.kernels.exact` where they apply
(exact solver or unregularized groups, unsharded float32 tensors), torch elsewhere; ``"auto"`` (default) — Triton only
for CUDA tensors, when ``triton`` is importable and a tiny RAMDA step run both ways on that
device (:func:`ramda_ds.kernels.exact.self_test`, once per process) compiled and matched, so
it never picks a path that cannot run.  On CPU
the kernels run only under ``TRITON_INTERPRET=1`` (the interpreter; the tests use it).

:data:`LAUNCHES` counts kernel launches (``bench/optimizer_step.py`` adds them to the op count).
"""

from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "native")
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


def check_backend(backend, where: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and triton_version() is None:
        raise ValueError(f"{where}: backend='triton' needs the triton package (pip install triton)")


def choose(backend: str, device: torch.device) -> str:
    """The path a step of tensors on ``device`` takes: ``"torch"``, ``"triton"`` or ``"native"``."""
    if backend == "native":
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors, not {device}; use 'auto'")
        from .native_build import load

        load()  # raises NativeUnavailable with the compiler's message
        return "native"
    if backend == "auto" and device.type == "cpu":
        from .native import available as native_ok

        return "native" if native_ok() else "torch"
    return "triton" if use_triton(backend, device) else "torch"


_VERIFIED: dict[str, bool] = {}


def use_triton(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":  # Triton on CUDA once a tiny step has compiled and matched torch
        if device.type != "cuda" or triton_version() is None:
            return False
        if str(device) not in _VERIFIED:
            from .exact import self_test

            try:
                _VERIFIED[str(device)] = self_test(device)
            except Exception as e:  # noqa: BLE001 - any compile/launch failure means "do not use"
                warnings.warn(f"ramda_ds: Triton kernels failed on {device} ({e!r}); using torch")
                _VERIFIED[str(device)] = False
        return _VERIFIED[str(device)]
    if not available(device):
        raise RuntimeError(f"backend='triton' cannot run on {device} tensors: Triton needs a CUDA "
                           "device, or TRITON_INTERPRET=1 for its CPU interpreter")
    return True
