"""Fused kernels for RAMDA's step, and the switch that chooses them.

They execute a step plan (:mod:`.plan`: tensors and scalars, built by
:mod:`ramda_ds.optim.fast`; the kernels never see an optimizer) on a table of rows (one row per
tensor; under a sharded view one row per piece of a segment, :mod:`.sharded`), so a step costs the
same number of passes for 8 or 80 layers.  A kernel set implements :mod:`.interface`.
``backend`` (a param-group option of RAMDA and ProxGen):

* ``"torch"`` (the default) — the pure-torch reference; runs everywhere; sharded == unsharded bit
  for bit on every sharding backend.
* ``"native"`` — CPU tensors: the C loops of :mod:`.native` (compiled on first use with the
  system C compiler; a clear error if there is none): the unregularized update, the exact solver
  and PG with the paper's stop rule.
* ``"triton"`` — Triton kernels: :mod:`.exact` (exact solver, unregularized groups) and
  :mod:`.triton_pg` (PG).  On CPU they run only under ``TRITON_INTERPRET=1`` (the tests use it).
* ``"auto"`` — native for CPU tensors and Triton for CUDA tensors, each only after a tiny plan
  run on the kernels matched the reference solvers (:mod:`.selftest`, once per process; no
  optimizer is built); otherwise torch, with a warning.  It never picks a path that cannot run.

The fast paths apply to contiguous float32 tensors with float32 state whose group's regularizer
does not act (λ = 0 or none) or is the group lasso, with ``inexact_eps0`` unset for PG: unsharded
(single process) or sharded (ZeRO-1/2/3, FSDP2, FSDP1: :mod:`.sharded`, one all-reduce per solver
iteration as on the torch path); anything else takes the torch path (the rule:
:mod:`ramda_ds.optim.fast`).  They match the torch path to float32
rounding (the native one, op for op, mostly bit for bit), not guaranteed bitwise.

:data:`LAUNCHES` counts Triton launches (``bench/optimizer_step.py`` adds them to the op count).
"""

from __future__ import annotations

import warnings

import torch

from .device import LAUNCHES, available, interpreting, triton_version  # noqa: F401

BACKENDS = ("auto", "torch", "triton", "native")


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
        return "native" if native_available() else "torch"
    return "triton" if use_triton(backend, device) else "torch"


_VERIFIED: dict[str, bool] = {}


def use_triton(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":  # Triton on CUDA once a tiny step has compiled and matched torch
        if device.type != "cuda" or triton_version() is None:
            return False
        if str(device) not in _VERIFIED:
            from .selftest import check

            try:
                _VERIFIED[str(device)] = check("triton", device)
            except Exception as e:  # noqa: BLE001 - any compile/launch failure means "do not use"
                warnings.warn(f"ramda_ds: Triton kernels failed on {device} ({e!r}); using torch")
                _VERIFIED[str(device)] = False
        return _VERIFIED[str(device)]
    if not available(device):
        raise RuntimeError(f"backend='triton' cannot run on {device} tensors: Triton needs a CUDA "
                           "device, or TRITON_INTERPRET=1 for its CPU interpreter")
    return True


_NATIVE_OK: dict = {}


def native_available() -> bool:
    """Whether the C kernels compile here and pass the self-test against the reference solvers
    (:mod:`.selftest`, PG and exact); once per process.  ``backend="auto"`` uses them on CPU only
    then (else warns and uses torch)."""
    if "ok" not in _NATIVE_OK:
        try:
            from .native_build import load
            from .selftest import check

            load()
            _NATIVE_OK["ok"] = check("native", torch.device("cpu"))
            if not _NATIVE_OK["ok"]:
                warnings.warn("ramda_ds: the native CPU kernels do not match the reference solvers "
                              "on this machine; using torch")
        except Exception as e:  # noqa: BLE001 - no compiler, a failed compile: use torch
            warnings.warn(f"ramda_ds: the native CPU kernels are unavailable ({e}); using torch")
            _NATIVE_OK["ok"] = False
    return _NATIVE_OK["ok"]
