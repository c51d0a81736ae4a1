"""RAMDA (Huang & Lee, NeurIPS 2024, Alg. 1)."""

from __future__ import annotations

import math

import torch

from ..solvers import Subproblem
from .base import StructuredOptimizer, averaging_weight, group_tau, is_regularized


_CHUNK = 1 << 16


def cube_root(U: torch.Tensor) -> torch.Tensor:
    """∛U, the same for an element wherever it sits in a tensor.

    CPU kernels compute ``pow`` with SIMD code for the body of a loop and scalar code for its
    tails, which differ in the last ulp; a parameter's elements fall in different tails unsharded
    and sharded, so the float32 results would differ.  On CPU we take the float64 cube root
    (whose rounding to float32 hides that ulp) in cache-sized chunks; GPU ``pow`` is already
    per-element.
    """
    if U.device.type != "cpu" or U.dtype != torch.float32:
        return U.pow(1 / 3)
    out = torch.empty_like(U)
    for i in range(0, U.numel(), _CHUNK):
        out[i:i + _CHUNK].copy_(U[i:i + _CHUNK].double().pow_(1 / 3))
    return out


class RAMDA(StructuredOptimizer):
    r"""Regularized Adaptive Momentum Dual Averaging.

    Per step t of the current stage (``s_t = lr·√t``, ``α_t = α_{t−1} + s_t``)::

        V += s_t·G;   U += s_t·G∘G;   P = ∛U + ε
        Ŵ ≈ argmin_Z ⟨V, Z−W0⟩ + ½⟨Z−W0, P∘(Z−W0)⟩ + α_t·ψ(Z)   (screening + PG, or exact)
        W ← (1−c)·W + c·Ŵ

    Unregularized tensors take ``Ŵ = W0 − V/P``: with ``regularizer=None`` this is MADGRAD with
    ``momentum = 1 − c`` (MADGRAD adds eps to lr). State per tensor: ``grad_sum`` (V),
    ``grad_sq_sum`` (U), ``initial`` (W0): 12 bytes/parameter in fp32. At each milestone
    ``lr, ε ← γ·lr, γ·ε`` and ``t, α, V, U ← 0``, ``W0 ← W``.

    Args: ``lr`` (η), ``c`` (the paper's averaging weight ∈ (0, 1]; ``momentum`` is its older
    name, see :func:`~.base.averaging_weight`), ``eps`` (ε), ``regularizer`` /
    ``lam`` / ``grouping`` (ψ), ``solver`` (``"pg"`` or ``"exact"``), ``max_iters``, ``rtol``
    (PG early stop), ``inexact_eps0`` (stop PG on condition (7) with ``ε_t = inexact_eps0/t``
    instead), ``milestones`` / ``gamma`` / ``final_stage_ramp`` (restarts), ``keep_structured``
    (keep Ŵ of the last step in ``state[p]["structured"]``, 4 more bytes/parameter).
    """

    restart_zero = ("grad_sum", "grad_sq_sum", "alpha")
    restart_copy = ("initial",)

    def __init__(self, params, lr=1e-2, c=None, eps=1e-6, regularizer=None, lam=0.0,
                 grouping="input", solver="pg", max_iters=100, rtol=1e-8, inexact_eps0=None,
                 milestones=(), gamma=0.1, final_stage_ramp=True, keep_structured=False, view=None,
                 momentum=None):
        super().__init__(params, dict(lr=lr, c=averaging_weight(c, momentum), eps=eps,
                                      regularizer=regularizer,
                                      lam=lam, grouping=grouping, solver=solver, max_iters=max_iters,
                                      rtol=rtol, inexact_eps0=inexact_eps0, milestones=milestones,
                                      gamma=gamma, final_stage_ramp=final_stage_ramp,
                                      keep_structured=keep_structured), view)

    def init_state(self, w, dtype):
        return dict(alpha=torch.zeros((), dtype=torch.float64),
                    grad_sum=torch.zeros_like(w, dtype=dtype),
                    grad_sq_sum=torch.zeros_like(w, dtype=dtype), initial=w.to(dtype, copy=True))

    def _update_group(self, group, present):
        items, updates = [], []
        for k, p, w, g in self._params(group, present):
            st = self.local_state(p, w)
            stage, i = self._advance(group, st)
            s = self._decayed(group, "lr", stage) * math.sqrt(i)  # s_t = lr·√t
            st["alpha"] += s
            V, U, W0 = st["grad_sum"], st["grad_sq_sum"], st["initial"]
            V.add_(g, alpha=s)
            U.addcmul_(g, g, value=s)
            P = cube_root(U).add_(self._decayed(group, "eps", stage))
            w_hat = torch.addcdiv(W0, V, P, value=-1)  # unregularized solution W0 − V/P
            for seg in self._segments(group, p, k):
                if not is_regularized(group, seg):
                    continue
                r = slice(seg.lo, seg.hi)
                w_hat[r] = w[r]  # warm start at W_{t−1}
                tau = group_tau(group, seg, st["alpha"].item())
                const = (0.5 * P[r] * W0[r] - V[r]).mul_(W0[r])
                items.append((seg, Subproblem(seg.groups, P[r], P[r] * W0[r] - V[r], tau, w_hat[r],
                                              const, seg.span), i))
            updates.append((p, w, st, w_hat, self._c(group, stage, i)))
        self._solve(group, items)
        for p, w, st, w_hat, c in updates:
            w.lerp_(w_hat.to(w.dtype), c)  # W ← (1−c)W + cŴ
            if group["keep_structured"]:
                self.state[p]["structured"] = self.view.wrap_state(p, w_hat)
            self._maybe_restart(group, st, w)
