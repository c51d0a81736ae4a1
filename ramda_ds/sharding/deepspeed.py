"""DeepSpeed ZeRO views: the optimizer is handed flat fp32 partitions, not parameters.

* ZeRO-1/2: one flat partition per param group per rank (``single_partition_of_fp32_groups``).
  Each bit16 parameter ``lp`` of the group has ``lp._hp_mapping`` (None when it has no element on
  this rank): ``hp_fragment_address.start/numel`` is the range in the partition,
  ``lp_fragment_address.start`` where it starts in the flattened parameter.  Cuts fall anywhere,
  mid-row included.
* ZeRO-3: every parameter is split into ``ds_tensor.ds_numel`` elements per rank (the last rank
  padded); the flat sub-group tensors (``fp32_partitioned_groups_flat``) concatenate them.
"""

from __future__ import annotations

from .base import ShardedView


class ZeroFlatView(ShardedView):
    """ZeRO stage 1 and 2."""

    def __init__(self, zero_optimizer, comm, names, local_solve=False):
        super().__init__(comm, names, local_solve)
        self.zero = zero_optimizer

    def describe(self, p, group):
        flats = self.zero.single_partition_of_fp32_groups
        i = next((k for k, f in enumerate(flats) if f is p), None)
        if i is None:
            raise RuntimeError("tensor handed to the optimizer is not a ZeRO-1/2 fp32 partition")
        out = []
        for lp in self.zero.bit16_groups[i]:
            m = getattr(lp, "_hp_mapping", None)
            if m is None:
                lo = hi = start = 0
            else:
                lo = m.hp_fragment_address.start
                hi = lo + m.hp_fragment_address.numel
                start = m.lp_fragment_address.start
            out.append(dict(name=self.name(lp), shape=tuple(lp.shape), lo=lo, hi=hi, start=start))
        return out

    def after_load(self):
        """bit16 params ← fp32 partitions, all-gathered (what DeepSpeed does after a step)."""
        self.zero.update_lp_params()


class Zero3View(ShardedView):
    """ZeRO stage 3."""

    def __init__(self, zero_optimizer, comm, names, rank: int, local_solve=False):
        super().__init__(comm, names, local_solve)
        self.zero, self.rank = zero_optimizer, rank

    def describe(self, p, group):
        flats = self.zero.fp32_partitioned_groups_flat
        i = next((k for k, f in enumerate(flats) if f is p), None)
        if i is None:
            raise RuntimeError("tensor handed to the optimizer is not a ZeRO-3 fp32 sub-group")
        out, offset = [], 0
        for param in self.zero.fp16_groups[i]:
            part = param.ds_tensor.ds_numel
            begin = self.rank * part
            valid = max(0, min(part, param.ds_numel - begin))
            out.append(dict(name=self.name(param), shape=tuple(param.ds_shape), lo=offset,
                            hi=offset + valid, start=min(begin, param.ds_numel)))
            offset += part
        return out

    def tensors(self, optimizer):
        """ZeRO-3 empties ``params`` between sub-group steps: list the sub-groups instead."""
        for i, flat in enumerate(self.zero.fp32_partitioned_groups_flat):
            yield flat, optimizer.param_groups[self.zero.sub_group_to_group_id[i]], 0

    def after_load(self):
        """bit16 partitions (``ds_tensor``) ← fp32 partitions, as ZeRO-3's ``step`` does: release
        every gathered parameter first (ZeRO-3 keeps small "persistent" ones gathered after a
        forward, which would keep stale full copies), copy, then gather the persistent ones again.
        Every rank calls it."""
        import torch

        self.zero._partition_all_parameters()
        with torch.no_grad():
            for bit16, fp32 in zip(self.zero.fp16_partitioned_groups_flat,
                                   self.zero.fp32_partitioned_groups_flat):
                if bit16 is not None and bit16.data_ptr() != fp32.data_ptr():
                    bit16.copy_(fp32)
        persistent = self.zero.persistent_parameters
        if persistent:
            persistent[0].all_gather(persistent)
