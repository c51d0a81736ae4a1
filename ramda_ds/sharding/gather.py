"""Reassemble whole per-parameter tensors from any view's local fragments (for tests, export and
resharding checkpoints): ``{name: {"param": W, "grad_sum": V, ...}}`` on every rank."""

from __future__ import annotations

import math

import torch

from ..layout import fragments, region


def gather_full_state(optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Every rank's fragments, all-gathered and placed into whole tensors of the original shape."""
    placed = [(f.seg.name, f.seg.shape, f.seg.start, f.seg.column_block,
               {k: t.detach().cpu().clone() for k, t in f.tensors.items()})
              for f in fragments(optimizer)]
    if optimizer.view.sharded:
        import torch.distributed as dist

        group = getattr(optimizer.view.comm, "group", None)
        every: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, placed, group=group)
        placed = [x for r in every for x in r]
    out: dict[str, dict[str, torch.Tensor]] = {}
    shapes = {}
    for name, shape, start, block, tensors in placed:
        entry, shapes[name] = out.setdefault(name, {}), shape
        for key, t in tensors.items():
            full = entry.setdefault(key, torch.zeros(math.prod(shape), dtype=t.dtype))
            r = region(full, start, t.numel(), block)
            r.copy_(t.view(r.shape))
    return {n: {k: v.view(shapes[n]) for k, v in e.items()} for n, e in out.items()}
