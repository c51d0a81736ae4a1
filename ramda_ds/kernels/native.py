"""RAMDA's step on CPU as fused C loops (``native.c``) over the per-step table (:mod:`.table`).

* Unregularized tensors: one pass, ``V, U, P`` and ``Ŵ = W0 − V/P``, ``W ← lerp(W, Ŵ, c)``.
* Exact solver: one pass per block of whole groups (~64K elements): the stage, screening, the
  safeguarded Newton of :func:`ramda_ds.solvers.solve_exact` while the block's ``P, b`` are packed
  in cache, ``Ŵ`` and the averaging.  Newton stops when every group *of the block* has converged
  (the torch path: every group of the tensor), so μ equals the torch path's to the solver's
  tolerance (8 float32 ulps), not necessarily bitwise.
* PG (the paper's stop rule): :func:`.sharded.solve_pg` (its chunks) with these kernels; ``P, b, Y, Y'``
  are stored item-packed (each block contiguous), so a chunk's iterations run in cache.
* Sharded views (:mod:`.sharded`): the same stage, finish and unregularized kernels on a table of
  pieces, and one pass per PG iteration (``ramda_pg_iter``) or Newton pass
  (``ramda_exact_stage`` / ``_iter`` / ``_finish``), the group sums completed across ranks between
  passes.

Every elementwise operation is the torch path's, op for op (``fmaf`` where ATen's CPU kernels
fuse), and every float64 group sum is over the same terms in another order, so the iterates and
stopping decisions are the torch path's to float32 rounding (bitwise on the tests' models).

Each pass is one ctypes call per thread over a contiguous share of the work items (blocks of whole
groups: no result depends on the number of threads); ctypes releases the GIL.  The library is
compiled on first use (:mod:`.native_build`); :func:`ramda_ds.kernels.native_available` says
whether that worked and the self-test (:mod:`.selftest`) matched the reference solvers.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from . import table
from .interface import KernelSet

F64 = torch.float64
ITEM_ELEMENTS = 1 << 16
MAX_WIDTH = 4096  # MAXW in native.c
_TOL32 = 8 * torch.finfo(torch.float32).eps

CALLS = [0]  # passes run (each one call per thread)
_POOL: list = []


def _pool():
    """One pool of torch.get_num_threads() workers (each keeps its C scratch for its lifetime)."""
    n = max(1, torch.get_num_threads())
    if not _POOL or _POOL[0][0] != n:
        if _POOL:
            _POOL[0][1].shutdown(wait=True)
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


_ITEMS: dict = {}  # (geometries, rows, threads) -> _Items: a param group's table repeats each step


def _items_for(geom, rows) -> "_Items":
    key = (tuple(map(tuple, geom)), tuple(rows), torch.get_num_threads())
    if key not in _ITEMS:
        if len(_ITEMS) > 64:
            _ITEMS.clear()
        _ITEMS[key] = _Items(geom, rows)
    return _ITEMS[key]


class _Items:
    """The work items of some tensors of a table, and their split over the threads."""

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
        status = [fn(*head, items.buf.data_ptr(), *ranges[0], *args)]
    else:
        futs = [_pool().submit(fn, *head, items.buf.data_ptr(), a, b, *args) for a, b in ranges]
        status = [fu.result() for fu in futs]
    if any(status):  # only ramda_exact returns one: its scratch could not be allocated
        raise MemoryError(f"{fn.__name__}: no memory for the per-thread scratch")


def _p(x):
    return 0 if x is None else x.data_ptr()


def run_exact(plan, tab) -> list:
    """One RAMDA step of an unsharded plan (its table ``tab``, built without scratch) with the
    exact solver fused in one pass per block of groups (stage, screening, Newton and the finish
    while the block is in cache); the unregularized rows in one pass before.
    ``[(segment, SolverStats)]``."""
    from .native_build import load

    k = _Kernels(load(), tab)
    k.free()
    if not k.items.n:
        return []
    iters, act = _exact(plan, k, tab, k.tau_t)
    return table.stats(tab, iters, act, [math.nan] * len(tab.rows))


class _Kernels(KernelSet):
    """The C kernels bound to one step's table (:class:`.interface.KernelSet`)."""

    def __init__(self, lib, tab):
        self.lib, self.tab = lib, tab
        self.ptrs = torch.tensor(tab.ptrs, dtype=torch.int64)
        self.geom = torch.tensor(tab.geom, dtype=torch.int64)
        self.scal = torch.tensor(tab.scal, dtype=F64)
        self.items = _items_for(tab.geom, [t for t, r in enumerate(tab.rows) if r.seg is not None])
        self.free_items = _items_for(tab.geom, [t for t, r in enumerate(tab.rows) if r.seg is None])
        self.head = (self.ptrs.data_ptr(), self.geom.data_ptr())
        self.head3 = self.head + (self.scal.data_ptr(),)
        self.spares = []
        self.tau_t = torch.tensor(tab.taus, dtype=F64)

    def free(self):
        _run(self.lib.ramda_free, self.head3, self.free_items)

    def stage(self):
        G = self.tab.G
        bb, cst, pmax = torch.zeros(G, dtype=F64), torch.zeros(G, dtype=F64), torch.zeros(G)
        fn, head = self._stage_fn()
        _run(fn, head, self.items, bb.data_ptr(), cst.data_ptr(), pmax.data_ptr())
        return bb, cst, pmax

    def _stage_fn(self):
        """PG's stage kernel and the leading arguments it takes."""
        return self.lib.ramda_pg_stage, self.head3

    def spare(self, t):
        self.spares.append(torch.empty_like(self.tab.rows[t].w))
        self.ptrs[t, table.COL_Y2] = self.spares[-1].data_ptr()

    def chunk(self, n, f, eta, src, dst):
        n_max, T = max(n), len(self.tab.rows)
        q_out = torch.zeros(self.items.n * n_max, dtype=F64)
        n_t = torch.tensor(n, dtype=torch.int32)
        _run(self.lib.ramda_pg_chunk, self.head, self.items, n_t.data_ptr(), n_max,
             self.tau_t.data_ptr(), eta.data_ptr(), f.data_ptr(), src, dst, q_out.data_ptr(),
             ranges=self.items.weighted([m + 1 for m in n]))
        return torch.zeros(T, n_max, dtype=F64).index_add_(
            0, self.items.tensor, q_out.view(-1, n_max)).tolist()

    def iterate(self, live, f, eta, src, dst):
        """One PG iteration of the rows with ``live[t]`` (sharded tensors, :mod:`.sharded`):
        ``Y_dst = ηb + (1 − ηP)∘(f∘Y_src)`` and per row slot ``[ΣY², ΣPY², ΣbY]`` (``[3, G]``)."""
        out = torch.zeros(3, self.tab.G, dtype=F64)
        live = live.to(torch.int32).contiguous()
        _run(self.lib.ramda_pg_iter, self.head, self.items, live.data_ptr(), eta.data_ptr(),
             f.data_ptr(), src, dst, out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(),
             ranges=self.items.weighted(live.tolist()))
        return out

    def exact_stage(self):
        """The exact solver's stage (:mod:`.sharded`): per row slot ``Σb², max P, min P``."""
        G = self.tab.G
        bb, pmax, pmin = torch.zeros(G, dtype=F64), torch.zeros(G), torch.zeros(G)
        _run(self.lib.ramda_exact_stage, self.head3, self.items, bb.data_ptr(), pmax.data_ptr(),
             pmin.data_ptr())
        return bb, pmax, pmin

    def exact_iter(self, live, mu):
        """One Newton pass of the rows with ``live[t]``: per row slot ``[Σb²/(P+μ)², Σb²/(P+μ)³]``."""
        out = torch.zeros(2, self.tab.G, dtype=F64)
        live = live.to(torch.int32).contiguous()
        _run(self.lib.ramda_exact_iter, self.head, self.items, live.data_ptr(), mu.data_ptr(),
             out[0].data_ptr(), out[1].data_ptr(), ranges=self.items.weighted(live.tolist()))
        return out

    def exact_finish(self, mu, act):
        _run(self.lib.ramda_exact_finish, self.head3, self.items, mu.data_ptr(), act.data_ptr())

    def finish(self, f, ycol):
        yc = torch.tensor(ycol, dtype=torch.int64)
        _run(self.lib.ramda_pg_finish, self.head3, self.items, f.data_ptr(), yc.data_ptr())


class _ProxGenKernels(_Kernels):
    """ProxGen's stage (AdamW's moments and D) with RAMDA's PG chunks and finish (c = 1)."""

    def __init__(self, lib, tab):
        super().__init__(lib, tab)
        self.pscal = torch.tensor(tab.pscal, dtype=F64)
        self.headp = self.head + (self.pscal.data_ptr(),)

    def free(self):
        _run(self.lib.proxgen_free, self.headp, self.free_items)

    def _stage_fn(self):
        return self.lib.proxgen_pg_stage, self.headp


def _exact(plan, k, tab, tau_t, max_iters=50):
    regs = [(t, r.seg) for t, r in enumerate(tab.rows) if r.seg is not None]
    G = tab.G
    warm = plan.warm
    pos_in = None
    if warm is not None:  # where each group's root sat in its bracket last step (1: the end)
        parts = [warm.get((seg.name, seg.lo, seg.hi)) for _, seg in regs]
        parts = [q.to(F64) if q is not None and q.numel() == seg.groups.num_groups
                 else torch.ones(seg.groups.num_groups, dtype=F64) for q, (_, seg) in zip(parts, regs)]
        pos_in = torch.cat(parts).contiguous()
    pos_out = torch.ones(G, dtype=F64)
    act = torch.zeros(G, dtype=torch.float32)
    passes = torch.zeros(k.items.n, dtype=torch.int32)
    _run(k.lib.ramda_exact, k.head3, k.items, tau_t.data_ptr(), _p(pos_in), pos_out.data_ptr(),
         act.data_ptr(), passes.data_ptr(), max_iters, _TOL32)
    if warm is not None:
        for (t, seg), part in zip(regs, pos_out.split([seg.groups.num_groups for _, seg in regs])):
            warm[(seg.name, seg.lo, seg.hi)] = part.clone()
    per_t = torch.zeros(len(tab.rows), dtype=torch.int64).scatter_reduce_(
        0, k.items.tensor, passes.to(torch.int64), "amax").tolist()
    return per_t, act > 0
