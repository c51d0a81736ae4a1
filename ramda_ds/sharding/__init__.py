"""Sharded views: which part of which original parameter each optimizer tensor holds, per backend.

The optimizers never ask which backend they run on; they ask the optimizer's *view* (protocol and
the single-process :class:`~ramda_ds.layout.Unsharded` view in :mod:`ramda_ds.layout`). Views:

* :class:`~.deepspeed.ZeroFlatView` — DeepSpeed ZeRO-1/2 (flat fp32 partitions per param group)
* :class:`~.deepspeed.Zero3View` — DeepSpeed ZeRO-3 (flat fp32 sub-groups)
* :class:`~.fsdp.FSDP2View` — ``fully_shard`` (DTensor shards, ``Shard(0)`` or ``Shard(1)``)
* :class:`~.fsdp.FSDP1View` — ``FullyShardedDataParallel(use_orig_params=True)`` (1-D slices)

:func:`attach` picks one from the wrapped model; :func:`~.gather.gather_full_state` reassembles
whole tensors from any of them.
"""

from __future__ import annotations

from ..layout import Segment, Span, Unsharded, layout_of, make_segment
from .attach import attach
from .base import ShardedView

__all__ = ["Segment", "ShardedView", "Span", "Unsharded", "attach", "layout_of", "make_segment"]
