r"""The per-step table that fused kernels consume, built from a step plan (:mod:`.plan`).

One row per tensor: pointers to ``g, s1, s2, W0, P, b, W, Ŵ, Y, Y'`` (float32, contiguous; RAMDA
``s1, s2 = V, U``, ProxGen ``m, v``), its ``[R, C, K]`` geometry with ``goff``, the offset of its
groups in the concatenation of every tensor's per-group vectors (−1: unregularized), and the
scalars ``s = lr·√t, ε, c, mode`` (ProxGen also its AdamW stage's, ``pscal``).  :func:`build`
allocates the scratch ``P, b`` and ``Y`` of PG's regularized tensors, so a kernel set
(:mod:`.native` on CPU, :mod:`.triton_pg`) only needs the table to run a pass for all tensors at
once.  The sharded table of pieces (:mod:`.sharded`) has the same rows.

:func:`solve_pg_chunked` is PG (Alg. 2, the paper's stop rule) for any kernel set that runs
*chunks*: ``n`` iterations per block of whole groups, each block computing its groups'
soft-threshold factors and its share of Q for every iteration (iteration j:
``Z = f_{j−1}∘Y_{j−1}``, ``Y_j = ηb + (1 − ηP)∘Z``, per group ``ΣY², ΣPY², ΣbY``,
``f_j = max(0, 1 − ητ/‖Y_j‖)``, ``Q_j = Σ_g ½f²ΣPY² − fΣbY + τf‖Y‖ + const``; ``Y_0 = W``,
``f_0`` = the screening mask).  The host sums the shares per tensor and applies the stop rule to
each iteration of the chunk in order.  A tensor that stopped inside a chunk re-runs that chunk
from its start (the chunk read ``Y`` and wrote ``Y'``, so the start is intact) up to the stopping
iteration.  Chunk lengths come from each tensor's iteration count at the previous step (a hint:
it changes the speed, never the result).

:func:`build` takes unsharded plans (tensors regularized whole or not at all).
"""

from __future__ import annotations

import math

import torch

from ..groups import GroupLayout
from ..solvers import SolverStats, pg_should_stop

F64 = torch.float64
MODE_EXACT, MODE_PG, MODE_FREE = 0, 1, 2


class Row:
    """One row of the table: tensor ``t`` of the plan (its flat ``w``: the row's elements), its
    problem's segment (None: an unregularized row) and the row's group layout."""

    __slots__ = ("t", "w", "seg", "layout")

    def __init__(self, t, w, seg, layout):
        self.t, self.w, self.seg, self.layout = t, w, seg, layout


class Table:
    """``rows``: :class:`Row` per row; ``ptrs``, ``geom``, ``scal``: lists per row; ``taus``: τ
    per row (0 unregularized); ``G``: groups in all; ``pscal`` (ProxGen): the AdamW stage's
    scalars per row."""

    def __init__(self, rows, ptrs, geom, scal, taus, G, keep, pscal=None):
        self.rows, self.ptrs, self.geom, self.scal = rows, ptrs, geom, scal
        self.taus, self.G, self._keep = taus, G, keep  # _keep: buffers the pointers refer to
        self.pscal = pscal


def row_ptrs(ts, P, b, Y, off: int = 0) -> list[int]:
    """A row's pointers ``g, s1, s2, W0, P, b, W, Ŵ, Y, Y'`` (RAMDA: ``s1, s2 = V, U``; ProxGen:
    ``m, v`` and no ``W0``, no ``Ŵ``) of plan tensor ``ts``; ``off``: the row's first element in
    the flat tensors ``g, s1, s2, W0, W, Ŵ`` (``P, b, Y`` are the row's own)."""
    return [_ptr(ts.g, off), _ptr(ts.s1, off), _ptr(ts.s2, off), _ptr(ts.W0, off), _ptr(P),
            _ptr(b), _ptr(ts.w, off), _ptr(ts.z, off), _ptr(Y), 0]


def row_scalars(plan, ts, mode: int) -> tuple[list, list | None]:
    """A row's ``[s, ε, c, mode]`` and (ProxGen) its AdamW scalars with the mode; ProxGen's
    ``c = 1``: the finish writes ``W = Ŵ``."""
    if plan.kind == "ramda":
        return list(ts.scalars) + [float(mode)], None
    return [0.0, ts.scalars[1], 1.0, float(mode)], list(ts.scalars) + [float(mode)]


def build(plan):
    """The table of an unsharded plan: one row per tensor, regularized whole (its one problem) or
    not at all.  Scratch ``P, b`` for regularized rows (RAMDA: PG only; the native exact solver
    packs its own), ``Y`` for PG (``Y'`` is allocated on demand)."""
    pg, ramda = plan.solver != "exact", plan.kind == "ramda"
    rows, ptrs, geom, scal, pscal, taus, keep, goff = [], [], [], [], [], [], [], 0
    for t, ts in enumerate(plan.tensors):
        w = ts.w
        seg = ts.problems[0].seg if ts.problems else None
        scratch = seg is not None and (pg or not ramda)
        P, b = (torch.empty_like(w), torch.empty_like(w)) if scratch else (None, None)
        Y = torch.empty_like(w) if pg and seg is not None else None
        if seg is not None:
            lay = seg.groups.layout
            geom.append([lay.rows, lay.groups, lay.inner, goff])
            goff += lay.groups
            taus.append(ts.problems[0].tau)
        else:  # unregularized: Ŵ = W0 − V/P, no groups
            lay = GroupLayout(1, w.numel(), 1)
            geom.append([1, w.numel(), 1, -1])
            taus.append(0.0)
        mode = MODE_FREE if seg is None else (MODE_PG if pg else MODE_EXACT)
        ptrs.append(row_ptrs(ts, P, b, Y))
        sc, psc = row_scalars(plan, ts, mode)
        scal.append(sc)
        if psc is not None:
            pscal.append(psc)
        rows.append(Row(t, w, seg, lay))
        keep.append((ts.g, P, b, Y))
    return Table(rows, ptrs, geom, scal, taus, goff, keep, pscal if not ramda else None)


def stats(tab, iters, act, q) -> list:
    """``[(segment, SolverStats)]`` of the table's regularized rows (one problem each)."""
    T = len(tab.rows)
    if not any(r.seg is not None for r in tab.rows):
        return []
    tid = group_tensor(tab).to(act.device)
    n_act = torch.zeros(T, dtype=torch.float64, device=act.device).index_add_(
        0, tid, act.to(torch.float64)).tolist()
    return [(r.seg, SolverStats(iters[t], round(n_act[t]), r.layout.groups - round(n_act[t]),
                                math.nan, q[t]))
            for t, r in enumerate(tab.rows) if r.seg is not None]


def _ptr(x, off: int = 0) -> int:
    """Address of element ``off`` of ``x`` (0 for None)."""
    return 0 if x is None else x.data_ptr() + off * x.element_size()


# ----------------------------------------------------------------------------- chunked PG
FIRST_CHUNK = 4  # iterations of a first chunk without a hint (else FIRST_SHARE of the hint)
FIRST_SHARE = 0.6
NEXT_CHUNK = 3
COL_W, COL_Y, COL_Y2 = 6, 8, 9  # pointer columns of W, Y, Y'


def group_tensor(tab) -> torch.Tensor:
    """Per group (in the concatenated vectors): the index of its tensor."""
    counts = [gm[1] if gm[3] >= 0 else 0 for gm in tab.geom]
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def first_chunk(hint) -> int:
    """The first chunk: a share of the previous step's iterations (a stop inside a chunk re-runs
    it from its start, so it should end before the stop; later chunks are short)."""
    return FIRST_CHUNK if hint is None else max(2, int(FIRST_SHARE * hint))


def solve_pg_chunked(k, plan, tab, tau_t):
    """PG on every regularized tensor of the table with kernel set ``k``: ``k.stage()`` →
    per group ``(Σb², Σ(½P∘W0 − V)∘W0, max P)``; ``k.chunk(n, f, eta, src, dst)`` → per tensor
    and iteration Q's shares (``[T][max n]``), ``f`` updated in place; ``k.spare(t)`` allocates
    tensor t's ``Y'``; ``k.finish(f, ycol)``.  Returns (iterations, screening mask, Q) per tensor."""
    T = len(tab.rows)
    max_iters, rtol = plan.max_iters, plan.rtol
    bb, cst, pmax = k.stage()
    tid = group_tensor(tab).to(bb.device)
    tau = tau_t[tid]
    act = bb.sqrt() > tau
    eta = torch.where(act, 1.0 / pmax.to(torch.float64), torch.zeros_like(tau)).contiguous()
    const_t = torch.zeros(T, dtype=torch.float64, device=bb.device).index_add_(
        0, tid, cst * act).tolist()
    f = act.to(torch.float64).contiguous()  # f_0: the warm start W with screened groups set to 0
    hints = plan.hints
    names = [r.seg.name if r.seg is not None else None for r in tab.rows]
    done = [name is None for name in names]
    iters, q_last, q_prev, ycol = [0] * T, [math.nan] * T, [math.nan] * T, [COL_Y] * T
    pos, first, src, dst, spared = [0] * T, True, COL_W, COL_Y, False
    while not all(done):
        if dst == COL_Y2 and not spared:  # Y' on first need: the second chunk
            for t in range(T):
                if not done[t]:
                    k.spare(t)
            spared = True
        want = [first_chunk(hints.get(names[t])) if first else NEXT_CHUNK for t in range(T)]
        n = [0 if done[t] else min(max_iters - pos[t], want[t]) for t in range(T)]
        f_start = f.clone()
        q = k.chunk(n, f, eta, src, dst)
        q = [[x + const_t[t] for x in q[t][:n[t]]] for t in range(T)]
        rerun = [0] * T
        for t, m in stop_in_chunk(range(T), n, q, pos, q_prev, q_last, iters, done, ycol, dst,
                                  rtol, max_iters).items():
            rerun[t] = m
        if any(rerun):  # from the chunk's start up to each stopping iteration
            f_re = f_start.clone()
            k.chunk(rerun, f_re, eta, src, dst)
            f = torch.where(torch.tensor([r > 0 for r in rerun], device=f.device)[tid], f_re,
                            f).contiguous()
        src, dst, first = dst, (COL_Y2 if dst == COL_Y else COL_Y), False
    for t in range(T):
        if names[t] is not None:
            hints[names[t]] = iters[t]
    k.finish(f, ycol)
    return iters, act, q_last


def stop_in_chunk(units, n, q, pos, q_prev, q_last, iters, done, ycol, dst, rtol, max_iters):
    """The paper's stop rule on each iteration of a chunk, in order, for the ``units`` not done:
    ``q[u][m]`` is the complete Q of iteration ``pos[u] + m + 1``.  Updates the per-unit lists
    (``pos``, ``q_prev``, ``q_last``, ``iters``, ``done``; ``ycol[u] = dst``) and returns
    ``{u: m}`` for the units that stopped after ``m`` iterations, before the chunk's last (they
    re-run the chunk from its start up to there)."""
    stops = {}
    for u in units:
        if done[u]:
            continue
        for m in range(n[u]):
            j, qj = pos[u] + m + 1, q[u][m]
            q_prev[u], q_last[u], iters[u] = q_last[u], qj, j
            if pg_should_stop(q_prev[u], qj, j, rtol):
                done[u] = True
                if m + 1 < n[u]:
                    stops[u] = m + 1
                break
        pos[u] += n[u]
        ycol[u] = dst
        done[u] = done[u] or pos[u] >= max_iters
    return stops
