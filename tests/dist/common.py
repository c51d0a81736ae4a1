"""Model, data and optimizers shared by the 2-rank workers and the 1-process reference runs.

Sizes are chosen so that shards cut through rows and columns: the regularized flat group of
ZeRO-1/2 (45 + 140 + 7 elements) is cut at element 96, mid-row and mid-column of ``fc1.weight``;
under FSDP2 ``head.weight`` ([1, 7]) leaves rank 1 with an empty shard.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ramda_ds.optim import RAMDA, RMDA, ProxGen, ProxSGD
from ramda_ds.param_groups import build_param_groups

STEPS = 5
KERNELS = os.environ.get("RAMDA_TEST_KERNELS", "torch")  # RAMDA's and ProxGen's backend
OPTIMIZERS = {
    "RAMDA": lambda gs: RAMDA(gs, lr=0.05, momentum=0.1, milestones=(3,), keep_structured=True,
                              backend=KERNELS),
    "RAMDA-exact": lambda gs: RAMDA(gs, lr=0.05, momentum=0.1, solver="exact", backend=KERNELS),
    "ProxGen": lambda gs: ProxGen(gs, lr=0.01, backend=KERNELS),
    "RMDA": lambda gs: RMDA(gs, lr=0.1, momentum=0.1),
    "ProxSGD": lambda gs: ProxSGD(gs, lr=0.1, momentum=0.1),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3)
        self.fc1 = nn.Linear(20, 7)
        self.head = nn.Linear(7, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def make_model():
    """The test model; starts from the weights in $RAMDA_TEST_INIT when set (resharding tests)."""
    torch.manual_seed(0)
    net = Net()
    if os.environ.get("RAMDA_TEST_INIT"):
        net.load_state_dict(torch.load(os.environ["RAMDA_TEST_INIT"], weights_only=True))
    return net


def param_groups(model):
    return build_param_groups(model, "group_lasso", lam=5e-2)


def make_optimizer(name, model, groups=None):
    return OPTIMIZERS[name](groups or param_groups(model))


def batches(n=STEPS + 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def loss_fn(out, y):
    return F.mse_loss(out, y)


def reference(name, steps=STEPS):
    """The 1-process run: params and optimizer state by parameter name, solver stats, and the
    weighted group sparsity (of W, and of Ŵ for RAMDA) — what the workers report."""
    from ramda_ds.metrics import weighted_group_sparsity
    from ramda_ds.sharding.gather import gather_full_state

    model = make_model()
    opt = make_optimizer(name, model)
    for x, y in batches()[:steps]:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    stats = {k: (v.iterations, v.active_groups, v.screened_groups) for k, v in opt.last_stats.items()}
    wgs = (weighted_group_sparsity(opt),
           weighted_group_sparsity(opt, structured=True) if name == "RAMDA" else None)
    return gather_full_state(opt), stats, wgs
