"""A small model with every tensor geometry the step kernels walk, and a RAMDA run on it, shared
by the native (tests/test_native.py) and Triton (tests/test_kernels.py) comparisons."""

import torch
import torch.nn as nn

from ramda_ds.optim import RAMDA
from ramda_ds.param_groups import build_param_groups


class Net(nn.Module):
    """Every geometry the kernels walk: columns (K = 1, wider than one work item), rows
    (``output``: R = 1), conv channels (K > 1), attention heads, and unregularized biases."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 5, 3)
        self.fc = nn.Linear(20, 300)
        self.heads = nn.Linear(300, 24)
        self.rows = nn.Linear(24, 6)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.rows(torch.tanh(self.heads(torch.tanh(self.fc(h)))))


def run(backend, solver="pg", steps=6, lam=3e-2, step_threads=None, **kw):
    net = Net()
    groups = build_param_groups(net, "group_lasso", lam=lam,
                                grouping={"rows.weight": "output", "heads.weight": "head:4"})
    opt = RAMDA(groups, lr=0.05, c=0.3, solver=solver, backend=backend, keep_structured=True,
                **kw)
    g = torch.Generator().manual_seed(1)
    stats = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, generator=g), torch.randn(8, 6, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        threads = torch.get_num_threads()
        torch.set_num_threads(step_threads or threads)  # (forward and backward keep theirs)
        try:
            opt.step()
        finally:
            torch.set_num_threads(threads)
        stats.append({k: (v.iterations, v.active_groups, v.screened_groups)
                      for k, v in opt.last_stats.items()})
    return net, opt, stats


def assert_same(ref, got, rtol=1e-6, atol=1e-8):
    (ref_net, ref_opt, ref_stats), (net, opt, stats) = ref, got
    assert stats == ref_stats  # same iterations, same screening, step by step
    for (name, a), b in zip(ref_net.named_parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)
        for key in ("grad_sum", "grad_sq_sum", "initial", "structured"):
            torch.testing.assert_close(opt.state[b][key], ref_opt.state[a][key], rtol=rtol,
                                       atol=atol, msg=f"{name} {key}")
        assert torch.equal(opt.state[b]["structured"] == 0, ref_opt.state[a]["structured"] == 0)
