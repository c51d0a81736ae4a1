"""Reassemble whole per-parameter tensors from any view's local segments (for tests, export and
resharding checkpoints): ``{name: {"param": W, "grad_sum": V, ...}}`` on every rank."""

from __future__ import annotations

import math

import torch


def _local_fragments(optimizer):
    view = optimizer.view
    frags = []
    for p, group, k in view.handed(optimizer):
        flat = view.local(p.detach()).reshape(-1)
        st = optimizer.state.get(p, {})
        tensors = {"param": flat}
        for key, v in st.items():
            if torch.is_tensor(v) and v.dim():
                tensors[key] = view.local(v).reshape(-1)
        for seg in view.segments(p, group, k):
            if seg.numel == 0:
                continue
            frags.append((seg.name, seg.shape, seg.start, seg.column_block,
                          {key: t[seg.lo:seg.hi].detach().cpu().clone() for key, t in tensors.items()}))
    return frags


def gather_full_state(optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Every rank's fragments, all-gathered and placed into whole tensors of the original shape."""
    frags = _local_fragments(optimizer)
    if optimizer.view.sharded:
        import torch.distributed as dist

        group = getattr(optimizer.view.comm, "group", None)
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, frags, group=group)
        frags = [f for r in every for f in r]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape, start, block, tensors in frags:
        entry = out.setdefault(name, {})
        for key, t in tensors.items():
            full = entry.setdefault(key, torch.zeros(math.prod(shape), dtype=t.dtype))
            if block is None:
                full[start:start + t.numel()] = t
            else:  # a column block [:, c0:c0+n, :] held whole (FSDP2 Shard(1))
                R, c0, n, K = block
                full.view(R, -1, K)[:, c0:c0 + n, :] = t.view(R, n, K)
    return {n: {k: v.view(shape_of(frags, n)) for k, v in e.items()} for n, e in out.items()}


def shape_of(frags, name):
    return next(f[1] for f in frags if f[0] == name)
