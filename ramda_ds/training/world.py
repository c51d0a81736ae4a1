"""Collectives of the training loop over the default process group (no-ops on one process)."""

from __future__ import annotations

import torch


def world_sum_(t: torch.Tensor) -> torch.Tensor:
    """All-reduce ``t`` by sum over the default process group, in place (no-op without one).

    The training loop uses this instead of ``Accelerator.reduce``, which does nothing when
    accelerate believes it is not distributed (its FSDP plugin on CPU, a manual ``fully_shard``).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def world_barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
