"""RAMDA's elementwise stage, computed in cache-sized chunks on CPU.

For one flat tensor (gradient ``g``, state ``V, U, W0``, scalars ``s = lr·√t`` and ``ε``)::

    V += s·g;   U += s·g∘g;   P = ∛U + ε;   b = P∘W0 − V;   const = (½P∘W0 − V)∘W0 (PG only)

The ops and their order are those of the per-tensor code they replace, and every one of them is
elementwise, so chunking changes no bit; it only keeps the ~20 ops of a chunk (the cube root's
included) in cache instead of making one pass over memory each.  Chunks of ATen's grain size also
run every op on one thread, which on a busy machine avoids a thread wake-up per op.
"""

from __future__ import annotations

import torch

from .cube_root import CHUNK, cube_root

_STAGE_CHUNK = CHUNK


def dual_averaging_stage(g, V, U, W0, s: float, eps: float, want_const: bool):
    """Update ``V, U`` in place; return ``(P, b, const or None)`` (all flat, like ``V``)."""
    P, b = torch.empty_like(V), torch.empty_like(V)
    const = torch.empty_like(V) if want_const else None
    n = V.numel()
    step = _STAGE_CHUNK if V.device.type == "cpu" else max(n, 1)
    scratch = torch.empty(min(n, step), dtype=V.dtype, device=V.device)
    for i in range(0, n, step):
        r = slice(i, min(i + step, n))
        Vr, Ur, Wr, Pr = V[r], U[r], W0[r], P[r]
        Vr.add_(g[r], alpha=s)
        Ur.addcmul_(g[r], g[r], value=s)
        cube_root(Ur, out=Pr).add_(eps)
        torch.mul(Pr, Wr, out=b[r]).sub_(Vr)
        if want_const:
            t = scratch[:Pr.numel()]
            torch.mul(Pr, 0.5, out=t).mul_(Wr).sub_(Vr)
            torch.mul(t, Wr, out=const[r])
    return P, b, const
