"""One rule for which tensors take the kernels: what the step hands them is what the log says,
for every setting the rule decides on (unsharded, native kernels on CPU)."""

import pytest
import torch
import torch.nn as nn

from ramda_ds.kernels import native_build
from ramda_ds.optim import RAMDA, ProxGen
from ramda_ds.optim import fast
from ramda_ds.param_groups import build_param_groups

if not native_build.has_compiler():
    pytest.skip("no C compiler: the native kernels cannot be built", allow_module_level=True)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last), nn.Flatten(),
                         nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3))


def taken_by_the_step(opt, net, monkeypatch):
    """ids of the parameters whose tensors the step put in a plan."""
    taken = []
    real = fast.execute

    def spy(plan, path):
        taken.extend(ts.w.data_ptr() for ts in plan.tensors)
        return real(plan, path)

    monkeypatch.setattr(fast, "execute", spy)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    opt.step()
    return {p.data_ptr() for p in net.parameters() if p.data_ptr() in taken}


CASES = [  # (optimizer, options, what the log says for the regularized weights, for the biases)
    (RAMDA, dict(regularizer="group_lasso", lam=1e-2), "native", "native"),
    (RAMDA, dict(regularizer="group_lasso", lam=1e-2, solver="exact"), "native", "native"),
    # λ = 0: unregularized whatever it names (was refused unsharded, accepted sharded)
    (RAMDA, dict(regularizer="l1", lam=0.0), "native", "native"),
    (RAMDA, dict(regularizer="nuclear", lam=0.0), "native", "native"),
    (RAMDA, dict(regularizer="l1", lam=1e-2), "regularizer l1", "native"),
    # condition (7) stopping is the torch path's, for PG on a regularized group only (an
    # unregularized group took torch unsharded, the kernels sharded)
    (RAMDA, dict(regularizer="group_lasso", lam=1e-2, inexact_eps0=1e-3),
     "inexact_eps0 (condition (7) stopping)", "native"),
    (RAMDA, dict(regularizer="group_lasso", lam=1e-2, inexact_eps0=1e-3, solver="exact"),
     "native", "native"),
    (ProxGen, dict(regularizer="group_lasso", lam=1e-2), "native", "native"),
    (ProxGen, dict(regularizer="group_lasso", lam=1e-2, solver="exact"),
     "ProxGen has a native PG step only", "ProxGen has a native PG step only"),
]


@pytest.mark.parametrize("cls, options, weights, biases", CASES)
def test_the_step_takes_what_the_log_says(cls, options, weights, biases, monkeypatch):
    net = model()
    reg = {k: options.pop(k) for k in ("regularizer", "lam")}
    groups = build_param_groups(net, reg["regularizer"], lam=reg["lam"])
    opt = cls(groups, lr=1e-2, backend="native", **options)
    said = {}
    for g in opt.param_groups:
        for p, (path, why) in zip(g["params"], fast.tensor_paths(opt, g)):
            said[p.data_ptr()] = (path, why)
    taken = taken_by_the_step(opt, net, monkeypatch)
    assert taken == {ptr for ptr, (path, _) in said.items() if path == "native"}
    conv = net[0].weight
    assert said[conv.data_ptr()][0] == "torch"  # channels_last: refused by the tensor rule
    if "channels_last" not in str(said[conv.data_ptr()][1]):
        assert said[conv.data_ptr()][1] in (weights, biases)  # (a group-level reason first)
    for p in (net[2].weight, net[4].weight):
        path, why = said[p.data_ptr()]
        assert (path if why is None else why) == weights
    for p in (net[0].bias, net[2].bias, net[4].bias):
        path, why = said[p.data_ptr()]
        assert (path if why is None else why) == biases


def test_l1_at_lambda_zero_on_the_kernels_is_the_torch_step():
    """The newly accepted case computes what the torch path computes (MADGRAD's update)."""
    nets = []
    for backend in ("torch", "native"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))
        opt = RAMDA(build_param_groups(net, "l1", lam=0.0), lr=1e-2, c=0.2, backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(8, 12, generator=g)
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        nets.append(net)
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
