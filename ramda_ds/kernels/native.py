"""RAMDA's step on CPU as fused C loops (``native.c``) over the per-step table (:mod:`.table`).

* Unregularized tensors: one pass, ``V, U, P`` and ``Ŵ = W0 − V/P``, ``W ← lerp(W, Ŵ, c)``.
* Exact solver: one pass per block of whole groups (~64K elements): the stage, screening, the
  safeguarded Newton of :func:`ramda_ds.solvers.solve_exact` while the block's ``P, b`` are in
  cache, ``Ŵ`` and the averaging.  Newton stops when every group *of the block* has converged
  (the torch path: every group of the tensor), so μ equals the torch path's to the solver's
  tolerance (8 float32 ulps), not bitwise.
* PG (Alg. 2, the paper's stop rule): a stage pass, then *chunks* of iterations: each block runs
  ``n`` iterations in cache, computing its groups' soft-threshold factors itself and its share of
  Q for every iteration; the host sums the shares per tensor and applies the stop rule to each
  iteration of the chunk.  A tensor that stopped inside a chunk re-runs its last chunk from that
  chunk's start up to the stopping iteration (the chunk read ``Y`` and wrote ``Y'``, so the start
  is intact).  Chunk lengths come from each tensor's iteration count at the previous step (a hint
  kept in memory: it changes the speed, never the result).  Every iteration is computed with the
  torch path's elementwise ops, so the iterates and stopping iterations are the torch path's;
  the float64 group sums add in another order (results agree to float32 rounding; on the tests'
  models they are bitwise equal).

Each pass is one ctypes call per thread over a contiguous share of the work items (blocks of whole
groups, so no result depends on the number of threads); ctypes releases the GIL.  The library is
compiled on first use (:mod:`.native_build`); :func:`available` says whether that worked and a
small self test matched the torch path.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from . import table
from ..solvers import SolverStats

F64 = torch.float64
ITEM_ELEMENTS = 1 << 16
MAX_WIDTH = 4096  # MAXW in native.c
FIRST_CHUNK = 4  # PG iterations of a first chunk without a hint (else FIRST_SHARE of the hint)
FIRST_SHARE = 0.6
NEXT_CHUNK = 3
COL_W, COL_Y, COL_Y2 = 6, 8, 9  # pointer columns (native.c)
_TOL32 = 8 * torch.finfo(torch.float32).eps

CALLS = [0]  # passes run (each one call per thread)
_POOL: list = []
_OK: dict = {}


def _pool(n):
    if not _POOL or _POOL[0][0] != n:
        _POOL[:] = [(n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="ramda_native"))]
    return _POOL[0][1]


def _items(geom, rows):
    """Work items ``(tensor, first group, end group)`` of tensors ``rows``, and their sizes."""
    items, sizes = [], []
    for t in rows:
        R, C, K, _ = geom[t]
        w = max(1, min(MAX_WIDTH, ITEM_ELEMENTS // max(1, R * K), C))
        if K == 1 and w < C:
            w = min(C, max(16, w - w % 16))
        for c0 in range(0, C, w):
            items.append((t, c0, min(C, c0 + w)))
            sizes.append(R * K * (min(C, c0 + w) - c0))
    return items, sizes


def _split(sizes, n):
    """``n`` contiguous ranges of items with about equal element counts."""
    total, bounds, acc = sum(sizes), [0], 0
    for i, s in enumerate(sizes):
        acc += s
        if len(bounds) < n and acc >= total * len(bounds) / n:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class _Items:
    def __init__(self, geom, rows):
        items, sizes = _items(geom, rows)
        self.n, self.sizes = len(items), sizes
        self.tensor = torch.tensor([it[0] for it in items], dtype=torch.int64)
        self.tensors = [it[0] for it in items]
        self.buf = torch.tensor(items, dtype=torch.int64).view(-1, 3)
        self.threads = max(1, torch.get_num_threads())
        self.ranges = _split(sizes, self.threads)

    def weighted(self, per_tensor):
        """Thread ranges balanced for ``per_tensor[t]`` passes over tensor t's items."""
        return _split([s * per_tensor[t] for s, t in zip(self.sizes, self.tensors)], self.threads)


def _run(fn, head, items: _Items, *args, ranges=None):
    """``fn(*head, items, i0, i1, *args)`` over the items, one call per thread."""
    if not items.n:
        return
    CALLS[0] += 1
    ranges = ranges or items.ranges
    if len(ranges) == 1:
        fn(*head, items.buf.data_ptr(), *ranges[0], *args)
        return
    futs = [_pool(len(ranges)).submit(fn, *head, items.buf.data_ptr(), a, b, *args)
            for a, b in ranges]
    for fu in futs:
        fu.result()


def _p(x):
    return 0 if x is None else x.data_ptr()


def ramda_native_step(opt, group, present) -> bool:
    """One RAMDA step of ``group`` on the CPU kernels; False (nothing done) if it does not apply."""
    from .native_build import load

    if not table.eligible(opt, group):
        return False
    pg = group["solver"] != "exact"
    tab = table.build(opt, group, present, pg)
    if tab is None:
        return False
    if not tab.rows:
        return True
    lib = load()
    ptrs = torch.tensor(tab.ptrs, dtype=torch.int64)
    geom = torch.tensor(tab.geom, dtype=torch.int64)
    scal = torch.tensor(tab.scal, dtype=F64)
    reg = [t for t, r in enumerate(tab.rows) if r[4] is not None]
    free = _Items(tab.geom, [t for t, r in enumerate(tab.rows) if r[4] is None])
    items = _Items(tab.geom, reg)
    _run(lib.ramda_free, (ptrs.data_ptr(), geom.data_ptr(), scal.data_ptr()), free)
    tau_t = torch.tensor(tab.taus, dtype=F64)
    if reg:
        solve = _pg if pg else _exact
        iters, act, q = solve(opt, group, lib, tab, ptrs, geom, scal, items, tau_t)
        T = len(tab.rows)
        counts = [gm[1] if gm[3] >= 0 else 0 for gm in tab.geom]
        tid = torch.repeat_interleave(torch.arange(T), torch.tensor(counts))
        n_act = torch.zeros(T, dtype=F64).index_add_(0, tid, act.to(F64)).tolist()
        for t in reg:
            seg, lay = tab.rows[t][4], tab.rows[t][5]
            opt.last_stats[seg.name] = SolverStats(iters[t], round(n_act[t]),
                                                   lay.groups - round(n_act[t]), math.nan, q[t])
    for p, w, st, z, seg, lay in tab.rows:
        if group["keep_structured"]:
            opt.state[p]["structured"] = opt.view.wrap_state(p, z)
        opt._maybe_restart(group, st, w)
    return True


def _exact(opt, group, lib, tab, ptrs, geom, scal, items, tau_t, max_iters=50):
    regs = [(t, tab.rows[t][4]) for t in range(len(tab.rows)) if tab.rows[t][4] is not None]
    G = tab.G
    warm = opt._warm_roots if group.get("warm_start") else None
    pos_in = None
    if warm is not None:  # where each group's root sat in its bracket last step (1: the end)
        parts = [warm.get((seg.name, seg.lo, seg.hi)) for _, seg in regs]
        parts = [q.to(F64) if q is not None and q.numel() == seg.groups.num_groups
                 else torch.ones(seg.groups.num_groups, dtype=F64) for q, (_, seg) in zip(parts, regs)]
        pos_in = torch.cat(parts).contiguous()
    pos_out = torch.ones(G, dtype=F64)
    act = torch.zeros(G, dtype=torch.float32)
    passes = torch.zeros(items.n, dtype=torch.int32)
    _run(lib.ramda_exact, (ptrs.data_ptr(), geom.data_ptr(), scal.data_ptr()), items,
         tau_t.data_ptr(), _p(pos_in), pos_out.data_ptr(), act.data_ptr(), passes.data_ptr(),
         max_iters, _TOL32)
    if warm is not None:
        for (t, seg), part in zip(regs, pos_out.split([seg.groups.num_groups for _, seg in regs])):
            warm[(seg.name, seg.lo, seg.hi)] = part.clone()
    per_t = torch.zeros(len(tab.rows), dtype=torch.int64).scatter_reduce_(
        0, items.tensor, passes.to(torch.int64), "amax").tolist()
    return per_t, act > 0, [math.nan] * len(tab.rows)


def _pg(opt, group, lib, tab, ptrs, geom, scal, items, tau_t):
    T, G = len(tab.rows), tab.G
    max_iters, rtol = group["max_iters"], group["rtol"]
    head = (ptrs.data_ptr(), geom.data_ptr())
    bb, cst, pmax = torch.zeros(G, dtype=F64), torch.zeros(G, dtype=F64), torch.zeros(G)
    _run(lib.ramda_pg_stage, head + (scal.data_ptr(),), items, bb.data_ptr(), cst.data_ptr(),
         pmax.data_ptr())
    counts = [gm[1] if gm[3] >= 0 else 0 for gm in tab.geom]
    tid = torch.repeat_interleave(torch.arange(T), torch.tensor(counts))
    tau = tau_t[tid]
    act = bb.sqrt() > tau
    eta = torch.where(act, 1.0 / pmax.to(F64), torch.zeros_like(tau)).contiguous()
    const_t = torch.zeros(T, dtype=F64).index_add_(0, tid, cst * act).tolist()
    f = act.to(F64).contiguous()  # f_0: the warm start W with screened groups set to 0
    hints = opt.__dict__.setdefault("_pg_chunk_hint", {})
    names = [r[4].name if r[4] is not None else None for r in tab.rows]
    done = [names[t] is None for t in range(T)]
    iters, q_last, q_prev = [0] * T, [math.nan] * T, [math.nan] * T
    ycol = torch.full((T,), COL_Y, dtype=torch.int64)
    pos, first, src, dst, spare = [0] * T, True, COL_W, COL_Y, []
    while not all(done):
        if dst == COL_Y2 and not spare:  # Y' on first need: the second chunk
            for t in range(T):
                if not done[t]:
                    spare.append(torch.empty_like(tab.rows[t][1]))
                    ptrs[t, COL_Y2] = spare[-1].data_ptr()
        want = [_first_chunk(hints.get(names[t])) if first else NEXT_CHUNK for t in range(T)]
        n = [0 if done[t] else min(max_iters - pos[t], want[t]) for t in range(T)]
        n_max = max(n)
        f_start = f.clone()
        q_out = torch.zeros(items.n * n_max, dtype=F64)
        _chunk(lib, head, items, n, n_max, tau_t, eta, f, src, dst, q_out)
        q = torch.zeros(T, n_max, dtype=F64).index_add_(0, items.tensor, q_out.view(-1, n_max))
        q = q.tolist()
        rerun = [0] * T
        for t in range(T):
            if done[t]:
                continue
            for k in range(n[t]):  # the stop rule on each iteration of the chunk, in order
                j, qj = pos[t] + k + 1, q[t][k] + const_t[t]
                q_prev[t], q_last[t], iters[t] = q_last[t], qj, j
                if j >= 2 and (q_prev[t] - qj) / (abs(qj) + 1.0) < rtol:
                    done[t], rerun[t] = True, (k + 1 if k + 1 < n[t] else 0)
                    break
            pos[t] += n[t]
            ycol[t] = dst
            done[t] = done[t] or pos[t] >= max_iters
        for m in sorted(set(rerun) - {0}):  # from the chunk's start up to the stopping iteration
            f_re = f_start.clone()
            _chunk(lib, head, items, [m if r == m else 0 for r in rerun], m, tau_t, eta, f_re,
                   src, dst, torch.zeros(items.n * m, dtype=F64))
            f = torch.where(torch.tensor([r == m for r in rerun])[tid], f_re, f).contiguous()
        src, dst, first = dst, (COL_Y2 if dst == COL_Y else COL_Y), False
    for t in range(T):
        if names[t] is not None:
            hints[names[t]] = iters[t]
    _run(lib.ramda_pg_finish, head + (scal.data_ptr(),), items, f.data_ptr(), ycol.data_ptr())
    return iters, act, q_last


def _first_chunk(hint):
    """The first chunk: a share of the previous step's iterations (a stop inside a chunk re-runs
    it from its start, so it should end before the stop; later chunks are short)."""
    return FIRST_CHUNK if hint is None else max(2, int(FIRST_SHARE * hint))


def _chunk(lib, head, items, n, n_max, tau_t, eta, f, src, dst, q_out):
    n_t = torch.tensor(n, dtype=torch.int32)
    _run(lib.ramda_pg_chunk, head, items, n_t.data_ptr(), n_max, tau_t.data_ptr(), eta.data_ptr(),
         f.data_ptr(), src, dst, q_out.data_ptr(), ranges=items.weighted([m + 1 for m in n]))


def available() -> bool:
    """Whether the C kernels compile here and a tiny RAMDA run (PG and exact) matches torch; once
    per process.  ``backend="auto"`` uses them on CPU only then (else warns and uses torch)."""
    if "ok" not in _OK:
        try:
            from .native_build import load

            load()
            _OK["ok"] = self_test()
            if not _OK["ok"]:
                warnings.warn("ramda_ds: the native CPU kernels do not match the torch step on "
                              "this machine; using torch")
        except Exception as e:  # noqa: BLE001 - no compiler, a failed compile: use torch
            warnings.warn(f"ramda_ds: the native CPU kernels are unavailable ({e}); using torch")
            _OK["ok"] = False
    return _OK["ok"]


def self_test() -> bool:
    """Two RAMDA steps of a tiny model with backends ``"torch"`` and ``"native"``, for each
    solver; True when the weights agree to 1e-5."""
    from ..optim import RAMDA
    from ..param_groups import build_param_groups

    for solver in ("pg", "exact"):
        nets = []
        for backend in ("torch", "native"):
            net = _seeded_linear(16, 24)  # (the caller's global RNG is left alone)
            opt = RAMDA(build_param_groups(net, "group_lasso", lam=1e-2), lr=0.05, solver=solver,
                        backend=backend)
            g = torch.Generator().manual_seed(1)
            for _ in range(2):
                net.weight.grad = torch.randn(24, 16, generator=g)
                net.bias.grad = torch.randn(24, generator=g)
                opt.step()
            nets.append(net.weight.detach().clone())
        if not torch.allclose(nets[0], nets[1], rtol=1e-5, atol=1e-6):
            return False
    return True


def _seeded_linear(n_in, n_out, device="cpu"):
    net = torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out, device=device)  # no RNG draw
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.2)
        net.bias.copy_(torch.randn(n_out, generator=g) * 0.2)
    return net
