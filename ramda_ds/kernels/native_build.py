"""Compile ``native.c`` with the system C compiler on first use and load it with ctypes.

The library is cached under ``$RAMDA_DS_CACHE`` (default ``~/.cache/ramda_ds``) in a directory
named by a hash of the source, the compiler's version, the flags and this CPU's model and feature
flags (``-march=native`` code must not be reused on another CPU of a shared home directory).
Concurrent ranks compile to private temporary files and ``os.replace`` the result, so none
ever loads a half-written library.  No compiler, or a failed compile, raises :class:`NativeUnavailable`
with the compiler's message; ``backend="auto"`` then uses the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fPIC", "-shared",
         "-std=c11"]


class NativeUnavailable(RuntimeError):
    pass


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("no C compiler found (set CC, or install gcc)")
    return cc


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    """``$RAMDA_DS_CACHE``, else ``~/.cache/ramda_ds``, else (not writable) a per-user temp dir."""
    if os.environ.get("RAMDA_DS_CACHE"):
        return Path(os.environ["RAMDA_DS_CACHE"])
    home = Path.home() / ".cache" / "ramda_ds"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return _private_dir(Path(tempfile.gettempdir()) / f"ramda_ds-{os.getuid()}")


def _private_dir(d: Path) -> Path:
    """``d`` created 0700, and refused unless this user owns it and nobody else can write to it
    (a shared temp dir: another user must not plant a library there)."""
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise NativeUnavailable(f"{d} is not a private directory of this user; set RAMDA_DS_CACHE")
    return d


def has_compiler() -> bool:
    try:
        _compiler()
    except NativeUnavailable:
        return False
    return True


def library_path() -> Path:
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"C compiler {cc!r} does not run: {e}") from e
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS),
                                    platform.machine(), _cpu_id()]).encode()).hexdigest()[:16]
    return cache_dir() / f"native-{key}" / "libramda_native.so"


def build() -> Path:
    """Path of the compiled library, compiling it first if this source/compiler/CPU has none."""
    lib = library_path()
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run([_compiler(), *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                             text=True, timeout=300)
        if res.returncode != 0:
            raise NativeUnavailable(f"compiling {SOURCE.name} failed:\n{res.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_LIB: list = []


def load() -> ctypes.CDLL:
    """The loaded library (compiled on first use); ctypes releases the GIL during each call."""
    if not _LIB:
        lib = ctypes.CDLL(str(build()))
        P = ctypes.c_void_p
        I = ctypes.c_int64
        sigs = {
            "ramda_free": [P, P, P, P, I, I],
            "ramda_exact": [P, P, P, P, I, I, P, P, P, P, P, ctypes.c_int, ctypes.c_double],
            "ramda_pg_stage": [P, P, P, P, I, I, P, P, P],
            "ramda_pg_chunk": [P, P, P, I, I, P, ctypes.c_int, P, P, P, ctypes.c_int,
                               ctypes.c_int, P],
            "ramda_pg_finish": [P, P, P, P, I, I, P, P],
            "ramda_pg_iter": [P, P, P, I, I, P, P, P, ctypes.c_int, ctypes.c_int, P, P, P],
            "ramda_exact_stage": [P, P, P, P, I, I, P, P, P],
            "ramda_exact_iter": [P, P, P, I, I, P, P, P, P],
            "ramda_exact_finish": [P, P, P, P, I, I, P, P],
            "ramda_cbrt": [P, P, I],
            "proxgen_free": [P, P, P, P, I, I],
            "proxgen_pg_stage": [P, P, P, P, I, I, P, P, P],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, (ctypes.c_int if name == "ramda_exact" else None)
        _LIB.append(lib)
    return _LIB[0]
