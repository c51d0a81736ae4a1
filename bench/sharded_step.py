"""Sharded RAMDA at 2 ranks: optimizer-state bytes, collectives, step time per backend.

    python bench/sharded_step.py            # one 2-process torchrun per row (CPU, gloo)
    python bench/sharded_step.py --kernels native --solvers pg --backends zero2 fsdp2
    python bench/sharded_step.py --count-ops     # ops per step of the Triton path, 8 vs 32 blocks

For each sharding backend, step kernels (``backend=`` of RAMDA: torch, native) and solver (PG,
exact) it prints, for RAMDA (group lasso) on a transformer-shaped stack of Linear layers:
per-rank optimizer-state bytes against the ideal 12·P/N (V, U, W0 in fp32), the number and total
bytes of the collectives the optimizer issued in one step, the solver iterations of that step,
and the optimizer step time relative to the 1-process torch step of the same solver and to
1-process AdamW (foreach), all measured in this run with one thread per process, as the
workers run.

``--count-ops`` counts, on rank 0, the ops one optimizer step dispatches with ``backend="triton"``
(the kernels run by Triton's interpreter on CPU; d = 64) on 8- and 32-block stacks: aten ops that
launch a kernel on CUDA, collectives included, plus Triton launches (the interpreter's argument
copies are aten ops too: a fixed number per launch), with the solver iterations of that step
(PG runs exactly 10 iterations there: ``rtol=0, max_iters=10``).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ramda_ds.optim import RAMDA  # noqa: E402
from ramda_ds.param_groups import build_param_groups  # noqa: E402

BACKENDS = ["ddp", "zero1", "zero2", "zero3", "fsdp2", "fsdp2_cols", "fsdp1"]
D, LAYERS, STEPS = int(os.environ.get("BENCH_D", 256)), int(os.environ.get("BENCH_LAYERS", 4)), 5
COUNT = os.environ.get("BENCH_COUNT_OPS") == "1"  # a --count-ops worker


class Stack(nn.Module):
    """Transformer-shaped Linear layers; forward(x, step) is a scalar whose gradient is a fixed
    random rank-1 pattern per layer and step (same on every backend)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        blocks = []
        for _ in range(LAYERS):
            blocks += [nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, step):
        g = torch.Generator().manual_seed(step)
        out = 0
        for b in self.blocks:
            pattern = torch.randn(1, b.out_features, generator=g) * 1e-2
            out = out + (b(x[:, :b.in_features]) * pattern).sum()
        return out


def model():
    return Stack()


def make_opt(groups, kernels="torch", solver="pg"):
    # --count-ops: exactly 10 PG iterations on every stack (rtol 0), so counts compare depths
    kw = dict(rtol=0.0, max_iters=10) if COUNT else {}
    return RAMDA(groups, lr=1e-2, eps=1e-6, backend=kernels, solver=solver, **kw)


def groups_of(m):
    return build_param_groups(m, "group_lasso", lam=3e-4)


def timed_steps(step_fn, opt):
    """Median optimizer.step() time; collectives of the last step."""
    inner = opt.step
    times = []

    def wrapped(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        times.append(time.perf_counter() - t)
        return out
    opt.step = wrapped
    comm = None
    for s in range(STEPS):
        comm = getattr(getattr(opt, "view", None), "comm", None)
        c0, b0 = getattr(comm, "calls", 0), getattr(comm, "bytes", 0)
        step_fn(s)
    calls, nbytes = getattr(comm, "calls", 0) - c0, getattr(comm, "bytes", 0) - b0
    return sorted(times)[len(times) // 2] * 1e3 * (len(times) // STEPS), calls, nbytes


def unsharded(kernels="torch", solver="pg", adamw=False):
    torch.set_num_threads(1)
    m = model()
    params = list(m.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True) if adamw else \
        make_opt(groups_of(m), kernels, solver)
    torch.manual_seed(1)
    x = torch.randn(1, 4 * D)

    def step(s):
        opt.zero_grad()
        m(x, s).backward()
        opt.step()
    ms, _, _ = timed_steps(step, opt)
    return ms, sum(p.numel() for p in params)


def worker(backend, kernels, solver):
    import torch.distributed as dist

    from ramda_ds.sharding import attach

    m = model()
    names = [n for n, _ in m.named_parameters()]
    if backend.startswith("zero"):
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        opt = make_opt(groups_of(m), kernels, solver)
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": int(backend[-1])},
               "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
               "steps_per_print": 10**9}
        engine, ds_opt, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=cfg)
        attach(ds_opt, engine)
        torch.manual_seed(1)
        x = torch.randn(1, 4 * D)

        def step(s):
            engine.backward(engine(x, s))
            engine.step()
    else:
        dist.init_process_group("gloo")
        groups = groups_of(m)
        if backend == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapped = DDP(m)
        elif backend.startswith("fsdp2"):
            from torch.distributed.fsdp import fully_shard

            from ramda_ds.sharding.fsdp import shard_columns
            kw = dict(shard_placement_fn=shard_columns()) if backend == "fsdp2_cols" else {}
            for b in m.blocks:
                fully_shard(b, **kw)
            wrapped = fully_shard(m, **kw)
            groups = groups_of(m)
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            wrapped = FSDP(m, use_orig_params=True, device_id=torch.device("cpu"),
                           auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
        opt = make_opt(groups, kernels, solver)
        attach(opt, wrapped)
        torch.manual_seed(1)
        x = torch.randn(1, 4 * D)

        def step(s):
            opt.zero_grad()
            wrapped(x, s).backward()
            opt.step()
    if COUNT:
        return count_worker(step, opt)
    ms, calls, nbytes = timed_steps(step, opt)
    state_bytes = 0
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() and k != "structured":
                state_bytes += opt.view.local(v).numel() * v.element_size()
    iters = max((s.iterations for s in opt.last_stats.values()), default=0)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, state_bytes)
    if dist.get_rank() == 0:
        from ramda_ds.optim.ramda import kernel_plan

        print("RESULT " + json.dumps(dict(backend=backend, ms=ms, calls=calls, bytes=nbytes,
                                          state_bytes=every, iters=iters, n_names=len(names),
                                          plan=kernel_plan(opt))))
    dist.barrier()
    dist.destroy_process_group()


def count_worker(step, opt):
    """Ops of the optimizer step of the second training step, on rank 0 (see --count-ops)."""
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "bench"))
    from optimizer_step import OpCounter

    from ramda_ds import kernels

    step(0)
    inner, counted = opt.step, {}

    def wrapped(*a, **k):
        launches = kernels.LAUNCHES[0]
        with OpCounter() as c:
            out = inner(*a, **k)
        counted.update(ops=c.ops + kernels.LAUNCHES[0] - launches)
        return out
    opt.step = wrapped
    step(1)
    iters = max((s.iterations for s in opt.last_stats.values()), default=0)
    if dist.get_rank() == 0:
        from ramda_ds.optim.ramda import kernel_plan

        print("RESULT " + json.dumps(dict(ops=counted["ops"], iters=iters, plan=kernel_plan(opt))))
    dist.barrier()
    dist.destroy_process_group()


def count_ops(backends, solvers):
    print("ops per optimizer step, backend='triton' (interpreter), d = 64, 2 ranks, rank 0:")
    print(f"{'backend':11s} {'solver':6s} {'8 blocks':>9s} {'iters':>5s} {'32 blocks':>9s} "
          f"{'iters':>5s} {'growth':>7s}")
    for solver in solvers:
        for backend in backends:
            got = []
            for layers in (2, 8):  # 4 Linear layers each: 8 and 32 blocks (tensors)
                env = dict(BENCH_COUNT_OPS="1", BENCH_D="64", BENCH_LAYERS=str(layers),
                           TRITON_INTERPRET="1")
                r = launch(backend, "triton", solver, env)
                if r is None or r["plan"] != "triton":
                    print(f"{backend:11s} {solver:6s} failed or not on triton: {r}")
                    break
                got.append(r)
            if len(got) == 2:
                print(f"{backend:11s} {solver:6s} {got[0]['ops']:9d} {got[0]['iters']:5d} "
                      f"{got[1]['ops']:9d} {got[1]['iters']:5d} "
                      f"{got[1]['ops'] / got[0]['ops']:6.2f}x")


def launch(backend, kernels, solver, extra_env=None):
    """One 2-process torchrun of this script's worker; its RESULT dict, or None (printed why)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(extra_env or {}))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port), __file__,
                          "--worker", backend, kernels, solver], env=env, capture_output=True,
                         text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"{backend} {kernels} {solver} failed: {out.stderr[-800:]}")
        return None
    return json.loads(line[7:])


def main():
    import argparse

    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    ap.add_argument("--kernels", nargs="+", default=["torch", "native"], choices=["torch", "native"])
    ap.add_argument("--solvers", nargs="+", default=["pg", "exact"], choices=["pg", "exact"])
    ap.add_argument("--count-ops", action="store_true",
                    help="ops per step of the Triton path on 8 and 32 blocks instead of timings")
    a = ap.parse_args()
    if a.count_ops:
        return count_ops([b for b in a.backends if b in ("zero2", "zero3", "fsdp2")]
                         if a.backends != BACKENDS else ["zero2", "zero3", "fsdp2"], a.solvers)
    adamw_ms, P = unsharded(adamw=True)
    base = {solver: unsharded("torch", solver)[0] for solver in a.solvers}
    print(f"RAMDA + group lasso, {P / 1e6:.2f}M parameters, 2 ranks (gloo, 1 thread each)")
    print(f"1-process optimizer step (1 thread): AdamW(foreach) {adamw_ms:.1f} ms, RAMDA torch "
          + ", ".join(f"{s} {ms:.1f} ms" for s, ms in base.items())
          + f"; ideal state per rank 12·P/N = {12 * P / 2 / 1e6:.2f} MB")
    print(f"{'backend':11s} {'kernels':7s} {'solver':6s} {'state MB/rank':>15s} {'vs ideal':>9s} "
          f"{'collectives':>11s} {'KB/step':>8s} {'iters':>5s} {'step ms':>8s} {'vs 1-proc':>9s} "
          f"{'vs AdamW':>8s}")
    for solver in a.solvers:
        for kernels in a.kernels:
            for backend in a.backends:
                row(backend, kernels, solver, P, base[solver], adamw_ms)


def row(backend, kernels, solver, P, base_ms, adamw_ms):
    r = launch(backend, kernels, solver)
    if r is None:
        return
    if r["plan"] != kernels:  # say what really ran
        kernels = f"{kernels} ({r['plan']})"
    mb = [b / 1e6 for b in r["state_bytes"]]
    print(f"{backend:11s} {kernels:7s} {solver:6s} {'/'.join(f'{x:.2f}' for x in mb):>15s} "
          f"{max(mb) / (12 * P / 2 / 1e6):8.2f}x {r['calls']:11d} {r['bytes'] / 1e3:8.1f} "
          f"{r['iters']:5d} {r['ms']:8.1f} {r['ms'] / base_ms:8.2f}x {r['ms'] / adamw_ms:7.2f}x")


if __name__ == "__main__":
    main()
