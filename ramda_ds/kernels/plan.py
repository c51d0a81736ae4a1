r"""The step plan: what an optimizer hands the fused kernels, and what it gets back.

The kernels never see an optimizer.  The optimizer (:mod:`ramda_ds.optim.fast`) decides which
tensors take them, advances their step counters, computes each tensor's scalars and thresholds,
and hands over a :class:`Plan`; :func:`execute` runs it on one kernel set and returns the solver
statistics; the optimizer then applies its own epilogue (statistics by name, Ŵ, restarts).

Schema (one :class:`TensorStep` per tensor, all tensors flat, contiguous, float32, on one device):

=============  ================================================================================
field          meaning
=============  ================================================================================
``g``          the gradient
``s1, s2``     per-element state: RAMDA ``V`` (grad_sum), ``U`` (grad_sq_sum); ProxGen ``m``, ``v``
``W0``         RAMDA's ``W0`` (initial); ``None`` for ProxGen
``w``          the parameter, updated in place (``W ← (1 − c)·W + c·Ŵ``; ProxGen ``W ← Ŵ``)
``z``          where Ŵ is written (RAMDA ``keep_structured``), or ``None``
``scalars``    RAMDA ``[s = lr·√t, ε, c]``; ProxGen ``[a = lr/(1−β1^t), ε, 1−β1, β2, 1−β2,
               √(1−β2^t), 1−lr·wd]``
``problems``   the tensor's regularized segments, each a :class:`Problem` (segment, τ, and
               whether its spanning groups are completed by ``Plan.comm``); elements outside
               them take the unregularized update ``Ŵ = W0 − V/P`` (ProxGen: AdamW's step)
=============  ================================================================================

A :class:`Plan` adds the settings of the whole step: ``kind`` (``"ramda"``/``"proxgen"``),
``solver`` (``"pg"``/``"exact"``), ``sharded`` (tensors are pieces of parameters: the pieces
table of :mod:`.sharded`), ``regularized`` (the group's regularizer acts at all), ``max_iters``,
``rtol``, ``comm`` (the reducer of spanning groups, sharded only), and three stores the caller
owns and the kernels read and update: ``warm`` (the exact solver's warm-start positions by
``(name, lo, hi)``, the same store as the torch path's; ``None``: cold), ``hints`` (PG chunk
lengths by segment name: speed only, never a result) and ``cache`` (index vectors of a sharded
table, kept between steps).

Unsharded tensors must be regularized whole or not at all (one problem covering the tensor with
one piece of groups); sharded ones may hold any segments.  :func:`execute` returns
``[(segment, SolverStats)]`` for every problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Problem:
    """One regularized segment of a tensor: its subproblem's groups and threshold."""

    seg: object  # a ramda_ds.layout.Segment (name, lo, hi, groups, span)
    tau: float  # threshold per unit group norm, α·λ·w_g (ProxGen: lr·λ·w_g)
    delayed: bool = False  # sharded: its spanning groups are completed by Plan.comm


@dataclass
class TensorStep:
    g: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    W0: torch.Tensor | None
    w: torch.Tensor
    z: torch.Tensor | None
    scalars: list
    problems: list = field(default_factory=list)


@dataclass
class Plan:
    kind: str
    solver: str
    tensors: list
    max_iters: int = 100
    rtol: float = 1e-8
    sharded: bool = False
    regularized: bool = True
    comm: object = None
    warm: dict | None = None
    hints: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].w.device


def execute(plan: Plan, path: str) -> list:
    """Run ``plan`` on the kernels of ``path`` (``"native"`` or ``"triton"``); returns
    ``[(segment, SolverStats)]`` per problem.  The parameters, state and Ŵ are updated in place."""
    if not plan.tensors:
        return []
    from . import sharded  # the table builder; PG on any table, and the sharded exact solver

    if not plan.sharded and plan.solver == "exact" and path == "native":
        from . import native  # the exact solver fused in one pass per block

        return native.run_exact(plan, sharded.build(plan, scratch=False).tab)
    if not plan.sharded and path == "triton" and (plan.solver == "exact" or not plan.regularized):
        from . import exact  # the Triton exact step (an unregularized group: τ = 0, one pass)

        return exact.run(plan)
    return sharded.run(plan, path)
