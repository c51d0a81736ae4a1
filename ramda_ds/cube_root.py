"""A float32 cube root that gives each element the same bits wherever it sits in a tensor.

RAMDA's preconditioner is ``P = ∛U + ε``.  CPU ``pow`` is not position independent: ATen runs
SIMD code (Sleef) in a loop's body and scalar ``std::pow`` in its tails (a tensor's end and every
thread's chunk end), and the two differ in the last ulp, so an element of a sharded parameter can
get another ``P`` than in the unsharded run.  IEEE ``+ − × ÷`` are correctly rounded, hence the
same in SIMD lanes and scalar tails; :func:`cube_root` is built from those alone:

* seed: the float's bits divided by 3 plus the exponent bias correction ``B1`` (fdlibm's
  ``cbrtf``), computed with an exact float multiply and a truncating conversion; relative error
  below 2^-5 for normal numbers;
* one Halley step and one Newton step in correction form, ``y += y·(r − 1)/(r + 2)`` and
  ``y += y·(r − 1)/3`` with ``r = x/y³`` (the ratio form cannot overflow): 2^-5 → 2^-15 → float
  rounding.  The result is within 1 ulp of the correctly rounded ``∛x`` for normal ``x`` (about
  88% of them exactly rounded, measured in tests/test_cube_root.py), 0 for 0; subnormal inputs
  (below 1.2e-38, whose cube root is < 2.3e-13, far below any ε) get a positive, finite,
  position-independent value, accurate to ~4 digits.

On CPU it runs in chunks of :data:`CHUNK` elements so the ~15 ops stay in cache (and below ATen's
parallel grain: no thread start-up per op); on other devices ``pow`` is per element already and is
used as is.  float64 inputs use ``pow`` (the float64 parity tests with the authors' code rely on
that).  :func:`cube_root_f64` is the previous CPU implementation (float64 ``pow`` rounded to
float32), kept for the benchmark.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 15  # ATen's GRAIN_SIZE: ops on a chunk run on one thread
_B1 = 709958130.0  # (127 − 127/3 − 0.0331)·2^23, fdlibm cbrtf
_THIRD = 1.0 / 3.0


def _cbrt_chunk(x: torch.Tensor, out: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> None:
    """``out = ∛x`` for a float32 chunk ``x ≥ 0`` (``t``, ``u``: scratch of the same size)."""
    torch.mul(x.view(torch.int32), _THIRD, out=t)  # bits/3 as float (int → float is exact enough)
    t.add_(_B1)
    out.view(torch.int32).copy_(t)  # truncating conversion back to bits: the seed y0
    for halley in (True, False):
        torch.mul(out, out, out=t)
        torch.div(x, t, out=t)
        t.div_(out)  # r = x / y³
        torch.sub(t, 1.0, out=u)
        if halley:
            t.add_(2.0)
            u.div_(t)  # (r − 1)/(r + 2)
        else:
            u.mul_(_THIRD)  # (r − 1)/3
        u.mul_(out)
        out.add_(u)
    torch.where(x > 0, out, x, out=out)  # ∛0 = 0 (and −0, NaN pass through)


def cube_root(U: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """∛U elementwise (U ≥ 0), bitwise the same for an element wherever it sits (see module doc)."""
    if U.device.type != "cpu" or U.dtype != torch.float32:
        return torch.pow(U, 1 / 3, out=out) if out is not None else U.pow(1 / 3)
    out = torch.empty_like(U) if out is None else out
    x, o = U.reshape(-1), out.view(-1)
    n = x.numel()
    t = torch.empty(min(n, CHUNK), dtype=U.dtype)
    u = torch.empty_like(t)
    for i in range(0, n, CHUNK):
        m = min(CHUNK, n - i)
        _cbrt_chunk(x[i:i + m], o[i:i + m], t[:m], u[:m])
    return out


def cube_root_f64(U: torch.Tensor) -> torch.Tensor:
    """The previous CPU cube root: float64 ``pow`` per chunk, rounded to float32."""
    out = torch.empty_like(U)
    x, o = U.reshape(-1), out.view(-1)
    for i in range(0, x.numel(), 1 << 16):
        o[i:i + (1 << 16)].copy_(x[i:i + (1 << 16)].double().pow_(1 / 3))
    return out
