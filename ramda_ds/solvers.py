r"""Solvers for the preconditioned proximal subproblem shared by RAMDA and ProxGen.

Each :class:`Subproblem` is one tensor (or one rank's flat segment of it):

.. math::  \min_Z\; Q(Z) = \langle V, Z - W_0\rangle + \tfrac12\langle Z - W_0, P\circ(Z - W_0)\rangle
           + \tau \sum_g \lVert Z_g\rVert

with diagonal ``P > 0``.  Writing ``b = P∘W0 − V``, the smooth part is ``½ΣPZ² − ΣbZ + const``
with ``const = Σ(½PW0² − VW0)``.  The Q that PG's stop test and the statistics use is summed over
the groups that survive screening only (the screened ones are fixed at 0).  :func:`solve_pg` and
:func:`solve_exact` take a list of subproblems and solve them together (one host synchronisation
per iteration, not per tensor); partial per-group sums of groups that span shards are combined by
one ``comm.sum_`` per iteration, and unsharded runs pass :data:`ramda_ds.comm.LOCAL` and
communicate nothing.  The closed form :func:`solve_l1` and :func:`solve_nuclear_pg` take one
whole (unsharded for the nuclear norm) subproblem.

* :func:`solve_pg` — Alg. 2: exact screening, warm start, per-group step ``1/max P_g``, early stop
  on the relative decrease of Q (≥ 2 iterations) or on the inexactness condition (7).
* :func:`solve_exact` — the exact group solution ``Z_g = b_g / (P_g + μ_g)`` with ``μ_g`` the root
  of ``μ‖b_g/(P_g+μ)‖ = τ`` (safeguarded Newton on ``1/‖Z(μ)‖ − μ/τ``).
* :func:`solve_l1` — closed form for L1 (every entry its own group).
* :func:`solve_nuclear_pg` — PG with singular-value soft-thresholding (unsharded 2-D tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .comm import LOCAL, Reducer
from .groups import SegmentGroups

if TYPE_CHECKING:  # (an annotation only: layout.py sits above this module)
    from .layout import Span

F64 = torch.float64


@dataclass
class Subproblem:
    groups: SegmentGroups
    P: torch.Tensor  # flat local preconditioner, > 0
    b: torch.Tensor  # flat local P∘W0 − V
    tau: float  # threshold per unit group norm (α·λ·w_g)
    z: torch.Tensor  # flat local: warm start on input, solution on output (written in place)
    const: torch.Tensor | None = None  # flat local ½P∘W0² − V∘W0 (only the stop test needs it)
    span: Span | None = None
    root_at: torch.Tensor | None = None  # exact solver warm start: per group, where μ lies in its
    #   bracket, (μ − lo)/(hi − lo) ∈ [0, 1]; set from the solution on output (float64, local groups)


@dataclass
class SolverStats:
    """What one solve did for one tensor (global over shards)."""

    iterations: int = 0
    active_groups: int = 0
    screened_groups: int = 0
    residual: float = 0.0  # ‖s‖ for the element s ∈ ∂Q(Ẑ) given by the last prox step
    objective: float = 0.0  # Q(Ẑ) over the groups that survive screening


# ----------------------------------------------------------------------------- the rules, once
def shrink_factor(norm: torch.Tensor, thresh) -> torch.Tensor:
    """The group soft-threshold factor ``max(0, 1 − thresh/‖Y_g‖)`` per group (``norm`` = ‖Y_g‖;
    a zero norm gives 0, never 0/0): ``prox(Y)_g = factor_g · Y_g``.  PG's iterate (``thresh =
    η_g·τ``), the closed-form prox (``thresh = τ``) and the sharded kernels' host step use it."""
    return (1.0 - thresh / norm.clamp_min(1e-300)).clamp_min_(0.0)


def pg_should_stop(q_prev: float, q: float, j: int, rtol: float) -> bool:
    """The paper's stop rule for PG, after iteration ``j``: ``j ≥ 2`` and
    ``(Q(Z^{j−1}) − Q(Z^j)) / (|Q(Z^j)| + 1) < rtol`` (every driver decides with it, from the same
    float64 numbers on every rank)."""
    return j >= 2 and (q_prev - q) / (abs(q) + 1.0) < rtol


def newton_update(mu, lo, hi, z2, z3, tau, move, tol):
    """One safeguarded Newton step per group on ``φ(μ) = 1/‖Z(μ)‖ − μ/τ`` (the exact group
    solver), from ``z2 = ‖Z(μ)‖² = Σ b²/(P+μ)²`` and ``z3 = Σ b²/(P+μ)³``: the bracket ``[lo, hi]``
    shrinks to μ's side of the root, μ takes the Newton step, or bisection when that leaves the
    bracket.  ``move``: the groups whose μ moves (active groups of problems still iterating).
    Returns ``(μ, lo, hi, unconverged)``, unconverged = ``move`` and ``|μ‖Z‖ − τ| > tol·τ`` (at
    the μ given)."""
    zn = z2.clamp_min(1e-300).sqrt()
    phi = 1.0 / zn - mu / tau
    dphi = z3 / (zn * zn * zn) - 1.0 / tau  # d/dμ (1/‖Z‖) − 1/τ  (< 0)
    lo = torch.where(phi > 0, mu, lo)
    hi = torch.where(phi <= 0, mu, hi)
    step = mu - phi / dphi
    inside = (step >= lo) & (step <= hi)
    bad = move & ((mu * zn - tau).abs() > tol * tau)
    return torch.where(move, torch.where(inside, step, 0.5 * (lo + hi)), mu), lo, hi, bad


# ----------------------------------------------------------------------------- reductions
def _combine(comm: Reducer, probs, vecs, scalars=None, op="sum"):
    """Complete per-group partial sums of spanning groups and sum per-problem scalars.

    ``vecs[i]`` is a list of per-group vectors of problem ``i``; ``scalars[i]`` a float64 vector.
    One collective for everything; nothing at all on one process.
    """
    if comm.world_size == 1:
        return vecs, scalars
    parts, layout = [], []
    for i, (p, vs) in enumerate(zip(probs, vecs)):
        if p.span is None or p.span.count == 0 or not vs:
            continue
        block = torch.zeros(len(vs), p.span.count, dtype=F64, device=p.b.device)
        if op == "max":
            block.fill_(-math.inf)
        for k, v in enumerate(vs):
            block[k, p.span.global_pos] = v[p.span.local_idx].to(F64)
        parts.append(block.view(-1))
        layout.append(i)
    if scalars is not None:
        parts.extend(s.to(F64) for s in scalars)
    if not parts:
        return vecs, scalars
    buf = torch.cat(parts)
    (comm.max_ if op == "max" else comm.sum_)(buf)
    off = 0
    for i in layout:
        p, vs = probs[i], vecs[i]
        block = buf[off:off + len(vs) * p.span.count].view(len(vs), p.span.count)
        off += block.numel()
        for k, v in enumerate(vs):
            v[p.span.local_idx] = block[k, p.span.global_pos].to(v.dtype)
    if scalars is not None:
        out = []
        for s in scalars:
            out.append(buf[off:off + s.numel()].view_as(s))
            off += s.numel()
        scalars = out
    return vecs, scalars


def _zero(p: Subproblem) -> torch.Tensor:
    return torch.zeros((), dtype=F64, device=p.b.device)


def _owned(p: Subproblem, v: torch.Tensor) -> torch.Tensor:
    return v if p.span is None else v * p.span.owned.to(v.dtype)


def _screen(comm, probs, squares=None):
    """Group norms of b (complete over shards) and the screening mask ‖b_g‖ > τ."""
    squares = squares or [p.b * p.b for p in probs]
    sq = [[p.groups.sum(bb)] for p, bb in zip(probs, squares)]
    sq, _ = _combine(comm, probs, sq)
    norms = [s[0].sqrt() for s in sq]
    return norms, [n > p.tau for n, p in zip(norms, probs)]


def _group_extremes(comm, probs, want_min=False):
    vecs = [[p.groups.amax(p.P).to(F64)] + ([(-p.groups.amin(p.P)).to(F64)] if want_min else [])
            for p in probs]
    vecs, _ = _combine(comm, probs, vecs, op="max")
    pmax = [v[0] for v in vecs]
    pmin = [-v[1] for v in vecs] if want_min else None
    return pmax, pmin


# ----------------------------------------------------------------------------- PG (Alg. 2)
def solve_pg(probs: list[Subproblem], comm: Reducer = LOCAL, max_iters: int = 100,
             rtol: float = 1e-8, residual_tol: float | list[float] | None = None) -> list[SolverStats]:
    """Screening + proximal gradient; stops each tensor on its own rule, identically on all ranks.

    Stop rule: after iteration ``j ≥ 2`` when ``(Q(Z^{j−1}) − Q(Z^j)) / (|Q(Z^j)| + 1) < rtol``;
    with ``residual_tol`` set, instead when condition (7) holds: ``‖s^j‖ ≤ residual_tol`` where
    ``s^j = (Z^{j−1} − Z^j)∘(1/η_g − P) ∈ ∂Q(Z^j)``.  (The other half of (7),
    ``Q(Ẑ) ≤ Q(W_{t−1})``, always holds: screening zeroes groups whose separable optimum is 0 and
    PG with step ``1/max P_g`` is monotone.)  ``residual_tol`` may be one value per problem.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if residual_tol is not None and not isinstance(residual_tol, (list, tuple)):
        residual_tol = [residual_tol] * len(probs)
    norms, active = _screen(comm, probs)
    pmax, _ = _group_extremes(comm, probs)
    S = []  # per-problem solver state
    for p, act, pm in zip(probs, active, pmax):
        # constant part of Q over surviving groups; element partial sums need no owner mask
        const = (p.groups.sum(p.const) * act).sum() if p.const is not None else _zero(p)
        eta = torch.where(act, 1.0 / pm, torch.zeros_like(pm))
        A = p.groups.mul(p.P, eta).neg_().add_(1.0)  # 1 − η_g P   (= 1 for screened groups)
        B = p.groups.mul(p.b, eta)  # η_g b          (= 0 for screened groups)
        p.groups.mul(p.z, act.to(F64), out=p.z)  # warm start, screened groups set to 0
        S.append(dict(eta=eta, A=A, B=B, Y=torch.empty_like(p.z), prev=torch.empty_like(p.z),
                      out=p.z, q=[], it=0, done=False, pm=pm, const=const))
    delayed = comm.world_size > 1  # sharded: Q of iterate j is complete one collective later
    pending = None  # delayed mode: per live problem, [local Q partial, residual² partial]
    for j in range(1, max_iters + 1):
        live = [i for i, s in enumerate(S) if not s["done"]]
        if not live:
            break
        sums = []
        for i in live:
            p, s = probs[i], S[i]
            Y = torch.addcmul(s["B"], s["A"], p.z, out=s["Y"])  # Y = Z − η(PZ − b)
            sums.append([p.groups.dot(Y, Y), p.groups.dot(p.P, Y, Y), p.groups.dot(p.b, Y)])
        sums, prev_vals = _combine(comm, [probs[i] for i in live], sums, pending)
        if pending is not None:  # decide on iterate j−1 now that its Q is complete
            _decide(S, live, torch.stack(prev_vals).tolist(), j - 1, rtol, residual_tol)
        go = [k for k, i in enumerate(live) if not S[i]["done"]]
        local = []
        for k in go:
            p, s = probs[live[k]], S[live[k]]
            s1, s2, s3 = sums[k]
            nrm = s1.sqrt()
            f = shrink_factor(nrm, s["eta"] * p.tau)
            qg = 0.5 * f * f * s2 - f * s3 + p.tau * f * nrm  # per-group Q terms of Z^j = f∘Y
            s["prev"], p.z = p.z, s["prev"]
            p.groups.mul(s["Y"], f, out=p.z)  # Z^j, group soft-threshold
            res = _residual_sq(p, s) if residual_tol is not None else _zero(p)
            local.append(torch.stack([_owned(p, qg).sum() + s["const"], res]))
            s["it"] = j
        if delayed:
            pending = local or None
        else:
            vals = torch.stack(local).tolist() if local else []  # one host sync per iteration
            _decide(S, [live[k] for k in go], vals, j, rtol, residual_tol)
    return _finish(comm, probs, S, active, pending)


def _residual_sq(p: Subproblem, s) -> torch.Tensor:
    D = (s["prev"] - p.z).mul_(s["A"])  # (Z^{j−1} − Z^j)∘(1 − ηP) = η_g · s
    r = p.groups.sum(D * D) * (s["pm"] * s["pm"])  # per group ‖s_g‖² = ‖·‖²/η_g²
    return r.sum()  # every element lives on exactly one rank: partial sums add up


def _decide(S, idx, vals, j, rtol, residual_tol):
    """Record Q(Z^j) and apply the stop rule; inputs are identical on every rank."""
    for i, (q, res) in zip(idx, vals):
        s = S[i]
        s["q"].append(q)
        if residual_tol is not None:
            stop = math.sqrt(max(res, 0.0)) <= residual_tol[i]
        else:
            stop = pg_should_stop(s["q"][-2] if len(s["q"]) >= 2 else math.nan, q, j, rtol)
        if stop:
            s["done"], s["it"] = True, j


def _finish(comm, probs, S, active, pending) -> list[SolverStats]:
    """Put each solution into the caller's tensor; one reduction for the final statistics."""
    pend = iter(pending or [])
    scal = []
    for p, s, act in zip(probs, S, active):
        q_missing = not s["done"] and pending is not None
        q_part = next(pend)[0] if q_missing else _zero(p)
        ones = _owned(p, torch.ones_like(act, dtype=F64))
        scal.append(torch.stack([_residual_sq(p, s), (ones * act).sum(), (ones * ~act).sum(), q_part]))
        if p.z is not s["out"]:
            s["out"].copy_(p.z)
            s["prev"], p.z = p.z, s["out"]
    _, scal = _combine(comm, probs, [[] for _ in probs], scal)
    out = []
    for s, v in zip(S, scal):
        res, n_active, n_screened, q_part = v.tolist()
        q = q_part if (not s["done"] and pending is not None) else (s["q"][-1] if s["q"] else math.nan)
        out.append(SolverStats(s["it"], round(n_active), round(n_screened), math.sqrt(max(res, 0.0)), q))
    return out


# ----------------------------------------------------------------------------- exact group solver
def solve_exact(probs: list[Subproblem], comm: Reducer = LOCAL, max_iters: int = 50,
                tol: float | None = None) -> list[SolverStats]:
    """Exact solution per group: ``Z_g = b_g / (P_g + μ_g)``, ``μ_g·‖b_g/(P_g+μ_g)‖ = τ``.

    ``φ(μ) = 1/‖Z(μ)‖ − μ/τ`` is decreasing with one root in
    ``[τ·min P_g, τ·max P_g] / (‖b_g‖ − τ)``; safeguarded Newton (bisection when a step leaves the
    bracket) from the bracket's upper end, vectorised over all groups.  ``1/‖Z(μ)‖`` is the power
    mean with exponent −2 of ``P_g + μ``, hence concave, so Newton from the right of the root stays
    right of it and converges monotonically; when P is constant on a group φ is linear and one
    step is exact.

    Warm start: a problem whose ``root_at`` is set starts each active group at that relative
    position of its bracket instead of the upper end (where the root sat in the previous step's
    bracket: it moves little between steps, while μ itself grows with α).  Concavity makes Newton
    safe from either side of the root (a step from the left lands right of it), so the result is
    the same root to ``tol``; only the number of passes changes.  ``root_at`` holds the solution's
    position on return.
    """
    if tol is None:  # relative accuracy of μ‖Z‖ = τ: a few ulps of the data's precision
        tol = 8 * torch.finfo(probs[0].P.dtype).eps if probs else 0.0
    squares = [p.b * p.b for p in probs]
    norms, active = _screen(comm, probs, squares)
    pmax, pmin = _group_extremes(comm, probs, want_min=True)
    S = []
    for p, act, nb, pM, pm, bb in zip(probs, active, norms, pmax, pmin, squares):
        excess = (nb - p.tau).clamp_min(1e-300)
        lo = torch.where(act, p.tau * pm / excess, torch.zeros_like(nb))
        hi = torch.where(act, p.tau * pM / excess, torch.zeros_like(nb))
        mu = hi.clone()
        if p.root_at is not None and p.root_at.shape == hi.shape:  # warm start inside the bracket
            mu = torch.lerp(lo, hi, p.root_at.to(hi.dtype).clamp(0.0, 1.0))
        S.append(dict(mu=mu, lo=lo, hi=hi, lo0=lo, hi0=hi, bb=bb, act=act, conv_at=None))
    newton = [i for i, p in enumerate(probs) if p.tau > 0]  # τ = 0: μ = 0, Z = b/P
    delayed = comm.world_size > 1
    pending, iters = None, 0
    for iters in range(1, max_iters + 1):
        live = [i for i in newton if S[i]["conv_at"] is None]  # identical on every rank
        if not live:
            break
        sums = []
        for i in live:
            p, s = probs[i], S[i]
            d = p.groups.add(p.P, s["mu"]).reciprocal_()  # 1/(P + μ_g)
            t = s["bb"] * d * d
            sums.append([p.groups.sum(t), p.groups.sum(t.mul_(d))])  # ‖Z‖², Σ b²/(P+μ)³
        sums, done = _combine(comm, [probs[i] for i in live], sums, pending)
        if done is not None:  # counts of the previous iteration, complete over ranks
            _note_converged(S, live, torch.cat(done).tolist(), iters - 1)
        unconverged, updated = [], []
        for i, (z2, z3) in zip(live, sums):
            p, s = probs[i], S[i]
            if s["conv_at"] is not None:  # converged at the previous iteration: μ stays
                continue
            s["mu"], s["lo"], s["hi"], bad = newton_update(s["mu"], s["lo"], s["hi"], z2, z3,
                                                           p.tau, s["act"], tol)
            unconverged.append(_owned(p, bad.to(F64)).sum().view(1))
            updated.append(i)
        if not delayed:
            _note_converged(S, updated, torch.cat(unconverged).tolist() if unconverged else [], iters)
        else:  # counts are complete one collective later, identically on every rank
            pending = unconverged or None
    stats = []
    for p, s in zip(probs, S):
        p.root_at = ((s["mu"] - s["lo0"]) / (s["hi0"] - s["lo0"])).nan_to_num_(1.0, 1.0, 1.0)
        d = p.groups.add(p.P, s["mu"])
        torch.div(p.b, d, out=p.z)
        p.groups.mul(p.z, s["act"].to(F64), out=p.z)
        ones = _owned(p, torch.ones_like(s["act"], dtype=F64))
        stats.append(torch.stack([(ones * s["act"]).sum(), (ones * ~s["act"]).sum()]))
    _, stats = _combine(comm, probs, [[] for _ in probs], stats)
    return [SolverStats(0 if p.tau == 0 else (s["conv_at"] or max_iters), round(v[0].item()),
                        round(v[1].item()), 0.0, math.nan) for p, s, v in zip(probs, S, stats)]


def _note_converged(S, idx, counts, it):
    """Record the first iteration after which a problem has no unconverged group."""
    for i, c in zip(idx, counts):
        if c == 0 and S[i]["conv_at"] is None:
            S[i]["conv_at"] = it


# ----------------------------------------------------------------------------- closed forms
def solve_l1(p: Subproblem) -> None:
    """L1 with diagonal P: ``Z = sign(b)·max(|b| − τ, 0) / P`` elementwise (no communication)."""
    torch.div(torch.sign(p.b) * (p.b.abs() - p.tau).clamp_min_(0.0), p.P, out=p.z)


def group_soft_threshold(xs, groups_list, taus, comm: Reducer = LOCAL, probs=None) -> None:
    """In place ``x_g ← x_g · max(0, 1 − τ/‖x_g‖)`` for every tensor (the group-lasso prox).

    ``probs`` (optional, same order) supplies :class:`Span` information for sharded tensors.
    """
    sq = [[g.sum(x * x)] for x, g in zip(xs, groups_list)]
    if probs is not None:
        sq, _ = _combine(comm, probs, sq)
    for x, g, tau, (s,) in zip(xs, groups_list, taus, sq):
        f = shrink_factor(s.sqrt(), tau)
        g.mul(x, f, out=x)


def singular_value_threshold(x2d: torch.Tensor, tau: float, with_rank: bool = False):
    """prox of τ‖·‖_* : soft-threshold the singular values (optionally also return the rank)."""
    U, S, Vh = torch.linalg.svd(x2d, full_matrices=False)
    S = (S - tau).clamp_min(0.0)
    out = (U * S) @ Vh
    return (out, int((S > 0).sum())) if with_rank else out


def solve_nuclear_pg(p: Subproblem, shape, max_iters: int = 100, rtol: float = 1e-8) -> SolverStats:
    """PG with η = 1/max P and singular-value soft-thresholding, for one whole 2-D tensor."""
    eta = 1.0 / p.P.max().item()
    z = p.z.view(shape)
    P, b = p.P.view(shape), p.b.view(shape)
    q_prev, it, rank = math.inf, 0, min(shape)
    for it in range(1, max_iters + 1):
        y = z - eta * (P * z - b)
        z_new, rank = singular_value_threshold(y, eta * p.tau, with_rank=True)
        z.copy_(z_new)
        q = ((0.5 * P * z - b) * z).sum(dtype=F64).item() + (0.0 if p.const is None else p.const.sum(dtype=F64).item()) + \
            p.tau * torch.linalg.matrix_norm(z, ord="nuc").item()
        if pg_should_stop(q_prev, q, it, rtol):
            break
        q_prev = q
    return SolverStats(it, rank, min(shape) - rank, math.nan, q)
