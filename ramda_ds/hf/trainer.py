"""RAMDA (ProxGen, RMDA, ProxSGD) inside ``transformers.Trainer`` and TRL's trainers.

``RamdaTrainer(model, args, ..., ramda=RamdaConfig(lam=1e-4))`` is a ``Trainer`` whose optimizer
is the ramda_ds one. What it changes, and why:

* ``create_optimizer`` builds the optimizer from the prunable units (:mod:`ramda_ds.hf.units`):
  it is the one route every backend takes (DeepSpeed's ``deepspeed_init`` clears
  ``trainer.optimizer`` and calls it again; FSDP2 through accelerate builds it before sharding and
  accelerate swaps its parameters for the DTensors; under ZeRO-3 ``zero3_init_flag`` the groups
  read ``ds_shape``). Passing ``optimizers=(opt, ...)`` is refused: it would be replaced.
* After the model is wrapped (DeepSpeed engine, FSDP2 module, DDP) the sharded view is attached
  (:func:`ramda_ds.sharding.attach`) before the first step and before a checkpoint is loaded.
* Checkpoints: ``checkpoint-N/ramda_ds_optim/`` holds the optimizer state and fp32 master weights in
  the world-size independent ramda_ds format (:mod:`ramda_ds.checkpoint`, safetensors, no pickle)
  instead of DeepSpeed's ``global_step*`` / FSDP's / ``optimizer.pt``; ``resume_from_checkpoint``
  reads it under any backend and world size. ``checkpoint-N/ramda_ds_trainer.json`` names the
  optimizer, step, world size and base model (for export). RNG, data position and the LR scheduler are the
  Trainer's own files.
* ``log`` adds, to each training log row, the weighted group sparsity of the weights the model
  holds (``wgs``; RAMDA also ``wgs_structured``, of Ŵ), the units kept per tensor and the solver
  iterations, so every reporter the user configured (console, TensorBoard, W&B) shows them.
* Refused before training, with what to change: a DeepSpeed config with an ``"optimizer"``
  section, ZeRO-Offload, FSDP1, ``weight_decay > 0`` (the regularizer is ``lam``).

Written against transformers 5.24, tested on 5.25 (pyproject.toml admits >=5.24,<5.26): it overrides the private ``_prepare_for_training``,
``_save_optimizer_and_scheduler`` and ``_load_optimizer_and_scheduler``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer
from transformers.utils import logging

from ..checkpoint import load_optimizer_state, save_optimizer_state
from ..metrics import tensor_sparsity, wgs_of
from ..sharding import attach
from .units import blocks_of, unit_param_groups

OPTIM_DIR = "ramda_ds_optim"  # checkpoint-N/ramda_ds_optim/rank{r}.safetensors + COMPLETE
OPTIMIZERS = ("ramda", "proxgen", "rmda", "proxsgd")
logger = logging.get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class RamdaConfig:
    """The structured-sparsity part of a run; lr, batch, steps, clipping are ``TrainingArguments``'.

    ``lam``: λ of the group lasso on the units; ``units``: ``"ffn"``, ``"heads"`` or both;
    ``groups``: ``{pattern: rule}`` (or ``"PATTERN=RULE;..."``) replacing the units; ``momentum``:
    the paper's c; ``milestones``: optimizer steps after which a restart stage begins.
    """

    optimizer: str = "ramda"
    lam: float = 1e-5
    units: str = "ffn,heads"
    groups: dict | str = field(default_factory=dict)
    momentum: float = 0.1
    milestones: tuple[int, ...] = ()
    solver: str = "pg"
    backend: str = "torch"  # RAMDA's step kernels: torch | auto | native | triton (see README)
    log_units: bool = True  # per-tensor units kept in every training log row
    # a size target (docs/compression.md): fraction of the units (or parameters) kept, met in one
    # run; λ is then set per step (``lam`` is ignored) and the kept units recover with λ = 0
    target: float = 0.0
    target_of: str = "units"
    target_ramp: int = 0  # 0: 30% of max_steps
    target_stable: int = 0  # 0: 3% of max_steps
    target_max_identify: int = 0
    target_floor: float = 0.0
    recover_lr_scale: float = 1.0
    recover_restart_every: int = 0
    recover_with: str = "adamw"  # the recovery's update: adamw | ramda (λ = 0)
    distill: float = 0.0  # β of β·T²·KL(teacher‖student) + (1−β)·loss; the teacher: the start model
    distill_temperature: float = 1.0


class RamdaMixin:
    """Mix into ``Trainer`` or a subclass of it (e.g. ``trl.SFTTrainer``) before it in the bases."""

    def __init__(self, *args, ramda: RamdaConfig | None = None, **kwargs):
        opts = kwargs.get("optimizers")
        if opts and opts[0] is not None:
            raise ValueError("RamdaTrainer builds its optimizer itself (DeepSpeed would silently "
                             "replace a passed one, FSDP refuses it): drop optimizers=(opt, ...) "
                             "and set ramda=RamdaConfig(...)")
        self.ramda = ramda or RamdaConfig()
        if self.ramda.optimizer not in OPTIMIZERS:
            raise ValueError(f"ramda.optimizer must be one of {OPTIMIZERS}, got "
                             f"{self.ramda.optimizer!r}")
        self.ramda_view, self._partitioned_at_load = None, 0
        self.ramda_hooks, self.ramda_teacher = None, None
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None:
            refuse_unsupported(targs)  # before the Trainer creates anything
        check_compression(self.ramda)
        super().__init__(*args, **kwargs)
        refuse_fsdp1(self)
        if self.ramda.distill:
            self.ramda_teacher = self._make_teacher()
        if self.ramda.target:
            self.add_callback(_RecipeCallback(self))

    def _make_teacher(self):
        """The starting model, frozen, sharded by FSDP2 where the student is sharded."""
        from transformers import AutoModelForCausalLM

        from ..compress.distill import make_teacher

        plugin = getattr(self.args, "deepspeed_plugin", None)
        kind = ("fsdp2" if has_dtensors(self.model) or self.is_fsdp_enabled else
                f"deepspeed-zero{plugin.zero_stage}" if plugin is not None else "ddp")
        path = getattr(self.model.config, "_name_or_path", "")
        teacher, held = make_teacher(
            self.model, self.accelerator, "no", kind, blocks_of=blocks_of,
            load=lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        self.ramda_teacher_params = held
        return teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.ramda_teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from ..compress.distill import causal_lm_distill_loss

        outputs = model(**inputs)
        with torch.no_grad():
            t = self.ramda_teacher(input_ids=inputs["input_ids"],
                                   attention_mask=inputs.get("attention_mask")).logits
        loss = causal_lm_distill_loss(outputs, t, inputs["labels"], self.ramda.distill,
                                      self.ramda.distill_temperature)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ optimizer and view
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            from ..optim.config import OptimizerConfig, make_optimizer

            model = self.model if model is None else model
            r = self.ramda
            cfg = OptimizerConfig(name=r.optimizer, lr=self.args.learning_rate,
                                  momentum=r.momentum, milestones=tuple(r.milestones),
                                  solver=r.solver, backend=r.backend,
                                  keep_structured=r.optimizer == "ramda")
            self._partitioned_at_load = sum(hasattr(p, "ds_shape") for p in model.parameters())
            self.optimizer = make_optimizer(cfg, target_groups(unit_param_groups(
                model, 1.0 if r.target else r.lam, r.units, r.groups), r.target))
            self.ramda_view = None
        return self.optimizer

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # the Trainer's own resume would look for DeepSpeed/FSDP checkpoints: load ours after
        # the view is attached instead
        model, dl = super()._prepare_for_training(max_steps, train_dataloader, None)
        self.ramda_view = attach(self.optimizer, model)
        if self.ramda.target:
            self.ramda_hooks = self._compression_hooks(max_steps)
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        self._write_setup(model)
        return model, dl

    def _write_setup(self, model) -> None:
        """``output_dir/ramda_ds_setup.json``: what actually ran (view, sharding, world size, the
        kernels of RAMDA's step)."""
        import json

        from ..training.launch import step_kernels

        setup = dict(view=type(self.ramda_view).__name__, world_size=self.args.world_size,
                     distributed_type=self.accelerator.distributed_type.name,
                     optimizer=type(self.ramda_optimizer).__name__, config=asdict(self.ramda),
                     dtensor_params=sum(type(p).__name__ == "DTensor" for p in model.parameters()),
                     partitioned_at_load=self._partitioned_at_load,
                     step_kernels=step_kernels(self.ramda_optimizer))
        logger.info("ramda_ds setup: %s", setup)
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            Path(self.args.output_dir, "ramda_ds_setup.json").write_text(json.dumps(setup, indent=1))

    def _compression_hooks(self, max_steps: int):
        from ..compress.recipe import TargetConfig, resolve_ramp
        from ..compress.run import CompressionHooks

        r = self.ramda
        model = self.accelerator.unwrap_model(self.model)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        cfg = resolve_ramp(TargetConfig(
            target=r.target, of=r.target_of, ramp=r.target_ramp, stable=r.target_stable,
            max_identify=r.target_max_identify, floor=r.target_floor,
            recover_lr_scale=r.recover_lr_scale, recover_restart_every=r.recover_restart_every,
            recover_with=r.recover_with, total_params=total), max_steps)
        cfg.check(max_steps)
        return CompressionHooks(self.ramda_optimizer, "ramda", cfg)

    @property
    def ramda_optimizer(self):
        """The ramda_ds optimizer inside accelerate's / DeepSpeed's wrappers."""
        from ..training.loop import unwrap

        return unwrap(self.optimizer)

    # ------------------------------------------------------------------ logging
    def log(self, logs, *args, **kwargs):
        # training rows only: every rank logs them at the same step (the counts are collective)
        if "loss" in logs and self.ramda_view is not None:
            logs = {**logs, **structure_logs(self.ramda_optimizer, self.ramda.log_units)}
        return super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir):
        save_optimizer_state(self.ramda_optimizer, Path(output_dir) / OPTIM_DIR)  # all ranks
        if not self.args.should_save:
            return
        if self.lr_scheduler is not None:
            from transformers.trainer import SCHEDULER_NAME

            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        self._write_checkpoint_meta(Path(output_dir))

    def _write_checkpoint_meta(self, out: Path) -> None:
        """``checkpoint-N/ramda_ds_trainer.json``: what a reader (export) needs besides the state."""
        import json

        base = getattr(getattr(self.accelerator.unwrap_model(self.model), "config", None),
                       "_name_or_path", "") or ""
        if base and Path(base).exists():
            base = str(Path(base).resolve())
        meta = dict(format="ramda_ds.trainer/1", step=self.state.global_step,
                    world_size=self.args.world_size, state_dir=OPTIM_DIR,
                    optimizer=type(self.ramda_optimizer).__name__, base_model=base,
                    ramda=asdict(self.ramda))
        if self.ramda_hooks is not None:
            meta["compress"] = self.ramda_hooks.state_dict()
        (out / "ramda_ds_trainer.json").write_text(json.dumps(meta, indent=1))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        path = Path(checkpoint) / OPTIM_DIR
        if not path.is_dir():
            raise ValueError(f"{checkpoint} has no {OPTIM_DIR}/: it was not written by a "
                             "RamdaTrainer, so the RAMDA state to continue from is missing")
        meta_file = Path(checkpoint) / "ramda_ds_trainer.json"
        if meta_file.exists():
            import json

            saved = json.loads(meta_file.read_text()).get("ramda", {})
            mine = json.loads(json.dumps(asdict(self.ramda)))
            diff = {k: (saved.get(k), mine[k]) for k in ("optimizer", "units", "groups")
                    if saved.get(k) != mine[k]}
            if diff:
                what = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
                raise ValueError(f"{checkpoint} was trained with other units or another "
                                 f"optimizer ({what}): resume with the RamdaConfig it was "
                                 "written with")
        load_optimizer_state(self.ramda_optimizer, path)  # also the fp32 master weights
        if self.ramda_hooks is not None and meta_file.exists():
            import json

            saved = json.loads(meta_file.read_text()).get("compress")
            if saved is None:
                raise ValueError(f"{checkpoint} was written without a size target: resume it "
                                 "with the RamdaConfig it was written with")
            self.ramda_hooks.on_start(saved, self.state.global_step, logger.info)
        sched = Path(checkpoint) / "scheduler.pt"
        if self.lr_scheduler is not None and sched.exists():
            self.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))
            restore_scheduled_lr(self.lr_scheduler)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # a model sharded with fully_shard outside accelerate (CPU): its weights come with the
        # optimizer state; the Trainer's loader expects whole tensors
        if has_dtensors(model or self.model):
            return
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir=None, _internal_call=False):
        m = self.model
        if has_dtensors(m) and not self.is_fsdp_enabled:  # fully_shard applied by the script
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_model_state_dict)

            sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=sd)
            return
        return super().save_model(output_dir, _internal_call)


class _RecipeCallback:
    """After every optimizer step: the size target's λ for the next step, or the freeze."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_optimizer_step(self, args, state, control, **kwargs):
        hooks = self.trainer.ramda_hooks
        if hooks is not None:  # the Trainer counts the step after this event
            row = hooks.after_step(state.global_step + 1)
            if row.get("stage") == "freeze":
                logger.warning("step %d: support frozen at %.4f kept; the kept units now recover "
                               "without shrinkage (λ = 0)", state.global_step + 1,
                               row["kept_fraction"])


def target_groups(groups: list[dict], target: float) -> list[dict]:
    """With a size target the unit groups keep group lasso with λ set per step (0 to start)."""
    for g in groups if target else ():
        if g.get("regularizer") == "group_lasso":
            g.update(lam=0.0, target=True)
    return groups


def check_compression(r: RamdaConfig) -> None:
    if r.target:
        if r.optimizer != "ramda":
            raise ValueError("RamdaConfig(target=...) identifies units with RAMDA: optimizer "
                             f"must be 'ramda', got {r.optimizer!r}")
        if r.milestones:
            raise ValueError("RamdaConfig(target=...) schedules its own stages: leave milestones "
                             "empty")
        from ..compress.recipe import TargetConfig

        TargetConfig(target=r.target, of=r.target_of, floor=r.target_floor,
                     recover_lr_scale=r.recover_lr_scale, recover_with=r.recover_with,
                     total_params=1).check()
    if not 0 <= r.distill <= 1 or r.distill_temperature <= 0:
        raise ValueError(f"distill must be in [0, 1] and distill_temperature > 0, got "
                         f"{r.distill}, {r.distill_temperature}")


def restore_scheduled_lr(scheduler) -> None:
    """Write the lr a loaded scheduler holds for the next step into its optimizer's groups.

    A torch optimizer's ``load_state_dict`` brings back each group's ``lr`` (which is why a
    resumed AdamW is exact); the ramda_ds state does not carry it, and ``LRScheduler.
    load_state_dict`` only restores the scheduler's counters: without this the first step after a
    resume ran at the lr the fresh scheduler set at construction (the initial lr: 0.01 instead of
    the decayed 0.005 in the test), so resumed ≠ uninterrupted under any non-constant schedule."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler
    get_last = getattr(inner, "get_last_lr", None)
    opt = getattr(inner, "optimizer", None)
    if get_last is None or opt is None:
        return
    lrs = get_last()
    if len(lrs) != len(opt.param_groups):
        raise ValueError(f"the checkpoint's scheduler has {len(lrs)} learning rates for "
                         f"{len(opt.param_groups)} param groups: it belongs to another optimizer")
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr


class RamdaTrainer(RamdaMixin, Trainer):
    """``transformers.Trainer`` training with a ramda_ds optimizer; see the module docstring."""


def has_dtensors(model) -> bool:
    from torch.distributed.tensor import DTensor

    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


def refuse_unsupported(args) -> None:
    """Configurations that would replace the optimizer or not be exact: stop, saying what to change."""
    from accelerate.utils import DistributedType

    if args.weight_decay:
        raise ValueError(f"weight_decay={args.weight_decay} would be ignored: ramda_ds "
                         "optimizers regularize with RamdaConfig(lam=...); set weight_decay=0")
    state = args.distributed_state
    if args.world_size > 1 and state is not None and state.distributed_type == DistributedType.NO:
        raise ValueError(f"{args.world_size} processes, but accelerate sees no distributed setup "
                         "(an FSDP config on CPU?): nothing would be gathered across ranks and the "
                         "loss would be scaled wrong. On CPU set ACCELERATE_USE_CPU=true (or call "
                         "ramda_ds.hf.setup.cpu_friendly() first) and pass --ddp_backend gloo")
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        cfg = plugin.deepspeed_config
        if "optimizer" in cfg:
            raise ValueError(f"the DeepSpeed config names its own optimizer "
                             f"({cfg['optimizer'].get('type')!r}), which would replace RAMDA: "
                             "remove its \"optimizer\" section")
        zero = cfg.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            device = (zero.get(key) or {}).get("device", "none")
            if device not in (None, "none"):
                raise ValueError(f"ZeRO-Offload ({key}: {device}) is not supported with a "
                                 "ramda_ds optimizer: it would step on CPU partitions that the "
                                 "ramda_ds ZeRO views do not describe, so sharded == unsharded is "
                                 f"not assured. Set zero_optimization.{key}.device to \"none\" "
                                 "(fit the model with ZeRO-3 over more GPUs instead)")


def refuse_fsdp1(trainer) -> None:
    fsdp = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if fsdp is not None and getattr(fsdp, "fsdp_version", 1) != 2:
        raise ValueError("FSDP1 flattens the parameters, which hides the units from the "
                         "optimizer: use FSDP2 (fsdp_version: 2 in the accelerate config or "
                         "fsdp_config={'fsdp_version': 2})")


def structure_logs(opt, per_tensor: bool = True) -> dict:
    """Numbers for a Trainer log row (all ranks call: the counts are collective when sharded).

    ``wgs``: weighted group sparsity of the weights the model holds (W); ``wgs_structured``: of
    RAMDA's Ŵ (its last subproblem solution, the structure an export keeps); ``units_kept/NAME``:
    groups of W not all zero; ``solver_iters_mean/max``: the last step's subproblem iterations.
    """
    rows = tensor_sparsity(opt)
    out = {"wgs": wgs_of(rows)}
    if opt.defaults.get("keep_structured"):  # the same on every rank (the count is collective)
        out["wgs_structured"] = wgs_of(tensor_sparsity(opt, structured=True))
    if per_tensor:
        out.update({f"units_kept/{r.name}": r.groups - r.zero_groups for r in rows})
    stats = list(opt.last_stats.values())
    if stats:
        out["solver_iters_mean"] = sum(s.iterations for s in stats) / len(stats)
        out["solver_iters_max"] = max(s.iterations for s in stats)
    return out
