r"""The rows that fused kernels consume, and the pieces of PG's chunk scheme.

A table (built from a step plan by :func:`.sharded.build`, sharded or not) has one row per
tensor, or per piece of a segment: pointers to ``g, s1, s2, W0, P, b, W, Ŵ, Y, Y'`` (float32,
contiguous; RAMDA ``s1, s2 = V, U``, ProxGen ``m, v``; :func:`row_ptrs`), its ``[R, C, K]``
geometry with ``goff``, the offset of its groups in the concatenation of every row's per-group
vectors (−1: an unregularized row), and the scalars ``s = lr·√t, ε, c, mode`` (ProxGen also its
AdamW stage's, ``pscal``; :func:`row_scalars`).  A kernel set (:mod:`.interface`) only needs the
table to run a pass for all rows at once.

PG's chunks (:func:`.sharded._chunks`): ``n`` iterations per block of whole groups, each block
computing its groups' soft-threshold factors and its share of Q for every iteration (iteration
j: ``Z = f_{j−1}∘Y_{j−1}``, ``Y_j = ηb + (1 − ηP)∘Z``, per group ``ΣY², ΣPY², ΣbY``,
``f_j = max(0, 1 − ητ/‖Y_j‖)``, ``Q_j = Σ_g ½f²ΣPY² − fΣbY + τf‖Y‖ + const``; ``Y_0 = W``,
``f_0`` = the screening mask).  The host applies the stop rule to each iteration of the chunk in
order (:func:`stop_in_chunk`).  A problem that stopped inside a chunk re-runs that chunk from its
start (the chunk read ``Y`` and wrote ``Y'``, so the start is intact) up to the stopping
iteration.  Chunk lengths come from each problem's iteration count at the previous step
(:func:`first_chunk`: a hint that changes the speed, never the result).
"""

from __future__ import annotations

import math

import torch

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
