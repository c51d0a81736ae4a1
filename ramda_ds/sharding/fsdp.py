"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors.

``Shard(0)`` (the default) gives each rank a block of whole rows: a contiguous flat range of the
original tensor, so input-wise groups (columns) span ranks and their partial sums are reduced.
``Shard(1)`` on an input-grouped weight (``shard_placement_fn``, see :func:`shard_columns`) gives
each rank whole columns: every group is local and the prox needs no communication at all.
Optimizer state tensors are stored as DTensors with the parameter's placements, so DCP can save
and reshard them.
"""

from __future__ import annotations

import math

import torch

from ..regularizers import regularizer_of
from .base import ShardedView


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


class FSDP2View(ShardedView):
    def __init__(self, comm, names, model=None, local_solve=False):
        super().__init__(comm, names, local_solve)
        self.model = model  # the fully_shard-ed module (for after_load)

    def after_load(self):
        """Drop unsharded copies of the parameters: the root module keeps its parameters
        all-gathered after a forward without backward (evaluation), so the next forward would
        use the old values; after ``reshard()`` it all-gathers the new shards."""
        from torch.distributed.fsdp import FSDPModule

        for m in (self.model.modules() if self.model is not None else ()):
            if isinstance(m, FSDPModule):
                m.reshard()

    def local(self, t):
        return t.to_local() if isinstance(t, _dtensor_cls()) else t

    def wrap_state(self, p, t):
        if not isinstance(p, _dtensor_cls()) or t.dim() == 0:
            return t
        local = p.to_local()
        return _dtensor_cls().from_local(t.view(local.shape), p.device_mesh, p.placements,
                                         shape=p.shape, stride=p.stride(), run_check=False)

    def describe(self, p, group):
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        name, shape = self.name(p), tuple(p.shape)
        if not isinstance(p, _dtensor_cls()):
            return [dict(name=name, shape=shape, lo=0, hi=p.numel(), start=0)]
        local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                    p.placements)
        n = math.prod(local_shape)
        dims = [pl.dim for pl in p.placements if isinstance(pl, Shard)]
        if not dims or all(isinstance(pl, Replicate) for pl in p.placements):
            return [dict(name=name, shape=shape, lo=0, hi=n, start=0)]
        if dims == [0]:
            row = math.prod(shape[1:])
            return [dict(name=name, shape=shape, lo=0, hi=n, start=offset[0] * row)]
        if dims == [1] and (not group.get("regularizer") or group["lam"] == 0
                            or regularizer_of(group).column_groups(group)):
            return [dict(name=name, shape=shape, lo=0, hi=n, start=0, local_shape=local_shape,
                         group_offset=offset[1])]
        raise ValueError(f"{name}: FSDP2 placement {p.placements} is not supported with "
                         f"regularizer={group.get('regularizer')!r}, "
                         f"grouping={group.get('grouping')!r}; use Shard(0), or Shard(1) for "
                         "input-wise group lasso")


def shard_columns(min_numel: int = 0):
    """A ``shard_placement_fn`` for ``fully_shard`` putting input-grouped weights on ``Shard(1)``.

    Weights with ≥ 2 dims whose dim 1 (the input features / channels, i.e. the groups) divides
    evenly by the world size — FSDP2 refuses uneven ``Shard(1)`` — are split by columns, so every
    group is whole on one rank and the prox needs no communication. Everything else keeps the
    default ``Shard(0)``. Use it only where those weights are grouped input-wise (the default).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    def fn(param: torch.nn.Parameter):
        world = dist.get_world_size()
        if param.dim() >= 2 and param.numel() >= min_numel and param.shape[1] % world == 0:
            return Shard(1)
        return None

    return fn


class FSDP1View(ShardedView):
    """FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``): each original parameter is a
    1-D slice ``[intra_param_start_idx, intra_param_end_idx]`` of its flattened self (possibly
    empty: ranks without a slice also get ``grad=None``)."""

    def __init__(self, comm, names, model, local_solve=False):
        super().__init__(comm, names, local_solve)
        self.where: dict[int, tuple] = {}
        for m in model.modules():
            handle = getattr(m, "_handle", None)
            flat = getattr(handle, "flat_param", None)
            if flat is None or getattr(flat, "_params", None) is None:
                continue
            for param, info, shape, fqn in zip(flat._params, flat._shard_param_infos,
                                                flat._shapes, flat._fqns):
                self.where[id(param)] = (info, tuple(shape))

    def describe(self, p, group):
        if id(p) not in self.where:
            raise ValueError("FSDP1 needs use_orig_params=True (the optimizer must hold the "
                             "original parameters)")
        info, shape = self.where[id(p)]
        n = info.numel_in_shard if info.in_shard else 0
        start = info.intra_param_start_idx if info.in_shard else 0
        return [dict(name=self.name(p), shape=shape, lo=0, hi=n, start=start)]
