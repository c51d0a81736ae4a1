r"""RAMDA + exact solver as a few Triton launches for all tensors of a param group.

A per-step table lists every tensor (pointers to g, V, U, W0, P, b, W, Ŵ; its ``[R, C, K]``
geometry; s, ε, c, τ).  Every kernel runs on a grid ``(block of BC groups, tensor)`` over the
whole table, so a step costs the same number of launches for 8 or 80 layers:

1. ``_stage``: ``V += s·g; U += s·g²; P = ∛U + ε; b = P∘W0 − V`` (stored) and per group
   ``Σb², max P, min P`` (screening and the Newton bracket);
2. ``_newton``: per group ``Σ b²/(P+μ)², Σ b²/(P+μ)³`` at the current μ (one launch per pass);
3. ``_finish``: ``Ŵ = b/(P+μ)`` on surviving groups (0 elsewhere), ``W ← W + c(Ŵ − W)``.

Between launches the per-group Newton update runs as torch ops on the concatenation of all
tensors' group vectors (the same safeguarded Newton as :func:`ramda_ds.solvers.solve_exact`).
Sums accumulate in float64.  The ∛ is the bit-seed + Halley + Newton of
:mod:`ramda_ds.cube_root`.  Results equal the torch path to float32 rounding (summation order and
FMA contraction differ), not bitwise; the tests compare them under ``TRITON_INTERPRET=1``.

:func:`ramda_exact_step` applies to unsharded float32 tensors that are regularized whole or not
at all (then τ = 0 and ``Ŵ = b/P = W0 − V/P``); the same three kernels (``NP`` pointers per
row) serve the sharded exact step of :mod:`.sharded` through :mod:`.triton_pg`.  PG's Triton
kernels are in :mod:`.triton_pg`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .device import LAUNCHES, interpreting
from ..groups import GroupLayout
from ..solvers import SolverStats, newton_update

# tile: BA rows (or inner elements) × BC groups; the interpreter runs a program's loop in Python,
# so it gets bigger tiles (fewer iterations)
BA, BC = (128, 64) if interpreting() else (32, 32)
_B1 = 709958130.0
F64 = torch.float64


@triton.jit
def _cbrt(x):
    """∛x, x ≥ 0 (seed from the bits, one Halley and one Newton step; see ramda_ds.cube_root)."""
    t = x.to(tl.int32, bitcast=True).to(tl.float32) * (1.0 / 3.0) + 709958130.0
    y = t.to(tl.int32).to(tl.float32, bitcast=True)
    r = x / (y * y) / y
    y = y + (r - 1.0) / (r + 2.0) * y
    r = x / (y * y) / y
    y = y + (r - 1.0) * (1.0 / 3.0) * y
    return tl.where(x > 0, y, x)


@triton.jit
def _tile(bi, a0, na, sa, sb, c, sc, cm, BA: tl.constexpr):
    """Offsets and mask of one [BA, BC] tile: rows a0.. of slice bi, groups c (mask cm)."""
    a = a0 + tl.arange(0, BA)
    return bi * sb + a[:, None] * sa + c[None, :] * sc, (a[:, None] < na) & cm[None, :]


@triton.jit
def _dual_averaging(gp, Vp, Up, off, m, s, eps):
    """``V += s·g; U += s·g²`` (stored) on a tile; returns ``(V, P = ∛U + ε)``."""
    g = tl.load(gp + off, mask=m, other=0.0)
    V = tl.load(Vp + off, mask=m, other=0.0) + s * g
    U = tl.load(Up + off, mask=m, other=0.0) + s * g * g
    tl.store(Vp + off, V, mask=m)
    tl.store(Up + off, U, mask=m)
    return V, _cbrt(U) + eps


@triton.jit
def _lerp(W, z, w):
    """torch.lerp(W, z, w) for a scalar weight."""
    return tl.where(w < 0.5, W + w * (z - W), z - (z - W) * (1.0 - w))


@triton.jit
def _geometry(geom, t, cb, BC: tl.constexpr):
    na = tl.load(geom + t * 7 + 0)
    sa = tl.load(geom + t * 7 + 1)
    nc = tl.load(geom + t * 7 + 2)
    sc = tl.load(geom + t * 7 + 3)
    nb = tl.load(geom + t * 7 + 4)
    sb = tl.load(geom + t * 7 + 5)
    g0 = tl.load(geom + t * 7 + 6)
    c = cb * BC + tl.arange(0, BC)
    return na, sa, nc, sc, nb, sb, g0, c


@triton.jit
def _ptr(ptrs, t, k, NP: tl.constexpr):
    """Pointer k of row t of a table with NP pointers per row (8 here, 10 in triton_pg's)."""
    return tl.load(ptrs + t * NP + k).to(tl.pointer_type(tl.float32))


@triton.jit
def _stage(ptrs, geom, scal, bb_out, pmax_out, pmin_out, BA: tl.constexpr, BC: tl.constexpr,
           NP: tl.constexpr):
    cb = tl.program_id(0)  # blocks on grid x (up to 2^31 − 1; y and z stop at 65535)
    t = tl.program_id(1)
    na, sa, nc, sc, nb, sb, g0, c = _geometry(geom, t, cb, BC)
    if cb * BC < nc:
        gp, Vp, Up, W0p, Pp, bp = (_ptr(ptrs, t, 0, NP), _ptr(ptrs, t, 1, NP),
                                   _ptr(ptrs, t, 2, NP), _ptr(ptrs, t, 3, NP),
                                   _ptr(ptrs, t, 4, NP), _ptr(ptrs, t, 5, NP))
        s = tl.load(scal + t * 4 + 0).to(tl.float32)
        eps = tl.load(scal + t * 4 + 1).to(tl.float32)
        cm = c < nc
        acc = tl.zeros((BC,), dtype=tl.float64)
        pmax = tl.full((BC,), float("-inf"), tl.float32)
        pmin = tl.full((BC,), float("inf"), tl.float32)
        for bi in range(0, nb):
            for a0 in range(0, na, BA):
                off, m = _tile(bi, a0, na, sa, sb, c, sc, cm, BA)
                V, P = _dual_averaging(gp, Vp, Up, off, m, s, eps)
                b = P * tl.load(W0p + off, mask=m, other=0.0) - V
                tl.store(Pp + off, P, mask=m)
                tl.store(bp + off, b, mask=m)
                acc += tl.sum((b * b).to(tl.float64), axis=0)
                pmax = tl.maximum(pmax, tl.max(tl.where(m, P, float("-inf")), axis=0))
                pmin = tl.minimum(pmin, tl.min(tl.where(m, P, float("inf")), axis=0))
        tl.store(bb_out + g0 + c, acc, mask=cm)
        tl.store(pmax_out + g0 + c, pmax, mask=cm)
        tl.store(pmin_out + g0 + c, pmin, mask=cm)


@triton.jit
def _newton(ptrs, geom, mu, z2_out, z3_out, BA: tl.constexpr, BC: tl.constexpr,
            NP: tl.constexpr):
    cb = tl.program_id(0)  # blocks on grid x (up to 2^31 − 1; y and z stop at 65535)
    t = tl.program_id(1)
    na, sa, nc, sc, nb, sb, g0, c = _geometry(geom, t, cb, BC)
    if cb * BC < nc:
        Pp, bp = _ptr(ptrs, t, 4, NP), _ptr(ptrs, t, 5, NP)
        cm = c < nc
        m_g = tl.load(mu + g0 + c, mask=cm, other=0.0).to(tl.float32)
        acc2 = tl.zeros((BC,), dtype=tl.float64)
        acc3 = tl.zeros((BC,), dtype=tl.float64)
        for bi in range(0, nb):
            for a0 in range(0, na, BA):
                off, m = _tile(bi, a0, na, sa, sb, c, sc, cm, BA)
                P = tl.load(Pp + off, mask=m, other=1.0)
                b = tl.load(bp + off, mask=m, other=0.0)
                d = 1.0 / (P + m_g[None, :])
                q = b * b * d * d
                acc2 += tl.sum(q.to(tl.float64), axis=0)
                acc3 += tl.sum((q * d).to(tl.float64), axis=0)
        tl.store(z2_out + g0 + c, acc2, mask=cm)
        tl.store(z3_out + g0 + c, acc3, mask=cm)


@triton.jit
def _finish(ptrs, geom, scal, mu, act, BA: tl.constexpr, BC: tl.constexpr, NP: tl.constexpr):
    cb = tl.program_id(0)  # blocks on grid x (up to 2^31 − 1; y and z stop at 65535)
    t = tl.program_id(1)
    na, sa, nc, sc, nb, sb, g0, c = _geometry(geom, t, cb, BC)
    if cb * BC < nc:
        Pp, bp, Wp = _ptr(ptrs, t, 4, NP), _ptr(ptrs, t, 5, NP), _ptr(ptrs, t, 6, NP)
        zi = tl.load(ptrs + t * NP + 7)  # Ŵ's buffer, or 0: none
        w = tl.load(scal + t * 4 + 2).to(tl.float32)  # the averaging weight c
        cm = c < nc
        m_g = tl.load(mu + g0 + c, mask=cm, other=0.0).to(tl.float32)
        a_g = tl.load(act + g0 + c, mask=cm, other=0.0)
        for bi in range(0, nb):
            for a0 in range(0, na, BA):
                off, m = _tile(bi, a0, na, sa, sb, c, sc, cm, BA)
                P = tl.load(Pp + off, mask=m, other=1.0)
                b = tl.load(bp + off, mask=m, other=0.0)
                z = b / (P + m_g[None, :]) * a_g[None, :]
                W = tl.load(Wp + off, mask=m, other=0.0)
                W = _lerp(W, z, w)
                if zi != 0:
                    tl.store(zi.to(tl.pointer_type(tl.float32)) + off, z, mask=m)
                tl.store(Wp + off, W, mask=m)


def _geom(layout):
    """(n_a, stride_a, n_c, stride_c, n_b, stride_b) of the [R, C, K] view: tile the two dims
    with the most elements, loop over the third (K = 1: rows × groups; R = 1: inner × groups)."""
    R, C, K = layout.rows, layout.groups, layout.inner
    if K == 1 or R >= K:
        return (R, C * K, C, K, K, 1)
    return (K, 1, C, K, R, C * K)


def _launch(kernel, grid, *args):
    LAUNCHES[0] += 1
    kernel[grid](*args, BA=BA, BC=BC, NP=8)


def run(plan, max_iters: int = 50) -> list:
    """One RAMDA step of an unsharded plan with the exact solver (or of an unregularized group):
    ``[(segment, SolverStats)]``.  Unregularized tensors are one pseudo-group with τ = 0, so
    μ = 0 and ``Ŵ = b/P``."""
    dev = plan.device
    ptrs, geom, scal, taus, meta, goff = [], [], [], [], [], 0
    for ts in plan.tensors:
        w = ts.w
        pr = ts.problems[0] if ts.problems else None
        P, b = torch.empty_like(w), torch.empty_like(w)
        z = ts.z if ts.z is not None else torch.empty_like(w)
        lay = pr.seg.groups.layout if pr is not None else GroupLayout(1, 1, w.numel())
        ptrs.append([ts.g.data_ptr(), ts.s1.data_ptr(), ts.s2.data_ptr(), ts.W0.data_ptr(),
                     P.data_ptr(), b.data_ptr(), w.data_ptr(), z.data_ptr()])
        geom.append(list(_geom(lay)) + [goff])
        scal.append(list(ts.scalars) + [0.0])
        taus.append(pr.tau if pr is not None else 0.0)
        meta.append((pr, lay, (P, b, z, ts.g)))  # keep the buffers alive
        goff += lay.groups
    T, G = len(plan.tensors), goff
    ptrs = torch.tensor(ptrs, dtype=torch.int64, device=dev)
    geom = torch.tensor(geom, dtype=torch.int64, device=dev)
    scal = torch.tensor(scal, dtype=torch.float32, device=dev)
    grid = (max(triton.cdiv(gm[2], BC) for gm in geom.tolist()), T)  # (blocks, tensors)
    tid = torch.repeat_interleave(torch.arange(T, device=dev),
                                  torch.tensor([m[1].groups for m in meta], device=dev))
    tau_t = torch.tensor(taus, dtype=F64, device=dev)
    tau = tau_t[tid]
    bb, pmax, pmin = (torch.empty(G, dtype=F64, device=dev), torch.empty(G, device=dev),
                      torch.empty(G, device=dev))
    _launch(_stage, grid, ptrs, geom, scal, bb, pmax, pmin)
    nrm = bb.sqrt()
    act = (nrm > tau) | (tau == 0)  # τ = 0 (unregularized): every group survives, μ = 0
    excess = (nrm - tau).clamp_min(1e-300)
    lo = torch.where(act, tau * pmin.to(F64) / excess, 0.0)
    hi = torch.where(act, tau * pmax.to(F64) / excess, 0.0)
    lo0, hi0 = lo, hi
    mu = hi.clone()  # cold: the bracket's upper end
    if plan.warm is not None:  # where each root sat in its bracket last step (1: the upper end)
        parts = [plan.warm.get((pr.seg.name, pr.seg.lo, pr.seg.hi)) if pr is not None else None
                 for pr, _, _ in meta]
        if any(q is not None for q in parts):
            at = torch.cat([q.to(device=dev, dtype=F64) if q is not None and q.numel() == lay.groups
                            else torch.ones(lay.groups, dtype=F64, device=dev)
                            for q, (_, lay, _) in zip(parts, meta)])
            mu = torch.lerp(lo, hi, at.clamp(0.0, 1.0))
    tol = 8 * torch.finfo(torch.float32).eps
    live_t = tau_t > 0
    conv_at = [None if tj > 0 else 0 for tj in taus]
    z2, z3 = torch.empty(G, dtype=F64, device=dev), torch.empty(G, dtype=F64, device=dev)
    for it in range(1, max_iters + 1):
        if all(cv is not None for cv in conv_at):
            break
        _launch(_newton, grid, ptrs, geom, mu, z2, z3)
        mu, lo, hi, bad = newton_update(mu, lo, hi, z2, z3, tau, act & live_t[tid], tol)
        left = torch.zeros(T, dtype=F64, device=dev).index_add_(0, tid, bad.to(F64))
        for j, n_bad in enumerate(left.tolist()):
            if conv_at[j] is None and n_bad == 0:
                conv_at[j] = it
        live_t = torch.tensor([cv is None for cv in conv_at], device=dev)
    _launch(_finish, grid, ptrs, geom, scal, mu, act.to(torch.float32))
    if plan.warm is not None:
        at = ((mu - lo0) / (hi0 - lo0)).nan_to_num_(1.0, 1.0, 1.0)
        for (pr, _, _), part in zip(meta, at.split([m[1].groups for m in meta])):
            if pr is not None:
                plan.warm[(pr.seg.name, pr.seg.lo, pr.seg.hi)] = part.clone()
    n_act = torch.zeros(T, dtype=F64, device=dev).index_add_(0, tid, act.to(F64)).tolist()
    return [(pr.seg, SolverStats(conv_at[j] if conv_at[j] is not None else max_iters,
                                 round(n_act[j]), lay.groups - round(n_act[j]), 0.0, math.nan))
            for j, (pr, lay, _) in enumerate(meta) if pr is not None]
