from .base import StructuredOptimizer
from .config import OPTIMIZERS, OptimizerConfig, make_optimizer
from .proxgen import ProxGen
from .proxsgd import ProxSGD
from .ramda import RAMDA
from .rmda import RMDA

__all__ = ["RAMDA", "RMDA", "ProxSGD", "ProxGen", "StructuredOptimizer", "OptimizerConfig",
           "make_optimizer", "OPTIMIZERS"]
