"""Time ``step()`` of each ramda_ds optimizer against ``torch.optim.AdamW``, and count its ops.

Same parameters (the Linear weights and biases of a transformer-shaped stack: per block
``[3d, d], [d, d], [4d, d], [d, 4d]``; 8 blocks of d = 512 = 25.2M parameters by default), same
gradients (a fixed mean plus fresh noise per step, as in training), state warmed up first.
Prints, measured in this one run:

* the median step time of each optimizer and its ratio to AdamW(foreach) steps interleaved with
  it (robust to a busy machine), and to AdamW(fused) through the same interleaving; on CPU also
  RAMDA with ``backend="native"`` (the C kernels of :mod:`ramda_ds.kernels.native`);
* solver passes per tensor: PG iterations, or Newton passes of the exact solver;
* ops dispatched per step on an 8-block and a 32-block stack (width ``--count-d``): aten ops
  counted at the dispatcher (a ``TorchDispatchMode``) plus the float64 group reductions done in
  numpy on CPU (one kernel each on CUDA) plus Triton kernel launches — once for the torch path
  and, when ``triton`` is installed, once for the Triton path (run by the interpreter on CPU);
* the issue's targets and whether this run meets them.

    python bench/optimizer_step.py                      # ~8 min on 2 CPU cores (op counts: ~5)
    python bench/optimizer_step.py --no-count           # ~3 min: the timings only
    python bench/optimizer_step.py --blocks 16 --d-model 1024 --steps 5 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn as nn

if not torch.cuda.is_available():  # Triton reads this once, at import: set before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (only the op counts run the kernels on CPU)
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import ramda_ds.groups as groups_mod
from ramda_ds import kernels
from ramda_ds.optim import RAMDA, RMDA, ProxGen, ProxSGD
from ramda_ds.param_groups import build_param_groups


def transformer_like(blocks: int, d: int, device) -> nn.Module:
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    return nn.Sequential(*layers).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def set_grads(params, grads, i, device):
    gen = torch.Generator(device=device).manual_seed(i)
    for p, (mean, scale) in zip(params, grads):
        p.grad = torch.randn(mean.shape, generator=gen, device=device).mul_(scale).add_(mean)


def _timed_step(opt, device):
    sync(device)
    t = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - t


def time_steps(model, opt, grads, steps, device, ref, warmup=2):
    """Median step time of ``opt``, the median of AdamW(foreach) steps interleaved with it (one
    before each step: the machine's load hits both alike), and the mean solver passes per
    regularized tensor over the timed steps.  ``ref`` = (model, AdamW) to interleave."""
    params, ref_params = list(model.parameters()), list(ref[0].parameters())
    times, ref_times, passes = [], [], []
    for i in range(warmup + steps):
        set_grads(ref_params, grads, i, device)
        t_ref = _timed_step(ref[1], device)
        set_grads(params, grads, i, device)
        t = _timed_step(opt, device)
        if i >= warmup:
            times.append(t)
            ref_times.append(t_ref)
            st = list(getattr(opt, "last_stats", {}).values())
            if st:
                passes.append(statistics.mean(s.iterations for s in st))
    return (statistics.median(times), statistics.median(ref_times),
            statistics.mean(passes) if passes else None)


_NO_KERNEL = {"empty", "empty_like", "empty_strided", "detach", "alias", "lift_fresh",
              "_local_scalar_dense", "set_", "resize_"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel on CUDA: not views, allocations or metadata, and not
    ops on 0-d CPU tensors only (the step/α counters stay on the CPU under CUDA too)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.all = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.all += 1
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        scalar_only = all(t.dim() == 0 and t.device.type == "cpu" for t in tensors)
        if not (func.is_view or func.__name__.split(".")[0] in _NO_KERNEL or scalar_only):
            self.ops += 1
        return out


def count_ops(make, blocks, d, lam, device):
    """Ops of one step (the second) of ``make(model)`` on a ``blocks``-block stack of width d."""
    torch.manual_seed(0)
    model = transformer_like(blocks, d, device)
    grads = [(torch.randn_like(p) * 1e-2, 1e-2) for p in model.parameters()]
    opt = make(model, lam)
    params = list(model.parameters())
    set_grads(params, grads, 0, device)
    opt.step()  # creates the state
    set_grads(params, grads, 1, device)
    numpy_sums = [0]
    inner = groups_mod.group_sums

    def counted(v):
        if v.device.type == "cpu" and v.dtype == torch.float32:
            numpy_sums[0] += 1  # a numpy reduction: no aten op, one kernel on CUDA
        return inner(v)
    groups_mod.group_sums = counted
    launches0 = kernels.LAUNCHES[0]
    launch = None
    if kernels.triton_version() and (device.type == "cuda" or kernels.interpreting()):
        import ramda_ds.kernels.exact as kx

        launch = kx._launch

        def quiet(*a, **k):  # the interpreter's own tensor copies are not the step's ops
            with _disable_current_modes():
                launch(*a, **k)
        kx._launch = quiet
    try:
        with OpCounter() as c:
            opt.step()
    finally:
        groups_mod.group_sums = inner
        if launch is not None:
            kx._launch = launch
    return c.ops + numpy_sums[0] + kernels.LAUNCHES[0] - launches0, c.all


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", "--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lam", type=float, default=2e-4)
    ap.add_argument("--count-d", type=int, default=64, help="width of the op-count stacks")
    ap.add_argument("--no-count", action="store_true", help="skip the op counts")
    ap.add_argument("--only", default="", help="comma-separated optimizer names to time "
                    "(default all; AdamW(foreach) is always the reference)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = transformer_like(args.blocks, args.d_model, device)
    n = sum(p.numel() for p in base.parameters())
    grads = [(torch.randn_like(p) * 1e-2, 1e-2) for p in base.parameters()]
    print(flush=True)
    print(f"{n / 1e6:.1f}M parameters ({args.blocks} blocks, d={args.d_model}) on {device}, "
          f"{torch.get_num_threads()} threads, triton: {kernels.triton_version() or 'not installed'}")

    def fresh():
        m = transformer_like(args.blocks, args.d_model, device)
        m.load_state_dict(base.state_dict())
        return m

    def reg(m, lam=args.lam):
        return build_param_groups(m, "group_lasso", lam=lam)

    configs = {
        "AdamW(foreach)": lambda m, lam: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
        "AdamW(fused)": lambda m, lam: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
        "MADGRAD (RAMDA λ=0)": lambda m, lam: RAMDA(m.parameters(), lr=1e-2),
        "RAMDA+PG": lambda m, lam: RAMDA(reg(m, lam), lr=1e-2),
        "RAMDA+exact": lambda m, lam: RAMDA(reg(m, lam), lr=1e-2, solver="exact"),
        "RAMDA+exact warm": lambda m, lam: RAMDA(reg(m, lam), lr=1e-2, solver="exact",
                                                 warm_start=True),
        "ProxGen+PG": lambda m, lam: ProxGen(reg(m, lam), lr=1e-3),
        "RMDA": lambda m, lam: RMDA(reg(m, lam), lr=1e-1),
        "ProxSGD": lambda m, lam: ProxSGD(reg(m, lam), lr=1e-1),
    }
    if device.type == "cpu":
        configs["RAMDA+PG native"] = lambda m, lam: RAMDA(reg(m, lam), lr=1e-2, backend="native")
        configs["RAMDA+exact native"] = lambda m, lam: RAMDA(reg(m, lam), lr=1e-2, solver="exact",
                                                             backend="native")
        configs["MADGRAD native"] = lambda m, lam: RAMDA(m.parameters(), lr=1e-2, backend="native")
        configs["ProxGen+PG native"] = lambda m, lam: ProxGen(reg(m, lam), lr=1e-3, backend="native")
    if device.type == "cuda" and kernels.available(device):
        configs["RAMDA+exact triton"] = lambda m, lam: RAMDA(reg(m, lam), lr=1e-2, solver="exact",
                                                             backend="triton")
        configs["RAMDA+PG triton"] = lambda m, lam: RAMDA(reg(m, lam), lr=1e-2, backend="triton")
        configs["MADGRAD triton"] = lambda m, lam: RAMDA(m.parameters(), lr=1e-2, backend="triton")
    timed = configs
    if args.only:
        keep = {"AdamW(foreach)", *args.only.split(",")}
        timed = {k: v for k, v in configs.items() if k in keep}
    ref_model = fresh()
    ref = (ref_model, configs["AdamW(foreach)"](ref_model, 0.0))
    results, ratio = {}, {}
    for name, make in timed.items():
        model = fresh()
        try:
            opt = make(model, args.lam)
        except (RuntimeError, ValueError) as e:  # fused AdamW not offered on this device
            print(f"{name}: skipped ({str(e).splitlines()[0][:80]})")
            continue
        t, t_ref, passes = time_steps(model, opt, grads, args.steps, device, ref)
        results[name], ratio[name] = (t, t_ref, passes), t / t_ref
        del model, opt
    fused = ratio.get("AdamW(fused)")
    print(f"\n{'optimizer':22s} {'step ms':>9s} {'AdamW ms':>9s} {'/foreach':>9s} {'/fused':>8s}"
          "  passes/tensor")
    for name, (t, t_ref, passes) in results.items():
        f = f"{ratio[name] / fused:7.2f}x" if fused else "      -"
        p = "" if passes is None else f"{passes:.1f}"
        print(f"{name:22s} {t * 1e3:9.1f} {t_ref * 1e3:9.1f} {ratio[name]:8.2f}x {f}  {p}")
    print("(AdamW ms: the AdamW(foreach) steps interleaved with that optimizer's; ratios use them)")

    counts = {}
    if not args.no_count:
        print(f"\nops per step, d={args.count_d}: kernel-launching aten ops + numpy group reductions "
              "+ Triton launches (all aten ops incl. views, allocations, 0-d counters)")
        paths = [("torch", {})]
        if kernels.triton_version():
            paths.append(("triton", dict(backend="triton")))
        for path, kw in paths:
            for name in ("AdamW(foreach)", "RAMDA+PG", "RAMDA+exact", "RAMDA+exact warm"):
                if name.startswith("AdamW") and path != "torch":
                    continue
                make = configs[name]
                mk = (lambda m, lam, _mk=make, _kw=kw: _with(_mk(m, lam), _kw)) if kw else make
                (c8, a8), (c32, a32) = (count_ops(mk, b, args.count_d, args.lam, device)
                                        for b in (8, 32))
                counts[(path, name)] = c32 / c8
                print(f"  {path:6s} {name:18s} 8 blocks {c8:6d} ({a8:6d})   32 blocks {c32:6d} "
                      f"({a32:6d})   growth {c32 / c8:.2f}x")

    print("\ntargets (issue 9, same run):")
    for name in ("RAMDA+exact triton", "RAMDA+exact") if device.type == "cuda" and fused else ():
        if name in ratio:  # the GPU target
            r = ratio[name] / fused
            print(f"  {name:18s} {r:6.2f}x AdamW(fused)  target <= 2x: "
                  f"{'met' if r <= 2 else 'NOT met'}")
    for name, limit in (("RAMDA+exact", 3.0), ("RAMDA+exact warm", 3.0), ("RAMDA+PG", 8.0),
                        ("RAMDA+exact native", 3.0), ("RAMDA+PG native", 8.0)):
        if device.type == "cuda" or name not in ratio:  # (the CPU targets)
            continue
        r = ratio[name]
        print(f"  {name:18s} {r:6.2f}x AdamW(foreach)  target <= {limit:.0f}x: "
              f"{'met' if r <= limit else 'NOT met'}")
    for (path, name), g in counts.items():
        if name.startswith("RAMDA") and (path == "triton" or not kernels.triton_version()):
            print(f"  ops growth 8->32 blocks, {path} path, {name:16s} {g:.2f}x  target <= 1.5x: "
                  f"{'met' if g <= 1.5 else 'NOT met'}")
    print(f"\n({time.perf_counter() - started:.0f} s)")


def _with(opt, kw):
    for g in opt.param_groups:
        g.update(kw)
    return opt


if __name__ == "__main__":
    main()
