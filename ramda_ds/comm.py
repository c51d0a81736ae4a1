"""How partial per-group sums are combined across ranks.

The math in :mod:`ramda_ds.solvers` only ever calls :meth:`Reducer.sum_` / :meth:`Reducer.max_` on
one flat float64 buffer per solver iteration.  Single-process and replicated (DDP) runs use
:data:`LOCAL`, which does nothing; sharded runs pass a reducer over the data-parallel group.
"""

from __future__ import annotations

import torch


class Reducer:
    """No communication: every group is whole on this process."""

    world_size = 1

    def sum_(self, buf: torch.Tensor) -> None:  # noqa: D401 - in-place all-reduce
        """All-reduce ``buf`` by sum, in place."""

    def max_(self, buf: torch.Tensor) -> None:
        """All-reduce ``buf`` by max, in place."""


LOCAL = Reducer()


class ProcessGroupReducer(Reducer):
    """All-reduce over a ``torch.distributed`` process group, counting calls and bytes."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.world_size = dist.get_world_size(group)
        self.calls = 0
        self.bytes = 0

    def _reduce(self, buf: torch.Tensor, op) -> None:
        self.calls += 1
        self.bytes += buf.numel() * buf.element_size()
        self._dist.all_reduce(buf, op=op, group=self.group)

    def sum_(self, buf: torch.Tensor) -> None:
        self._reduce(buf, self._dist.ReduceOp.SUM)

    def max_(self, buf: torch.Tensor) -> None:
        self._reduce(buf, self._dist.ReduceOp.MAX)
