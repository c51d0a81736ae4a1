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


def exit_process(code: int = 0) -> None:
    """End this process at once with ``code``, after flushing stdout/stderr; call it as the last
    statement of a distributed script, after every rank met at a barrier.

    A normal interpreter shutdown runs the C++ destructors of the gloo process group while a peer
    may already have closed its sockets; that intermittently aborts a rank after all its work is
    done ("terminate called without an active exception", exit -6, so the launcher reports a
    failure). ``os._exit`` skips those destructors; files, checkpoints and logs are closed by then.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
