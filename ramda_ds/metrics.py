"""Structure metrics: weighted group sparsity (the paper's headline number) and per-tensor sparsity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from typing import Callable

from .layout import Fragment, fragments


@dataclass
class TensorSparsity:
    name: str
    groups: int
    zero_groups: int
    group_size: int

    @property
    def sparsity(self) -> float:
        return self.zero_groups / self.groups if self.groups else 0.0


def tensor_sparsity(optimizer, structured: bool = False) -> list[TensorSparsity]:
    """Group sparsity of every group-regularized tensor (λ > 0, or under a size target).

    ``structured=True`` measures Ŵ of the last step (needs ``keep_structured=True``) instead of
    the averaged iterate W, which is only exactly sparse once c = 1. A group is zero iff all its
    entries are exactly 0 (counted by :func:`group_totals`: one all-reduce when sharded).
    """
    key = "structured" if structured else "param"

    def nonzero(frag):
        if key not in frag.tensors:
            raise ValueError(f"no structured point for {frag.seg.name}: construct the optimizer "
                             "with keep_structured=True and take a step first")
        return (frag.tensors[key] != 0).float()
    return [TensorSparsity(name, lay.groups, int((c == 0).sum()), lay.group_size)
            for name, (lay, c) in group_totals(optimizer, nonzero).items()]


def weighted_group_sparsity(optimizer, structured: bool = False) -> float:
    """WGS = 1 − Σ(#nonzero groups·|g|) / Σ(#groups·|g|) over regularized tensors."""
    return wgs_of(tensor_sparsity(optimizer, structured))


def wgs_of(rows: list[TensorSparsity]) -> float:
    """WGS of per-tensor counts already computed by :func:`tensor_sparsity`."""
    total = sum(r.groups * r.group_size for r in rows)
    if total == 0:
        return 0.0
    return 1.0 - sum((r.groups - r.zero_groups) * r.group_size for r in rows) / total


# ---------------------------------------------------------------------------- per-group totals
def tracked(group: dict) -> bool:
    """Whether a param group's grouped tensors are counted: group-regularized with λ > 0, or
    under a size target (λ is then set per step and is 0 once the support is frozen)."""
    return group.get("regularizer") in ("group_lasso", "l1") and (
        group.get("lam", 0) > 0 or bool(group.get("target")))


def group_totals(optimizer, quantity: Callable[[Fragment], torch.Tensor],
                 include: Callable[[dict], bool] = tracked) -> dict:
    """``{name: (GroupLayout, per-group totals of quantity(fragment))}``, float64 on the CPU.

    ``quantity(fragment)`` is a flat tensor over the fragment's elements; groups that span ranks
    are completed with one all-reduce, so every rank returns the same (every rank must call it).
    ``include(param_group)`` picks the tensors (default :func:`tracked`).
    """
    view, layouts, totals = optimizer.view, {}, {}
    for frag in fragments(optimizer):
        seg = frag.seg
        if seg.groups is None or not include(frag.group):
            continue
        lay = seg.groups.layout
        if seg.name not in totals:
            layouts[seg.name] = lay
            totals[seg.name] = torch.zeros(lay.groups, dtype=torch.float64)
        part = seg.groups.sum(quantity(frag).to(torch.float64)).cpu()
        totals[seg.name][seg.groups.group_lo:seg.groups.group_lo + seg.groups.num_groups] += part
    if view.sharded:  # ranks without an element of some tensor learn its layout from the others
        import torch.distributed as dist

        group = getattr(view.comm, "group", None)
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, list(layouts.items()), group=group)
        layouts = dict(kv for r in every for kv in r)  # the same order on every rank
    buf = torch.cat([totals.get(n, torch.zeros(lay.groups, dtype=torch.float64))
                     for n, lay in layouts.items()]) if layouts else torch.zeros(0, dtype=torch.float64)
    if view.sharded and buf.numel():  # on the parameters' device (NCCL has no CPU backend)
        device = next((view.local(p.detach()).device for p, _, _ in view.tensors(optimizer)), None)
        buf = buf.to(device)
        view.comm.sum_(buf)
        buf = buf.cpu()
    out, off = {}, 0
    for name, lay in layouts.items():
        out[name] = (lay, buf[off:off + lay.groups])
        off += lay.groups
    return out
