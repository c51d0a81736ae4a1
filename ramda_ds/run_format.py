"""The on-disk format of a training run's checkpoints, and its public reader.

    <root>/latest                      the name of the newest complete checkpoint
    <root>/step_00000600/manifest.json step, world size, fingerprint, run metadata, size + sha256
    <root>/step_00000600/manifest.sha256  sha256 of manifest.json
    <root>/step_00000600/{weights,trainer}/rank{r}.safetensors

:func:`read_latest` resolves ``latest``, :func:`read_manifest` checks a manifest (its hash, its
fields, its file list, the step against the directory name) and :func:`read_verified_manifest`
also every file's size and sha256, on one process with no collective.  The writer and the
collective loader are :class:`ramda_ds.training.run_checkpoint.RunCheckpointer`; readers such as
the export use this module, which sits below both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .checkpoint import CheckpointError

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_SHA = "manifest.sha256"
FORMAT = "ramda_ds.run/2"  # /1 had no manifest hash
OBJECTIVE = ("regularizer", "grouping", "lam")  # per parameter: what the loss being minimized is


def file_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return path.stat().st_size, h.hexdigest()


def describe_error(e: BaseException) -> str:
    """An exception as one line, with a hint when the disk is full."""
    text = f"{type(e).__name__}: {e}"
    if getattr(e, "errno", None) == 28 or "No space left" in text or "StorageFull" in text:
        text += " (the disk is full: free space under output_dir, or lower --keep_last)"
    return text


def read_latest(root: Path) -> str:
    """The checkpoint name in ``root/latest``; CheckpointError if it is not one."""
    raw = (root / LATEST).read_bytes()
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not re.fullmatch(r"step_\d+", name):
        raise CheckpointError(f"{root / LATEST} is corrupt ({raw[:40]!r}): it should hold a "
                              "checkpoint name such as step_00000600; pass --resume with the "
                              "checkpoint directory you want")
    if not (root / name).is_dir():
        raise CheckpointError(f"{root / LATEST} names {name}, which does not exist in {root}")
    return name


def check_manifest(m, where: Path) -> None:
    """Types of every field the loader uses (a KeyError would leave the other ranks waiting)."""
    def bad(what):
        raise CheckpointError(f"{where} is malformed: {what}")

    for key, kind in dict(step=int, world_size=int, fingerprint=dict, meta=dict,
                          files=dict).items():
        if key not in m:
            bad(f"no {key!r}")
        if not isinstance(m[key], kind) or isinstance(m[key], bool):
            bad(f"{key!r} must be {kind.__name__}")
    if m["step"] < 1 or m["world_size"] < 1:
        bad(f"step {m['step']} and world_size {m['world_size']} must be >= 1")
    fp = m["fingerprint"]
    if not isinstance(fp.get("optimizer"), str) or not isinstance(fp.get("params"), dict):
        bad("the fingerprint needs 'optimizer' and 'params'")
    for name, entry in fp["params"].items():
        if not isinstance(entry, dict) or not {"shape", *OBJECTIVE} <= entry.keys():
            bad(f"fingerprint entry of {name} lacks shape/{'/'.join(OBJECTIVE)}")
    for rel, info in m["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int)
                and isinstance(info.get("sha256"), str)):
            bad(f"files[{rel!r}] needs 'bytes' and 'sha256'")


def expected_files(world_size: int) -> set[str]:
    """The files a checkpoint written by ``world_size`` ranks holds (each listed with its hash)."""
    return {f"{kind}/rank{r}.safetensors" for kind in ("weights", "trainer")
            for r in range(world_size)}


def file_problems(path: Path, items) -> list[str]:
    """For ``(relative path, {bytes, sha256})`` items: one line per file missing, unreadable or
    not what the manifest says (size and sha256)."""
    problems = []
    for rel, info in items:
        f = path / rel
        if not f.exists():
            problems.append(f"{f} is missing")
            continue
        try:
            size, digest = file_sha256(f)
        except Exception as e:
            problems.append(f"cannot read {f}: {describe_error(e)}")
            continue
        if size != info["bytes"] or digest != info["sha256"]:
            problems.append(f"{f} is corrupt or truncated ({size} bytes, sha256 {digest[:12]}…;"
                            f" the manifest says {info['bytes']} bytes, {info['sha256'][:12]}…)")
    return problems


def read_verified_manifest(path) -> dict:
    """The manifest of checkpoint ``path`` after every check :meth:`RunCheckpointer.load` makes
    before it reads state (manifest hash, fields, file list, step vs. directory name, and the
    size + sha256 of every listed file), on this process alone (no collective: for readers such
    as the export). CheckpointError naming the first problem."""
    path = Path(path)
    manifest = read_manifest(path)
    problems = file_problems(path, sorted(manifest["files"].items()))
    if problems:
        raise CheckpointError(problems[0])
    return manifest


def read_manifest(path: Path) -> dict:
    """The manifest, checked against its hash, its own fields and the directory's name (the
    files themselves: :func:`file_problems`)."""
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}: the save "
                              "was interrupted, or this is not a checkpoint directory)") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is corrupt: {e}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path / MANIFEST} is malformed: not a JSON object")
    if manifest.get("format") != FORMAT:
        old = " (written by an older ramda_ds, whose manifest is not verified)" \
            if manifest.get("format") == "ramda_ds.run/1" else ""
        raise CheckpointError(f"{path}: unknown checkpoint format "
                              f"{manifest.get('format')!r}{old}; this version reads {FORMAT}")
    sidecar = path / MANIFEST_SHA
    if not sidecar.exists():
        raise CheckpointError(f"{path} has no {MANIFEST_SHA}: the manifest cannot be verified")
    digest = sidecar.read_bytes()[:64].decode("ascii", errors="replace")
    if hashlib.sha256(raw).hexdigest() != digest:
        raise CheckpointError(f"{path / MANIFEST} does not match its sha256 in {MANIFEST_SHA} "
                              "(edited or corrupt): it is not trusted")
    check_manifest(manifest, path / MANIFEST)
    listed, needed = set(manifest["files"]), expected_files(manifest["world_size"])
    if listed != needed:
        what = sorted(needed - listed) or sorted(listed - needed)
        raise CheckpointError(
            f"{path / MANIFEST} lists {sorted(listed) or 'no files'}, a checkpoint written by "
            f"{manifest['world_size']} rank(s) has exactly {sorted(needed)} ({what[0]} "
            f"{'missing' if needed - listed else 'unexpected'})")
    m = re.fullmatch(r"step_(\d+)", path.name)
    if m and int(m.group(1)) != manifest["step"]:
        raise CheckpointError(f"{path / MANIFEST} says step {manifest['step']}, the "
                              f"directory is {path.name}")
    return manifest
