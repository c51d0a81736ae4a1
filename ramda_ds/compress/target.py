"""The size target: which fraction of units is kept at a step, and the λ that keeps exactly it.

For group lasso with a diagonal preconditioner the RAMDA subproblem is separable over groups and
its screening rule is exact (algorithms.md): with ``b = P∘W0 − V``, group g of Ŵ is zero iff
``‖b_g‖ ≤ α_t·λ·w_g``.  So every group has a *critical* value

    r_g = ‖b_g‖ / (α_t·w_g)          (Ŵ_g ≠ 0  ⇔  λ < r_g)

and the units Ŵ keeps at λ are those with r_g > λ. Keeping a fraction k of the units (weighted
by a cost per unit: 1 for a unit count, its parameters for a parameter count) is choosing λ as
the weighted (1 − k)-quantile of r: ranks are global, so how many units each layer keeps is
free, as the paper's method intends; an optional floor keeps at least ``floor`` of each
tensor's units (those with the largest r), whatever λ.

:func:`keep_schedule` is the kept fraction at step t of the identification: the cubic schedule of
gradual pruning (Zhu & Gupta, 2017), from 1 at t = 0 to the target k* at ``ramp`` and after:

    k_t = k* + (1 − k*)·(1 − min(t / ramp, 1))³
"""

from __future__ import annotations

import math

import torch


def keep_schedule(t: int, target: float, ramp: int) -> float:
    """Kept fraction at step ``t`` (1 at t = 0, ``target`` from ``ramp`` on)."""
    if ramp <= 0:
        return target
    x = 1.0 - min(t / ramp, 1.0)
    return target + (1.0 - target) * x ** 3


def select(scores: dict[str, torch.Tensor], costs: dict[str, torch.Tensor], keep: float,
           floor: float = 0.0, fixed: float = 0.0) -> tuple[float, dict[str, torch.Tensor]]:
    """(λ, ``{name: bool mask of kept groups}``): the units with the largest critical values
    ``scores`` whose cost fits ``keep·(fixed + Σ costs) − fixed`` (``fixed``: the cost no unit
    removal touches, e.g. embeddings when the target counts the model's parameters).

    One global ranking by score, after each tensor's ``ceil(floor·n)`` best units are taken
    unconditionally; units are taken in that order while the cumulative cost fits (ties: the
    stable order, tensor then index), so the kept cost is within one unit of the target. λ lies
    geometrically halfway between the best removed score and the worst kept (unprotected) one:
    at that λ the screening rule keeps exactly the unprotected part of the set.
    """
    names = list(scores)
    cat_s = torch.cat([scores[n].double() for n in names])
    cat_c = torch.cat([costs[n].double() for n in names])
    budget = keep * (fixed + float(cat_c.sum())) - fixed
    protected = torch.zeros_like(cat_s, dtype=torch.bool)
    off = 0
    for n in names:
        m = scores[n].numel()
        need = min(m, math.ceil(floor * m - 1e-9)) if floor > 0 else 0
        if need:
            top = torch.topk(scores[n].double(), need).indices + off
            protected[top] = True
        off += m
    order_key = torch.where(protected, torch.full_like(cat_s, math.inf), cat_s)
    order = torch.sort(order_key, descending=True, stable=True).indices
    cum = torch.cumsum(cat_c[order], 0)
    n_keep = int((cum <= budget + 1e-9 * max(abs(budget), 1.0)).sum())
    n_keep = max(n_keep, int(protected.sum()))
    kept = torch.zeros_like(cat_s, dtype=torch.bool)
    kept[order[:n_keep]] = True
    lam = _between(cat_s, kept & ~protected, kept)
    out, off = {}, 0
    for n in names:
        m = scores[n].numel()
        out[n] = kept[off:off + m].clone()
        off += m
    return lam, out


def _between(scores: torch.Tensor, ranked: torch.Tensor, kept: torch.Tensor) -> float:
    """λ with every removed score ≤ λ < every ranked kept score (0 when nothing is removed)."""
    if kept.all():
        return 0.0
    lo = float(scores[~kept].max())
    above = scores[ranked & (scores > lo)]
    if lo <= 0 or not above.numel():
        return max(lo, 0.0)
    return math.sqrt(lo * float(above.min()))
