"""One rank of a 2-process run: ``torchrun --nproc-per-node 2 worker.py BACKEND OUT``.

Every rank computes the gradient of the same full batch, so the data-parallel average is exactly
the 1-process gradient and any difference comes from the sharded optimizer. Rank 0 saves, per
optimizer, the gathered params and optimizer state, solver stats and collective counts, and the
result of a save → continue / load → continue round trip through the backend's own checkpoint.
"""

import importlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from common import (OPTIMIZERS, STEPS, batches, loss_fn, make_model, make_optimizer,  # noqa: E402
                    param_groups)

from ramda_ds.sharding import attach  # noqa: E402
from ramda_ds.sharding.gather import gather_full_state  # noqa: E402
from ramda_ds.training.world import exit_process  # noqa: E402

BACKEND, OUT = sys.argv[1], sys.argv[2]


def no_shm_build():
    m = importlib.import_module("deepspeed.comm.torch")
    m.build_shm_op = lambda *a, **k: None


def build(name):
    """(train_step, optimizer, save(dir), load(dir)) for this backend."""
    model = make_model()
    if BACKEND.startswith("zero"):
        import deepspeed

        opt = make_optimizer(name, model)
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": int(BACKEND[-1])},
               "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10**9}
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        attach(ds_opt, engine)

        def step(x, y):
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()

        def save(d):
            engine.save_checkpoint(d, tag="t")

        def load(d):
            engine.load_checkpoint(d, tag="t")
        return step, opt, save, load
    if BACKEND.startswith("fsdp2"):
        from torch.distributed.checkpoint import load as dcp_load, save as dcp_save
        from torch.distributed.checkpoint.state_dict import (get_state_dict, set_state_dict)
        from torch.distributed.fsdp import fully_shard
        from ramda_ds.sharding.fsdp import shard_columns

        kw = dict(shard_placement_fn=shard_columns()) if "cols" in BACKEND else {}
        if BACKEND == "fsdp2_partial":  # head stays a plain tensor, replicated on both ranks
            fully_shard(model.conv)
            fully_shard(model.fc1)
        else:
            for m in (model.conv, model.fc1, model.head):
                fully_shard(m, **kw)
            fully_shard(model, **kw)
        opt = make_optimizer(name, model)
        attach(opt, model, local_solve=BACKEND == "fsdp2_cols_local")

        def step(x, y):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        def save(d):
            msd, osd = get_state_dict(model, opt)
            dcp_save({"model": msd, "optim": osd}, checkpoint_id=d)

        def load(d):
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp_load(state, checkpoint_id=d)
            set_state_dict(model, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        return step, opt, save, load
    if BACKEND == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        groups = param_groups(model)  # before FSDP1 flattens the parameters in place
        fsdp = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                    auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear, torch.nn.Conv1d}))
        opt = make_optimizer(name, fsdp, groups)
        attach(opt, fsdp)

        def step(x, y):
            opt.zero_grad()
            loss_fn(fsdp(x), y).backward()
            opt.step()

        from torch.distributed.fsdp import StateDictType

        def save(d):  # FSDP1's own sharded path: each rank saves its shard
            with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT):
                ck = {"model": fsdp.state_dict(), "optim": FSDP.optim_state_dict(fsdp, opt)}
            torch.save(ck, f"{d}.rank{dist.get_rank()}.pt")
            dist.barrier()

        def load(d):
            ck = torch.load(f"{d}.rank{dist.get_rank()}.pt", weights_only=False)
            with FSDP.state_dict_type(fsdp, StateDictType.SHARDED_STATE_DICT):
                fsdp.load_state_dict(ck["model"])
                opt.load_state_dict(FSDP.optim_state_dict_to_load(fsdp, opt, ck["optim"]))
        return step, opt, save, load
    if BACKEND == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        opt = make_optimizer(name, model)
        attach(opt, ddp)

        def step(x, y):
            opt.zero_grad()
            loss_fn(ddp(x), y).backward()
            opt.step()

        def save(d):
            if dist.get_rank() == 0:
                torch.save({"m": model.state_dict(), "o": opt.state_dict()}, d + ".pt")
            dist.barrier()

        def load(d):
            ck = torch.load(d + ".pt", weights_only=True)
            model.load_state_dict(ck["m"])
            opt.load_state_dict(ck["o"])
        return step, opt, save, load
    raise SystemExit(f"unknown backend {BACKEND}")


def init_distributed(backend):
    """gloo process group; DeepSpeed's own initialisation (without its shm op build) for ZeRO."""
    if backend.startswith("zero"):
        no_shm_build()
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")


def main():
    init_distributed(BACKEND)
    if os.environ.get("RAMDA_TEST_BROKEN_RANK") == str(dist.get_rank()):  # no compiler here
        os.environ["CC"] = "/bin/false"
        os.environ["RAMDA_DS_CACHE"] = os.path.join(os.path.dirname(OUT), "empty_cache")
    data = batches()
    results = {}
    ckpt_dir = os.path.join(os.path.dirname(OUT), f"ckpt_{BACKEND}")
    for name in OPTIMIZERS:
        step, opt, save, load = build(name)
        from ramda_ds.metrics import weighted_group_sparsity

        comm = opt.view.comm
        for x, y in data[:STEPS - 1]:
            step(x, y)
        calls0, bytes0 = getattr(comm, "calls", 0), getattr(comm, "bytes", 0)
        step(*data[STEPS - 1])
        last_step = dict(calls=getattr(comm, "calls", 0) - calls0,
                         bytes=getattr(comm, "bytes", 0) - bytes0,
                         max_iterations=max((s.iterations for s in opt.last_stats.values()), default=0))
        full = gather_full_state(opt)
        wgs = (weighted_group_sparsity(opt),
               weighted_group_sparsity(opt, structured=True) if "RAMDA" == name else None)
        stats = {k: (v.iterations, v.active_groups, v.screened_groups)
                 for k, v in opt.last_stats.items()}
        d = f"{ckpt_dir}_{name}"
        save(d)
        calls_before = getattr(comm, "calls", 0)
        for x, y in data[STEPS:]:
            step(x, y)
        per_step = (getattr(comm, "calls", 0) - calls_before) / len(data[STEPS:])
        continued = gather_full_state(opt)
        step2, opt2, save2, load2 = build(name)
        load2(d)
        for x, y in data[STEPS:]:
            step2(x, y)
        resumed = gather_full_state(opt2)
        from ramda_ds.optim.ramda import kernel_plan

        plan = kernel_plan(opt) if hasattr(opt, "state_keys") and "backend" in opt.param_groups[0] \
            else "torch"
        results[name] = dict(full=full, stats=stats, wgs=wgs, continued=continued, resumed=resumed,
                             kernel_plan=plan,
                             collectives_per_step=per_step, last_step=last_step,
                             sharded=[type(p).__name__ for g in opt.param_groups for p in g["params"]],
                             param_dims=[p.dim() for g in opt.param_groups for p in g["params"]])
    if dist.get_rank() == 0:
        torch.save(results, OUT)
    dist.barrier()
    exit_process(0)  # no gloo teardown race at exit (see exit_process)


if __name__ == "__main__":
    main()
