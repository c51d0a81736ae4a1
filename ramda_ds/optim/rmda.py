"""RMDA (Huang, Chen & Lee, ICLR 2022): regularized modernized dual averaging."""

from __future__ import annotations

import math

import torch

from .base import StructuredOptimizer, averaging_weight, group_tau, is_regularized


class RMDA(StructuredOptimizer):
    r"""Per step t of the stage (``s_t = lr·√t``, ``α_t = α_{t−1} + s_t``)::

        V += s_t·G;   Ŵ = prox_{(α_t/√t)·ψ}(W0 − V/√t);   W ← (1−c)·W + c·Ŵ

    The prox is closed form (group soft-threshold, L1 soft-threshold, singular-value
    soft-threshold). State: ``grad_sum`` (V), ``initial`` (W0). Restarts and ``c`` (old name
    ``momentum``) as in :class:`RAMDA`.
    """

    restart_zero = ("grad_sum", "alpha")
    restart_copy = ("initial",)

    def __init__(self, params, lr=1e-1, c=None, regularizer=None, lam=0.0, grouping="input",
                 milestones=(), gamma=0.1, final_stage_ramp=True, view=None, momentum=None):
        super().__init__(params, dict(lr=lr, c=averaging_weight(c, momentum),
                                      regularizer=regularizer, lam=lam,
                                      grouping=grouping, milestones=milestones, gamma=gamma,
                                      final_stage_ramp=final_stage_ramp), view)

    def init_state(self, w, dtype):
        return dict(alpha=torch.zeros((), dtype=torch.float64),
                    grad_sum=torch.zeros_like(w, dtype=dtype), initial=w.to(dtype, copy=True))

    def _update_group(self, group, present):
        items, updates = [], []
        for k, p, w, g in self._params(group, present):
            st = self.local_state(p, w)
            stage, t = self._advance(group, st)
            s = self._decayed(group, "lr", stage) * math.sqrt(t)
            st["alpha"] += s
            st["grad_sum"].add_(g, alpha=s)
            w_hat = torch.add(st["initial"], st["grad_sum"], alpha=-1 / math.sqrt(t))
            for seg in self._segments(group, p, k):
                if is_regularized(group, seg):
                    tau = group_tau(group, seg, st["alpha"].item() / math.sqrt(t))
                    items.append((seg, w_hat[seg.lo:seg.hi], tau))
            updates.append((w, st, w_hat, self._c(group, stage, t)))
        self._prox_(group, items)
        for w, st, w_hat, c in updates:
            w.lerp_(w_hat.to(w.dtype), c)
            self._maybe_restart(group, st, w)
