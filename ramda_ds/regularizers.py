r"""The regularizers ψ, one class each: what a param group's ``regularizer`` option means.

A :class:`Regularizer` says

* ``grouping(group)`` — the grouping rule of :func:`ramda_ds.groups.layout_for` its groups follow
  (``None``: no group structure, e.g. the nuclear norm, which acts on the whole 2-D weight);
* ``regularizes(group, seg)`` — whether a segment of a tensor is regularized at all (λ = 0 is
  not: it takes the optimizer's closed-form unregularized update, exactly MADGRAD / AdamW / SGD);
* ``tau(group, seg, scale)`` — the threshold per unit group norm, ``scale · λ · w_g``;
* ``prox_(items, comm)`` — in place ``x ← prox_{τψ}(x)`` (RMDA, ProxSGD);
* ``solve(prob, shape, group)`` — a subproblem it solves on its own (L1's closed form, the nuclear
  norm's PG), or ``batched = True``: the screening + PG / exact solvers of :mod:`ramda_ds.solvers`
  solve all of a step's subproblems together (the group lasso);
* ``kernels`` — whether the fused step kernels (:mod:`ramda_ds.kernels`) implement it.

Adding a regularizer is adding a class here and an entry in :data:`REGULARIZERS`.  This module
imports only torch, :mod:`ramda_ds.groups` and :mod:`ramda_ds.solvers`, so every layer above it
(the layouts, the kernels' selection, the optimizers) asks it rather than comparing names.
"""

from __future__ import annotations

import torch

from .comm import LOCAL, Reducer
from .groups import layout_for
from .solvers import (SolverStats, Subproblem, group_soft_threshold, singular_value_threshold,
                      solve_l1, solve_nuclear_pg)


class Regularizer:
    """ψ = 0 (``regularizer=None``): every tensor takes the unregularized update."""

    name: str | None = None
    batched = False
    kernels = True  # the unregularized update is the kernels' "free" row
    whole_tensors = False  # its prox needs whole tensors (no ZeRO/FSDP sharding)

    def column_groups(self, group: dict) -> bool:
        """Whether every group is a set of whole columns ``W[:, j, ...]`` (so an FSDP2
        ``Shard(1)`` block holds whole groups)."""
        return False

    def grouping(self, group: dict) -> str | None:
        return None

    def layout(self, group: dict, shape, name: str = "<tensor>"):
        """The group layout of a tensor of ``shape`` (None: no group structure)."""
        rule = self.grouping(group)
        return None if rule is None else layout_for(shape, rule, name)

    def group_weight(self, seg) -> float:
        return 1.0

    def regularizes(self, group: dict, seg) -> bool:
        return False

    def tau(self, group: dict, seg, scale: float) -> float:
        """Threshold per unit group norm: ``scale · λ · w_g``."""
        return scale * group["lam"] * self.group_weight(seg)

    def prox_(self, items, comm: Reducer = LOCAL) -> None:
        """In place ``x ← prox_{τψ}(x)`` for ``(segment, flat x, τ)`` items."""

    def solve(self, prob: Subproblem, shape, group: dict) -> SolverStats | None:
        raise NotImplementedError(f"{type(self).__name__} has no subproblem")

    def validate(self, group: dict, where: str, whole_tensors: bool) -> str | None:
        """Why ``group`` cannot use this regularizer, or None."""
        return None


class GroupLasso(Regularizer):
    """ψ = λ Σ_g √|g| ‖W_g‖ over the groups of ``grouping``."""

    name = "group_lasso"
    batched = True

    def grouping(self, group):
        return group.get("grouping", "input")

    def column_groups(self, group):
        return self.grouping(group) == "input"

    def group_weight(self, seg):
        return seg.groups.layout.group_weight

    def regularizes(self, group, seg):
        return group["lam"] > 0 and seg.groups is not None

    def prox_(self, items, comm=LOCAL):
        if not items:
            return
        probs = [Subproblem(s.groups, x, x, tau, x, span=s.span) for s, x, tau in items]
        group_soft_threshold([x for _, x, _ in items], [s.groups for s, _, _ in items],
                             [tau for *_, tau in items], comm, probs)


class L1(GroupLasso):
    """ψ = λ‖W‖₁: every entry its own group of size 1 (weight 1)."""

    name = "l1"
    batched = False
    kernels = False

    def grouping(self, group):
        return "element"

    def column_groups(self, group):
        return False  # (elements are, but Shard(1) of L1 was never offered)

    def group_weight(self, seg):
        return 1.0

    def prox_(self, items, comm=LOCAL):
        for _, x, tau in items:
            x.copy_(torch.sign(x) * (x.abs() - tau).clamp_min_(0.0))

    def solve(self, prob, shape, group):
        solve_l1(prob)
        return None


class Nuclear(Regularizer):
    """ψ = λ‖W‖_* per 2-D weight (App. E): singular values soft-thresholded."""

    name = "nuclear"
    kernels = False
    whole_tensors = True

    def regularizes(self, group, seg):
        return group["lam"] > 0

    def prox_(self, items, comm=LOCAL):
        for seg, x, tau in items:
            x.copy_(singular_value_threshold(x.view(seg.shape), tau).view(-1))

    def solve(self, prob, shape, group):
        return solve_nuclear_pg(prob, shape, group["max_iters"], group["rtol"])

    def validate(self, group, where, whole_tensors):
        if whole_tensors and not all(p.dim() == 2 for p in group["params"]):
            return f"{where}: the nuclear norm needs 2-D weights"
        return None


REGULARIZERS: dict[str | None, Regularizer] = {r.name: r for r in (Regularizer(), GroupLasso(),
                                                                    L1(), Nuclear())}


def regularizer_of(group: dict) -> Regularizer:
    """The :class:`Regularizer` of a param group (KeyError for an unknown name)."""
    return REGULARIZERS[group.get("regularizer")]


def group_tau(group: dict, seg, scale: float) -> float:
    """Threshold per unit group norm: scale · λ · w_g (w_g = sqrt|g| for group lasso, else 1)."""
    return regularizer_of(group).tau(group, seg, scale)


def is_regularized(group: dict, seg) -> bool:
    """λ = 0 takes the closed-form unregularized update (exactly MADGRAD / AdamW / SGD)."""
    return regularizer_of(group).regularizes(group, seg)


def active(group: dict) -> bool:
    """Whether the group's regularizer acts at all (λ > 0 and a regularizer named): the one rule
    for "unregularized group" that the kernels' selection and the torch path share."""
    return group["lam"] > 0 and group.get("regularizer") is not None
