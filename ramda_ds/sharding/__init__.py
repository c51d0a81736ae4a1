"""Which part of which original parameter each tensor handed to the optimizer holds.

The optimizers never ask which backend they run on.  For every tensor ``p`` in a param group they
ask the optimizer's *view* for its :class:`Segment` list: local flat ranges, each naming the
original parameter, its shape, where the range starts in it, its group structure, and which of its
groups cross into other ranks (:class:`ramda_ds.solvers.Span`).  The math then runs on
``local(p).view(-1)[seg.lo:seg.hi]``.

Views: :class:`Unsharded` (single process, DDP), :class:`~.deepspeed.ZeroFlatView` (ZeRO-1/2),
:class:`~.deepspeed.Zero3View` (ZeRO-3), :class:`~.fsdp.FSDP2View` (``fully_shard``).
:func:`attach` picks one from the wrapped model.
"""

from __future__ import annotations

from .base import Segment, ShardedView, Unsharded, layout_of, make_segment
from .attach import attach

__all__ = ["Segment", "ShardedView", "Unsharded", "attach", "layout_of", "make_segment"]
