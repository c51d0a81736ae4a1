"""The fused native exact solver (one pass per block of groups) against the generic exact driver
(one pass per Newton iteration, ``kernels.sharded.run``) on the same unsharded step plan.

    python bench/fused_exact.py

Both run the same plan on the native kernels (no optimizer), interleaved step by step; prints
the median step time of each (steps 3..12) and the largest difference of the parameters (0: the
same bits).  docs/architecture.md quotes it: why the fused special case is kept.
"""

import math
import statistics
import time

import torch

from ramda_ds.kernels import plan as P
from ramda_ds.kernels import sharded
from ramda_ds.layout import make_segment

SHAPES = [(1024, 1024)] * 4 + [(2816, 1024), (1024, 2816)]
GROUP = dict(regularizer="group_lasso", grouping="input", lam=1e-4)


def make():
    torch.manual_seed(0)
    out = []
    for i, shape in enumerate(SHAPES):
        n = math.prod(shape)
        w = torch.randn(n) * 0.02
        out.append(dict(w=w, V=torch.zeros(n), U=torch.zeros(n), W0=w.clone(),
                        seg=make_segment(f"w{i}", shape, 0, n, 0, GROUP)))
    return out


def step(tensors, t, fused):
    s = 0.01 * math.sqrt(t)
    gen = torch.Generator().manual_seed(t)
    rows = [P.TensorStep(torch.randn(x["w"].numel(), generator=gen) * 1e-2, x["V"], x["U"],
                         x["W0"], x["w"], None, [s, 1e-6, 0.1],
                         [P.Problem(x["seg"], 1e-4 * s * t * x["seg"].groups.layout.group_weight)])
            for x in tensors]
    plan = P.Plan("ramda", "exact", rows)
    t0 = time.perf_counter()
    out = P.execute(plan, "native") if fused else sharded.run(plan, "native")
    return time.perf_counter() - t0, out


def main():
    a, b = make(), make()
    ta, tb, passes = [], [], []
    for t in range(1, 13):
        x, _ = step(a, t, True)
        y, stats = step(b, t, False)
        if t > 2:
            ta.append(x)
            tb.append(y)
            passes = [st.iterations for _, st in stats]
    diff = max((u["w"] - v["w"]).abs().max().item() for u, v in zip(a, b))
    fa, fb = statistics.median(ta), statistics.median(tb)
    print(f"threads {torch.get_num_threads()}; {sum(map(math.prod, SHAPES)) / 1e6:.1f}M params; "
          f"fused one pass per block: {fa * 1e3:.1f} ms; generic driver: {fb * 1e3:.1f} ms "
          f"({fb / fa:.2f}x); Newton passes {passes}; max |W difference| {diff:.1e}")


if __name__ == "__main__":
    main()
