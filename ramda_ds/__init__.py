"""ramda_ds: RAMDA and its baselines with structured sparsity, on one process or sharded (DeepSpeed
ZeRO-1/2/3, FSDP2, FSDP1, DDP).

The public API, importable from here::

    from ramda_ds import RAMDA, build_param_groups, attach
    opt = RAMDA(build_param_groups(model, "group_lasso", lam=1e-4), lr=1e-2)
    model, opt = accelerator.prepare(model, opt); attach(opt, model)   # the sharded view

* optimizers: :class:`RAMDA`, :class:`RMDA`, :class:`ProxSGD`, :class:`ProxGen` (RAMDA with
  ``regularizer=None`` is MADGRAD), the typed :class:`OptimizerConfig` + :func:`make_optimizer`;
* param groups and regularizers: :func:`build_param_groups`, :data:`REGULARIZERS`;
* sharding: :func:`attach` (picks the view of a wrapped model), :class:`Unsharded`,
  :func:`gather_full_state`;
* checkpoints: :func:`save_optimizer_state`, :func:`load_optimizer_state`, the run-checkpoint
  reader :func:`read_verified_manifest`;
* metrics: :func:`weighted_group_sparsity`, :func:`tensor_sparsity`;
* export (imported on first use): :func:`export_run`, :func:`export_model`,
  :func:`export_weights`, :class:`ExportError`;
* Hugging Face (imported on first use, needs transformers): :class:`RamdaTrainer`,
  :class:`RamdaConfig`.
"""

from .checkpoint import CheckpointError, load_optimizer_state, save_optimizer_state
from .metrics import tensor_sparsity, weighted_group_sparsity
from .optim import RAMDA, RMDA, OptimizerConfig, ProxGen, ProxSGD, StructuredOptimizer, make_optimizer
from .param_groups import build_param_groups
from .regularizers import REGULARIZERS, Regularizer
from .run_format import read_verified_manifest
from .sharding import Unsharded, attach
from .sharding.gather import gather_full_state

_LAZY = {"export_run": "export", "export_model": "export", "export_weights": "export",
         "ExportError": "export", "RamdaTrainer": "hf", "RamdaConfig": "hf"}


def __getattr__(name):  # export and the HF Trainer are imported only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RAMDA", "RMDA", "ProxSGD", "ProxGen", "StructuredOptimizer", "OptimizerConfig",
           "make_optimizer", "build_param_groups", "REGULARIZERS", "Regularizer", "attach",
           "Unsharded", "gather_full_state", "save_optimizer_state", "load_optimizer_state",
           "CheckpointError", "read_verified_manifest", "tensor_sparsity",
           "weighted_group_sparsity", *_LAZY]
