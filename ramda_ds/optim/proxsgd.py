"""ProxSGD: momentum SGD followed by the proximal operator of the regularizer."""

from __future__ import annotations

import torch

from .base import StructuredOptimizer, averaging_weight, group_tau, is_regularized


class ProxSGD(StructuredOptimizer):
    r"""Per step::

        buf ← c·G (first step),  buf ← (1−c)·buf + c·G (later);   W ← prox_{lr·ψ}(W − lr·buf)

    ``c`` ∈ (0, 1] (old name ``momentum``; c = 1: no momentum) is the weight of the new gradient.
    At each milestone ``lr ← γ·lr``.
    """

    def __init__(self, params, lr=1e-1, c=None, regularizer=None, lam=0.0, grouping="input",
                 milestones=(), gamma=0.1, view=None, momentum=None):
        super().__init__(params, dict(lr=lr, c=averaging_weight(c, momentum),
                                      regularizer=regularizer, lam=lam,
                                      grouping=grouping, milestones=milestones, gamma=gamma,
                                      final_stage_ramp=False), view)

    def init_state(self, w, dtype):
        return dict(momentum_buffer=torch.zeros_like(w, dtype=dtype))

    def _update_group(self, group, present):
        c, items, updates = group["c"], [], []
        for k, p, w, g in self._params(group, present):
            st = self.local_state(p, w)
            lr = self._decayed(group, "lr", self._advance(group, st)[0])
            st["momentum_buffer"].lerp_(g, c)  # from 0, so the first step gives c·G
            x = torch.add(w.to(g.dtype), st["momentum_buffer"], alpha=-lr)
            for seg in self._segments(group, p, k):
                if is_regularized(group, seg):
                    items.append((seg, x[seg.lo:seg.hi], group_tau(group, seg, lr)))
            updates.append((w, x))
        self._prox_(group, items)
        for w, x in updates:
            w.copy_(x)
