"""Which slice of which original parameter a local tensor holds: the one owner of that question.

Every tensor an optimizer is handed (a whole parameter, a ZeRO-1/2 flat fp32 partition, a ZeRO-3
flat sub-group, an FSDP2 DTensor shard, an FSDP1 1-D slice) is described by its *view* as a list
of :class:`Segment`\\ s: a local flat range ``[lo, hi)`` that holds either the flat range
``[start, start + n)`` of the row-major flattened original parameter, or a :class:`ColumnBlock`
``W[:, first:first + count, ...]`` of it (FSDP2 ``Shard(1)``). Group structure follows from the
original shape and the param group's rule alone (:mod:`ramda_ds.groups`).

:func:`fragments` is the one generator of "segment + local slices of the master weight and of
every state tensor" that checkpoints, ``gather_full_state`` and the metrics consume.

The view protocol (:class:`Unsharded` is the single-process / DDP view; the sharded views live in
:mod:`ramda_ds.sharding` and subclass it):

* ``tensors(optimizer)`` → ``(tensor, param group, index)`` for every tensor handed at a step
* ``segments(tensor, group, index)`` → ``list[Segment]``
* ``local(t)`` → the tensor this rank computes on (a DTensor's local shard)
* ``wrap_state(param, t)`` → how a per-element state tensor is stored (FSDP2: a DTensor)
* ``comm_for(segment)`` → the :class:`~ramda_ds.comm.Reducer` that completes its group sums
* ``after_load()`` → refresh the model's copies after the master weights were overwritten

This module imports only torch, :mod:`ramda_ds.groups`, :mod:`ramda_ds.comm` (both leaves) and
:mod:`ramda_ds.regularizers` (each regularizer's grouping rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .comm import LOCAL, Reducer
from .groups import GroupLayout, SegmentGroups, layout_for
from .regularizers import regularizer_of


@dataclass
class Span:
    """Where a segment's groups that cross shards sit in the step's reduction buffer.

    ``local_idx[i]`` (local group index) maps to position ``global_pos[i]`` in a block of
    ``count`` slots that every rank agrees on.  ``owned`` marks the local groups whose objective
    and counts this rank reports (each group is owned by exactly one rank).
    """

    local_idx: torch.Tensor
    global_pos: torch.Tensor
    count: int
    owned: torch.Tensor


@dataclass(frozen=True)
class ColumnBlock:
    """The block ``[:, first:first + count, :]`` of the ``[rows, C, inner]`` view of a parameter,
    held whole on one rank (FSDP2 ``Shard(1)``); locally it is a ``[rows, count, inner]`` tensor."""

    rows: int
    first: int
    count: int
    inner: int

    def region(self, full: torch.Tensor) -> torch.Tensor:
        """This block inside the flat whole tensor ``full`` (a view: read it or write into it)."""
        return full.view(self.rows, -1, self.inner)[:, self.first:self.first + self.count, :]

    def as_list(self) -> list[int]:
        return [self.rows, self.first, self.count, self.inner]


def region(full: torch.Tensor, start: int, numel: int, block: ColumnBlock | None) -> torch.Tensor:
    """The part of the flat whole tensor ``full`` that a fragment holds (a view)."""
    return full[start:start + numel] if block is None else block.region(full)


@dataclass
class Segment:
    name: str  # original parameter name
    shape: tuple  # original parameter shape
    lo: int  # local flat range in the handed tensor
    hi: int
    start: int  # where the range starts in the flattened original parameter
    groups: SegmentGroups | None  # group structure of the range, None if unregularized
    span: Span | None = None  # groups crossing shards (None: all groups whole on this rank)
    column_block: ColumnBlock | None = None  # set: the range holds this block, not a flat range
    replicated: bool = False  # every rank holds this whole tensor: solve it locally, identically

    @property
    def numel(self) -> int:
        return self.hi - self.lo

    def region(self, full: torch.Tensor) -> torch.Tensor:
        """Where this segment's values sit in the flat whole parameter ``full``."""
        return region(full, self.start, self.numel, self.column_block)

    def place(self, full: torch.Tensor, local: torch.Tensor) -> None:
        """Scatter this segment's flat local values into the flat whole tensor ``full``."""
        r = self.region(full)
        r.copy_(local.view(r.shape))

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """Gather this segment's values from the flat whole tensor ``full`` (flat, local order)."""
        return self.region(full).reshape(-1)


def layout_of(group: dict, shape, name: str = "<tensor>") -> GroupLayout | None:
    """Group layout of a tensor of the param group (None: no group structure): its
    regularizer's grouping rule (:mod:`ramda_ds.regularizers`)."""
    return regularizer_of(group).layout(group, shape, name)


def make_segment(name, shape, lo, hi, start, group, local_shape=None, group_offset=0) -> Segment:
    """A segment whose groups follow the param group's regularizer and grouping rule.

    ``local_shape``/``group_offset`` describe a column block ``[:, offset:offset+n, ...]`` of the
    original tensor held whole on this rank (FSDP2 ``Shard(1)``) instead of a flat range.
    """
    layout = layout_of(group, shape, name)
    groups = block = None
    if local_shape is not None:
        cols = layout or layout_for(shape, "input", name)  # unregularized: for gathering only
        block = ColumnBlock(cols.rows, group_offset, (hi - lo) // (cols.rows * cols.inner),
                            cols.inner)
        if layout is not None:
            groups = SegmentGroups(GroupLayout(layout.rows, block.count, layout.inner),
                                   group_offset=group_offset, weight_layout=layout)
    elif layout is not None:
        groups = SegmentGroups(layout, start, start + hi - lo)
    return Segment(name, tuple(shape), lo, hi, start, groups, column_block=block)


@dataclass
class Fragment:
    """One segment with this rank's flat slices of the master weight (``"param"``) and of every
    per-element state tensor, plus the tensor's scalar state (step, α) as 0-d tensors."""

    seg: Segment
    group: dict
    tensors: dict[str, torch.Tensor]
    scalars: dict[str, torch.Tensor]


def fragments(optimizer, skip_empty: bool = True) -> Iterator[Fragment]:
    """Every local segment of every tensor ``optimizer`` is handed, with its slices (views: copy
    them before keeping them beyond the step)."""
    view = optimizer.view
    for p, group, k in view.tensors(optimizer):
        flat = {"param": view.local(p.detach()).reshape(-1)}
        scalars = {}
        for key, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):
                if v.dim():
                    flat[key] = view.local(v).reshape(-1)
                else:
                    scalars[key] = v
        for seg in view.segments(p, group, k):
            if skip_empty and not seg.numel:
                continue
            yield Fragment(seg, group, {key: t[seg.lo:seg.hi] for key, t in flat.items()}, scalars)


class Unsharded:
    """Single process or replicated data parallel (DDP): every tensor is a whole parameter.

    Param groups carry ``param_names`` and ``param_shapes`` (the optimizer fills them in when the
    caller did not), so names and shapes are never guessed here.
    """

    comm: Reducer = LOCAL
    sharded = False
    local_solve = False

    def tensors(self, optimizer):
        """(tensor, param group, index) for every tensor the optimizer is handed at a step."""
        for group in optimizer.param_groups:
            for k, p in enumerate(group["params"]):
                yield p, group, k

    def segments(self, p: torch.Tensor, group: dict, index: int) -> list[Segment]:
        name, shape = group["param_names"][index], tuple(group["param_shapes"][index])
        if math.prod(shape) != p.numel():
            raise ValueError(f"{name}: the optimizer holds {p.numel()} elements but its param "
                             f"group records shape {list(shape)}; a wrapper replaced the parameters "
                             "after the optimizer was built: call ramda_ds.sharding.attach(opt, model)")
        return [make_segment(name, shape, 0, p.numel(), 0, group)]

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor this rank computes on (a DTensor's local shard)."""
        return t

    def wrap_state(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """How a per-element state tensor is stored (FSDP2: a DTensor like ``p``)."""
        return t

    def comm_for(self, seg: Segment) -> Reducer:
        """Who completes this segment's group sums: nobody (LOCAL) when every group is whole here
        — replicated tensors, and with ``local_solve`` tensors none of whose groups crosses ranks
        — else the data-parallel reducer."""
        if seg.replicated or (self.local_solve and seg.span is not None and seg.span.count == 0):
            return LOCAL
        return self.comm

    def after_load(self) -> None:
        """Master weights were overwritten (checkpoint load): refresh any copies the model uses."""
