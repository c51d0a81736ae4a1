"""Training-run checkpoints: one directory per step, complete or invisible, loadable at any world size.

    <root>/
      latest                        "step_00000600" — replaced (atomically) after every rank finished
      step_00000600/
        manifest.json               step, world size, fingerprint, run metadata, size + sha256 per file
        weights/rank{r}.safetensors master weights + optimizer state of rank r (ramda_ds.checkpoint)
        trainer/rank{r}.safetensors RNG states and carried tensors (e.g. Transformer-XL memory)
      step_00000800.partial/        a save in progress, or one killed: never read, removed next save

A save writes into ``*.partial``; rank 0 writes the manifest only after all ranks' files are on
disk, renames the directory, then moves ``latest`` and deletes all but the newest ``keep_last``.
Killing any process at any point leaves the previous checkpoint and ``latest`` intact. Loading
checks the manifest, the fingerprint (parameter names/shapes, regularizer layout, optimizer) and
every file's sha256 before changing anything. Requires a filesystem shared by all ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, plan_load, write_shard

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = "ramda_ds.run/1"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def fingerprint(optimizer) -> dict:
    """What must match to resume: optimizer class and, per parameter, shape and regularizer layout."""
    params = {}
    for i, g in enumerate(optimizer.param_groups):
        # DeepSpeed replaces ``params`` by flat partitions but keeps names and shapes
        names = g.get("param_names") or [f"param_groups[{i}][{k}]" for k in range(len(g["params"]))]
        shapes = g.get("param_shapes") or [tuple(p.shape) for p in g["params"]]
        for name, shape in zip(names, shapes):
            params[name] = dict(shape=list(shape), regularizer=g.get("regularizer"),
                                grouping=g.get("grouping") if g.get("regularizer") else None)
    return dict(optimizer=type(optimizer).__name__, params=params)


def compare_fingerprints(saved: dict, current: dict) -> None:
    """Raise CheckpointError naming the first difference."""
    if saved["optimizer"] != current["optimizer"]:
        raise CheckpointError(f"checkpoint was written by {saved['optimizer']}, this run uses "
                              f"{current['optimizer']}")
    a, b = saved["params"], current["params"]
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise CheckpointError("checkpoint is of a different model: parameters only in the "
                              f"checkpoint {only_a[:3]}, only in this model {only_b[:3]}")
    for name in a:
        for key in ("shape", "regularizer", "grouping"):
            if a[name][key] != b[name][key]:
                raise CheckpointError(f"{name}: checkpoint {key} {a[name][key]!r} != this run's "
                                      f"{b[name][key]!r}")


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (torch CPU, CUDA if present; Python's as JSON bytes)."""
    out = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng/cuda"] = torch.cuda.get_rng_state()
    py = json.dumps(random.getstate(), default=list).encode()
    out["rng/python"] = torch.frombuffer(bytearray(py), dtype=torch.uint8)
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available() and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    if "rng/python" in tensors:
        v, state, g = json.loads(bytes(tensors["rng/python"].tolist()))
        random.setstate((v, tuple(state), g))


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return path.stat().st_size, h.hexdigest()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Loaded:
    """A checked checkpoint: ``apply()`` installs weights and optimizer state (nothing changed
    before); ``meta`` is the run metadata; ``trainer[r]`` rank r's saved tensors."""

    path: Path
    step: int
    world_size: int
    meta: dict
    trainer: list
    apply: object


class RunCheckpointer:
    def __init__(self, root, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last
        d = _dist()
        self.rank, self.world = (d.get_rank(), d.get_world_size()) if d else (0, 1)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
        """Every rank calls this at the same step; returns the final directory."""
        d = _dist()
        name = f"step_{step:08d}"
        part, final = self.root / f"{name}.partial", self.root / name
        if self.rank == 0:
            for stale in self.root.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            part.mkdir(parents=True)
        if d:
            d.barrier()
        view = optimizer.view
        shard = part / "weights" / f"rank{self.rank}.safetensors"
        write_shard(optimizer, shard, writer=view.sharded or self.rank == 0)
        trainer = part / "trainer" / f"rank{self.rank}.safetensors"
        trainer.parent.mkdir(exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(trainer))
        mine = {str(f.relative_to(part)): _sha256(f) for f in (shard, trainer)}
        every = [None] * self.world
        if d:
            d.all_gather_object(every, mine)
        else:
            every = [mine]
        if self.rank == 0:
            files = {k: dict(bytes=s, sha256=h) for r in every for k, (s, h) in r.items()}
            manifest = dict(format=FORMAT, step=step, world_size=self.world,
                            fingerprint=fingerprint(optimizer), meta=meta, files=files)
            _write_text(part / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():  # re-saving a step (e.g. after resuming from it)
                old = self.root / f"{name}.old.partial"
                os.replace(final, old)
                os.replace(part, final)
                shutil.rmtree(old)
            else:
                os.replace(part, final)
            _write_text(self.root / LATEST, name)
            self._prune(keep=final)
        if d:
            d.barrier()
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and
                      not p.name.endswith(".partial") and (p / MANIFEST).exists())
        for p in done[:-self.keep_last]:
            if p != keep:
                shutil.rmtree(p)

    # ------------------------------------------------------------------ loading
    def resolve(self, spec: str) -> Path | None:
        """``"auto"``: the latest checkpoint under root, or None; otherwise a checkpoint directory
        (or a root holding ``latest``), which must exist."""
        if spec == "auto":
            latest = self.root / LATEST
            return self.root / latest.read_text().strip() if latest.exists() else None
        p = Path(spec)
        if (p / LATEST).exists():
            p = p / (p / LATEST).read_text().strip()
        if not p.exists():
            raise CheckpointError(f"checkpoint {spec} does not exist")
        return p

    def _verify(self, path: Path, files: dict) -> None:
        """sha256 of every file, split over the ranks; every rank raises the same first error."""
        problems = []
        for rel, info in sorted(files.items())[self.rank::self.world]:
            f = path / rel
            if not f.exists():
                problems.append(f"{f} is missing")
                continue
            size, digest = _sha256(f)
            if size != info["bytes"] or digest != info["sha256"]:
                problems.append(f"{f} is corrupt or truncated ({size} bytes, sha256 {digest[:12]}…;"
                                f" the manifest says {info['bytes']} bytes, {info['sha256'][:12]}…)")
        d = _dist()
        if d:
            every = [None] * self.world
            d.all_gather_object(every, problems)
            problems = [x for r in every for x in r]
        if problems:
            raise CheckpointError(problems[0])

    def load(self, path: Path, optimizer) -> Loaded:
        """Read and check everything (manifest, fingerprint, sha256, shapes, state keys); every
        rank calls it. Each rank reads only the weight/state ranges it will hold."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}: the save "
                                  "was interrupted)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / MANIFEST} is corrupt: {e}") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}")
        compare_fingerprints(manifest["fingerprint"], fingerprint(optimizer))
        self._verify(path, manifest["files"])
        world = manifest["world_size"]
        apply = plan_load(optimizer, [path / "weights" / f"rank{r}.safetensors" for r in range(world)])
        trainer = []
        for r in range(world):
            with safe_open(str(path / "trainer" / f"rank{r}.safetensors"), "pt") as h:
                trainer.append({k: h.get_tensor(k) for k in h.keys()})
        return Loaded(path, manifest["step"], world, manifest["meta"], trainer, apply)
