"""Pick and install the view that matches how the model was wrapped."""

from __future__ import annotations


from ..comm import ProcessGroupReducer
from ..layout import Unsharded
from ..optim.base import find_structured
from ..regularizers import regularizer_of


def attach(optimizer, model, process_group=None, local_solve: bool = False):
    """Install the right view on the ramda_ds optimizer inside ``optimizer``; return that view.

    Call it after ``deepspeed.initialize`` / ``fully_shard`` / ``accelerator.prepare``.
    ``model`` is the DeepSpeed engine, the FSDP2-sharded module, a DDP module or a plain module.
    ``local_solve=True``: tensors with no group crossing ranks (FSDP2 ``Shard(1)`` via
    ``shard_columns``) are solved without any communication; each rank applies PG's stop test to
    its own groups, so results equal the unsharded run within the solver tolerance, not bitwise.
    """
    opt = find_structured(optimizer)
    if opt is None:
        raise TypeError(f"no ramda_ds optimizer inside {type(optimizer).__name__}")
    whole = any(regularizer_of(g).whole_tensors and g.get("lam", 0) > 0
                for g in opt.param_groups)
    view = _view_for(model, opt, process_group, local_solve)
    if view.sharded and whole:
        raise ValueError("the nuclear-norm regularizer needs whole 2-D weights; it is not "
                         "supported with ZeRO/FSDP sharding")
    opt.view = view
    return view


def _view_for(model, opt, process_group, local_solve):
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover
        DeepSpeedEngine = ()
    if DeepSpeedEngine and isinstance(model, DeepSpeedEngine):
        from .deepspeed import Zero3View, ZeroFlatView

        stage = model.zero_optimization_stage()
        names = {id(p): n for n, p in model.module.named_parameters()}
        if stage == 0:
            return Unsharded()
        zero = model.optimizer
        if not hasattr(zero, "single_partition_of_fp32_groups") and stage in (1, 2):
            raise NotImplementedError(
                f"DeepSpeed wrapped the optimizer in {type(zero).__name__} (bf16 with fp32 "
                "gradient accumulation); ramda_ds supports DeepSpeedZeroOptimizer for ZeRO-1/2")
        if getattr(zero, "round_robin_gradients", False):
            raise NotImplementedError("ZeRO-1/2 with round_robin_gradients reorders the flat "
                                      "partitions; set \"round_robin_gradients\": false")
        comm = ProcessGroupReducer(process_group or getattr(zero, "dp_process_group", None))
        if stage in (1, 2):
            return ZeroFlatView(zero, comm, names, local_solve)
        import torch.distributed as dist

        return Zero3View(zero, comm, names, dist.get_rank(comm.group), local_solve)
    names = {id(p): n for n, p in model.named_parameters()}
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from .fsdp import FSDP2View

        held = {id(p) for p in model.parameters()}
        stale = [n for g in opt.param_groups for n, p in zip(g.get("param_names") or
                 [f"<{tuple(p.shape)}>" for p in g["params"]], g["params"]) if id(p) not in held]
        if stale:
            raise ValueError(f"the optimizer holds parameters the FSDP2 model no longer uses "
                             f"({stale[:2]}...): fully_shard replaces them, so build the optimizer "
                             "after fully_shard")

        mesh_group = process_group
        if mesh_group is None:  # the mesh dimension that shards (HSDP: not the replicate one)
            from torch.distributed.tensor import Shard

            p = next(p for p in model.parameters() if isinstance(p, DTensor))
            dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)] or [0]
            mesh_group = p.device_mesh.get_group(mesh_dim=dims[-1])
        return FSDP2View(ProcessGroupReducer(mesh_group), names, model, local_solve)
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    if fsdp1:
        from .fsdp import FSDP1View

        names = {id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in model.named_parameters()}
        return FSDP1View(ProcessGroupReducer(process_group or fsdp1[0].process_group), names,
                         model, local_solve)
    return Unsharded()
