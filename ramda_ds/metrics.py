"""Structure metrics: weighted group sparsity (the paper's headline number) and per-tensor sparsity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sharding import layout_of


@dataclass
class TensorSparsity:
    name: str
    groups: int
    zero_groups: int
    group_size: int

    @property
    def sparsity(self) -> float:
        return self.zero_groups / self.groups if self.groups else 0.0


def zero_groups(x: torch.Tensor, layout) -> torch.Tensor:
    """Boolean per group: all entries exactly 0."""
    v = x.detach().reshape(layout.rows, layout.groups, layout.inner)
    return (v != 0).sum(dim=(0, 2)) == 0


def tensor_sparsity(optimizer, structured: bool = False) -> list[TensorSparsity]:
    """Group sparsity of every group-regularized tensor of ``optimizer``.

    ``structured=True`` measures Ŵ of the last step (needs ``keep_structured=True``) instead of
    the averaged iterate W, which is only exactly sparse once c = 1. Under a sharded view every
    rank counts nonzeros per group on its slice and one all-reduce completes the counts (all ranks
    must call it).
    """
    if getattr(optimizer.view, "sharded", False):
        return _sharded_tensor_sparsity(optimizer, structured)
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names")
        for k, p in enumerate(group["params"]):
            name = names[k] if names else f"param_groups[{gi}][{k}]"
            layout = layout_of(group, p.shape, name)
            if layout is None or group["lam"] == 0:
                continue
            x = p
            if structured:
                st = optimizer.state.get(p, {})
                if "structured" not in st:
                    raise ValueError(f"no structured point for {name}: construct the optimizer with "
                                     "keep_structured=True and take a step first")
                x = st["structured"].view_as(p)
            z = zero_groups(x, layout)
            out.append(TensorSparsity(name, layout.groups, int(z.sum()), layout.group_size))
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


def _sharded_tensor_sparsity(optimizer, structured: bool) -> list[TensorSparsity]:
    import torch.distributed as dist

    view, rows, counts = optimizer.view, {}, {}
    for p, group, k in view.handed(optimizer):
        if group.get("regularizer") not in ("group_lasso", "l1") or group["lam"] == 0:
            continue
        x = p
        if structured:
            st = optimizer.state.get(p, {})
            if "structured" not in st:
                raise ValueError("no structured point: construct the optimizer with "
                                 "keep_structured=True and take a step first")
            x = st["structured"]
        flat = view.local(x.detach()).reshape(-1)
        for seg in view.segments(p, group, k):
            lay = seg.groups.layout
            if seg.name not in counts:
                rows[seg.name] = lay
                counts[seg.name] = torch.zeros(lay.groups, dtype=torch.float64)
            nz = seg.groups.sum((flat[seg.lo:seg.hi] != 0).float()).cpu()
            counts[seg.name][seg.groups.group_lo:seg.groups.group_lo + seg.groups.num_groups] += nz
    every: list = [None] * dist.get_world_size(getattr(view.comm, "group", None))
    dist.all_gather_object(every, sorted(rows.items()), group=getattr(view.comm, "group", None))
    layouts = dict(kv for r in every for kv in r)  # every rank lists every tensor, in one order
    buf = torch.cat([counts.get(n, torch.zeros(lay.groups, dtype=torch.float64))
                     for n, lay in sorted(layouts.items())]) if layouts else torch.zeros(0)
    if buf.numel():  # on the parameters' device (NCCL has no CPU backend)
        device = next((view.local(p.detach()).device for p, _, _ in view.handed(optimizer)), None)
        buf = buf.to(device)
        view.comm.sum_(buf)
        buf = buf.cpu()
    out, off = [], 0
    for name, lay in sorted(layouts.items()):
        c = buf[off:off + lay.groups]
        off += lay.groups
        out.append(TensorSparsity(name, lay.groups, int((c == 0).sum()), lay.group_size))
    return out
