"""Identify, then recover: a size target met in one run (:class:`TargetRecipe`).

Stage 1, *identification* (RAMDA with group lasso on the units): after every step the critical
value r_g = ‖P∘W0 − V‖_g / (α·w_g) of every unit is computed from the optimizer state (the λ at
which Ŵ would drop it; :mod:`.target`), and λ for the next step is set so that Ŵ keeps the
scheduled fraction k_t (:func:`.target.keep_schedule`, from 1 down to the target over ``ramp``
steps). λ is thus a multiplier adjusted toward the target; how many units each layer keeps is
left to the ranking.

Stage 2, *recovery*: once the schedule has reached the target and Ŵ's kept set has settled for
``stable`` steps in a row (at most ``churn``, 1%, of the units changing per step: at the margin
the quantile's units trade places), or at the latest after ``max_identify`` steps, the support is
frozen on the exact target (the top units by r_g, with the per-tensor ``floor``), removed units
are zeroed in W and held at zero (:mod:`.support`), the optimizer restarts from that W (V, U, α
zeroed, W0 ← W; lr and ε × ``recover_lr_scale``) and λ is 0: the kept units train without
shrinkage. The recovery's update is AdamW by default (``recover_with="adamw"``: RAMDA's V and U
buffers hold Adam's m and v, :meth:`RAMDA._adamw_group`), which fine-tunes a converged model better
than dual averaging does at λ = 0 (docs/compression.md has the numbers), or RAMDA at λ = 0
(``"ramda"``, optionally restarted every ``recover_restart_every`` steps). From then on the
structured model is W itself (exactly zero on the removed units), and ``state["structured"]`` is
kept equal to it, so metrics and export ship W.

The recipe's own state (λ, the stage switch, the stability counter) goes into the run
checkpoint's metadata (:meth:`state_dict`), the support into the optimizer state: a resumed run
continues bitwise, across the switch too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .support import freeze_support
from .target import keep_schedule, select

TARGET_OF = ("units", "params")
RECOVER_WITH = ("adamw", "ramda")


@dataclass
class TargetConfig:
    target: float  # fraction kept, in (0, 1]
    of: str = "units"  # units: each unit kind (FFN neurons, heads) keeps the fraction; params
    ramp: int = 0  # steps of the cubic schedule; 0: 30% of the run's steps (set by the caller)
    stable: int = 0  # steps in a row Ŵ's kept set must stay settled first; 0: 3% of the steps
    churn: float = 0.01  # settled: at most this fraction of the units changed since the step before
    max_identify: int = 0  # freeze at this step at the latest; 0: ramp + 2·stable
    floor: float = 0.0  # each tensor keeps at least this fraction of its units
    recover_lr_scale: float = 1.0  # γ: lr and ε × this at the freeze and each recovery restart
    recover_restart_every: int = 0  # recover_with=ramda: restart every N recovery steps; 0: never
    steps: int = 0  # the run's length (for the recovery's restarts)
    recover_with: str = "adamw"  # the recovery's update: adamw, or ramda (at λ = 0)
    total_params: int = 0  # the model's parameter count (of="params")

    def check(self, steps: int | None = None) -> None:
        """ValueError naming the first bad setting."""
        if not 0 < self.target <= 1:
            raise ValueError(f"target must be a fraction kept in (0, 1], got {self.target}")
        if self.of not in TARGET_OF:
            raise ValueError(f"target_of must be one of {TARGET_OF}, got {self.of!r}")
        if not 0 <= self.floor <= self.target:
            raise ValueError(f"target_floor must be in [0, target={self.target}], got {self.floor}")
        if self.ramp < 0 or self.stable < 0 or self.max_identify < 0:
            raise ValueError("target_ramp, target_stable and target_max_identify must be >= 0")
        if self.recover_with not in RECOVER_WITH:
            raise ValueError(f"recover_with must be one of {RECOVER_WITH}, got {self.recover_with!r}")
        if not 0 < self.recover_lr_scale <= 1:
            raise ValueError(f"recover_lr_scale must be in (0, 1], got {self.recover_lr_scale}")
        if self.of == "params" and self.total_params <= 0:
            raise ValueError("target_of params needs the model's parameter count")
        if steps is not None and self.freeze_by() >= steps:
            raise ValueError(f"the support is frozen by step {self.freeze_by()} at the latest "
                             f"(target_max_identify), which is not before --steps {steps}: no "
                             "step would recover the kept units; lower target_ramp / "
                             "target_max_identify or raise --steps")

    def freeze_by(self) -> int:
        return self.max_identify or self.ramp + 2 * self.stable


def unit_cost(name: str, group_size: int) -> int:
    """Parameters removed with one unit of tensor ``name``: an FFN neuron of a gated MLP
    (``down_proj`` column + ``gate_proj``/``up_proj`` rows) 3·|g|; of GPT-2's MLP (``c_proj`` row,
    ``c_fc`` column and bias) 2·|g| + 1; a head (``o_proj`` columns + ``q_proj`` rows) 2·|g|
    (its K/V share goes only with its whole GQA group, not counted); otherwise |g|."""
    if name.endswith("down_proj.weight"):
        return 3 * group_size
    if name.endswith("mlp.c_proj.weight"):
        return 2 * group_size + 1
    if name.endswith("o_proj.weight"):
        return 2 * group_size
    return group_size


def critical_values(optimizer) -> dict[str, torch.Tensor]:
    """r_g = ‖P∘W0 − V‖_g / (α·w_g) per unit of every targeted tensor (RAMDA's state after a
    step; P = ∛U + ε of the tensor's stage), the same on every rank."""
    from ..cube_root import cube_root
    from ..metrics import group_totals

    def b_over_alpha_sq(frag):
        t = frag.tensors
        g = frag.group
        step = int(frag.scalars["step"].item())
        stage = sum(step > m for m in g["milestones"])
        eps = g["eps"] * g["gamma"] ** stage
        P = cube_root(t["grad_sq_sum"].clone()).add_(eps)
        b = P.mul_(t["initial"]).sub_(t["grad_sum"])
        alpha = float(frag.scalars["alpha"].item())
        return (b / alpha) ** 2 if alpha > 0 else torch.zeros_like(b)
    out = {}
    for name, (lay, tot) in group_totals(optimizer, b_over_alpha_sq, _targeted).items():
        out[name] = tot.sqrt() / lay.group_weight
    return out


def _targeted(group: dict) -> bool:
    return bool(group.get("target"))


class TargetRecipe:
    """Drives a RAMDA optimizer through identification and recovery; call :meth:`after_step`
    after every ``optimizer.step()`` with the number of steps taken (every rank: it
    communicates when sharded)."""

    def __init__(self, optimizer, cfg: TargetConfig):
        self.opt, self.cfg = optimizer, cfg
        if not self.groups:
            raise ValueError("a size target needs group-lasso param groups marked target=True")
        self.lams: dict[str, float] = {}  # λ per ranked part (see _partitions)
        self.frozen_at: int | None = None
        self.same_for = 0  # steps in a row whose kept set changed by at most ``churn`` of the units
        self.last_kept: torch.Tensor | None = None  # Ŵ's kept set at the last step
        self.kept_fraction = 1.0
        for g in self.groups:
            g["lam"] = 0.0  # step 1: nothing to rank yet

    @property
    def groups(self) -> list[dict]:
        """The targeted param groups (looked up each time: ``load_state_dict`` replaces them)."""
        return [g for g in self.opt.param_groups
                if g.get("regularizer") == "group_lasso" and g.get("target")]

    # ------------------------------------------------------------------ the per-step drive
    def after_step(self, step: int) -> dict:
        """Set λ for the next step, or freeze the support; returns what to log."""
        if self.frozen_at is not None:
            if self.cfg.recover_with != "adamw":  # the AdamW stage keeps Ŵ = W itself
                self._structured_is_w()
            return dict(stage="recover", lam=0.0)
        scores = critical_values(self.opt)
        costs = self._costs(scores)
        ramp_done = step >= self.cfg.ramp
        keep = keep_schedule(step, self.cfg.target, self.cfg.ramp)
        parts = self._partitions(scores)
        # Ŵ's kept set at this step (each part at its λ of this step): settled → freeze
        now = torch.cat([scores[n] > self.lams.get(k, 0.0) for k, _, names in parts
                         for n in names]) if any(self.lams.values()) else None
        settled = now is not None and self.last_kept is not None and \
            int((now ^ self.last_kept).sum()) <= self.cfg.churn * now.numel()
        self.same_for = self.same_for + 1 if settled else 0
        self.last_kept = now
        self.kept_fraction = self._fraction({n: scores[n] > self.lams.get(k, 0.0)
                                             for k, _, names in parts for n in names}, costs)
        if ramp_done and (self.same_for >= self.cfg.stable or step >= self.cfg.freeze_by()):
            kept = {}
            for _, _, names in parts:
                sub = {n: scores[n] for n in names}
                subc = {n: costs[n] for n in names}
                kept.update(select(sub, subc, self.cfg.target, self.cfg.floor,
                                   self._fixed(costs))[1])
            self.freeze(step, kept)
            return dict(stage="freeze", lam=0.0, kept_fraction=self.kept_fraction)
        for k, groups, names in parts:
            lam, _ = select({n: scores[n] for n in names}, {n: costs[n] for n in names}, keep,
                            0.0, self._fixed(costs))
            self.lams[k] = lam
            for g in groups:
                g["lam"] = lam
        return dict(stage="identify", lam=max(self.lams.values()), keep_scheduled=keep,
                    kept_fraction=self.kept_fraction)

    def _partitions(self, scores) -> list[tuple[str, list[dict], list[str]]]:
        """(key, param groups, tensor names) ranked together: every targeted param group (a unit
        kind: FFN neurons, heads) on its own for a units target, all together for params."""
        groups = self.groups
        if self.cfg.of == "params":
            return [("all", groups, list(scores))]
        return [(str(i), [g], [n for n in g["param_names"] if n in scores])
                for i, g in enumerate(groups)]

    def _fraction(self, kept: dict, costs: dict) -> float:
        fixed = self._fixed(costs)
        kc = sum(float(costs[n][kept[n]].sum()) for n in kept)
        return (fixed + kc) / (fixed + sum(float(c.sum()) for c in costs.values()))

    def freeze(self, step: int, kept: dict[str, torch.Tensor]) -> None:
        """Freeze ``kept``, restart from the masked W, λ = 0 and a recovery stage from ``step``."""
        freeze_support(self.opt, kept, restart=True)
        self.frozen_at, self.lams = step, {}
        self._enter_recovery()
        self.kept_fraction = self._fraction(kept, self._costs(kept))
        self._structured_is_w()

    def _enter_recovery(self) -> None:
        """Every group enters one new stage at the freeze step (freeze_support restarted every
        tensor): a milestone there, lr and ε scaled by ``recover_lr_scale``, c constant."""
        targeted = {id(g) for g in self.groups}
        R, m0 = self.cfg.recover_restart_every, self.frozen_at
        again = tuple(range(m0 + R, self.cfg.steps, R)) if R and self.cfg.steps else ()
        for g in self.opt.param_groups:
            if id(g) in targeted:
                g["lam"] = 0.0
            g["milestones"] = tuple(m for m in g["milestones"] if m < m0) + \
                ((m0,) if m0 > 0 else ()) + again
            g["gamma"] = self.cfg.recover_lr_scale  # at the freeze and at every later restart
            if self.cfg.recover_with == "adamw" and "grad_sum" in self.opt.state_keys():
                g["adamw"] = dict(betas=(0.9, 0.999), eps=1e-8)
            g["final_stage_ramp"] = False  # c stays c0: W, the average, is the model

    @torch.no_grad()
    def _structured_is_w(self) -> None:
        """Ŵ := W, for every tensor, after a recovery step: W is exactly zero on the removed
        units and is the model the run ships (W is the average; Ŵ = W0 − V/P there is MADGRAD's
        dual point z, which is not)."""
        view = self.opt.view
        for p, st in self.opt.state.items():
            if "structured" in st:
                view.local(st["structured"]).view(-1).copy_(
                    view.local(p.detach()).reshape(-1).to(st["structured"].dtype))

    # ------------------------------------------------------------------ costs
    def _costs(self, like: dict) -> dict[str, torch.Tensor]:
        if self.cfg.of == "units":
            return {n: torch.ones(v.numel(), dtype=torch.float64) for n, v in like.items()}
        sizes = self._group_sizes()
        return {n: torch.full((v.numel(),), float(unit_cost(n, sizes[n])), dtype=torch.float64)
                for n, v in like.items()}

    def _fixed(self, costs) -> float:
        if self.cfg.of == "units":
            return 0.0
        return self.cfg.total_params - sum(float(c.sum()) for c in costs.values())

    def _group_sizes(self) -> dict[str, int]:
        from ..layout import layout_of

        out = {}
        for g in self.groups:
            for name, shape in zip(g["param_names"], g["param_shapes"]):
                lay = layout_of(g, tuple(shape), name)
                if lay is not None:
                    out[name] = lay.group_size
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return dict(lams=self.lams, frozen_at=self.frozen_at, same_for=self.same_for,
                    last_kept=None if self.last_kept is None else _pack(self.last_kept),
                    kept_fraction=self.kept_fraction,
                    config=asdict(self.cfg))

    def load_state_dict(self, d: dict) -> None:
        self.lams, self.frozen_at = dict(d["lams"]), d["frozen_at"]
        self.same_for = d["same_for"]
        self.last_kept = None if d["last_kept"] is None else _unpack(d["last_kept"])
        self.kept_fraction = d["kept_fraction"]
        for k, groups, _ in self._partitions({n: None for g in self.groups
                                               for n in g["param_names"]}):
            for g in groups:
                g["lam"] = self.lams.get(k, 0.0)
        if self.frozen_at is not None:
            self._enter_recovery()


def _pack(mask: torch.Tensor) -> list:
    """A bool vector as JSON: [length, base64 of its packed bits]."""
    import base64

    import numpy as np

    return [mask.numel(), base64.b64encode(np.packbits(mask.numpy()).tobytes()).decode()]


def _unpack(packed: list) -> torch.Tensor:
    import base64

    import numpy as np

    n, text = packed
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


def resolve_ramp(cfg: TargetConfig, steps: int) -> TargetConfig:
    """The automatic lengths: ``ramp = 0`` → 30% of ``steps``, ``stable = 0`` → 3% (≥ 1)."""
    cfg.steps = steps
    if cfg.ramp == 0:
        cfg.ramp = max(1, math.ceil(0.3 * steps))
    if cfg.stable == 0:
        cfg.stable = max(1, round(0.03 * steps))
    return cfg
