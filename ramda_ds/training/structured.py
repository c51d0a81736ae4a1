"""The structured model Ŵ in place of the weights W, for evaluation (any backend).

RAMDA built with ``keep_structured=True`` keeps, per tensor, Ŵ of the last step (the prox point,
exactly group-sparse) as ``state[p]["structured"]``; the weights W are the average
W ← (1−c)·W + c·Ŵ, exactly sparse only once c = 1 (final restart stage). Export ships Ŵ, so its
quality is the number to report::

    with structured_weights(opt):
        ppl_hat = evaluate(model)        # the model Ŵ
    ppl_w = evaluate(model)              # W again, bitwise as before

The swap works on the optimizer's master tensors as the view hands them (a parameter, a ZeRO-1/2
flat fp32 partition, a ZeRO-3 sub-group, an FSDP2 local shard): W's local slices are copied aside,
overwritten by Ŵ's, and ``view.after_load()`` refreshes what the model computes with (ZeRO's
bit16 copies, FSDP2's unsharded parameters). On exit W is copied back and refreshed again. Every
rank must enter and leave together (the refresh communicates).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _pairs(optimizer):
    """(local master tensor, local Ŵ) for every handed tensor; ValueError if Ŵ is not kept."""
    view, out = optimizer.view, []
    for p, _, _ in view.tensors(optimizer):
        st = optimizer.state.get(p, {})
        if "structured" not in st:
            raise ValueError("no structured point Ŵ: construct RAMDA with keep_structured=True "
                             "and take a step first")
        w = view.local(p.detach())
        out.append((w, view.local(st["structured"].detach()).reshape(w.shape)))
    return out


def has_structured(optimizer) -> bool:
    """Whether ``optimizer`` (a ramda_ds optimizer, or None) keeps Ŵ for every tensor."""
    if optimizer is None or not any(g.get("keep_structured") for g in optimizer.param_groups):
        return False
    try:
        _pairs(optimizer)
    except ValueError:
        return False
    return True


@contextmanager
def structured_weights(optimizer):
    """Inside the block the model computes with Ŵ; afterwards with W, restored bitwise."""
    view = optimizer.view
    pairs = _pairs(optimizer)
    saved = []
    with torch.no_grad():
        for w, s in pairs:
            saved.append(w.clone())
            w.copy_(s)
    view.after_load()
    try:
        yield
    finally:
        with torch.no_grad():
            for (w, _), keep in zip(pairs, saved):
                w.copy_(keep)
        view.after_load()


def weights_are_structured(optimizer) -> bool:
    """Whether W == Ŵ exactly on every tensor of every rank (one all-reduce when sharded)."""
    differ = sum(not torch.equal(w, s) for w, s in _pairs(optimizer))
    if optimizer.view.comm.world_size > 1:
        device = next((w.device for w, _ in _pairs(optimizer)), None)
        t = torch.tensor([float(differ)], dtype=torch.float64, device=device)
        optimizer.view.comm.sum_(t)
        differ = int(t.item())
    return differ == 0
