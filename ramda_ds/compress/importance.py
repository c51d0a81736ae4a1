"""Unit importance for the prune-then-recover baselines (what users run without RAMDA).

Units are those of :mod:`ramda_ds.hf.units` (FFN neurons: input columns of ``down_proj``; heads:
blocks of ``o_proj`` input columns), keyed by the parameter name the optimizer uses, one score
per group:

* ``weight``: the unit's output weights' norm, ‖down_proj[:, j]‖ (‖o_proj[:, head h]‖);
* ``activation`` (as Minitron ranks width): the mean over calibration tokens of the magnitude of
  the unit's activation, |x_j| for the input x of ``down_proj`` (the L2 norm of head h's slice of
  the input of ``o_proj``), with forward hooks on an unsharded model.

:func:`keep_top` turns scores into kept masks, at one width for every tensor (``uniform``) or at
a given per-tensor allocation (e.g. the one RAMDA found).
"""

from __future__ import annotations

import math
from fnmatch import fnmatch

import torch

CRITERIA = ("weight", "activation")


def _unit_tensors(model, rules: dict[str, str]):
    """(param name, module, rule) for every targeted Linear (``down_proj`` / ``o_proj``); names
    as the optimizer knows them (a wrapper's ``module.`` prefix dropped)."""
    for mod_name, mod in model.named_modules():
        name = f"{mod_name}.weight"
        for pat, rule in rules.items():
            if fnmatch(name, pat) and isinstance(getattr(mod, "weight", None), torch.Tensor):
                yield name.removeprefix("module."), mod, rule


def _block(rule: str) -> int:
    return int(rule.split(":")[1]) if rule.startswith("head:") else 1


def weight_scores(model, rules: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod, rule in _unit_tensors(model, rules):
        w = mod.weight.detach().double()
        if rule == "output":  # GPT-2's Conv1D c_proj: units are rows
            w = w.t()
        d = _block(rule)
        out[name] = w.view(w.shape[0], -1, d).pow(2).sum(dim=(0, 2)).sqrt()
    return out


@torch.no_grad()
def activation_scores(model, rules: dict[str, str], batches, reduce=None) -> dict[str, torch.Tensor]:
    """Mean unit activation magnitude over the tokens of ``batches`` (input ids tensors).
    ``reduce(tensor)``: sums it over ranks in place (each rank passes its own batches)."""
    sums, count, hooks = {}, {"n": 0}, []
    for name, mod, rule in _unit_tensors(model, rules):
        d = _block(rule)

        def hook(m, args, name=name, d=d):
            x = args[0].detach().double()
            x = x.reshape(-1, x.shape[-1] // d, d).norm(dim=2)  # [tokens, units]
            sums[name] = sums.get(name, 0) + x.sum(0).cpu()
        hooks.append(mod.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(input_ids=x)
            count["n"] += x.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    names = sorted(sums)
    flat = torch.cat([sums[n] for n in names] + [torch.tensor([float(count["n"])],
                                                              dtype=torch.float64)])
    if reduce is not None:
        flat = reduce(flat)
    out, off = {}, 0
    for n in names:
        out[n] = flat[off:off + sums[n].numel()].cpu() / max(flat[-1].item(), 1)
        off += sums[n].numel()
    return out


def keep_top(scores: dict[str, torch.Tensor], keep: float | None = None,
             allocation: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Bool masks keeping, per tensor, its ``round(keep·n)`` best units (uniform widths) or
    ``allocation[name]`` of them."""
    out = {}
    for name, s in scores.items():
        n = s.numel()
        k = allocation[name] if allocation is not None else max(1, int(round(keep * n)))
        mask = torch.zeros(n, dtype=torch.bool)
        if k > 0:
            mask[torch.topk(s, min(k, n)).indices] = True
        out[name] = mask
    return out


def allocation_of(kept: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in kept.items()}


def kept_fraction(kept: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in kept.values())
    return sum(int(m.sum()) for m in kept.values()) / total if total else math.nan
