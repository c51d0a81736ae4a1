"""Time ``step()`` of each ramda_ds optimizer against ``torch.optim.AdamW(foreach=True)``.

Same parameters (the Linear weights and biases of a transformer-shaped stack, ~50M parameters on
CPU, larger on GPU), same fixed gradients, state warmed up first. Prints the median step time of
each optimizer and its ratio to AdamW measured in this run, plus the time RAMDA spends in its
subproblem solver (PG vs exact) and the solver statistics.

    python bench/optimizer_step.py [--layers 16 --d-model 512 --steps 5 --device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from ramda_ds.optim import RAMDA, RMDA, ProxGen, ProxSGD
from ramda_ds.param_groups import build_param_groups


def transformer_like(layers: int, d: int, device) -> nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    return nn.Sequential(*blocks).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, opt, grads, steps, device, warmup=2):
    """Median step time; gradients G_i = mean + noise_i, correlated across steps as in training."""
    params = list(model.parameters())
    times = []
    for i in range(warmup + steps):
        gen = torch.Generator(device=device).manual_seed(i)
        for p, (mean, scale) in zip(params, grads):
            p.grad = torch.randn(mean.shape, generator=gen, device=device).mul_(scale).add_(mean)
        sync(device)
        t = time.perf_counter()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lam", type=float, default=2e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = transformer_like(args.layers, args.d_model, device)
    n = sum(p.numel() for p in base.parameters())
    grads = [(torch.randn_like(p) * 1e-2, 1e-2) for p in base.parameters()]
    print(f"{n / 1e6:.1f}M parameters on {device} ({torch.get_num_threads()} threads)")

    def fresh():
        m = transformer_like(args.layers, args.d_model, device)
        m.load_state_dict(base.state_dict())
        return m

    def reg(m, **kw):
        return build_param_groups(m, "group_lasso", lam=args.lam, **kw)

    configs = [
        ("AdamW(foreach)", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)),
        ("MADGRAD (RAMDA λ=0)", lambda m: RAMDA(m.parameters(), lr=1e-2)),
        ("RAMDA+PG", lambda m: RAMDA(reg(m), lr=1e-2)),
        ("RAMDA+exact", lambda m: RAMDA(reg(m), lr=1e-2, solver="exact")),
        ("ProxGen+PG", lambda m: ProxGen(reg(m), lr=1e-3)),
        ("RMDA", lambda m: RMDA(reg(m), lr=1e-1)),
        ("ProxSGD", lambda m: ProxSGD(reg(m), lr=1e-1)),
    ]
    results, solve_time = {}, {}
    for name, make in configs:
        model = fresh()
        opt = make(model)
        spent = []
        if hasattr(opt, "_solve"):
            inner = opt._solve

            def timed(*a, _inner=inner, **k):
                sync(device)
                t = time.perf_counter()
                _inner(*a, **k)
                sync(device)
                spent.append(time.perf_counter() - t)
            opt._solve = timed
        results[name] = time_steps(model, opt, grads, args.steps, device)
        if spent and getattr(opt, "last_stats", None):
            solve_time[name] = statistics.median(spent[-args.steps:])
            st = list(opt.last_stats.values())
            its = statistics.mean(s.iterations for s in st)
            act = sum(s.active_groups for s in st)
            scr = sum(s.screened_groups for s in st)
            solve_time[name + " stats"] = f"mean iters {its:.1f}, active/screened groups {act}/{scr}"
        del model, opt
    ref = results["AdamW(foreach)"]
    print(f"{'optimizer':24s} {'step ms':>9s} {'vs AdamW':>9s}")
    for name, t in results.items():
        print(f"{name:24s} {t * 1e3:9.1f} {t / ref:8.2f}x")
    for name in ("RAMDA+PG", "RAMDA+exact", "ProxGen+PG"):
        if name in solve_time:
            print(f"solver time {name:12s} {solve_time[name] * 1e3:8.1f} ms  ({solve_time[name + ' stats']})")
    if "RAMDA+PG" in solve_time and "RAMDA+exact" in solve_time:
        print(f"exact / PG solver time: {solve_time['RAMDA+exact'] / solve_time['RAMDA+PG']:.2f}  "
              f"(target <= 0.5)")
    print(f"RAMDA+PG / AdamW step: {results['RAMDA+PG'] / ref:.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
