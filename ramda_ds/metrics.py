"""Structure metrics: weighted group sparsity (the paper's headline number) and per-tensor sparsity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import fragments


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
    """Group sparsity of every group-regularized tensor (λ > 0) of ``optimizer``.

    ``structured=True`` measures Ŵ of the last step (needs ``keep_structured=True``) instead of
    the averaged iterate W, which is only exactly sparse once c = 1. Every rank counts nonzeros
    per group on its fragments; under a sharded view one all-reduce completes the counts (all
    ranks must call it). A group is zero iff all its entries are exactly 0.
    """
    key = "structured" if structured else "param"
    view, layouts, counts = optimizer.view, {}, {}
    for frag in fragments(optimizer):
        seg = frag.seg
        if seg.groups is None or frag.group["lam"] == 0:
            continue
        if key not in frag.tensors:
            raise ValueError(f"no structured point for {seg.name}: construct the optimizer with "
                             "keep_structured=True and take a step first")
        lay = seg.groups.layout
        if seg.name not in counts:
            layouts[seg.name] = lay
            counts[seg.name] = torch.zeros(lay.groups, dtype=torch.float64)
        nz = seg.groups.sum((frag.tensors[key] != 0).float()).cpu()
        counts[seg.name][seg.groups.group_lo:seg.groups.group_lo + seg.groups.num_groups] += nz
    if view.sharded:  # ranks without an element of some tensor learn it from the others
        import torch.distributed as dist

        group = getattr(view.comm, "group", None)
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, list(layouts.items()), group=group)
        layouts = dict(kv for r in every for kv in r)  # the same order on every rank
    buf = torch.cat([counts.get(n, torch.zeros(lay.groups, dtype=torch.float64))
                     for n, lay in layouts.items()]) if layouts else torch.zeros(0)
    if view.sharded and buf.numel():  # on the parameters' device (NCCL has no CPU backend)
        device = next((view.local(p.detach()).device for p, _, _ in view.tensors(optimizer)), None)
        buf = buf.to(device)
        view.comm.sum_(buf)
        buf = buf.cpu()
    out, off = [], 0
    for name, lay in layouts.items():
        c = buf[off:off + lay.groups]
        off += lay.groups
        out.append(TensorSparsity(name, lay.groups, int((c == 0).sum()), lay.group_size))
    return out


def weighted_group_sparsity(optimizer, structured: bool = False) -> float:
    """WGS = 1 − Σ(#nonzero groups·|g|) / Σ(#groups·|g|) over regularized tensors."""
    return wgs_of(tensor_sparsity(optimizer, structured))


def wgs_of(rows: list[TensorSparsity]) -> float:
    """WGS of per-tensor counts already computed by :func:`tensor_sparsity`."""
    total = sum(r.groups * r.group_size for r in rows)
    if total == 0:
        return 0.0
    return 1.0 - sum((r.groups - r.zero_groups) * r.group_size for r in rows) / total
