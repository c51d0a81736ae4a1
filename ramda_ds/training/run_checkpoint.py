"""Training-run checkpoints: one directory per step, complete or invisible, loadable at any world size.

    <root>/
      latest                        "step_00000600" — replaced (atomically) after every rank finished
      step_00000600/
        manifest.json               step, world size, fingerprint, run metadata, size + sha256 per file
        manifest.sha256             sha256 of manifest.json: the manifest is verified like the files
        weights/rank{r}.safetensors master weights + optimizer state of rank r (ramda_ds.checkpoint)
        trainer/rank{r}.safetensors RNG states and carried tensors (e.g. Transformer-XL memory)
      step_00000800.partial/        a save in progress, or one killed: never read, removed next save

A save writes into ``*.partial``; rank 0 writes the manifest only after all ranks' files are on
disk, renames the directory, then moves ``latest`` and deletes all but the newest ``keep_last``.
Killing any process at any point leaves the previous checkpoint and ``latest`` intact; so does an
error of any kind on any rank (disk full, ...), which every rank raises as the same CheckpointError
(the half-written ``*.partial`` is removed). Loading checks, before changing anything: the manifest
against its own hash and its fields (types, the files every saved rank must have, the step against
the directory name and against the optimizer's per-tensor step counters), the fingerprint
(parameter names/shapes, optimizer, and the objective: regularizer, grouping, λ) and every file's
sha256. Requires a filesystem shared by all ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, plan_load, saved_steps, write_shard
from ..run_format import (FORMAT, LATEST, MANIFEST, MANIFEST_SHA,  # noqa: F401 (re-exported)
                          OBJECTIVE, describe_error, expected_files, file_problems,
                          file_sha256, read_latest, read_manifest, read_verified_manifest)

KEEP_LAST = 2  # complete checkpoints kept by default (RunCheckpointer, LoopConfig, the scripts)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def fingerprint(optimizer) -> dict:
    """What must match to resume: optimizer class and, per parameter, shape and the objective
    (regularizer, grouping, λ; see :func:`compare_fingerprints`)."""
    params = {}
    for g in optimizer.param_groups:
        # DeepSpeed replaces ``params`` by flat partitions but keeps names and shapes
        reg = g.get("regularizer")
        for name, shape in zip(g["param_names"], g["param_shapes"]):
            params[name] = dict(shape=list(shape), regularizer=reg,
                                grouping=g.get("grouping") if reg else None,
                                lam=("target" if g.get("target") else float(g.get("lam", 0.0)))
                                if reg else None)  # a size target sets λ itself, per step
    return dict(optimizer=type(optimizer).__name__, params=params)


def compare_fingerprints(saved: dict, current: dict, allow_change: bool = False) -> list[dict]:
    """Raise CheckpointError naming the first difference. A changed objective setting
    (regularizer, grouping, λ) is refused too unless ``allow_change``; then the changes are
    returned, one entry per (setting, old, new) with the tensors it applies to."""
    if saved["optimizer"] != current["optimizer"]:
        raise CheckpointError(f"checkpoint was written by {saved['optimizer']}, this run uses "
                              f"{current['optimizer']}")
    a, b = saved["params"], current["params"]
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise CheckpointError("checkpoint is of a different model: parameters only in the "
                              f"checkpoint {only_a[:3]}, only in this model {only_b[:3]}")
    changes: dict[tuple, list[str]] = {}
    for name in a:
        if a[name]["shape"] != b[name]["shape"]:
            raise CheckpointError(f"{name}: checkpoint shape {a[name]['shape']!r} != this run's "
                                  f"{b[name]['shape']!r}")
        for key in OBJECTIVE:
            if a[name][key] != b[name][key]:
                if not allow_change:
                    raise CheckpointError(
                        f"{name}: checkpoint {key} {a[name][key]!r} != this run's {b[name][key]!r} "
                        "(the objective would change; pass --allow_hparam_change to resume anyway)")
                changes.setdefault((key, a[name][key], b[name][key]), []).append(name)
    return [dict(setting=k, checkpoint=old, now=new, tensors=len(names), first=names[0])
            for (k, old, new), names in changes.items()]


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


def _write_tmp(path: Path, text: str) -> Path:
    """``text`` written and fsynced to ``path`` + ".tmp" (to be renamed over ``path``)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return tmp


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
    changes: list = None  # objective settings changed on resume (compare_fingerprints)


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
        """Every rank calls this at the same step; returns the final directory. An error of any
        kind on any rank (disk full, no shared filesystem, ...) makes every rank raise the same
        CheckpointError right after that phase; the previous checkpoint and ``latest`` are then
        untouched and the half-written ``*.partial`` is removed."""
        name = f"step_{step:08d}"
        part, final = self.root / f"{name}.partial", self.root / name
        error = None
        if self.rank == 0:
            try:
                for stale in self.root.glob("*.partial"):
                    shutil.rmtree(stale, ignore_errors=True)
                part.mkdir(parents=True)
            except Exception as e:
                error = f"cannot create {part}: {describe_error(e)}"
        self.agree(error)
        # agreed before any rank writes: a sharded view's first segments() is a collective
        self._agree_or_clean(None if part.is_dir() else
                             f"rank {self.rank}: {part} (made by rank 0) is not visible here: "
                             "output_dir must be on a filesystem shared by all ranks", part)
        mine, f = {}, None
        try:
            f = part / "weights" / f"rank{self.rank}.safetensors"
            write_shard(optimizer, f, writer=optimizer.view.sharded or self.rank == 0)
            f = part / "trainer" / f"rank{self.rank}.safetensors"
            f.parent.mkdir(exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(f))
            f = None
            mine = {str(x.relative_to(part)): file_sha256(x) for x in (
                part / "weights" / f"rank{self.rank}.safetensors",
                part / "trainer" / f"rank{self.rank}.safetensors")}
        except Exception as e:  # safetensors raises SafetensorError, not OSError, on a full disk
            error = f"rank {self.rank}: writing {f or part} failed: {describe_error(e)}"
        self._agree_or_clean(error, part)
        every = [mine]
        d = _dist()
        if d:
            every = [None] * self.world
            d.all_gather_object(every, mine)
        if self.rank == 0:
            try:
                files = {k: dict(bytes=s, sha256=h) for r in every for k, (s, h) in r.items()}
                missing = sorted(expected_files(self.world) - set(files)) or \
                    [k for k in files if not (part / k).exists()]
                if missing:
                    raise OSError(f"{part / missing[0]} written by another rank is not visible "
                                  "on rank 0: output_dir must be on a shared filesystem")
                manifest = json.dumps(dict(format=FORMAT, step=step, world_size=self.world,
                                           fingerprint=fingerprint(optimizer), meta=meta,
                                           files=files), indent=1)
                os.replace(_write_tmp(part / MANIFEST, manifest), part / MANIFEST)
                digest = hashlib.sha256(manifest.encode()).hexdigest()
                os.replace(_write_tmp(part / MANIFEST_SHA, digest + "\n"), part / MANIFEST_SHA)
                pointer = _write_tmp(self.root / LATEST, name)  # the last write that can fail
                if final.exists():  # not the target of `latest` (see set_aside_after)
                    self._remove(final)
                os.replace(part, final)
                os.replace(pointer, self.root / LATEST)
            except Exception as e:
                error = f"rank 0: writing {part} failed: {describe_error(e)}"
            else:
                self._prune(keep=final)
        self._agree_or_clean(error, part)
        return final

    def _agree_or_clean(self, error: str | None, part: Path) -> None:
        """:meth:`agree`; on any rank's error rank 0 first removes what this save wrote."""
        try:
            self.agree(error)
        except CheckpointError:
            if self.rank == 0:
                shutil.rmtree(part, ignore_errors=True)
                (self.root / (LATEST + ".tmp")).unlink(missing_ok=True)
            raise

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
        moved, error = [], None
        if self.rank == 0 and self.root.is_dir():
            try:
                later = [p for p in self.root.glob("step_*") if p.is_dir() and
                         re.fullmatch(r"step_\d+", p.name) and int(p.name[5:]) > step]
                if later:
                    dest = self.root / "abandoned" / f"after_step_{step:08d}_{int(time.time())}"
                    dest.mkdir(parents=True)
                    for p in sorted(later):
                        os.replace(p, dest / p.name)
                        moved.append(p.name)
                    latest = self.root / LATEST
                    if latest.exists() and latest.read_bytes().decode(errors="replace").strip() \
                            in moved:
                        latest.unlink()  # the next save writes it again
            except Exception as e:
                error = f"cannot set aside the checkpoints after step {step}: {describe_error(e)}"
        self.agree(error)
        return moved

    def discard(self, step: int, why: str = "diverged") -> tuple[bool, str | None]:
        """A state found bad after it was saved (its next step's loss diverged): move checkpoint
        ``step``, if there is one, to ``root/why/`` and point ``latest`` at the newest earlier
        complete checkpoint (removed when there is none). Every rank calls this; returns
        (whether a checkpoint was moved, the name ``latest`` holds now or None)."""
        out, error = (False, None), None
        if self.rank == 0 and self.root.is_dir():
            try:
                d = self.root / f"step_{step:08d}"
                latest = self.root / LATEST
                if d.is_dir():
                    (self.root / why).mkdir(exist_ok=True)
                    os.replace(d, self.root / why / f"{d.name}_{int(time.time())}")
                    done = sorted(p.name for p in self.root.glob("step_*") if p.is_dir() and
                                  re.fullmatch(r"step_\d+", p.name) and int(p.name[5:]) < step
                                  and (p / MANIFEST).exists())
                    if done:
                        os.replace(_write_tmp(latest, done[-1]), latest)
                    else:
                        latest.unlink(missing_ok=True)
                    out = (True, done[-1] if done else None)
                elif latest.exists():
                    out = (False, read_latest(self.root))
            except Exception as e:
                error = f"cannot set aside the checkpoint of step {step}: {describe_error(e)}"
        self.agree(error)
        return self.from_rank0(out)

    # ------------------------------------------------------------------ loading
    def resolve(self, spec: str) -> Path | None:
        """``"auto"``: the latest checkpoint under root, or None; otherwise a checkpoint directory,
        a checkpoints root holding ``latest``, or an output_dir holding ``checkpoints/latest``.
        Decided by rank 0 for everyone."""
        def find():
            if spec == "auto":
                exists = (self.root / LATEST).exists()
                return str(self.root / read_latest(self.root)) if exists else None
            p = Path(spec)
            for root in (p, p / "checkpoints"):
                if (root / LATEST).exists():
                    return str(root / read_latest(root))
            if not p.exists():
                raise CheckpointError(f"checkpoint {spec} does not exist")
            return str(p)

        found = None
        if self.rank == 0:
            try:
                found = ("ok", find())
            except CheckpointError as e:
                found = ("error", str(e))
            except Exception as e:
                found = ("error", f"cannot read {spec}: {describe_error(e)}")
        kind, value = self.from_rank0(found)
        if kind == "error":
            raise CheckpointError(value)
        return Path(value) if value else None

    def has_checkpoints(self) -> bool:
        """Whether root holds a ``latest`` (as rank 0 sees it)."""
        return bool(self.from_rank0((self.root / LATEST).exists() if self.rank == 0 else None))

    def _verify(self, path: Path, files: dict) -> None:
        """sha256 of every file, split over the ranks; every rank raises the same first error."""
        problems = file_problems(path, sorted(files.items())[self.rank::self.world])
        d = _dist()
        if d:
            every = [None] * self.world
            d.all_gather_object(every, problems)
            problems = [x for r in every for x in r]
        if problems:
            raise CheckpointError(problems[0])

    def load(self, path: Path, optimizer, allow_change: bool = False) -> Loaded:
        """Read and check everything (manifest and its hash, its fields against each other and
        against the files, fingerprint, sha256, shapes, state keys); every rank calls it and every
        rank raises the same CheckpointError if any rank finds a problem. A changed objective
        setting is refused unless ``allow_change`` (then listed in ``Loaded.changes``). Each rank
        reads only the weight/state ranges it will hold (in ``apply``)."""
        path = Path(path)
        manifest, error, changes = None, None, []
        try:
            manifest = self._manifest(path)
            changes = compare_fingerprints(manifest["fingerprint"], fingerprint(optimizer),
                                           allow_change)
        except CheckpointError as e:
            error = str(e)
        except Exception as e:
            error = f"cannot read {path / MANIFEST}: {describe_error(e)}"
        self.agree(error)
        self._verify(path, manifest["files"])  # every listed file is what the manifest says
        world, step = manifest["world_size"], manifest["step"]
        shards = [path / "weights" / f"rank{r}.safetensors" for r in range(world)]
        apply, trainer = None, []
        try:
            counted = saved_steps(shards)  # per tensor, by the optimizer itself
            if counted and max(counted.values()) != step:
                name = max(counted, key=counted.get)
                raise CheckpointError(
                    f"{path / MANIFEST} says step {step}, but the optimizer state in it has "
                    f"taken {int(max(counted.values()))} steps ({name}): the manifest is wrong")
            apply = plan_load(optimizer, shards)
            for r in range(world):
                with safe_open(str(path / "trainer" / f"rank{r}.safetensors"), "pt") as h:
                    trainer.append({k: h.get_tensor(k) for k in h.keys()})
        except CheckpointError as e:
            error = str(e)
        except Exception as e:  # e.g. an unreadable trainer file
            error = f"cannot read the checkpoint {path}: {describe_error(e)}"
        self.agree(error)
        return Loaded(path, step, world, manifest["meta"], trainer, apply, changes)

    @staticmethod
    def _manifest(path: Path) -> dict:
        """The manifest, checked against its hash, its own fields and the directory's name."""
        return read_manifest(path)
