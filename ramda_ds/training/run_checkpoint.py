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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, plan_load, write_shard

KEEP_LAST = 2  # complete checkpoints kept by default (RunCheckpointer, LoopConfig, the scripts)
LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = "ramda_ds.run/1"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def fingerprint(optimizer) -> dict:
    """What must match to resume: optimizer class and, per parameter, shape and regularizer layout."""
    params = {}
    for g in optimizer.param_groups:
        # DeepSpeed replaces ``params`` by flat partitions but keeps names and shapes
        for name, shape in zip(g["param_names"], g["param_shapes"]):
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
    def __init__(self, root, keep_last: int = KEEP_LAST):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.keep_last = Path(root), keep_last
        d = _dist()
        self.rank, self.world = (d.get_rank(), d.get_world_size()) if d else (0, 1)

    # ------------------------------------------------------------------ agreement
    def agree(self, error: str | None) -> None:
        """Every rank learns every rank's error and raises the same one (no rank is left waiting
        in a collective because another one failed)."""
        every = [error]
        d = _dist()
        if d:
            every = [None] * self.world
            d.all_gather_object(every, error)
        errors = list(dict.fromkeys(e for e in every if e))  # distinct, in rank order
        if errors:
            raise CheckpointError("; ".join(errors))

    def from_rank0(self, value):
        """``value`` as rank 0 sees it (what is on disk is decided once, for everyone)."""
        d = _dist()
        if not d:
            return value
        box = [value]
        d.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ saving
    def save(self, step: int, optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
        """Every rank calls this at the same step; returns the final directory. Raises
        CheckpointError on every rank if any rank failed (e.g. disk full, no shared filesystem);
        the previous checkpoint and ``latest`` are then untouched."""
        name = f"step_{step:08d}"
        part, final = self.root / f"{name}.partial", self.root / name
        error = None
        if self.rank == 0:
            try:
                for stale in self.root.glob("*.partial"):
                    shutil.rmtree(stale, ignore_errors=True)
                part.mkdir(parents=True)
            except OSError as e:
                error = f"cannot create {part}: {e}"
        self.agree(error)
        mine = {}
        try:
            if not part.is_dir():
                raise OSError(f"{part} (made by rank 0) is not visible here: output_dir must be "
                              "on a filesystem shared by all ranks")
            shard = part / "weights" / f"rank{self.rank}.safetensors"
            write_shard(optimizer, shard, writer=optimizer.view.sharded or self.rank == 0)
            trainer = part / "trainer" / f"rank{self.rank}.safetensors"
            trainer.parent.mkdir(exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(trainer))
            mine = {str(f.relative_to(part)): _sha256(f) for f in (shard, trainer)}
        except OSError as e:
            error = str(e)
        self.agree(error)
        every = [mine]
        d = _dist()
        if d:
            every = [None] * self.world
            d.all_gather_object(every, mine)
        if self.rank == 0:
            try:
                files = {k: dict(bytes=s, sha256=h) for r in every for k, (s, h) in r.items()}
                missing = [k for k in files if not (part / k).exists()]
                if missing:
                    raise OSError(f"{part / missing[0]} written by another rank is not visible "
                                  "on rank 0: output_dir must be on a shared filesystem")
                manifest = dict(format=FORMAT, step=step, world_size=self.world,
                                fingerprint=fingerprint(optimizer), meta=meta, files=files)
                _write_text(part / MANIFEST, json.dumps(manifest, indent=1))
                if final.exists():  # not the target of `latest` (see set_aside_after)
                    self._remove(final)
                os.replace(part, final)
                _write_text(self.root / LATEST, name)
            except OSError as e:
                error = str(e)
            else:
                self._prune(keep=final)
        self.agree(error)
        return final

    def _remove(self, d: Path) -> None:
        """Delete a checkpoint so that a kill midway leaves no half directory that looks complete."""
        doomed = d.with_name(d.name + ".deleting.partial")
        os.replace(d, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        """All but the newest ``keep_last`` complete checkpoints; failures only warn."""
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and
                      not p.name.endswith(".partial") and (p / MANIFEST).exists())
        for p in done[:-self.keep_last]:
            if p != keep:
                try:
                    self._remove(p)
                except OSError as e:
                    print(f"warning: could not delete old checkpoint {p}: {e}", flush=True)

    def set_aside_after(self, step: int) -> list[str]:
        """Resuming at ``step``: move this root's checkpoints of later steps (an abandoned future
        of the run) to ``abandoned/``, so new saves neither collide with nor are pruned in favour
        of them; nothing is deleted. Rank 0 only; returns what was moved."""
        moved = []
        if self.rank != 0 or not self.root.is_dir():
            return moved
        later = [p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")
                 and int(p.name.split("_")[1]) > step]
        if later:
            dest = self.root / "abandoned" / f"after_step_{step:08d}_{int(time.time())}"
            dest.mkdir(parents=True)
            for p in sorted(later):
                os.replace(p, dest / p.name)
                moved.append(p.name)
            latest = self.root / LATEST
            if latest.exists() and latest.read_text().strip() in moved:
                latest.unlink()  # the next save writes it again
        return moved

    # ------------------------------------------------------------------ loading
    def resolve(self, spec: str) -> Path | None:
        """``"auto"``: the latest checkpoint under root, or None; otherwise a checkpoint directory,
        a checkpoints root holding ``latest``, or an output_dir holding ``checkpoints/latest``.
        Decided by rank 0 for everyone."""
        def find():
            if spec == "auto":
                latest = self.root / LATEST
                return str(self.root / latest.read_text().strip()) if latest.exists() else None
            p = Path(spec)
            for root in (p, p / "checkpoints"):
                if (root / LATEST).exists():
                    return str(root / (root / LATEST).read_text().strip())
            return str(p) if p.exists() else f"missing:{spec}"
        found = self.from_rank0(find() if self.rank == 0 else None)
        if found and found.startswith("missing:"):
            raise CheckpointError(f"checkpoint {spec} does not exist")
        return Path(found) if found else None

    def has_checkpoints(self) -> bool:
        """Whether root holds a ``latest`` (as rank 0 sees it)."""
        return bool(self.from_rank0((self.root / LATEST).exists() if self.rank == 0 else None))

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
        rank calls it and every rank raises the same CheckpointError if any rank finds a problem.
        Each rank reads only the weight/state ranges it will hold (in ``apply``)."""
        path = Path(path)
        manifest, error = None, None
        try:
            manifest = self._manifest(path)
            compare_fingerprints(manifest["fingerprint"], fingerprint(optimizer))
        except CheckpointError as e:
            error = str(e)
        self.agree(error)
        self._verify(path, manifest["files"])
        world = manifest["world_size"]
        apply, trainer = None, []
        try:
            apply = plan_load(optimizer, [path / "weights" / f"rank{r}.safetensors"
                                          for r in range(world)])
            for r in range(world):
                with safe_open(str(path / "trainer" / f"rank{r}.safetensors"), "pt") as h:
                    trainer.append({k: h.get_tensor(k) for k in h.keys()})
        except CheckpointError as e:
            error = str(e)
        except Exception as e:  # unreadable trainer file
            error = f"cannot read the trainer state in {path}: {e}"
        self.agree(error)
        return Loaded(path, manifest["step"], world, manifest["meta"], trainer, apply)

    @staticmethod
    def _manifest(path: Path) -> dict:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}: the save "
                                  "was interrupted, or this is not a checkpoint directory)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / MANIFEST} is corrupt: {e}") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}")
        return manifest
