"""World-size independent optimizer state: every rank writes its own slices, any layout reads them.

DeepSpeed's universal checkpoint only knows Adam's state names, so ramda_ds stores its state by
*original parameter*: each rank writes ``rank{r}.safetensors`` holding, for every local segment, the
slice ``[start, start + n)`` (or column block) of each per-element state tensor of that parameter
(V, U, W0, ...) plus the per-tensor scalars (step, α). Loading under any view — 1 process, DDP,
ZeRO-1/2/3, FSDP2/FSDP1 at any world size — reassembles each needed parameter from the fragments
and copies this rank's slice into its state. Files are written to ``*.tmp`` and renamed; rank 0
writes ``COMPLETE`` after a barrier, and loading refuses a directory without it. No pickle:
safetensors plus JSON metadata.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _fragments(optimizer):
    """(segment, state dict of flat local tensors) for every local segment with elements."""
    view = optimizer.view
    for p, group, k in view.handed(optimizer):
        st = optimizer.state.get(p)
        if not st:
            continue
        local = {key: (view.local(v).reshape(-1) if torch.is_tensor(v) and v.dim() else v)
                 for key, v in st.items()}
        for seg in view.segments(p, group, k):
            if seg.numel:
                yield seg, local


def save_optimizer_state(optimizer, path) -> None:
    """Write this rank's slices of the optimizer state under ``path`` (all ranks must call)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    tensors, meta = {}, []
    for i, (seg, st) in enumerate(_fragments(optimizer)):
        entry = dict(name=seg.name, shape=list(seg.shape), start=seg.start, numel=seg.numel,
                     block=list(seg.column_block) if seg.column_block else None, keys=[], scalars={})
        for key, v in st.items():
            if torch.is_tensor(v) and v.dim():
                tensors[f"{i}/{key}"] = v[seg.lo:seg.hi].detach().cpu().contiguous()
                entry["keys"].append(key)
            elif torch.is_tensor(v):
                entry["scalars"][key] = [v.item(), str(v.dtype).removeprefix("torch.")]
        meta.append(entry)
    tmp = path / f"rank{rank}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"fragments": json.dumps(meta)})
    os.replace(tmp, path / f"rank{rank}.safetensors")
    if dist:
        dist.barrier()
    if rank == 0:
        world = dist.get_world_size() if dist else 1
        (path / MARKER).write_text(json.dumps({"world_size": world}))
    if dist:
        dist.barrier()


def load_optimizer_state(optimizer, path) -> None:
    """Fill this rank's optimizer state from a directory written at any world size."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete ramda_ds optimizer checkpoint "
                                f"(no {MARKER} marker: an interrupted save?)")
    world = json.loads((path / MARKER).read_text())["world_size"]
    files = [path / f"rank{r}.safetensors" for r in range(world)]
    frags = []  # (entry, {key: tensor})
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f} missing from the checkpoint written by {world} ranks")
        data = load_file(str(f))
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            meta = json.loads(h.metadata()["fragments"])
        for i, entry in enumerate(meta):
            frags.append((entry, {key: data[f"{i}/{key}"] for key in entry["keys"]}))
    by_name: dict[str, list] = {}
    for entry, ts in frags:
        by_name.setdefault(entry["name"], []).append((entry, ts))

    view = optimizer.view
    for p, group, k in view.handed(optimizer):
        segs = [s for s in view.segments(p, group, k) if s.numel]
        if not segs:
            continue
        lp = view.local(p.detach()).reshape(-1)
        st = optimizer._state(p, lp, torch.zeros_like(lp, dtype=torch.float32
                                                      if lp.dtype != torch.float64 else lp.dtype))
        for seg in segs:
            pieces = by_name.get(seg.name)
            if not pieces:
                raise KeyError(f"checkpoint has no optimizer state for parameter {seg.name}")
            if list(seg.shape) != pieces[0][0]["shape"]:
                raise ValueError(f"{seg.name}: checkpoint shape {pieces[0][0]['shape']} != model "
                                 f"shape {list(seg.shape)}")
            for key, target in st.items():
                if not (torch.is_tensor(target) and target.dim()):
                    continue
                full = _assemble(pieces, key, seg.shape, target.dtype)
                if seg.column_block is None:
                    part = full[seg.start:seg.start + seg.numel]
                else:
                    R, c0, n, K = seg.column_block
                    part = full.view(R, -1, K)[:, c0:c0 + n, :].reshape(-1)
                target[seg.lo:seg.hi].copy_(part)
            for key, (value, dtype) in pieces[0][0]["scalars"].items():
                st[key].fill_(value)


def _assemble(pieces, key, shape, dtype):
    full = torch.zeros(math.prod(shape), dtype=dtype)
    covered = 0
    for entry, ts in pieces:
        if key not in ts:
            raise KeyError(f"checkpoint state of {entry['name']} has no {key!r} (another optimizer?)")
        t = ts[key].to(dtype)
        if entry["block"] is None:
            full[entry["start"]:entry["start"] + entry["numel"]] = t
        else:
            R, c0, n, K = entry["block"]
            full.view(R, -1, K)[:, c0:c0 + n, :] = t.view(R, n, K)
        covered += entry["numel"]
    if covered < full.numel():
        raise ValueError(f"checkpoint covers {covered} of {full.numel()} elements of {key}")
    return full
