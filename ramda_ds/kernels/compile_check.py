"""Compile every Triton kernel of :mod:`.triton_pg` and :mod:`.exact` for a CUDA GPU, without one.

    python -m ramda_ds.kernels.compile_check            # sm_90 (H100/H200); --arch 80 for A100

Triton's interpreter (``TRITON_INTERPRET=1``, what the tests run the kernels with on CPU) executes
the kernels' Python with numpy: it checks their arithmetic, not that Triton's compiler accepts
them.  This runs the real compiler down to a cubin (``ptxas`` ships with the triton wheel) for
each kernel with the argument types the step passes, so a kernel that would fail to compile on
the cluster fails here, on a CPU machine.  It needs ``TRITON_INTERPRET`` unset (the interpreter
replaces ``@triton.jit`` functions at import).
"""

from __future__ import annotations

import argparse
import os
import sys

P64, F64, F32, I32 = "*i64", "*fp64", "*fp32", "*i32"


def kernels():
    """``(name, jit function, {argument: type}, {constexpr: value})`` for every launch the
    steps make (the exact kernels twice: float32 scalars unsharded, float64 in the PG table)."""
    from . import exact as ex
    from . import triton_pg as tp

    tile = dict(BA=32, BC=32)
    out = [
        ("triton_pg._free", tp._free, dict(ptrs=P64, geom=P64, scal=F64), tile),
        ("triton_pg._pg_stage", tp._pg_stage,
         dict(ptrs=P64, geom=P64, scal=F64, bb_out=F64, cst_out=F64, pmax_out=F32), tile),
        ("triton_pg._pg_chunk", tp._pg_chunk,
         dict(ptrs=P64, geom=P64, n_iter=I32, n_max="i32", nblk="i32", tau_t=F64, eta=F64,
              f=F64, src="i32", dst="i32", q_out=F64), tile),
        ("triton_pg._pg_iter", tp._pg_iter,
         dict(ptrs=P64, geom=P64, live=I32, eta=F64, f=F64, src="i32", dst="i32", s_out=F64,
              G="i32"), tile),
        ("triton_pg._pg_finish", tp._pg_finish,
         dict(ptrs=P64, geom=P64, scal=F64, f=F64, ycol=P64), tile),
    ]
    for np_, scal, where in ((8, "*fp32", "unsharded"), (10, F64, "sharded table")):
        consts = dict(tile, NP=np_)
        out += [
            (f"exact._stage ({where})", ex._stage,
             dict(ptrs=P64, geom=P64, scal=scal, bb_out=F64, pmax_out=F32, pmin_out=F32), consts),
            (f"exact._newton ({where})", ex._newton,
             dict(ptrs=P64, geom=P64, mu=F64, z2_out=F64, z3_out=F64), consts),
            (f"exact._finish ({where})", ex._finish,
             dict(ptrs=P64, geom=P64, scal=scal, mu=F64, act=F32), consts),
        ]
    return out


def supported() -> bool:
    """Whether this Triton's compiler API is the one used here (Triton 3.9's)."""
    import inspect

    from triton.compiler import ASTSource

    return "constexprs" in inspect.signature(ASTSource).parameters


def compile_all(arch: int = 90) -> dict[str, str | None]:
    """Compile each kernel for ``sm_<arch>``: name → None (compiled to a cubin) or the error."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not supported():
        raise RuntimeError(f"compile_check uses ASTSource(constexprs=...), which Triton "
                           f"{triton.__version__} does not have (it was written for 3.9)")
    target = GPUTarget("cuda", arch, 32)
    result = {}
    for name, fn, types, consts in kernels():
        signature = dict(types, **{k: "constexpr" for k in consts})
        try:
            k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                               target=target)
            result[name] = None if k.asm.get("cubin") else "no cubin produced"
        except Exception as e:  # noqa: BLE001 - report every kernel's compiler error
            result[name] = f"{type(e).__name__}: {e}"
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # (silences Triton 3.9's notice)
    result = compile_all(a.arch)
    for name, err in result.items():
        print(f"{'ok    ' if err is None else 'FAILED'} {name}" + ("" if err is None else f": {err}"))
    return 0 if all(e is None for e in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
