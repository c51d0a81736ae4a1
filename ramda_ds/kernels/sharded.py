r"""The fast step under sharded views (ZeRO-1/2/3, FSDP2, FSDP1): table rows are *pieces*.

A handed tensor holds segments of parameters (ZeRO-1/2: many, cut anywhere; FSDP: one) and a
segment's groups are cut into at most five pieces ``[rows, ncols, inner]``
(:class:`ramda_ds.groups.SegmentGroups`).  The table's rows are those pieces, plus *free* rows
for the rest of the tensor (unregularized segments, padding: ``Ŵ = W0 − V/P`` as on the torch
path), so the stage, finish and unregularized kernels of :mod:`.native` and :mod:`.triton_pg`
run on it unchanged.  An unsharded plan is the special case of whole tensors (one piece per
regularized tensor, no spanning group).  PG: a group that spans ranks is complete only after an
all-reduce, so :func:`solve_pg` runs one iteration per pass for those problems:

* pass j (``k.iterate``): ``Z = f_{j−1}∘Y_{j−1}``, ``Y_j = ηb + (1 − ηP)∘Z``, and per row slot the
  partial sums ``ΣY², ΣPY², ΣbY``;
* host, on the concatenated vectors of every problem at once: add the row slots into the
  problem's groups (pieces of one segment share groups), complete the spanning groups with one
  all-reduce that also completes ``Q`` of iterate ``j−1`` (the torch path's delayed stop
  decision), then ``f_j = max(0, 1 − ητ/‖Y_j‖)`` and the shares of ``Q_j``.

Problems with no spanning group (a parameter whole on one ZeRO-1/2 partition, an FSDP2
``Shard(1)`` column block, a replicated tensor) have each group complete in one row, so they run
PG as *chunks* instead (:func:`_chunks`, the scheme described in :mod:`.table`): several
iterations per pass in cache and one all-reduce per chunk for their shares of ``Q``.

A *problem* is one regularized segment (empty ones included), exactly as on the torch path; every
rank builds the same problems in the same order and makes the same stop decisions, so both ranks
issue the same collectives: two for screening (``Σb²`` by sum, ``max P`` by max), one per chunk,
one per iteration of the problems with spanning groups, one for the statistics.  The host work
per iteration is a fixed number of ops on concatenated vectors, whatever the number of tensors.  Problems the view solves locally
(replicated tensors, ``local_solve`` tensors with no spanning group) run in the same passes with
no communication and stop on their own ``Q``, as on the torch path.  The all-reduce carries the
spanning groups of the problems still iterating, as the torch path's does.

Which tensors take the kernels is the optimizer's decision (:func:`ramda_ds.optim.fast.select`),
made from properties every rank shares (dtypes, contiguity, state), never from the local shard,
so no rank takes the torch path while another takes this one; this module runs the plan it
builds (:mod:`.plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..groups import GroupLayout
from ..solvers import SolverStats, newton_update, pg_should_stop, shrink_factor
from . import table

F64 = torch.float64


@dataclass
class Problem:
    """One regularized segment: its groups are slots ``[slot, slot + n)`` of the concatenated
    per-group vectors."""

    seg: object
    tensor: int  # index into Sharded.tensors
    slot: int
    n: int
    tau: float
    delayed: bool  # its groups' sums and Q are completed by the view's all-reduce
    whole: bool = False  # every group whole on one rank (no spanning group): PG runs chunks


class Sharded:
    """The table of one sharded step, its problems and the index vectors that map row slots to
    problem slots and spanning slots to the all-reduce buffer.  The index vectors depend only on
    the segments, so they are built once and kept (``cache``: per param group, checked against
    the segments by identity); each step then costs a fixed number of ops, not a few per tensor."""

    def __init__(self, tab, tensors, probs, row_prob, slot_ranges, comm, device, cache):
        self.tab, self.tensors, self.probs, self.comm = tab, tensors, probs, comm
        self.G = sum(pr.n for pr in probs)
        self.nP = len(probs)
        self.delayed = [pr.delayed for pr in probs]
        self.device = device
        segs = [pr.seg for pr in probs]
        key = (tuple(row_prob), tuple(slot_ranges), str(device))
        hit = cache.get("segs") is not None and len(cache["segs"]) == len(segs) and \
            all(a is b for a, b in zip(cache["segs"], segs)) and cache.get("key") == key
        if not hit:
            cache.clear()
            cache.update(self._index(probs, row_prob, slot_ranges, device), segs=segs, key=key)
        for name in ("row_prob_cpu", "slot_map", "prob_of", "owned", "span_idx", "span_pos",
                     "pos_prob", "L", "slot_row"):
            setattr(self, name, cache[name])
        self.tau = torch.tensor([pr.tau for pr in probs], dtype=F64)[cache["prob_of_cpu"]].to(
            device)  # τ per problem slot (changes every step with α)

    @staticmethod
    def _index(probs, row_prob, slot_ranges, device) -> dict:
        i64 = dict(dtype=torch.int64, device=device)
        counts = [pr.n for pr in probs]
        out = dict(row_prob_cpu=torch.tensor(row_prob, dtype=torch.int64))  # −1: a free row
        out["slot_map"] = (torch.cat([torch.arange(a, a + n) for a, n in slot_ranges])
                           if slot_ranges else torch.zeros(0, dtype=torch.int64)).to(device)
        out["prob_of_cpu"] = torch.repeat_interleave(torch.arange(len(probs)),
                                                     torch.tensor(counts, dtype=torch.int64))
        out["prob_of"] = out["prob_of_cpu"].to(device)
        reg_rows = [t for t, i in enumerate(row_prob) if i >= 0]  # (in slot order)
        out["slot_row"] = torch.repeat_interleave(  # per row slot: its row
            torch.tensor(reg_rows, dtype=torch.int64),
            torch.tensor([n for _, n in slot_ranges], dtype=torch.int64)).to(device)
        owned, idx, pos, pos_prob, L = [], [], [], [], 0
        for pr in probs:
            span = pr.seg.span
            owned.append(torch.ones(pr.n, dtype=F64, device=device) if span is None
                         else span.owned.to(device=device, dtype=F64))
            if pr.delayed and span is not None and span.count:
                idx.append(pr.slot + span.local_idx.to(device))
                pos.append(L + span.global_pos.to(device))
                pos_prob += [len(owned) - 1] * span.count
                L += span.count
        out["owned"] = torch.cat(owned) if owned else torch.zeros(0, dtype=F64, device=device)
        out["span_idx"] = torch.cat(idx) if idx else torch.zeros(0, **i64)
        out["span_pos"] = torch.cat(pos) if pos else torch.zeros(0, **i64)
        out["L"] = L  # spanning slots of the communicating problems, the same on every rank
        out["pos_prob"] = torch.tensor(pos_prob, dtype=torch.int64)  # their problems
        return out

    def to_problems(self, row_vals, op="sum"):
        """Per problem slot: the row slots' values added (max for ``op="max"``)."""
        if op == "max":
            out = torch.full((self.G,), -math.inf, dtype=F64, device=self.device)
            return out.scatter_reduce_(0, self.slot_map, row_vals.to(F64), "amax")
        shape = row_vals.shape[:-1] + (self.G,)
        return torch.zeros(shape, dtype=F64, device=self.device).index_add_(
            -1, self.slot_map, row_vals)

    def per_problem(self, slot_vals):
        return torch.zeros(self.nP, dtype=F64, device=self.device).index_add_(0, self.prob_of,
                                                                              slot_vals)

    def complete(self, vals, scalars=None, op="sum", live=None):
        """Complete the spanning slots of ``vals`` (``[..., G]``, in place) and sum ``scalars``
        (a float64 vector, returned) over ranks in one collective; nothing without one.
        ``live`` (a flag per problem, the same on every rank): only those problems' slots."""
        if self.comm is None or (not self.L and scalars is None):
            return scalars
        lead = vals.shape[:-1]
        full = torch.full(lead + (self.L,), -math.inf if op == "max" else 0.0, dtype=F64,
                          device=self.device)
        full[..., self.span_pos] = vals[..., self.span_idx]
        keep = None if live is None else torch.tensor(live)[self.pos_prob].to(self.device)
        blk = full if keep is None else full[..., keep]
        buf = torch.cat([blk.reshape(-1)] + ([scalars] if scalars is not None else []))
        (self.comm.max_ if op == "max" else self.comm.sum_)(buf)
        n = blk.numel()
        if keep is None:
            full = buf[:n].view(full.shape)
        else:
            full[..., keep] = buf[:n].view(blk.shape)
        vals[..., self.span_idx] = full[..., self.span_pos]
        return buf[n:] if scalars is not None else None


def build(plan, scratch: bool = True):
    """The table of a plan and its problems (one per :class:`.plan.Problem`): rows are pieces
    of segments (sharded) or whole tensors (unsharded: one piece per regularized tensor), plus
    free rows for everything unregularized.  ``scratch=False``: no ``P, b, Y`` (the fused native
    exact solver packs its own)."""
    ramda, pg = plan.kind == "ramda", plan.solver != "exact"
    rows, ptrs, geom, scal, pscal, taus, keep = [], [], [], [], [], [], []
    tensors, probs, row_prob, slot_ranges = [], [], [], []
    row_slot = prob_slot = 0
    for ti, ts in enumerate(plan.tensors):
        w, regs = ts.w, ts.problems
        P, b = (torch.empty_like(w), torch.empty_like(w)) if regs and scratch else (None, None)
        Y = torch.empty_like(w) if pg and regs and scratch else None
        keep.append((ts.g, P, b, Y))
        tensors.append(ts)

        def add(off, n, lay, gslot, mode, tau, prob, seg):
            r = slice(off, off + n)
            P_r, b_r, Y_r = ((None, None, None) if seg is None or P is None else  # (no scratch)
                             (P[r], b[r], None if Y is None else Y[r]))
            ptrs.append(table.row_ptrs(ts, P_r, b_r, Y_r, off))
            geom.append([lay.rows, lay.groups, lay.inner, gslot])
            sc, psc = table.row_scalars(plan, ts, mode)
            scal.append(sc)
            if psc is not None:
                pscal.append(psc)
            taus.append(tau)
            rows.append(table.Row(ti, w[r], seg, lay))
            row_prob.append(prob)

        covered = []
        for prob in regs:
            seg = prob.seg
            pr = Problem(seg, ti, prob_slot, seg.groups.num_groups if seg.numel else 0, prob.tau,
                         prob.delayed, seg.span is None or seg.span.count == 0)
            for pc in seg.groups.pieces if seg.numel else ():
                add(seg.lo + pc.lo, pc.hi - pc.lo, GroupLayout(pc.rows, pc.ncols, pc.inner),
                    row_slot, table.MODE_PG if pg else table.MODE_EXACT, pr.tau, len(probs),
                    seg)
                slot_ranges.append((prob_slot + pc.col, pc.ncols))
                row_slot += pc.ncols
            covered.append((seg.lo, seg.hi))
            probs.append(pr)
            prob_slot += pr.n
        at = 0  # everything else: unregularized, Ŵ = W0 − V/P (ProxGen: AdamW's step)
        for lo, hi in sorted(covered) + [(w.numel(), w.numel())]:
            if lo > at:
                add(at, lo - at, GroupLayout(1, lo - at, 1), -1, table.MODE_FREE, 0.0, -1, None)
            at = max(at, hi)
    tab = table.Table(rows, ptrs, geom, scal, taus, row_slot, keep, pscal if not ramda else None)
    return Sharded(tab, tensors, probs, row_prob, slot_ranges, plan.comm, plan.device, plan.cache)


def solve_pg(k, plan, sh: Sharded):
    """PG (Alg. 2, the paper's stop rule) on every problem of ``sh`` with kernel set ``k``
    (``stage``, ``iterate``, ``spare``, ``finish``); the :class:`SolverStats` per problem."""
    rtol, max_iters = plan.rtol, plan.max_iters
    rb, rc, rp = k.stage()
    bb, cst, pmax = sh.to_problems(rb), sh.to_problems(rc), sh.to_problems(rp, "max")
    sh.complete(bb)  # screening: ‖b_g‖ > τ, complete over ranks
    sh.complete(pmax, op="max")  # the step 1/max P_g
    act = bb.sqrt() > sh.tau
    eta = torch.where(act, 1.0 / pmax, torch.zeros_like(pmax))
    const = sh.per_problem(cst * act)  # this rank's elements of Q's constant
    f = act.to(F64)  # f_0: the warm start W with screened groups set to 0
    eta_rows = eta[sh.slot_map].contiguous()
    nP, dev = sh.nP, f.device
    iters, q_last, q_prev, ycol = [0] * nP, [math.nan] * nP, [math.nan] * nP, [table.COL_Y] * nP
    whole = [i for i, pr in enumerate(sh.probs) if pr.whole]
    f_rows = f[sh.slot_map].contiguous()  # the chunks' f, per row slot
    if whole:
        _chunks(k, plan, sh, whole, f_rows, eta_rows, const.tolist(), iters, q_last, ycol)
    done = [pr.whole for pr in sh.probs]  # the loop below: problems with spanning groups

    def decide(which, q, j):  # q: complete Q(Z^j) per problem, identical on every rank
        for i in which:
            q_prev[i], q_last[i] = q_last[i], q[i]
            if pg_should_stop(q_prev[i], q[i], j, rtol):
                done[i], iters[i] = True, j

    def per_row(vals):  # a per-problem list as a per-row tensor (free rows: index −1, a 0)
        return torch.tensor(list(vals) + [0])[sh.row_prob_cpu]

    pending, pending_go = None, []  # Q shares of iterate j−1 of the communicating problems
    src, dst, spared = table.COL_W, table.COL_Y, False
    for j in range(1, max_iters + 1):
        live = [not d for d in done]
        if not any(live):
            break
        live_rows = per_row([int(x) for x in live]).to(torch.int32)
        if dst == table.COL_Y2 and not spared:  # Y' on first need: the second iteration
            for t in live_rows.nonzero().view(-1).tolist():
                k.spare(t)
            spared = True
        sums = sh.to_problems(k.iterate(live_rows, f[sh.slot_map].contiguous(), eta_rows,
                                        src, dst))
        if any(lv and dl for lv, dl in zip(live, sh.delayed)):  # the same on every rank
            prev = sh.complete(sums, pending, live=live)
            if pending is not None:  # decide on iterate j−1 now that its Q is complete
                decide(pending_go, prev.tolist(), j - 1)
        go = [i for i in range(nP) if live[i] and not done[i]]
        nrm = sums[0].sqrt()
        fj = shrink_factor(nrm, eta * sh.tau)
        qg = 0.5 * fj * fj * sums[1] - fj * sums[2] + sh.tau * fj * nrm  # Q terms of f_j∘Y_j
        q = sh.per_problem(qg * sh.owned) + const  # complete for the local problems only
        go_mask = torch.zeros(nP, dtype=torch.bool, device=dev)
        go_mask[go] = True
        f = torch.where(go_mask[sh.prob_of], fj, f)  # a stopped problem keeps f_{j−1}, Y_{j−1}
        for i in go:
            iters[i], ycol[i] = j, dst
        pending_go = [i for i in go if sh.delayed[i]]
        local = [i for i in go if not sh.delayed[i]]
        if local:
            decide(local, q.tolist(), j)
        pending = torch.where(go_mask, q, torch.zeros_like(q)) if pending_go else None
        src, dst = dst, (table.COL_Y2 if dst == table.COL_Y else table.COL_Y)
    in_chunks = torch.tensor([pr.whole for pr in sh.probs] + [False], device=dev)[sh.prob_of][
        sh.slot_map] if nP else torch.zeros(0, dtype=torch.bool, device=dev)
    k.finish(torch.where(in_chunks, f_rows, f[sh.slot_map]).contiguous(), per_row(ycol).tolist())
    # statistics: owned active / screened groups and the pending Q, complete over ranks
    tail = torch.cat([sh.per_problem(act.to(F64) * sh.owned),
                      sh.per_problem((~act).to(F64) * sh.owned),
                      pending if pending is not None else torch.zeros(nP, dtype=F64, device=dev)])
    if sh.comm is not None:  # (the local problems' entries keep this rank's values)
        local = tail.clone()
        sh.comm.sum_(tail)
        keep = torch.tensor([not d for d in sh.delayed] * 3, device=dev)
        tail = torch.where(keep, local, tail)
    tail = tail.tolist()
    for i in pending_go if pending is not None else ():
        q_last[i] = tail[2 * nP + i]  # stopped at max_iters: Q complete only now
    return [SolverStats(iters[i], round(tail[i]), round(tail[nP + i]), math.nan, q_last[i])
            for i in range(nP)]


def _chunks(k, plan, sh, which, f_rows, eta_rows, const, iters, q_last, ycol):
    """PG as chunks (the scheme of :mod:`.table`) for the problems ``which``, whose
    groups are all whole on one rank (so each has at most one row here, its groups complete in
    it): ``n`` iterations per pass in cache, one all-reduce per chunk completing the communicating
    problems' shares of Q for each of its iterations (not one per iteration), the stop rule on
    each iteration in order, a re-run of the chunk up to the stopping iteration.  Chunk lengths
    come from the previous step's counts of the same problems, identical on every rank.  Fills
    ``iters``, ``q_last``, ``ycol`` (per problem) and ``f_rows`` (per row slot, in place)."""
    rtol, max_iters = plan.rtol, plan.max_iters
    T, dev = len(sh.tab.rows), f_rows.device
    row_of = {}
    for t, i in enumerate(sh.row_prob_cpu.tolist()):
        if i >= 0 and sh.probs[i].whole:
            if i in row_of:
                raise RuntimeError(f"{sh.probs[i].seg.name}: a segment with no spanning group "
                                   "has several pieces on one rank")
            row_of[i] = t
    hints = plan.hints
    names = {i: sh.probs[i].seg.name for i in which}
    done, pos, q_prev = {i: False for i in which}, {i: 0 for i in which}, {}
    src, dst, first, spared = table.COL_W, table.COL_Y, True, False
    while not all(done.values()):
        if dst == table.COL_Y2 and not spared:  # Y' on first need: the second chunk
            for i, t in row_of.items():
                if not done[i]:
                    k.spare(t)
            spared = True
        n = {i: 0 if done[i] else min(max_iters - pos[i], table.first_chunk(hints.get(names[i]))
                                      if first else table.NEXT_CHUNK) for i in which}
        n_rows = [0] * T
        for i, t in row_of.items():
            n_rows[t] = n[i]
        f_start = f_rows.clone()
        q_rows = k.chunk(n_rows, f_rows, eta_rows, src, dst) if any(n_rows) else None
        q = {i: [(q_rows[row_of[i]][m] if i in row_of else 0.0) + const[i] for m in range(n[i])]
             for i in which}
        talk = [i for i in which if sh.probs[i].delayed and n[i]]  # the same on every rank
        if talk:
            width = max(n[i] for i in talk)
            buf = torch.tensor([q[i] + [0.0] * (width - n[i]) for i in talk], dtype=F64,
                               device=dev)
            sh.comm.sum_(buf.view(-1))
            for i, v in zip(talk, buf.tolist()):
                q[i] = v[:n[i]]
        rerun = [0] * T
        for i, m in table.stop_in_chunk(which, n, q, pos, q_prev, q_last, iters, done, ycol, dst,
                                        rtol, max_iters).items():
            if i in row_of:
                rerun[row_of[i]] = m
        if any(rerun):  # from the chunk's start up to each stopping iteration
            f_re = f_start.clone()
            k.chunk(rerun, f_re, eta_rows, src, dst)
            redo = torch.tensor([r > 0 for r in rerun], device=dev)[sh.slot_row]
            f_rows.copy_(torch.where(redo, f_re, f_rows))
        src, dst, first = dst, (table.COL_Y2 if dst == table.COL_Y else table.COL_Y), False
    for i in which:
        hints[names[i]] = iters[i]


def solve_exact(k, plan, sh: Sharded, max_iters: int = 50):
    """The exact group solution (:func:`ramda_ds.solvers.solve_exact`: screening, the bracket
    ``[τ·min P_g, τ·max P_g]/(‖b_g‖ − τ)``, safeguarded Newton on ``1/‖Z(μ)‖ − μ/τ``) with kernel
    set ``k`` (``exact_stage``, ``exact_iter``, ``exact_finish``): one pass per Newton iteration,
    the Newton update on the host for every group at once, and one all-reduce per iteration that
    completes the spanning groups' sums and the previous iteration's unconverged counts.  A
    problem stops once all its groups satisfy ``|μ‖Z‖ − τ| ≤ tol·τ``; ``warm_start`` as there."""
    tol = 8 * torch.finfo(torch.float32).eps
    rb, rmax, rmin = k.exact_stage()
    bb = sh.to_problems(rb)
    ext = torch.stack([sh.to_problems(rmax, "max"), sh.to_problems(-rmin, "max")])
    sh.complete(bb)  # screening
    sh.complete(ext, op="max")  # the bracket's ends: max P and −min P in one collective
    pmax, pmin = ext[0], -ext[1]
    tau, nP, dev = sh.tau, sh.nP, bb.device
    nb = bb.sqrt()
    act = nb > tau
    excess = (nb - tau).clamp_min(1e-300)
    lo = torch.where(act, tau * pmin / excess, torch.zeros_like(nb))
    hi = torch.where(act, tau * pmax / excess, torch.zeros_like(nb))
    lo0, hi0 = lo, hi
    warm = plan.warm
    keys = [(pr.seg.name, pr.seg.lo, pr.seg.hi) for pr in sh.probs]
    mu = hi.clone()
    if warm is not None:  # where each root sat in its bracket last step (kept per problem)
        pos = [warm.get(key) for key in keys]
        has = [q is not None and q.numel() == pr.n for q, pr in zip(pos, sh.probs)]
        if any(has):
            at = torch.cat([q.to(device=dev, dtype=F64) if h else torch.ones(pr.n, dtype=F64,
                                                                            device=dev)
                            for q, h, pr in zip(pos, has, sh.probs)])
            mu = torch.where(torch.tensor(has, device=dev)[sh.prob_of],
                             torch.lerp(lo, hi, at.clamp(0.0, 1.0)), mu)
    conv_at = [None] * nP
    pending, pending_go = None, []

    def note(which, counts, it):
        for i in which:
            if counts[i] == 0 and conv_at[i] is None:
                conv_at[i] = it

    for it in range(1, max_iters + 1):
        live = [c is None for c in conv_at]
        if not any(live):
            break
        live_rows = torch.tensor([int(x) for x in live] + [0])[sh.row_prob_cpu]
        sums = sh.to_problems(k.exact_iter(live_rows, mu[sh.slot_map].contiguous()))
        if any(lv and dl for lv, dl in zip(live, sh.delayed)):  # the same on every rank
            prev = sh.complete(sums, pending, live=live)
            if pending is not None:
                note(pending_go, prev.tolist(), it - 1)
        upd = [i for i in range(nP) if live[i] and conv_at[i] is None]
        upd_mask = torch.zeros(nP, dtype=torch.bool, device=dev)
        upd_mask[upd] = True
        # (the bracket of a group that does not move is never read again)
        mu, lo, hi, bad = newton_update(mu, lo, hi, sums[0], sums[1], tau,
                                        upd_mask[sh.prob_of] & act, tol)
        left = sh.per_problem(bad.to(F64) * sh.owned)
        pending_go = [i for i in upd if sh.delayed[i]]
        local = [i for i in upd if not sh.delayed[i]]
        if local:
            note(local, left.tolist(), it)
        pending = torch.where(upd_mask, left, torch.zeros_like(left)) if pending_go else None
    k.exact_finish(mu[sh.slot_map].contiguous(), act.to(torch.float32)[sh.slot_map].contiguous())
    if warm is not None:
        at = ((mu - lo0) / (hi0 - lo0)).nan_to_num_(1.0, 1.0, 1.0)
        for key, part in zip(keys, at.split([pr.n for pr in sh.probs])):
            warm[key] = part.clone()
    tail = torch.cat([sh.per_problem(act.to(F64) * sh.owned),
                      sh.per_problem((~act).to(F64) * sh.owned)])
    if sh.comm is not None:  # (the local problems' entries keep this rank's values)
        local_tail = tail.clone()
        sh.comm.sum_(tail)
        tail = torch.where(torch.tensor([not d for d in sh.delayed] * 2, device=dev), local_tail,
                           tail)
    tail = tail.tolist()
    return [SolverStats(conv_at[i] or max_iters, round(tail[i]), round(tail[nP + i]), 0.0,
                        math.nan) for i in range(nP)]


def run(plan, path: str) -> list:
    """One step of a plan, sharded or not, on the kernels of ``path`` (``"native"`` or
    ``"triton"``): ``[(segment, SolverStats)]`` per problem.  The one PG driver and the exact
    driver for every table (an unsharded plan's problems are all whole: PG runs them as chunks,
    with no communication).  Every rank runs the same collectives."""
    sh = build(plan)
    k = _kernels(path, plan.kind, sh.tab, sh.device)
    k.free()
    solve = solve_pg if plan.solver != "exact" else solve_exact
    stats = solve(k, plan, sh) if sh.probs else []
    return [(pr.seg, st) for pr, st in zip(sh.probs, stats)]


def _kernels(path, kind, tab, device):
    if path == "native":
        from .native import _Kernels, _ProxGenKernels
        from .native_build import load

        return (_Kernels if kind == "ramda" else _ProxGenKernels)(load(), tab)
    from .triton_pg import _Kernels

    return _Kernels(tab, device)
