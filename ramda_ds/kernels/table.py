r"""The per-step table of a param group's tensors that fused kernels consume.

One row per tensor: pointers to ``g, V, U, W0, P, b, W, Ŵ, Y, Y'`` (float32, contiguous), its
``[R, C, K]`` geometry with ``goff``, the offset of its groups in the concatenation of every
tensor's per-group vectors (−1: unregularized), and the scalars ``s = lr·√t, ε, c, mode``.
:func:`build` advances each tensor's step and α exactly as the torch path does and allocates the
scratch ``P, b`` and ``Y`` of PG's regularized tensors, so a kernel set (:mod:`.native` on CPU)
only needs the table to run a pass for all tensors at once.

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

:func:`build` applies to unsharded, contiguous float32 tensors regularized by the group lasso
whole or not at all, with ``inexact_eps0`` unset; sharded views build their table of pieces in
:mod:`.sharded` (with :func:`ramda_tensor`, :func:`ramda_ptrs` and the ProxGen counterparts
here); anything else takes the torch path.
"""

from __future__ import annotations

import math

import torch

from ..groups import GroupLayout
from ..solvers import SolverStats

F64 = torch.float64
MODE_EXACT, MODE_PG, MODE_FREE = 0, 1, 2


def eligible(opt, group) -> bool:
    """Whether this group's step can run on the table at all (settings; tensors are checked in
    :func:`build`)."""
    return (opt.view.comm.world_size == 1 and group["regularizer"] in (None, "group_lasso")
            and group.get("inexact_eps0") is None and bool(group["params"]))


class Table:
    """``rows[t] = (p, w, state, Ŵ buffer or None, segment or None, layout)``; ``ptrs``, ``geom``,
    ``scal``: lists per row; ``taus``: τ per row (0 unregularized); ``G``: groups in all."""

    def __init__(self, rows, ptrs, geom, scal, taus, G, keep):
        self.rows, self.ptrs, self.geom, self.scal = rows, ptrs, geom, scal
        self.taus, self.G, self._keep = taus, G, keep  # _keep: buffers the pointers refer to


def why_not(opt, group, k, p, w, device_type: str | None = None) -> str | None:
    """Why tensor ``p`` (its flat local ``w``) cannot take a table step, or None if it can.

    Also checks the optimizer state that already exists: a float64 checkpoint loaded into a
    float32 model keeps float64 V/U/W0, which a float32 kernel must not read."""
    from ..optim.base import is_regularized

    if p.dtype != torch.float32:
        return f"param dtype {p.dtype}"
    if not w.is_contiguous() or w.data_ptr() != p.data_ptr():
        return "not a contiguous row-major tensor (e.g. channels_last)"
    if device_type is not None and w.device.type != device_type:
        return f"on {w.device}, not {device_type}"
    segs = opt._segments(group, p, k)
    reg = [s for s in segs if is_regularized(group, s)]
    whole = (len(segs) == 1 and segs[0].span is None and segs[0].lo == 0
             and segs[0].hi == w.numel())
    if reg and not (whole and reg[0].groups.group_lo == 0 and len(reg[0].groups.pieces) == 1):
        return "regularized only in part, or sharded"
    return state_problem(opt, p, w)


def state_problem(opt, p, w) -> str | None:
    """Why ``p``'s existing optimizer state cannot be read by a float32 kernel, or None."""
    st = opt.state.get(p) or {}
    for key in sorted(opt.state_keys()):
        t = st.get(key)
        if t is not None and torch.is_tensor(t):
            t = opt.view.local(t)
        if t is not None and (not torch.is_tensor(t) or t.dtype != torch.float32
                              or not t.is_contiguous() or t.device != w.device
                              or t.numel() != w.numel()):
            return f"state {key} is {getattr(t, 'dtype', type(t).__name__)}, not float32 like the param"
    return None


def ramda_tensor(opt, group, p, w):
    """Advance tensor ``p``'s step and α exactly as the torch path does: ``(state, [s, ε, c],
    α)`` with ``s = lr·√t`` (the row's scalars, without the mode)."""
    st = opt.local_state(p, w)
    stage, i = opt._advance(group, st)
    s = opt._decayed(group, "lr", stage) * math.sqrt(i)  # s_t = lr·√t
    st["alpha"] += s
    return st, [s, opt._decayed(group, "eps", stage), opt._c(group, stage, i)], st["alpha"].item()


def proxgen_tensor(opt, group, p, w):
    """ProxGen's counterpart of :func:`ramda_tensor`: ``(state, [a = lr/(1−β1^t), ε, 1−β1, β2,
    1−β2, √(1−β2^t), 1−lr·wd], lr)`` (the AdamW stage's scalars, without the mode)."""
    b1, b2 = group["betas"]
    st = opt.local_state(p, w)
    lr = opt._decayed(group, "lr", opt._advance(group, st)[0])
    t = st["step"].item()  # per tensor, as AdamW
    return st, [lr / (1 - b1 ** t), group["eps"], 1 - b1, b2, 1 - b2, math.sqrt(1 - b2 ** t),
                1 - lr * group["weight_decay"]], lr


def ramda_ptrs(g, st, w, P, b, z, Y, off: int = 0) -> list[int]:
    """A RAMDA row's pointers ``g, V, U, W0, P, b, W, Ŵ, Y, Y'``; ``off``: the row's first element
    in the flat tensors ``g, V, U, W0, W, Ŵ`` (``P, b, Y`` are the row's own)."""
    return [_ptr(g, off), _ptr(st["grad_sum"], off), _ptr(st["grad_sq_sum"], off),
            _ptr(st["initial"], off), _ptr(P), _ptr(b), _ptr(w, off), _ptr(z, off), _ptr(Y), 0]


def proxgen_ptrs(g, st, w, P, b, z, Y, off: int = 0) -> list[int]:
    """A ProxGen row's pointers ``g, m, v, -, P, b, W, -, Y, Y'`` (see :func:`ramda_ptrs`)."""
    return [_ptr(g, off), _ptr(st["exp_avg"], off), _ptr(st["exp_avg_sq"], off), 0, _ptr(P),
            _ptr(b), _ptr(w, off), 0, _ptr(Y), 0]


def build(opt, group, present, pg: bool, device_type: str | None = None):
    """The table for one step of the tensors of ``group`` that qualify (:func:`why_not`; on the
    first one's device, of type ``device_type`` when given), advancing their step and α.  The
    others are left untouched for the torch path: ``table.handled`` are the ids taken."""
    todo = _qualifying(opt, group, present, device_type)
    from ..optim.base import group_tau

    rows, ptrs, geom, scal, taus, keep, goff = [], [], [], [], [], [], 0
    for p, w, g, seg in todo:
        st, sc, alpha = ramda_tensor(opt, group, p, w)
        P, b = (torch.empty_like(w), torch.empty_like(w)) if pg and seg is not None else (None, None)
        Y = torch.empty_like(w) if pg and seg is not None else None  # Y' is allocated on demand
        z = torch.empty_like(w) if group["keep_structured"] else None
        if seg is not None:
            lay = seg.groups.layout
            geom.append([lay.rows, lay.groups, lay.inner, goff])
            goff += lay.groups
            taus.append(group_tau(group, seg, alpha))
        else:  # unregularized: Ŵ = W0 − V/P, no groups
            lay = GroupLayout(1, w.numel(), 1)
            geom.append([1, w.numel(), 1, -1])
            taus.append(0.0)
        mode = MODE_FREE if seg is None else (MODE_PG if pg else MODE_EXACT)
        ptrs.append(ramda_ptrs(g, st, w, P, b, z, Y))
        scal.append(sc + [float(mode)])
        rows.append((p, w, st, z, seg, lay))
        keep.append((g, P, b, Y))
    tab = Table(rows, ptrs, geom, scal, taus, goff, keep)
    tab.handled = {id(r[0]) for r in rows}
    return tab


def build_proxgen(opt, group, present):
    """:func:`build` for ProxGen (PG): rows ``g, m, v, -, P, b, W, -, Y, Y'`` and per tensor the
    scalars of its AdamW stage ``a = lr/(1−β1^t), ε, 1−β1, β2, 1−β2, √(1−β2^t), 1−lr·wd, mode``
    (``Table.pscal``); τ = lr·λ·w_g; c = 1 (``W ← Ŵ``)."""
    from ..optim.base import group_tau

    todo = _qualifying(opt, group, present, "cpu")
    rows, ptrs, geom, scal, pscal, taus, keep, goff = [], [], [], [], [], [], [], 0
    for p, w, g, seg in todo:
        st, psc, lr = proxgen_tensor(opt, group, p, w)
        P, b, Y = ((torch.empty_like(w), torch.empty_like(w), torch.empty_like(w))
                   if seg is not None else (None, None, None))
        if seg is not None:
            lay = seg.groups.layout
            geom.append([lay.rows, lay.groups, lay.inner, goff])
            goff += lay.groups
            taus.append(group_tau(group, seg, lr))
        else:
            lay = GroupLayout(1, w.numel(), 1)
            geom.append([1, w.numel(), 1, -1])
            taus.append(0.0)
        mode = MODE_FREE if seg is None else MODE_PG
        ptrs.append(proxgen_ptrs(g, st, w, P, b, None, Y))
        scal.append([0.0, group["eps"], 1.0, float(mode)])  # c = 1: the finish writes W = Ŵ
        pscal.append(psc + [float(mode)])
        rows.append((p, w, st, None, seg, lay))
        keep.append((g, P, b, Y))
    tab = Table(rows, ptrs, geom, scal, taus, goff, keep)
    tab.pscal, tab.handled = pscal, {id(r[0]) for r in rows}
    return tab


def _qualifying(opt, group, present, device_type):
    """``(p, w, g, regularized segment or None)`` of the tensors that take a table step (on the
    first one's device), decided before anything changes."""
    todo, first = [], None
    n_writeback = len(opt._writeback)
    for k, p, w, g in opt._params(group, present):
        first = w.device if first is None else first
        if (why_not(opt, group, k, p, w, device_type) is not None or w.device != first
                or g.dtype != torch.float32 or g.device != w.device):
            continue
        segs = [s for s in opt._segments(group, p, k) if _regularized(group, s)]
        todo.append((p, w, g.contiguous(), segs[0] if segs else None))
    del opt._writeback[n_writeback:]  # only rejected (non-contiguous) tensors add entries: the
    #                                   torch path collects them again
    return todo


def _regularized(group, seg) -> bool:
    from ..optim.base import is_regularized

    return is_regularized(group, seg)


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


def solve_pg_chunked(k, opt, group, tab, tau_t):
    """PG on every regularized tensor of the table with kernel set ``k``: ``k.stage()`` →
    per group ``(Σb², Σ(½P∘W0 − V)∘W0, max P)``; ``k.chunk(n, f, eta, src, dst)`` → per tensor
    and iteration Q's shares (``[T][max n]``), ``f`` updated in place; ``k.spare(t)`` allocates
    tensor t's ``Y'``; ``k.finish(f, ycol)``.  Returns (iterations, screening mask, Q) per tensor."""
    T = len(tab.rows)
    max_iters, rtol = group["max_iters"], group["rtol"]
    bb, cst, pmax = k.stage()
    tid = group_tensor(tab).to(bb.device)
    tau = tau_t[tid]
    act = bb.sqrt() > tau
    eta = torch.where(act, 1.0 / pmax.to(torch.float64), torch.zeros_like(tau)).contiguous()
    const_t = torch.zeros(T, dtype=torch.float64, device=bb.device).index_add_(
        0, tid, cst * act).tolist()
    f = act.to(torch.float64).contiguous()  # f_0: the warm start W with screened groups set to 0
    hints = opt.__dict__.setdefault("_pg_chunk_hint", {})
    names = [r[4].name if r[4] is not None else None for r in tab.rows]
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
            if j >= 2 and (q_prev[u] - qj) / (abs(qj) + 1.0) < rtol:
                done[u] = True
                if m + 1 < n[u]:
                    stops[u] = m + 1
                break
        pos[u] += n[u]
        ycol[u] = dst
        done[u] = done[u] or pos[u] >= max_iters
    return stops


def record(opt, group, tab, iters, act, q, restarts: bool = True) -> None:
    """Solver statistics per regularized tensor, Ŵ (``keep_structured``) and restarts (RAMDA)."""
    T = len(tab.rows)
    if any(r[4] is not None for r in tab.rows):
        tid = group_tensor(tab).to(act.device)
        n_act = torch.zeros(T, dtype=torch.float64, device=act.device).index_add_(
            0, tid, act.to(torch.float64)).tolist()
        for t, (p, w, st, z, seg, lay) in enumerate(tab.rows):
            if seg is not None:
                opt.last_stats[seg.name] = SolverStats(iters[t], round(n_act[t]),
                                                       lay.groups - round(n_act[t]), math.nan,
                                                       q[t])
    for p, w, st, z, seg, lay in tab.rows if restarts else ():
        if group["keep_structured"]:
            opt.state[p]["structured"] = opt.view.wrap_state(p, z)
        opt._maybe_restart(group, st, w)
