"""Which part of which original parameter each tensor handed to the optimizer holds.

The optimizers never ask which backend they run on.  For every tensor ``p`` in a param group they
ask the group's view for its :class:`Segment` list: contiguous local flat ranges, each naming the
original parameter, its shape, where the range starts in it, and (for sharded backends) which of
its groups cross into other ranks.  The math then runs on ``p.view(-1)[seg.lo:seg.hi]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import LOCAL, Reducer
from ..groups import GroupLayout, SegmentGroups, layout_for
from ..solvers import Span


@dataclass
class Segment:
    name: str  # original parameter name
    shape: tuple  # original parameter shape
    lo: int  # local flat range in the handed tensor
    hi: int
    start: int  # where the range starts in the flattened original parameter
    groups: SegmentGroups | None  # group structure of the range, None if unregularized
    span: Span | None = None  # groups crossing shards (None: all groups whole on this rank)

    @property
    def numel(self) -> int:
        return self.hi - self.lo


class Unsharded:
    """Single process or replicated data parallel (DDP): every tensor is a whole parameter."""

    comm: Reducer = LOCAL

    def segments(self, p: torch.Tensor, group: dict, index: int) -> list[Segment]:
        names = group.get("param_names")
        name = names[index] if names else f"param_groups[{group.get('_index', '?')}][{index}]"
        return [make_segment(name, tuple(p.shape), 0, p.numel(), 0, group)]


def make_segment(name, shape, lo, hi, start, group, span=None) -> Segment:
    """A segment whose groups follow the param group's regularizer and grouping rule."""
    reg = group.get("regularizer")
    groups = None
    if reg in ("group_lasso", "l1"):
        grouping = "element" if reg == "l1" else group.get("grouping", "input")
        groups = SegmentGroups(layout_for(shape, grouping, name), start, start + hi - lo)
    return Segment(name, tuple(shape), lo, hi, start, groups, span)


def layout_of(group: dict, shape, name: str = "<tensor>") -> GroupLayout | None:
    reg = group.get("regularizer")
    if reg == "group_lasso":
        return layout_for(shape, group.get("grouping", "input"), name)
    if reg == "l1":
        return layout_for(shape, "element", name)
    return None


__all__ = ["Segment", "Unsharded", "make_segment", "layout_of"]
