"""The kernels' self-test: a tiny plan run on a kernel set against the reference solvers.

No optimizer is built: two RAMDA steps of a 24×16 weight (input groups, regularized) and its
bias (unregularized) are computed twice from the same random state — by :func:`.plan.execute` on
the kernels, and by the reference: the elementwise stage of :mod:`ramda_ds.stages`, then
:func:`ramda_ds.solvers.solve_pg` / :func:`~ramda_ds.solvers.solve_exact` (or ``Ŵ = W0 − V/P``)
and ``W ← lerp(W, Ŵ, c)``.  ``backend="auto"`` uses a kernel set only once this passed.
"""

from __future__ import annotations

import math

import torch

from ..layout import make_segment
from ..solvers import Subproblem, solve_exact, solve_pg
from ..stages import dual_averaging_stage
from .plan import Plan, Problem, TensorStep, execute

LR, EPS, C, LAM = 0.05, 1e-6, 0.1, 1e-2


def _tensors(device):
    """(name, shape, W, regularized) of the test model, seeded (the caller's RNG is left alone)."""
    g = torch.Generator().manual_seed(0)
    return [("weight", (24, 16), (torch.randn(24, 16, generator=g) * 0.2).view(-1), True),
            ("bias", (24,), torch.randn(24, generator=g) * 0.2, False)]


def check(path: str, device: torch.device, solver: str | None = None) -> bool:
    """Two steps on the kernels of ``path`` and on the reference agree to 1e-5 (both solvers,
    or ``solver``)."""
    for sv in ([solver] if solver else ["pg", "exact"]):
        if not _agree(path, torch.device(device), sv):
            return False
    return True


def _agree(path, device, solver) -> bool:
    group = dict(regularizer="group_lasso", grouping="input", lam=LAM)
    spec = _tensors(device)
    runs = []
    for which in ("reference", "kernels"):
        state = [dict(W=w.clone().to(device), V=torch.zeros_like(w, device=device),
                      U=torch.zeros_like(w, device=device), W0=w.clone().to(device),
                      seg=make_segment(name, shape, 0, w.numel(), 0, group) if reg else None)
                 for name, shape, w, reg in spec]
        gen = torch.Generator().manual_seed(1)
        alpha = 0.0
        for t in (1, 2):
            grads = [torch.randn(w.numel(), generator=gen).to(device) for _, _, w, _ in spec]
            s = LR * math.sqrt(t)
            alpha += s
            if which == "kernels":
                steps = [TensorStep(g, st["V"], st["U"], st["W0"], st["W"], None, [s, EPS, C],
                                    [Problem(st["seg"], alpha * LAM * st["seg"].groups.layout.
                                             group_weight)] if st["seg"] is not None else [])
                         for g, st in zip(grads, state)]
                execute(Plan("ramda", solver, steps, max_iters=100, rtol=1e-8), path)
            else:
                _reference(state, grads, s, alpha, solver)
        runs.append([st["W"].cpu() for st in state])
    return all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*runs))


def _reference(state, grads, s, alpha, solver):
    for st, g in zip(state, grads):
        seg, pg = st["seg"], solver != "exact"
        P, b, const = dual_averaging_stage(g, st["V"], st["U"], st["W0"], s, EPS,
                                           want_const=pg and seg is not None)
        if seg is None:
            z = torch.addcdiv(st["W0"], st["V"], P, value=-1)
        else:
            z = st["W"].clone() if pg else torch.empty_like(st["W"])
            prob = Subproblem(seg.groups, P, b, alpha * LAM * seg.groups.layout.group_weight, z,
                              const)
            solve_pg([prob]) if pg else solve_exact([prob])
        st["W"].lerp_(z, C)
