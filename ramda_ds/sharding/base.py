"""The shared machinery of sharded views: segment caching and which groups span ranks."""

from __future__ import annotations

import torch

from ..comm import Reducer
from ..layout import Segment, Span, Unsharded, make_segment


class ShardedView(Unsharded):
    """Common part of sharded views: caches segments and computes which groups span ranks.

    Subclasses implement :meth:`describe`, returning for a handed tensor one entry per original
    parameter it can hold, **in the same order on every rank** (empty ranges included), so that
    every rank builds the same list of subproblems and issues the same collectives.
    """

    sharded = True

    def __init__(self, comm: Reducer, names: dict[int, str], local_solve: bool = False):
        """``local_solve``: tensors none of whose groups crosses ranks are solved with no
        communication (see :func:`~ramda_ds.sharding.attach`)."""
        self.comm, self.names, self.local_solve = comm, names, local_solve
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
