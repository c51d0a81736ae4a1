"""One process of a 1-rank job: every wrapping that ``attach`` must refuse, with what it says.

``torchrun --nproc-per-node 1 refusals.py OUT.json`` writes ``{case: "Type: message"}``.
"""

import importlib
import json
import sys

import torch
import torch.distributed as dist

from ramda_ds.optim import RAMDA
from ramda_ds.param_groups import build_param_groups
from ramda_ds.sharding import attach
from ramda_ds.training.world import exit_process  # noqa: E402


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def outcome(fn) -> str:
    try:
        fn()
    except Exception as e:  # what the user would see
        return f"{type(e).__name__}: {e}"
    return "accepted"


def deepspeed_case(extra: dict):
    import deepspeed

    m = model()
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
           "gradient_clipping": 0.0, "steps_per_print": 10**9, **extra}
    engine, ds_opt, _, _ = deepspeed.initialize(
        model=m, optimizer=RAMDA(build_param_groups(m, "group_lasso", lam=1e-3)), config=cfg)
    attach(ds_opt, engine)


def fsdp2_nuclear():
    from torch.distributed.fsdp import fully_shard

    m = model()
    fully_shard(m)
    attach(RAMDA(build_param_groups(m, "nuclear", lam=1e-3)), m)


if __name__ == "__main__":
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
    dist.init_process_group("gloo")
    import deepspeed

    deepspeed.init_distributed("gloo")
    cases = {
        "round_robin": lambda: deepspeed_case(
            {"zero_optimization": {"stage": 2, "round_robin_gradients": True}}),
        "bf16_optimizer": lambda: deepspeed_case(
            {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
             "data_types": {"grad_accum_dtype": "fp32"}}),
        "sharded_nuclear": fsdp2_nuclear,
        "zero2_plain": lambda: deepspeed_case({"zero_optimization": {"stage": 2}}),  # control
    }
    result = {name: outcome(fn) for name, fn in cases.items()}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
    exit_process(0)  # no gloo teardown race at exit (see exit_process)
