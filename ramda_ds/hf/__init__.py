"""Hugging Face integration: prunable units of causal LMs and a ``Trainer`` that trains with RAMDA.

``from ramda_ds.hf import RamdaTrainer, RamdaConfig`` (see :mod:`ramda_ds.hf.trainer`); the unit
rules are in :mod:`ramda_ds.hf.units` (no transformers import needed for those).
"""

from .units import unit_param_groups, unit_patterns

_LAZY = ("RamdaTrainer", "RamdaMixin", "RamdaConfig", "OPTIM_DIR", "structure_logs")


def __getattr__(name):  # transformers.Trainer is imported only when asked for
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["unit_patterns", "unit_param_groups", *_LAZY]
