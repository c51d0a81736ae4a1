"""The compression recipe inside a training run: what the loop calls around its steps.

:class:`CompressionHooks` serves ``launch/finetune_llm.py`` (and the HF Trainer's callback):

* ``--target``: a :class:`~.recipe.TargetRecipe` drives RAMDA (identify → freeze → recover);
* ``--method prune_recover``: the baseline users know: at step 0 the units are ranked (weight
  norm or mean activation, :mod:`.importance`) and the lowest pruned (uniform widths, or a given
  per-tensor allocation), then the kept units train with AdamW (ProxGen at λ = 0) while the
  pruned ones are held at zero (:mod:`.support`).

Its state rides in the run checkpoint's metadata (``meta["compress"]``); the support rides in
the optimizer state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .importance import keep_top
from .recipe import TargetConfig, TargetRecipe
from .support import freeze_support

METHODS = ("ramda", "prune_recover")


def read_allocation(spec: str) -> dict[str, int] | None:
    """``uniform`` → None; else a run's ``summary.json`` (its ``units``: zero and total groups per
    tensor) → kept units per tensor."""
    if spec == "uniform":
        return None
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prune_allocation must be 'uniform' or a run's summary.json, got {spec!r}")
    try:
        units = json.loads(path.read_text())["units"]
        return {name: int(total) - int(zero) for name, (zero, total) in units.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{spec} has no per-tensor 'units' (a finetune_llm summary.json): {e}") from None


class CompressionHooks:
    def __init__(self, optimizer, method: str, cfg: TargetConfig, criterion: str = "weight",
                 allocation: dict[str, int] | None = None, activation_fn=None):
        self.opt, self.method, self.cfg = optimizer, method, cfg
        self.criterion, self.allocation, self.activation_fn = criterion, allocation, activation_fn
        self.recipe = TargetRecipe(optimizer, cfg) if method == "ramda" else None
        self.pruned = False

    def on_start(self, saved: dict | None, step: int, say) -> None:
        """A fresh run prunes (prune_recover); a resumed one restores the recipe's state."""
        if saved is not None:
            if self.recipe is not None:
                self.recipe.load_state_dict(saved)
            self.pruned = bool(saved.get("pruned"))
            return
        if self.method == "prune_recover" and step == 0:
            scores = self.scores()
            missing = set(self.allocation or {}) ^ set(scores)
            if self.allocation is not None and missing:
                raise ValueError(f"prune_allocation names other tensors than this model's units: "
                                 f"{sorted(missing)[:3]}")
            kept = keep_top(scores, self.cfg.target, self.allocation)
            freeze_support(self.opt, kept, restart=False)
            self.pruned = True
            n = sum(int(m.sum()) for m in kept.values())
            total = sum(m.numel() for m in kept.values())
            say(f"prune_recover: kept {n} of {total} units ({n / total:.3f}) by {self.criterion} "
                f"({'uniform widths' if self.allocation is None else 'the given allocation'}); "
                "the rest are zero and held there")

    def scores(self) -> dict[str, torch.Tensor]:
        if self.criterion == "activation":
            return self.activation_fn()
        from ..metrics import group_totals

        return {n: c.sqrt() for n, (_, c) in
                group_totals(self.opt, lambda f: f.tensors["param"].double() ** 2).items()}

    def after_step(self, step: int) -> dict:
        if self.recipe is None:
            return {}
        return self.recipe.after_step(step)

    def frozen_at(self) -> int | None:
        return self.recipe.frozen_at if self.recipe is not None else (0 if self.pruned else None)

    def state_dict(self) -> dict:
        return dict(self.recipe.state_dict() if self.recipe else {}, pruned=self.pruned)
