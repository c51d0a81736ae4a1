"""RAMDA (Huang & Lee, NeurIPS 2024, Alg. 1)."""

from __future__ import annotations

import math

import torch

from ..solvers import Subproblem
from ..stages import dual_averaging_stage
from . import fast
from .base import StructuredOptimizer, averaging_weight, group_tau, is_regularized
from .fast import kernel_plan, tensor_paths  # noqa: F401 (the run's log; the names it had here)

_tensor_paths = tensor_paths


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
    (keep Ŵ of the last step in ``state[p]["structured"]``, 4 more bytes/parameter),
    ``warm_start`` (exact solver: start each group's Newton iteration at its previous μ; same
    root to fp32 precision, fewer passes; the μ are not checkpointed, so a resumed run's first
    step starts cold and differs from the uninterrupted one within that precision),
    ``backend`` (``"torch"``, the default: the reference, bitwise equal across every sharding
    backend; ``"native"`` (CPU C loops), ``"triton"``, ``"auto"`` (native on CPU, Triton on CUDA,
    each once it built and matched): one pass for all tensors of a group, equal to the torch path
    within float32 rounding, for float32 tensors, unsharded or sharded; see
    :mod:`ramda_ds.kernels`).
    """

    restart_zero = ("grad_sum", "grad_sq_sum", "alpha")
    restart_copy = ("initial",)
    kernel_kind = "ramda"
    kernel_support = {"native": ("pg", "exact"), "triton": ("pg", "exact")}

    def __init__(self, params, lr=1e-2, c=None, eps=1e-6, regularizer=None, lam=0.0,
                 grouping="input", solver="pg", max_iters=100, rtol=1e-8, inexact_eps0=None,
                 milestones=(), gamma=0.1, final_stage_ramp=True, keep_structured=False, view=None,
                 momentum=None, warm_start=False, backend="torch"):
        super().__init__(params, dict(lr=lr, c=averaging_weight(c, momentum), eps=eps,
                                      regularizer=regularizer,
                                      lam=lam, grouping=grouping, solver=solver, max_iters=max_iters,
                                      rtol=rtol, inexact_eps0=inexact_eps0, milestones=milestones,
                                      gamma=gamma, final_stage_ramp=final_stage_ramp,
                                      keep_structured=keep_structured,
                                      warm_start=warm_start, backend=backend), view)

    def init_state(self, w, dtype):
        return dict(alpha=torch.zeros((), dtype=torch.float64),
                    grad_sum=torch.zeros_like(w, dtype=dtype),
                    grad_sq_sum=torch.zeros_like(w, dtype=dtype), initial=w.to(dtype, copy=True))

    def _update_group(self, group, present):
        if group.get("adamw"):  # the recovery stage of a size target (ramda_ds.compress)
            return self._adamw_group(group, present)
        handled = fast.step(self, group, present)  # backend ≠ "torch": the kernels' tensors
        present = present - handled  # the rest (all, with backend="torch") takes the torch path
        items, updates = [], []
        for k, p, w, g in self._params(group, present):
            st = self.local_state(p, w)
            stage, i = self._advance(group, st)
            s = self._decayed(group, "lr", stage) * math.sqrt(i)  # s_t = lr·√t
            st["alpha"] += s
            segs = [seg for seg in self._segments(group, p, k) if is_regularized(group, seg)]
            pg = group["solver"] != "exact"
            V, U, W0 = st["grad_sum"], st["grad_sq_sum"], st["initial"]
            # V += s·G, U += s·G², P = ∛U + ε, b = P∘W0 − V, const = (½P∘W0 − V)∘W0 (PG's Q only)
            P, b, const = dual_averaging_stage(g, V, U, W0, s, self._decayed(group, "eps", stage),
                                               want_const=pg and bool(segs))
            w_hat = _start_point(w, W0, V, P, segs, warm=pg)  # W0 − V/P off the regularized ranges
            for seg in segs:
                r = slice(seg.lo, seg.hi)
                tau = group_tau(group, seg, st["alpha"].item())
                items.append((seg, Subproblem(seg.groups, P[r], b[r], tau, w_hat[r],
                                              None if const is None else const[r], seg.span), i))
            updates.append((p, w, st, w_hat, self._c(group, stage, i)))
        self._solve(group, items)
        for p, w, st, w_hat, c in updates:
            w.lerp_(w_hat.to(w.dtype), c)  # W ← (1−c)W + cŴ
            if group["keep_structured"]:
                self.state[p]["structured"] = self.view.wrap_state(p, w_hat)
            self._maybe_restart(group, st, w)

    def _adamw_group(self, group, present):
        """AdamW on the group (``group["adamw"]``: betas, eps; lr: the stage's, lr·γ^stage), in
        RAMDA's own buffers:
        ``grad_sum`` holds m and ``grad_sq_sum`` v (zeroed by the restart that starts the stage),
        so the state keeps its keys, size and sharding. With t the step in the stage::

            m ← β1·m + (1−β1)·G;  v ← β2·v + (1−β2)·G²;  W ← W − lr/(1−β1^t) · m/(√v/√(1−β2^t) + eps)
        """
        (b1, b2), eps = group["adamw"]["betas"], group["adamw"]["eps"]
        for _, p, w, g in self._params(group, present):
            st = self.local_state(p, w)
            stage, t = self._advance(group, st)
            lr = self._decayed(group, "lr", stage)
            m, v = st["grad_sum"], st["grad_sq_sum"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
            w.addcdiv_(m.to(w.dtype), denom.to(w.dtype), value=-lr / (1 - b1 ** t))
            if group["keep_structured"]:
                self.state[p]["structured"] = self.view.wrap_state(p, w.to(m.dtype, copy=True))

    def kernel_scalars(self, group, p, w):
        """Advance tensor ``p``'s step and α exactly as the torch path does (for the kernels'
        plan): ``(state, (V, U, W0), [s = lr·√t, ε, c], α)``."""
        st = self.local_state(p, w)
        stage, i = self._advance(group, st)
        s = self._decayed(group, "lr", stage) * math.sqrt(i)  # s_t = lr·√t
        st["alpha"] += s
        return (st, (st["grad_sum"], st["grad_sq_sum"], st["initial"]),
                [s, self._decayed(group, "eps", stage), self._c(group, stage, i)],
                st["alpha"].item())


def _start_point(w, W0, V, P, segs, warm: bool) -> torch.Tensor:
    """Ŵ before the solve: the unregularized solution ``W0 − V/P`` outside the regularized
    segments and the solver's start inside them (PG: warm start at W_{t−1}; the exact solver
    needs none).  A tensor that is regularized everywhere skips the division."""
    if sum(seg.hi - seg.lo for seg in segs) == V.numel():  # segments are disjoint
        return w.to(V.dtype, copy=True) if warm else torch.empty_like(V)
    w_hat = torch.addcdiv(W0, V, P, value=-1)
    for seg in segs if warm else ():
        w_hat[seg.lo:seg.hi] = w[seg.lo:seg.hi]
    return w_hat
