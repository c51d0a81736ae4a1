"""ProxGen (Yun, Lozano & Yang, NeurIPS 2021) with AdamW's preconditioner and our PG solver."""

from __future__ import annotations

import math

import torch

from ..solvers import Subproblem
from . import fast
from .base import StructuredOptimizer, group_tau, is_regularized


class ProxGen(StructuredOptimizer):
    r"""AdamW whose step is a preconditioned proximal step. Per step t::

        W ← W·(1 − lr·wd);   m ← β1·m + (1−β1)·G;   v ← β2·v + (1−β2)·G²
        D = √v/√(1−β2^t) + eps;   a = lr/(1−β1^t)
        W ← argmin_Z ⟨a·m, Z−W⟩ + ½⟨Z−W, D∘(Z−W)⟩ + lr·ψ(Z)   (screening + PG from W, or exact)

    Unregularized tensors get exactly AdamW's step ``W − a·m/D``. At each milestone
    ``lr ← γ·lr`` (moments are kept).  ``backend``: ``"torch"`` (default), or ``"native"`` /
    ``"auto"``: on CPU, PG on the C kernels of :mod:`ramda_ds.kernels.native`, unsharded or sharded
    (the exact solver and other devices take the torch path).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 regularizer=None, lam=0.0, grouping="input", solver="pg", max_iters=100,
                 rtol=1e-8, inexact_eps0=None, milestones=(), gamma=0.1, view=None,
                 warm_start=False, backend="torch"):
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      regularizer=regularizer, lam=lam, grouping=grouping,
                                      solver=solver, max_iters=max_iters, rtol=rtol,
                                      inexact_eps0=inexact_eps0, milestones=milestones, gamma=gamma,
                                      final_stage_ramp=False, warm_start=warm_start,
                                      backend=backend), view)

    kernel_kind = "proxgen"
    kernel_support = {"native": ("pg",)}

    def kernel_scalars(self, group, p, w):
        """Advance tensor ``p``'s step as the torch path does (for the kernels' plan):
        ``(state, (m, v, None), [a = lr/(1−β1^t), ε, 1−β1, β2, 1−β2, √(1−β2^t), 1−lr·wd], lr)``."""
        b1, b2 = group["betas"]
        st = self.local_state(p, w)
        lr = self._decayed(group, "lr", self._advance(group, st)[0])
        t = st["step"].item()  # per tensor, as AdamW
        return (st, (st["exp_avg"], st["exp_avg_sq"], None),
                [lr / (1 - b1 ** t), group["eps"], 1 - b1, b2, 1 - b2, math.sqrt(1 - b2 ** t),
                 1 - lr * group["weight_decay"]], lr)

    def init_state(self, w, dtype):
        return dict(exp_avg=torch.zeros_like(w, dtype=dtype), exp_avg_sq=torch.zeros_like(w, dtype=dtype))

    def _update_group(self, group, present):
        present = present - fast.step(self, group, present)  # backend ≠ "torch": the kernels'
        (b1, b2) = group["betas"]
        items, updates = [], []
        for k, p, w, g in self._params(group, present):
            st = self.local_state(p, w)
            lr = self._decayed(group, "lr", self._advance(group, st)[0])
            t = st["step"].item()  # per tensor, as AdamW
            a = lr / (1 - b1 ** t)
            m, v = st["exp_avg"], st["exp_avg_sq"]
            if group["weight_decay"]:
                w.mul_(1 - lr * group["weight_decay"])
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            D = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
            wf = w.to(g.dtype)
            am = m * a
            z = torch.addcdiv(wf, am, D, value=-1)  # AdamW step, the unregularized solution
            for seg in self._segments(group, p, k):
                if not is_regularized(group, seg):
                    continue
                r = slice(seg.lo, seg.hi)
                z[r] = wf[r]  # warm start at W
                const = None if group["solver"] == "exact" else \
                    (0.5 * D[r] * wf[r] - am[r]).mul_(wf[r])  # only PG's stop test reads it
                items.append((seg, Subproblem(seg.groups, D[r], D[r] * wf[r] - am[r],
                                              group_tau(group, seg, lr), z[r], const, seg.span),
                              int(t)))
            updates.append((w, z))
        self._solve(group, items)
        for w, z in updates:
            w.copy_(z)
