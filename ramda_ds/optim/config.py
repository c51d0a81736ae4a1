"""The typed way to build an optimizer: :class:`OptimizerConfig` and :func:`make_optimizer`.

Both front ends call it: the command line (:func:`ramda_ds.training.launch.make_optimizer`, from
the parsed arguments) and the Hugging Face Trainer (:class:`ramda_ds.hf.RamdaTrainer`, from its
``RamdaConfig``)::

    from ramda_ds import OptimizerConfig, make_optimizer
    from ramda_ds.param_groups import build_param_groups

    opt = make_optimizer(OptimizerConfig(name="ramda", lr=1e-2, milestones=(100, 200)),
                         build_param_groups(model, "group_lasso", lam=1e-4))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .proxgen import ProxGen
from .proxsgd import ProxSGD
from .ramda import RAMDA
from .rmda import RMDA

OPTIMIZERS = ("ramda", "proxgen", "rmda", "proxsgd", "adamw")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """What the front ends choose; the regularizer, λ and grouping are in the param groups.

    ``name``: one of :data:`OPTIMIZERS` (``adamw``: the dense baseline, ``torch.optim.AdamW``);
    ``momentum``: the paper's averaging weight c (RAMDA, RMDA, ProxSGD; see
    :func:`~ramda_ds.optim.base.averaging_weight`); ``milestones``: optimizer steps after which a
    restart stage begins; ``solver`` and ``backend``: RAMDA's and ProxGen's subproblem solver and
    step kernels; ``keep_structured``: RAMDA keeps Ŵ in its state (metrics, export).
    """

    name: str = "ramda"
    lr: float
    momentum: float = 0.1
    milestones: tuple[int, ...] = ()
    solver: str = "pg"
    backend: str = "torch"
    keep_structured: bool = False

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {OPTIMIZERS}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))


def make_optimizer(config: OptimizerConfig, params) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, on ``params`` (param groups, or parameters for AdamW)."""
    c, kw = config, dict(lr=config.lr, milestones=config.milestones)
    if c.name == "adamw":
        return torch.optim.AdamW(params, lr=c.lr)
    if c.name == "ramda":
        return RAMDA(params, momentum=c.momentum, solver=c.solver,
                     keep_structured=c.keep_structured, backend=c.backend, **kw)
    if c.name == "rmda":
        return RMDA(params, momentum=c.momentum, **kw)
    if c.name == "proxsgd":
        return ProxSGD(params, momentum=c.momentum, **kw)
    return ProxGen(params, solver=c.solver, backend=c.backend, **kw)
