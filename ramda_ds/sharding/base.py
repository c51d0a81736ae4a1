"""Segments, the unsharded view, and the shared machinery of sharded views."""

from __future__ import annotations

import math
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
    column_block: tuple | None = None  # (R, first group, groups, K): a column block, not a range
    replicated: bool = False  # every rank holds this whole tensor: solve it locally, identically

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def layout_of(group: dict, shape, name: str = "<tensor>") -> GroupLayout | None:
    reg = group.get("regularizer")
    if reg == "group_lasso":
        return layout_for(shape, group.get("grouping", "input"), name)
    if reg == "l1":
        return layout_for(shape, "element", name)
    return None


def make_segment(name, shape, lo, hi, start, group, local_shape=None, group_offset=0) -> Segment:
    """A segment whose groups follow the param group's regularizer and grouping rule.

    ``local_shape``/``group_offset`` describe a column block ``[:, offset:offset+n, ...]`` of the
    original tensor held whole on this rank (FSDP2 ``Shard(1)``) instead of a flat range.
    """
    layout = layout_of(group, shape, name)
    groups = block = None
    if local_shape is not None:
        cols = layout or layout_for(shape, "input", name)  # unregularized: for gathering only
        ncols = (hi - lo) // (cols.rows * cols.inner)
        block = (cols.rows, group_offset, ncols, cols.inner)
        if layout is not None:
            groups = SegmentGroups(GroupLayout(layout.rows, ncols, layout.inner),
                                   group_offset=group_offset, weight_layout=layout)
    elif layout is not None:
        groups = SegmentGroups(layout, start, start + hi - lo)
    return Segment(name, tuple(shape), lo, hi, start, groups, column_block=block)


class Unsharded:
    """Single process or replicated data parallel (DDP): every tensor is a whole parameter."""

    comm: Reducer = LOCAL
    sharded = False

    def segments(self, p: torch.Tensor, group: dict, index: int) -> list[Segment]:
        names = group.get("param_names")
        name = names[index] if names else f"param_groups[{group.get('_index', '?')}][{index}]"
        shapes = group.get("param_shapes")
        shape = tuple(shapes[index]) if shapes and len(shapes) == len(group["params"]) \
            and math.prod(shapes[index]) == p.numel() else tuple(p.shape)
        return [make_segment(name, shape, 0, p.numel(), 0, group)]

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor this rank computes on (a DTensor's local shard)."""
        return t

    def handed(self, optimizer):
        """(tensor, param group, index) for every tensor the optimizer is handed at a step."""
        for group in optimizer.param_groups:
            for k, p in enumerate(group["params"]):
                yield p, group, k

    def master_loaded(self) -> None:
        """Master weights were overwritten (checkpoint load): refresh any copies the model uses."""

    def wrap_state(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """How a per-element state tensor is stored (FSDP2: a DTensor like ``p``)."""
        return t


class ShardedView(Unsharded):
    """Common part of sharded views: caches segments and computes which groups span ranks.

    Subclasses implement :meth:`describe`, returning for a handed tensor one entry per original
    parameter it can hold, **in the same order on every rank** (empty ranges included), so that
    every rank builds the same list of subproblems and issues the same collectives.
    """

    sharded = True

    def __init__(self, comm: Reducer, names: dict[int, str]):
        self.comm, self.names = comm, names
        self._cache: dict[int, list[Segment]] = {}

    def describe(self, p: torch.Tensor, group: dict) -> list[dict]:
        """``make_segment`` keyword arguments for each original parameter of ``p``."""
        raise NotImplementedError

    def segments(self, p, group, index):
        key = id(p)
        if key not in self._cache:
            segs = [make_segment(group=group, **d) for d in self.describe(p, group)]
            attach_spans(segs, self.comm, self.local(p.detach()).device)
            self._cache[key] = segs
        return self._cache[key]

    def name(self, p: torch.Tensor) -> str:
        return self.names.get(id(p), f"<unnamed {tuple(p.shape)}>")


def attach_spans(segs: list[Segment], comm, device=None) -> None:
    """Mark the groups of each segment that other ranks also touch (one all-gather, once).

    Rank r touches groups ``[lo_r, lo_r + n_r)`` of a parameter.  Groups touched by ≥ 2 ranks are
    *spanning*: they get consecutive slots in the per-parameter reduction block, identical on every
    rank; each is *owned* (objective, counts) by the lowest rank touching it.  A tensor that every
    rank holds whole (replicated: DDP-like parts of a model) needs no reduction and gets no span;
    partial overlaps (e.g. HSDP over the world group) are refused.
    """
    import torch.distributed as dist

    every: list = [None] * comm.world_size
    dist.all_gather_object(every, span_inputs(segs), group=getattr(comm, "group", None))
    set_spans(segs, every, dist.get_rank(getattr(comm, "group", None)), device)


def span_inputs(segs: list[Segment]) -> list[tuple]:
    """What :func:`attach_spans` all-gathers from a rank: per segment its groups
    ``(group_lo, num_groups)`` (None if unregularized) and ``(start, numel, column_block)``."""
    return [((s.groups.group_lo, s.groups.num_groups) if s.groups is not None else None,
             (s.start, s.numel, s.column_block)) for s in segs]


def set_spans(segs: list[Segment], every: list, me: int, device=None) -> None:
    """The collective-free part of :func:`attach_spans`: ``every[r]`` is ``span_inputs`` of rank
    ``r``'s segments (same tensor, same order), ``me`` this rank; sets ``seg.span`` /
    ``seg.replicated`` of ``segs`` (this rank's).  ``bench/scale_model.py`` calls it with every
    rank's inputs computed in one process."""
    if len({len(r) for r in every}) != 1:
        raise RuntimeError("ranks disagree on the parameters of one optimizer tensor")
    for j, seg in enumerate(segs):
        ivals = [r[j][0] for r in every]
        elems = [r[j][1] for r in every]
        if len({type(v) for v in ivals}) != 1:
            raise RuntimeError(f"ranks disagree on the group structure of {seg.name}")
        if seg.groups is None:
            continue
        if len(set(elems)) == 1 and elems[0][1] > 0 and len(elems) > 1:
            seg.replicated = True  # every rank holds the same elements, computes the same result
            continue
        if seg.column_block is None:
            spans = sorted((a, a + n) for a, n, _ in elems if n)
            if any(b0 < a1 for (_, a1), (b0, _) in zip(spans, spans[1:])):
                raise ValueError(f"{seg.name}: ranks hold overlapping parts of the tensor; pass the "
                                 "process group that shards it (e.g. the shard dim of an HSDP "
                                 "mesh) to attach()")
        hi = max(a + n for a, n in ivals)
        count = torch.zeros(hi, dtype=torch.int32)
        first = torch.full((hi,), len(ivals), dtype=torch.int32)
        for r, (a, n) in reversed(list(enumerate(ivals))):
            count[a:a + n] += 1
            first[a:a + n] = r
        spanning = count >= 2
        slot = torch.cumsum(spanning.to(torch.int64), 0) - 1
        a, n = ivals[me]
        local_span = spanning[a:a + n]
        seg.span = Span(local_idx=local_span.nonzero().view(-1).to(device),
                        global_pos=slot[a:a + n][local_span].to(device),
                        count=int(spanning.sum()), owned=(first[a:a + n] == me).to(device))
