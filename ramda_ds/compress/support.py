"""A frozen support: the removed units of a model held at exactly zero while the rest trains.

After :func:`freeze_support` a tensor's state holds ``support`` (1 where an element is kept, 0 on
the removed groups), stored and sharded like the optimizer's other per-element state (a ZeRO
partition, an FSDP2 local shard) and checkpointed with it. At every later step the optimizer
multiplies the gradient by it before the update (:meth:`StructuredOptimizer.step`), so the
removed elements receive no gradient: with λ = 0 and W = W0 = V = 0 there, RAMDA's
Ŵ = W0 − V/P and W ← (1−c)W + cŴ stay exactly 0, and so do AdamW's (ProxGen at λ = 0) moments
and update. The kept elements train as in a model that never had the removed units (up to the
gradient-norm clip, which is taken before the step and so still counts the removed units'
gradients).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def freeze_support(optimizer, kept: dict[str, torch.Tensor], restart: bool = True) -> None:
    """Zero the removed groups (``kept[name]``: bool per group of tensor ``name``) in W (and Ŵ
    when kept), record the support, and with ``restart`` start a new stage of the optimizer's
    state from this W (App. A.1: accumulators zeroed, W0 ← W). Every rank calls it with the same
    ``kept``; afterwards the model's compute copies are refreshed (``view.after_load``)."""
    view = optimizer.view
    for p, group, k in view.tensors(optimizer):
        local = view.local(p.detach())
        w = local.view(-1) if local.is_contiguous() else local.reshape(-1)
        st = optimizer.local_state(p, w)
        segs = [s for s in view.segments(p, group, k) if s.groups is not None and s.name in kept]
        if segs:  # a support only where units are (a ZeRO partition holds other tensors too)
            support = st["support"] if "support" in st else optimizer.add_state(p, "support")
            support.fill_(1.0)
            for seg in segs:
                g, r = seg.groups, slice(seg.lo, seg.hi)
                f = kept[seg.name][g.group_lo:g.group_lo + g.num_groups].to(support.dtype)
                g.mul(support[r], f.to(support.device), out=support[r])
            w.mul_(support.to(w.dtype))
            if "structured" in st:
                st["structured"].mul_(support)
        if restart:
            for key in optimizer.restart_zero:
                st[key].zero_()
            for key in optimizer.restart_copy:
                st[key].copy_(w)
        if w.data_ptr() != local.data_ptr():
            local.copy_(w.view(local.shape))
    view.after_load()


def has_support(optimizer) -> bool:
    """Whether a support was frozen (on this rank's tensors)."""
    return any("support" in st for st in optimizer.state.values())


def kept_groups(optimizer, of_structured: bool = False) -> dict[str, torch.Tensor]:
    """``{name: bool per group}``: the groups of W (or Ŵ) with a nonzero entry (one collective
    when sharded)."""
    from ..metrics import group_totals

    key = "structured" if of_structured else "param"
    return {name: c > 0 for name, (_, c) in
            group_totals(optimizer, lambda f: (f.tensors[key] != 0).float()).items()}
