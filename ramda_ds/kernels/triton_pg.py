r"""RAMDA + PG (the paper's stop rule) as Triton launches over the per-step table.

The Triton kernel set (:class:`.interface.KernelSet`) of the PG driver :func:`.sharded.solve_pg`.  Every kernel runs on a
grid ``(block of BC groups, tensor)`` over the whole table, so a step costs the same number of
launches for 8 or 80 layers: ``_free`` (unregularized tensors: the stage, ``Ŵ = W0 − V/P`` and
the averaging), ``_pg_stage`` (``V, U, P, b`` and per group ``Σb², Σ(½P∘W0 − V)∘W0, max P``),
one ``_pg_chunk`` per chunk of iterations (a program runs all of its block's iterations, computing
the soft-threshold factors and its share of Q itself) and ``_pg_finish`` (``Ŵ = f∘Y``, the
averaging).  ``P, b, Y, Y'`` are in the tensor's own layout.  Sums accumulate in float64; results
equal the torch path to float32 rounding (FMA contraction and summation order differ); the tests
compare them under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import exact, table
from .device import LAUNCHES
from .interface import KernelSet
from .exact import BA, BC, _dual_averaging, _geom, _geometry, _lerp, _tile
from ..groups import GroupLayout

F64 = torch.float64
NPTR = 10


@triton.jit
def _p(ptrs, t, k):
    return tl.load(ptrs + t * 10 + k).to(tl.pointer_type(tl.float32))


@triton.jit
def _free(ptrs, geom, scal, BA: tl.constexpr, BC: tl.constexpr):
    cb = tl.program_id(0)  # blocks on grid x (up to 2^31 − 1; y and z stop at 65535)
    t = tl.program_id(1)
    na, sa, nc, sc, nb, sb, g0, c = _geometry(geom, t, cb, BC)
    if cb * BC < nc:
        gp, Vp, Up, W0p, Wp = _p(ptrs, t, 0), _p(ptrs, t, 1), _p(ptrs, t, 2), _p(ptrs, t, 3), _p(ptrs, t, 6)
        zi = tl.load(ptrs + t * 10 + 7)
        s = tl.load(scal + t * 4 + 0).to(tl.float32)
        eps = tl.load(scal + t * 4 + 1).to(tl.float32)
        w = tl.load(scal + t * 4 + 2).to(tl.float32)
        cm = c < nc
        for bi in range(0, nb):
            for a0 in range(0, na, BA):
                off, m = _tile(bi, a0, na, sa, sb, c, sc, cm, BA)
                V, P = _dual_averaging(gp, Vp, Up, off, m, s, eps)
                z = tl.load(W0p + off, mask=m, other=0.0) - V / P
                if zi != 0:
                    tl.store(zi.to(tl.pointer_type(tl.float32)) + off, z, mask=m)
                W = tl.load(Wp + off, mask=m, other=0.0)
                W = _lerp(W, z, w)
                tl.store(Wp + off, W, mask=m)


@triton.jit
def _pg_stage(ptrs, geom, scal, bb_out, cst_out, pmax_out, BA: tl.constexpr, BC: tl.constexpr):
    cb = tl.program_id(0)  # blocks on grid x (up to 2^31 − 1; y and z stop at 65535)
    t = tl.program_id(1)
    na, sa, nc, sc, nb, sb, g0, c = _geometry(geom, t, cb, BC)
    if cb * BC < nc:
        gp, Vp, Up, W0p, Pp, bp = (_p(ptrs, t, 0), _p(ptrs, t, 1), _p(ptrs, t, 2), _p(ptrs, t, 3),
                                   _p(ptrs, t, 4), _p(ptrs, t, 5))
        s = tl.load(scal + t * 4 + 0).to(tl.float32)
        eps = tl.load(scal + t * 4 + 1).to(tl.float32)
        cm = c < nc
        acc = tl.zeros((BC,), dtype=tl.float64)
        cacc = tl.zeros((BC,), dtype=tl.float64)
        pmax = tl.full((BC,), float("-inf"), tl.float32)
        for bi in range(0, nb):
            for a0 in range(0, na, BA):
                off, m = _tile(bi, a0, na, sa, sb, c, sc, cm, BA)
                V, P = _dual_averaging(gp, Vp, Up, off, m, s, eps)
                W0 = tl.load(W0p + off, mask=m, other=0.0)
                b = P * W0 - V
                tl.store(Pp + off, P, mask=m)
                tl.store(bp + off, b, mask=m)
                acc += tl.sum((b * b).to(tl.float64), axis=0)
                q = (P * 0.5 * W0 - V) * W0
                cacc += tl.sum(q.to(tl.float64), axis=0)
                pmax = tl.maximum(pmax, tl.max(tl.where(m, P, float("-inf")), axis=0))
        tl.store(bb_out + g0 + c, acc, mask=cm)
        tl.store(cst_out + g0 + c, cacc, mask=cm)
        tl.store(pmax_out + g0 + c, pmax, mask=cm)


@triton.jit
def _pg_tile(Pp, bp, Ys, Yd, off, m, fg, eg):
    """One PG iteration on a tile: ``Y_d = ηb + (1 − ηP)∘(f∘Y_s)`` (stored) and the tile's
    per-group ``ΣY², ΣPY², ΣbY`` in float64."""
    P = tl.load(Pp + off, mask=m, other=0.0)
    b = tl.load(bp + off, mask=m, other=0.0)
    z = tl.load(Ys + off, mask=m, other=0.0) * fg[None, :]
    y = b * eg[None, :] + (1.0 - P * eg[None, :]) * z
    tl.store(Yd + off, y, mask=m)
    yd = y.to(tl.float64)
    return (tl.sum(yd * yd, axis=0), tl.sum(P.to(tl.float64) * yd * yd, axis=0),
            tl.sum(b.to(tl.float64) * yd, axis=0))


@triton.jit
def _pg_chunk(ptrs, geom, n_iter, n_max, nblk, tau_t, eta, f, src, dst, q_out,
              BA: tl.constexpr, BC: tl.constexpr):
    cb = tl.program_id(0)  # blocks on grid x (up to 2^31 − 1; y and z stop at 65535)
    t = tl.program_id(1)
    na, sa, nc, sc, nb, sb, g0, c = _geometry(geom, t, cb, BC)
    n = tl.load(n_iter + t)
    if (cb * BC < nc) & (n > 0):
        Pp, bp = _p(ptrs, t, 4), _p(ptrs, t, 5)
        Yd = _p(ptrs, t, dst)
        Ys0 = _p(ptrs, t, src)
        tau = tl.load(tau_t + t)
        cm = c < nc
        fd = tl.load(f + g0 + c, mask=cm, other=0.0)
        ed = tl.load(eta + g0 + c, mask=cm, other=0.0)
        eg = ed.to(tl.float32)
        for it in range(0, n):
            fg = fd.to(tl.float32)
            a1 = tl.zeros((BC,), dtype=tl.float64)
            a2 = tl.zeros((BC,), dtype=tl.float64)
            a3 = tl.zeros((BC,), dtype=tl.float64)
            for bi in range(0, nb):
                for a0 in range(0, na, BA):
                    off, m = _tile(bi, a0, na, sa, sb, c, sc, cm, BA)
                    s1, s2, s3 = _pg_tile(Pp, bp, Ys0 if it == 0 else Yd, Yd, off, m, fg, eg)
                    a1 += s1
                    a2 += s2
                    a3 += s3
            nrm = tl.sqrt(a1)
            fd = tl.maximum(1.0 - ed * tau / tl.maximum(nrm, 1e-300), 0.0)
            qg = 0.5 * fd * fd * a2 - fd * a3 + tau * fd * nrm
            tl.store(q_out + (t * nblk + cb) * n_max + it, tl.sum(tl.where(cm, qg, 0.0), axis=0))
        tl.store(f + g0 + c, fd, mask=cm)


@triton.jit
def _pg_iter(ptrs, geom, live, eta, f, src, dst, s_out, G, BA: tl.constexpr, BC: tl.constexpr):
    """One PG iteration of the rows with live[t] (sharded tensors): Y_dst = ηb + (1 − ηP)∘(f∘Y_src)
    and per row slot ΣY², ΣPY², ΣbY into s_out[0 / G / 2G + slot]."""
    cb = tl.program_id(0)
    t = tl.program_id(1)
    na, sa, nc, sc, nb, sb, g0, c = _geometry(geom, t, cb, BC)
    if (cb * BC < nc) & (tl.load(live + t) != 0):
        Pp, bp = _p(ptrs, t, 4), _p(ptrs, t, 5)
        Yd, Ys = _p(ptrs, t, dst), _p(ptrs, t, src)
        cm = c < nc
        fg = tl.load(f + g0 + c, mask=cm, other=0.0).to(tl.float32)
        eg = tl.load(eta + g0 + c, mask=cm, other=0.0).to(tl.float32)
        a1 = tl.zeros((BC,), dtype=tl.float64)
        a2 = tl.zeros((BC,), dtype=tl.float64)
        a3 = tl.zeros((BC,), dtype=tl.float64)
        for bi in range(0, nb):
            for a0 in range(0, na, BA):
                off, m = _tile(bi, a0, na, sa, sb, c, sc, cm, BA)
                s1, s2, s3 = _pg_tile(Pp, bp, Ys, Yd, off, m, fg, eg)
                a1 += s1
                a2 += s2
                a3 += s3
        tl.store(s_out + g0 + c, a1, mask=cm)
        tl.store(s_out + G + g0 + c, a2, mask=cm)
        tl.store(s_out + 2 * G + g0 + c, a3, mask=cm)


@triton.jit
def _pg_finish(ptrs, geom, scal, f, ycol, BA: tl.constexpr, BC: tl.constexpr):
    cb = tl.program_id(0)  # blocks on grid x (up to 2^31 − 1; y and z stop at 65535)
    t = tl.program_id(1)
    na, sa, nc, sc, nb, sb, g0, c = _geometry(geom, t, cb, BC)
    if cb * BC < nc:
        Yp = _p(ptrs, t, tl.load(ycol + t))
        Wp = _p(ptrs, t, 6)
        zi = tl.load(ptrs + t * 10 + 7)
        w = tl.load(scal + t * 4 + 2).to(tl.float32)
        cm = c < nc
        fg = tl.load(f + g0 + c, mask=cm, other=0.0).to(tl.float32)
        for bi in range(0, nb):
            for a0 in range(0, na, BA):
                off, m = _tile(bi, a0, na, sa, sb, c, sc, cm, BA)
                z = tl.load(Yp + off, mask=m, other=0.0) * fg[None, :]
                if zi != 0:
                    tl.store(zi.to(tl.pointer_type(tl.float32)) + off, z, mask=m)
                W = tl.load(Wp + off, mask=m, other=0.0)
                W = _lerp(W, z, w)
                tl.store(Wp + off, W, mask=m)


class _Kernels(KernelSet):
    """The Triton kernels bound to one step's table (:class:`.interface.KernelSet`)."""

    def __init__(self, tab, dev):
        self.tab, self.dev = tab, dev
        geo = []
        for (R, C, K, goff), row in zip(tab.geom, tab.rows):
            lay = row.layout if goff >= 0 else GroupLayout(1, C, 1)
            geo.append(list(_geom(lay)) + [max(goff, 0)])
        self.ptrs = torch.tensor(tab.ptrs, dtype=torch.int64, device=dev).view(-1, NPTR)
        self.geom = torch.tensor(geo, dtype=torch.int64, device=dev).view(-1, 7)
        self.scal = torch.tensor(tab.scal, dtype=F64, device=dev)
        self.tau_t = torch.tensor(tab.taus, dtype=F64, device=dev)
        reg = [goff >= 0 for _, _, _, goff in tab.geom]
        self.nblk = max([1] + [triton.cdiv(g[2], BC) for g in geo])
        self.grid = (self.nblk, len(geo))  # (blocks, tensors): blocks may exceed 65535
        self.reg = torch.tensor(reg, dtype=torch.bool, device=dev)
        self.spares = []

    def _launch(self, kernel, *args, **constexprs):
        """One launch on the table's grid; none for an empty table (a rank of a sharded view
        whose shards of this group are all empty still takes part in the collectives)."""
        LAUNCHES[0] += 1
        if self.grid[1]:
            kernel[self.grid](*args, BA=BA, BC=BC, **constexprs)

    def free(self):
        if not bool(self.reg.all()):  # the unregularized tensors
            geom = self.geom.clone()
            geom[self.reg, 2] = 0  # no blocks for the regularized ones
            self._launch(_free, self.ptrs, geom, self.scal)

    def stage(self):
        G = max(self.tab.G, 1)
        bb, cst = torch.zeros(G, dtype=F64, device=self.dev), torch.zeros(G, dtype=F64, device=self.dev)
        pmax = torch.zeros(G, device=self.dev)
        geom = self._reg_geom()
        self._launch(_pg_stage, self.ptrs, geom, self.scal, bb, cst, pmax)
        G = self.tab.G
        return bb[:G], cst[:G], pmax[:G]

    def _reg_geom(self):
        geom = self.geom.clone()
        geom[~self.reg, 2] = 0
        return geom

    def spare(self, t):
        self.spares.append(torch.empty_like(self.tab.rows[t].w))
        self.ptrs[t, table.COL_Y2] = self.spares[-1].data_ptr()

    def chunk(self, n, f, eta, src, dst):
        n_max, T = max(n), len(self.tab.rows)
        q_out = torch.zeros(T * self.nblk * n_max, dtype=F64, device=self.dev)
        n_t = torch.tensor(n, dtype=torch.int32, device=self.dev)
        self._launch(_pg_chunk, self.ptrs, self._reg_geom(), n_t, n_max, self.nblk, self.tau_t,
                     eta, f, src, dst, q_out)
        return q_out.view(T, self.nblk, n_max).sum(1).tolist()

    def iterate(self, live, f, eta, src, dst):
        """One PG iteration of the rows with ``live[t]`` (:mod:`.sharded`): ``[3, G]`` sums."""
        G = self.tab.G
        out = torch.zeros(3, max(G, 1), dtype=F64, device=self.dev)
        lv = live.to(device=self.dev, dtype=torch.int32)
        self._launch(_pg_iter, self.ptrs, self._reg_geom(), lv, eta, f, src, dst, out, max(G, 1))
        return out[:, :G]

    # the exact solver's passes for sharded tensors (:mod:`.sharded`), on exact.py's kernels
    def exact_stage(self):
        G = max(self.tab.G, 1)
        bb = torch.zeros(G, dtype=F64, device=self.dev)
        pmax, pmin = torch.zeros(G, device=self.dev), torch.zeros(G, device=self.dev)
        self._launch(exact._stage, self.ptrs, self._reg_geom(), self.scal, bb, pmax, pmin,
                     NP=NPTR)
        G = self.tab.G
        return bb[:G], pmax[:G], pmin[:G]

    def exact_iter(self, live, mu):
        """One Newton pass (every regularized row: the kernel has no live mask)."""
        G = max(self.tab.G, 1)
        out = torch.zeros(2, G, dtype=F64, device=self.dev)
        self._launch(exact._newton, self.ptrs, self._reg_geom(), _padded(mu, G), out[0], out[1],
                     NP=NPTR)
        return out[:, :self.tab.G]

    def exact_finish(self, mu, act):
        G = max(self.tab.G, 1)
        self._launch(exact._finish, self.ptrs, self._reg_geom(), self.scal, _padded(mu, G),
                     _padded(act, G), NP=NPTR)

    def finish(self, f, ycol):
        yc = torch.tensor(ycol, dtype=torch.int64, device=self.dev)
        self._launch(_pg_finish, self.ptrs, self._reg_geom(), self.scal, f, yc)


def _padded(x, n):
    """``x`` with at least ``n`` elements (a kernel argument must not be empty)."""
    return x if x.numel() >= n else torch.cat([x, x.new_zeros(n - x.numel())])
