"""One rank of a 2-process run checking bench/scale_model.py: ``torchrun --nproc-per-node 2
scale_worker.py OUT``.

A tiny Llama (every Linear weight regularized input-wise) is trained for two RAMDA steps, with the
PG and the exact solver, under DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2 Shard(0) and Shard(1).  Rank 0
saves, per backend and solver, what every rank holds of each handed tensor (the ``span_inputs``
that ``attach_spans`` all-gathers), each regularized parameter's number of spanning groups, the all-reduces ramda_ds issued in the second step (calls, bytes) and the
solver's iterations per tensor in that step.
"""

import importlib
import sys

import torch
import torch.distributed as dist
from ramda_ds.training.world import exit_process  # noqa: E402

# the flat of all Linear weights (6534 elements) needs DeepSpeed's padding to 2·world; Shard(1) fits
SHAPE = dict(hidden_size=18, intermediate_size=28, num_hidden_layers=2, num_attention_heads=3,
             num_key_value_heads=3, vocab_size=51)
BACKENDS = ("zero2", "zero3", "fsdp2", "fsdp2_cols")


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE))


def optimizer(m, solver):
    from ramda_ds.optim import RAMDA
    from ramda_ds.param_groups import build_param_groups

    return RAMDA(build_param_groups(m, "group_lasso", lam=1e-3), lr=0.05, solver=solver)


def build(backend, solver):
    """(one training step, ramda_ds optimizer)."""
    from ramda_ds.sharding import attach

    m = model()
    if backend.startswith("zero"):
        import deepspeed

        opt = optimizer(m, solver)
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": int(backend[-1])},
               "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
               "steps_per_print": 10**9}
        engine, ds_opt, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=cfg)
        attach(ds_opt, engine)

        def step(x):
            engine.backward(engine(x, labels=x).loss)
            engine.step()
        return step, opt
    from torch.distributed.fsdp import fully_shard

    from ramda_ds.sharding.fsdp import shard_columns

    kw = dict(shard_placement_fn=shard_columns()) if backend == "fsdp2_cols" else {}
    for block in m.model.layers:
        fully_shard(block, **kw)
    fully_shard(m, **kw)
    opt = optimizer(m, solver)
    attach(opt, m)

    def step(x):
        opt.zero_grad()
        m(x, labels=x).loss.backward()
        opt.step()
    return step, opt


def main():
    from ramda_ds.sharding.base import span_inputs

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, SHAPE["vocab_size"], (2, 8), generator=g) for _ in range(2)]
    out = {}
    for backend in BACKENDS:
        for solver in ("pg", "exact"):
            step, opt = build(backend, solver)
            comm = opt.view.comm
            step(data[0])
            calls, sent = comm.calls, comm.bytes
            step(data[1])
            spans = {s.name: s.span.count for segs in opt.view._cache.values() for s in segs
                     if s.groups is not None and s.span is not None}
            every = [None] * dist.get_world_size()  # what each rank holds, per handed tensor
            dist.all_gather_object(every, [span_inputs(segs) for segs in opt.view._cache.values()])
            out[backend, solver] = dict(
                calls=comm.calls - calls, bytes=comm.bytes - sent, spans=spans, inputs=every,
                iterations={k: v.iterations for k, v in opt.last_stats.items()})
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[1])
    dist.barrier()
    exit_process(0)  # no gloo teardown race at exit (see exit_process)


if __name__ == "__main__":
    main()
