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
    """Group sparsity of every group-regularized tensor of ``optimizer`` (whole tensors only).

    ``structured=True`` measures Ŵ of the last step (needs ``keep_structured=True``) instead of
    the averaged iterate W, which is only exactly sparse once c = 1.
    """
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
    rows = tensor_sparsity(optimizer, structured)
    total = sum(r.groups * r.group_size for r in rows)
    if total == 0:
        return 0.0
    return 1.0 - sum((r.groups - r.zero_groups) * r.group_size for r in rows) / total
