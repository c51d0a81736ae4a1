"""World-size independent optimizer state: every rank writes its own slices, any layout reads them.

DeepSpeed's universal checkpoint only knows Adam's state names, so ramda_ds stores its state by
*original parameter*: each rank writes one safetensors file holding, for every local segment, the
slice ``[start, start + n)`` (or column block) of the master weight (``param``) and of each
per-element state tensor of that parameter (V, U, W0, ...), plus the per-tensor scalars (step, α).
Loading under any view — 1 process, DDP, ZeRO-1/2/3, FSDP2/FSDP1 at any world size — reassembles
each needed parameter from the fragments and copies this rank's slice into its state and weights.

Loading is two-phase: everything is read and checked (names, shapes, state keys, coverage) before
the first tensor is written, so a bad checkpoint raises and leaves the optimizer untouched.
No pickle: safetensors plus JSON metadata.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .layout import ColumnBlock, fragments, region

MARKER = "COMPLETE"


class CheckpointError(ValueError):
    """The checkpoint does not fit this model/optimizer, or is incomplete or corrupt."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def write_shard(optimizer, file: Path, writer: bool = True) -> None:
    """Write this rank's fragments (master weights and state) to ``file`` via ``*.tmp`` + rename.

    ``writer=False`` writes an empty shard: used for the replicas of an unsharded (DDP) run, where
    rank 0's file already holds everything.
    """
    tensors, meta = {}, []
    for i, frag in enumerate(fragments(optimizer) if writer else ()):
        seg = frag.seg
        for key, v in frag.tensors.items():
            tensors[f"{i}/{key}"] = v.detach().cpu().contiguous()
        meta.append(dict(name=seg.name, shape=list(seg.shape), start=seg.start, numel=seg.numel,
                         block=seg.column_block.as_list() if seg.column_block else None,
                         keys=list(frag.tensors),
                         scalars={k: [v.item(), str(v.dtype).removeprefix("torch.")]
                                  for k, v in frag.scalars.items()}))
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"fragments": json.dumps(meta)})
    os.replace(tmp, file)


class SavedFragments:
    """Index of the fragments in shard files, from their metadata; tensors are read on demand and
    only the ranges a rank needs (a 7B checkpoint is not loaded whole into every rank)."""

    def __init__(self, files):
        self.handles, self.by_name = {}, {}
        for f in map(str, files):
            if not Path(f).exists():
                raise CheckpointError(f"{f} is missing from the checkpoint")
            try:
                h = safe_open(f, "pt")
                meta = json.loads(h.metadata()["fragments"])
            except Exception as e:  # truncated or corrupt file: safetensors/json errors
                raise CheckpointError(f"cannot read {f}: {e}") from e
            self.handles[f] = h
            for i, entry in enumerate(meta):
                self.by_name.setdefault(entry["name"], []).append((entry, f, i))

    def read(self, f, i, key, a=None, b=None) -> torch.Tensor:
        try:
            if a is None:
                return self.handles[f].get_tensor(f"{i}/{key}")
            return self.handles[f].get_slice(f"{i}/{key}")[a:b]
        except Exception as e:
            raise CheckpointError(f"cannot read {key!r} of fragment {i} in {f}: {e}") from e

    def keys(self, name) -> set[str]:
        return {k for entry, _, _ in self.by_name[name] for k in entry["keys"]}

    def whole(self, name, key) -> torch.Tensor:
        """The whole flat tensor ``key`` of parameter ``name`` (every element covered)."""
        pieces = self.by_name[name]
        for entry, _, _ in pieces:
            if key not in entry["keys"]:
                raise CheckpointError(f"checkpoint state of {name} has no {key!r} "
                                      "(written by another optimizer?)")
        numel = math.prod(pieces[0][0]["shape"])
        full, covered = None, torch.zeros(numel, dtype=torch.bool)
        for entry, f, i in pieces:
            t = self.read(f, i, key)
            full = torch.zeros(numel, dtype=t.dtype) if full is None else full
            r = _region(full, entry)
            r.copy_(t.view(r.shape))
            _region(covered, entry).fill_(True)
        _check_covered(covered, name, key)
        return full

    def check_covered(self, seg) -> None:
        """From the metadata: the fragments hold every element of ``seg``."""
        pieces = self.by_name[seg.name]
        if seg.column_block is not None or any(e["block"] is not None for e, _, _ in pieces):
            full = torch.zeros(math.prod(seg.shape), dtype=torch.bool)
            for entry, _, _ in pieces:
                _region(full, entry).fill_(True)
            ok = bool(seg.region(full).all())
        else:
            ok = _ranges_cover(seg.start, seg.start + seg.numel,
                               [(e["start"], e["start"] + e["numel"]) for e, _, _ in pieces])
        if not ok:
            raise CheckpointError(f"checkpoint does not cover every element of {seg.name} that "
                                  "this rank holds (a shard file is missing or foreign?)")

    def segment(self, seg, key) -> torch.Tensor:
        """The flat values of ``key`` on segment ``seg``: a range read from the overlapping
        fragments, or a column block cut from the whole tensor."""
        pieces = self.by_name[seg.name]
        if seg.column_block is not None or any(e["block"] is not None for e, _, _ in pieces):
            return seg.take(self.whole(seg.name, key))
        lo, hi = seg.start, seg.start + seg.numel
        out, covered = None, torch.zeros(hi - lo, dtype=torch.bool)
        for entry, f, i in pieces:
            a, b = max(lo, entry["start"]), min(hi, entry["start"] + entry["numel"])
            if a < b:
                t = self.read(f, i, key, a - entry["start"], b - entry["start"])
                out = torch.empty(hi - lo, dtype=t.dtype) if out is None else out
                out[a - lo:b - lo] = t
                covered[a - lo:b - lo] = True
        _check_covered(covered, seg.name, key)
        return out


def _region(full: torch.Tensor, entry: dict) -> torch.Tensor:
    """Where a saved fragment sits in the flat whole tensor ``full``."""
    block = ColumnBlock(*entry["block"]) if entry["block"] is not None else None
    return region(full, entry["start"], entry["numel"], block)


def _ranges_cover(lo: int, hi: int, ranges) -> bool:
    at = lo
    for a, b in sorted(ranges):
        if a > at:
            return False
        at = max(at, b)
    return at >= hi


def _check_covered(covered, name, key):
    if not bool(covered.all()):
        raise CheckpointError(f"checkpoint covers {int(covered.sum())} of {covered.numel()} "
                              f"needed elements of {key} of {name}")


def full_state(files) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's whole tensors ``{name: {"param": W, "grad_sum": V, ...}}`` (export, tests)."""
    frags, out = SavedFragments(files), {}
    for name, pieces in frags.by_name.items():
        shape = pieces[0][0]["shape"]
        out[name] = {k: frags.whole(name, k).view(shape) for k in sorted(frags.keys(name))}
        for key, (value, dtype) in pieces[0][0]["scalars"].items():
            out[name][key] = torch.tensor(value, dtype=getattr(torch, dtype))
    return out


def saved_steps(files) -> dict[str, float]:
    """Each saved parameter's own step counter (from the metadata; no tensor is read)."""
    out = {}
    for name, pieces in SavedFragments(files).by_name.items():
        steps = [e["scalars"]["step"][0] for e, _, _ in pieces if "step" in e["scalars"]]
        if steps:
            out[name] = max(steps)
    return out


def plan_load(optimizer, files):
    """Check the checkpoint against this rank's tensors; return ``apply()`` that reads this
    rank's ranges and copies them in.

    Checks (from the metadata, nothing read yet): every local parameter is in the checkpoint with
    the same shape and state keys, and every needed element is covered. Nothing is modified
    before ``apply()``. Segments are built first for all tensors, so that the collectives of a
    sharded view run on every rank before any rank can raise.
    """
    frags = SavedFragments(files)
    keys = {"param"} | optimizer.state_keys()
    view = optimizer.view
    handed = [(p, group, view.segments(p, group, k)) for p, group, k in view.tensors(optimizer)]
    plan = []  # (p, [(seg, keys to copy)], scalars)
    for p, group, segs in handed:
        copies, scalars = [], {}
        for seg in segs:
            pieces = frags.by_name.get(seg.name)
            if not pieces:
                raise CheckpointError(f"checkpoint has no state for parameter {seg.name} "
                                      "(a different model?)")
            if list(seg.shape) != pieces[0][0]["shape"]:
                raise CheckpointError(f"{seg.name}: checkpoint shape {pieces[0][0]['shape']} != "
                                      f"model shape {list(seg.shape)}")
            saved = frags.keys(seg.name)
            # Ŵ of the last step, and a frozen support (ramda_ds.compress): restored when present
            optional = ({"structured"} if group.get("keep_structured") else set()) | {"support"}
            optional &= saved
            if saved - optional != keys:
                raise CheckpointError(f"{seg.name}: checkpoint holds {sorted(saved)}, "
                                      f"{type(optimizer).__name__} needs {sorted(keys)} "
                                      "(written by another optimizer, or with other settings?)")
            scalars = pieces[0][0]["scalars"]  # per tensor: the same in every fragment
            if seg.numel:
                frags.check_covered(seg)
                copies.append((seg, keys | optional))
        plan.append((p, copies, scalars))

    @torch.no_grad()
    def apply():
        for p, copies, scalars in plan:
            local = view.local(p.detach())
            lp = local.reshape(-1)  # a copy when the layout is not contiguous (channels_last)
            # state also for an empty local shard: its step and α must match the other ranks'
            st = optimizer.local_state(p, lp)
            for seg, seg_keys in copies:
                for key in seg_keys:
                    if key != "param" and key not in st:  # optional state, made by a step
                        st[key] = optimizer.add_state(p, key)
                    target = lp if key == "param" else st[key]
                    target[seg.lo:seg.hi].copy_(frags.segment(seg, key))
            if lp.numel() and lp.data_ptr() != local.data_ptr():
                local.copy_(lp.view(local.shape))
            for key, (value, _) in scalars.items():
                st[key].fill_(value)
        view.after_load()  # e.g. ZeRO's bit16 copies of the master weights
    return apply


def save_optimizer_state(optimizer, path) -> None:
    """Write this rank's slices under ``path`` (all ranks call); rank 0 marks it COMPLETE last."""
    path = Path(path)
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    write_shard(optimizer, path / f"rank{rank}.safetensors")
    if dist:
        dist.barrier()
    if rank == 0:
        world = dist.get_world_size() if dist else 1
        (path / MARKER).write_text(json.dumps({"world_size": world}))
    if dist:
        dist.barrier()


def load_optimizer_state(optimizer, path) -> None:
    """Fill this rank's optimizer state (and master weights) from a directory of any world size."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise CheckpointError(f"{path} is not a complete ramda_ds optimizer checkpoint "
                              f"(no {MARKER} marker: an interrupted save?)")
    world = json.loads((path / MARKER).read_text())["world_size"]
    plan_load(optimizer, [path / f"rank{r}.safetensors" for r in range(world)])()
