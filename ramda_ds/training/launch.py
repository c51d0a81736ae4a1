"""What the launch scripts share: arguments, checks, the optimizer, the accelerator, wrapping
(FSDP2 / DeepSpeed / DDP + the ramda_ds view), the loop's configuration and a clean exit.

``launch/train_lm.py`` and ``launch/finetune_llm.py`` are thin entry points on top of this.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..optim.config import OPTIMIZERS  # noqa: F401 (the names --optimizer takes)


def parse_milestones(text: str) -> tuple[int, ...]:
    """``"100,200"`` → ``(100, 200)``."""
    return tuple(int(m) for m in text.split(",") if m.strip())


BACKEND_HELP = ("RAMDA's (and ProxGen's PG) step kernels: torch (the reference; sharded == unsharded bit for bit) | "
                "auto (native C loops on CPU, Triton on CUDA, where they apply; torch elsewhere) "
                "| native | triton (see README: Fast step)")


def make_optimizer(a, model, groups_of, keep_structured: bool = False):
    """The optimizer named by ``a.optimizer`` (:func:`ramda_ds.optim.make_optimizer` on an
    :class:`~ramda_ds.optim.OptimizerConfig` made from the arguments); ``groups_of(model)`` builds
    its param groups.

    ``a`` carries lr, momentum, milestones and (optionally) solver and backend (RAMDA's kernels). ``keep_structured`` keeps
    RAMDA's Ŵ in the state (for Ŵ metrics and export).
    """
    from ..optim.config import OptimizerConfig
    from ..optim.config import make_optimizer as build

    cfg = OptimizerConfig(name=a.optimizer, lr=a.lr, momentum=a.momentum,
                          milestones=parse_milestones(a.milestones),
                          solver=getattr(a, "solver", "pg"), backend=getattr(a, "backend", "torch"),
                          keep_structured=keep_structured)
    return build(cfg, model.parameters() if cfg.name == "adamw" else groups_of(model))


def read_args(cls, argv=None):
    """A ``cls`` dataclass from the command line, or from one YAML file given as the only argument."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls)
    for action in parser._actions:  # argparse shows "(default: ...)" only for options with help
        if action.help is None:
            action.help = "default: %(default)r"
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        try:
            (args,) = parser.parse_yaml_file(argv[0])
        except ValueError as e:  # "Some keys are not used by the HfArgumentParser: [...]"
            raise SystemExit(f"{argv[0]}: {e}; see --help for the options") from None
        return args
    (args,) = parse_cli(parser, argv)
    return args


#: TrainingArguments' names of the launch scripts' options (suggested for a mistyped flag)
HF_SPELLINGS = {"--learning_rate": "--lr", "--max_steps": "--steps", "--num_train_epochs": "--steps",
                "--per_device_train_batch_size": "--batch_size",
                "--gradient_accumulation_steps": "--grad_accum", "--max_grad_norm": "--grad_clip",
                "--save_steps": "--save_every", "--eval_steps": "--eval_every",
                "--save_total_limit": "--keep_last", "--resume_from_checkpoint": "--resume",
                "--model_name_or_path": "--model_path", "--weight_decay": "--lam"}


def parse_cli(parser, argv=None) -> tuple:
    """``parser.parse_args_into_dataclasses(argv)`` (an ``HfArgumentParser``), except that an
    unknown flag is one line naming it and the closest known flags (HfArgumentParser raises a
    ValueError with a traceback), exit 2 as argparse's own errors."""
    import difflib

    def error(message):  # argparse's errors without its usage block (hundreds of lines for
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr)  # Trainer flags)
        raise SystemExit(2)

    parser.error = error
    argv = sys.argv[1:] if argv is None else argv
    *out, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        unknown = [r for r in rest if r.startswith("-")] or rest
        first = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(first, known, n=3, cutoff=0.6)
        alias = difflib.get_close_matches(first, list(HF_SPELLINGS), n=1, cutoff=0.8)
        if alias and HF_SPELLINGS[alias[0]] in known:  # e.g. --learning_rate: this script's --lr
            close = [HF_SPELLINGS[alias[0]]]
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see --help for the options"
        what = "unknown option" if first.startswith("-") else "unexpected argument"
        print(f"{parser.prog}: error: {what} {first}" + (f" (and {unknown[1:]})" if
              len(unknown) > 1 else "") + hint, file=sys.stderr)
        raise SystemExit(2)
    return tuple(out)


def validate_common(a, files) -> None:
    """The checks both scripts share; fail before any process group starts, naming the problem."""
    import math

    if a.optimizer not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {a.optimizer!r}; choose one of {OPTIMIZERS}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise SystemExit(f"lr must be a finite number > 0, got {a.lr}")
    if not (math.isfinite(a.lam) and a.lam >= 0):
        raise SystemExit(f"lam must be >= 0, got {a.lam}")
    if a.optimizer in ("ramda", "rmda", "proxsgd"):
        if not 0 < a.momentum <= 1:
            raise SystemExit(f"momentum (the paper's c, weight of the new point) must be in (0, 1], "
                             f"got {a.momentum}")
        from ..optim.base import averaging_weight

        try:
            averaging_weight(None, a.momentum)  # refuses torch-convention values such as 0.9
        except ValueError as e:
            raise SystemExit(str(e)) from None
    factor = getattr(a, "diverge_factor", 2.0)
    if not (math.isfinite(factor) and (factor == 0 or factor > 1)):
        raise SystemExit(f"diverge_factor must be > 1 (or 0: off), got {factor}")
    if not (math.isfinite(a.grad_clip) and a.grad_clip >= 0):
        raise SystemExit(f"grad_clip must be >= 0 (0: no clipping), got {a.grad_clip}")
    if getattr(a, "solver", "pg") not in ("pg", "exact"):
        raise SystemExit(f"solver must be pg or exact, got {a.solver!r}")
    from ..kernels import BACKENDS, check_backend

    try:
        check_backend(getattr(a, "backend", "torch"), "backend")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if getattr(a, "backend", "torch") != "torch" and a.optimizer not in ("ramda", "proxgen"):
        raise SystemExit(f"backend {a.backend!r} applies to RAMDA's and ProxGen's step only; "
                         f"{a.optimizer} runs on torch (one of {BACKENDS} with --optimizer ramda "
                         f"or proxgen)")
    for f in files:
        if f and not f.startswith("hf:") and not Path(f).exists():
            raise SystemExit(f"file not found: {f}")
    for name in ("train_file", "valid_file"):
        f = getattr(a, name, "")
        if f and not f.startswith("hf:") and not _has_text(Path(f)):
            raise SystemExit(f"{name} {f} is empty (no text to train or evaluate on)")
    if a.steps < 1 or a.batch_size < 1 or a.grad_accum < 1 or a.eval_every < 1 or a.keep_last < 1:
        raise SystemExit("steps, batch_size, grad_accum, eval_every and keep_last must be >= 1")
    if getattr(a, "seq_len", 1) < 1:
        raise SystemExit(f"seq_len must be >= 1, got {a.seq_len}")
    if a.save_every < 0:
        raise SystemExit(f"save_every must be >= 0 (0: save only at the end and on SIGTERM), got "
                         f"{a.save_every}")
    try:
        ms = parse_milestones(str(a.milestones))
    except ValueError:
        raise SystemExit(f"milestones must be comma-separated step numbers such as 400,800, got "
                         f"{a.milestones!r}") from None
    if any(m < 1 for m in ms) or list(ms) != sorted(set(ms)):
        raise SystemExit(f"milestones must be strictly increasing steps >= 1, got {a.milestones!r}")
    late = [m for m in ms if m >= a.steps]
    if late:
        print(f"note: milestones {late} are not before --steps {a.steps}: no restart happens at "
              "them in this run (they do when it is resumed with more steps)", file=sys.stderr)
    if a.precision not in ("auto", "bf16", "no"):
        raise SystemExit(f"precision must be auto, bf16 or no, got {a.precision!r}")
    if a.resume and a.optimizer == "adamw":
        raise SystemExit("resuming needs a ramda_ds optimizer; the AdamW baseline keeps no checkpoints")
    if Path(a.output_dir).exists() and not Path(a.output_dir).is_dir():
        raise SystemExit(f"output_dir {a.output_dir} exists and is not a directory")
    check_resume_target(a)
    check_validation_set(a)
    check_deepspeed_config(a.optimizer)


def check_deepspeed_config(optimizer: str, path: str | None = None) -> None:
    """A DeepSpeed config file (``accelerate launch --deepspeed_config_file``, or
    ``deepspeed_config_file`` in an accelerate config) with an ``"optimizer"`` or ``"scheduler"``
    section would replace the ramda_ds optimizer or its restart schedule (accelerate then asks for
    ``DummyOptim``, which drops RAMDA): refused before anything is loaded."""
    import json

    path = path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path in ("", "none") or os.environ.get("ACCELERATE_USE_DEEPSPEED", "true") != "true":
        return
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read the DeepSpeed config {path}: {e}") from None
    for key, what in (("optimizer", "the optimizer"), ("scheduler", "the learning-rate schedule")):
        if isinstance(cfg, dict) and key in cfg:
            name = (cfg[key] or {}).get("type") if isinstance(cfg[key], dict) else None
            raise SystemExit(f"the DeepSpeed config {path} has a section \"{key}\" ({name!r}): "
                             f"ramda_ds supplies {what} ({optimizer}); remove the section (the "
                             "scripts set micro batch, clipping and zero_allow_untested_optimizer "
                             "themselves)")


def _has_text(path: Path) -> bool:
    """Whether ``path`` holds anything but whitespace (read until the first such byte)."""
    if path.suffix in (".json", ".jsonl", ".parquet"):
        return path.stat().st_size > 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if chunk.strip():
                return True
    return False


def make_task(acc, a, train_ids, valid_ids, seq_len: int, forward, **task_kw):
    """The LM task, once the token streams are known to fill the global batch (each of its rows
    needs >= 2 tokens: an input and its next token); ``task_kw`` go to :class:`StreamTask`."""
    from .tasks import StreamTask

    rows = a.batch_size * acc.num_processes
    for what, ids in (("training", train_ids), ("validation", valid_ids)):
        if ids.numel() < 2 * rows:
            raise SystemExit(f"the {what} text gives {ids.numel()} tokens, too few for a global "
                             f"batch of {rows} rows (at least {2 * rows}): give more text or a "
                             "smaller --batch_size")
    return StreamTask(acc, train_ids, valid_ids, a.batch_size, seq_len, forward, **task_kw)


def check_resume_target(a) -> None:
    """``--resume`` checked on the file system before any model or data is loaded and before
    anything is written: DIR must be a checkpoint (``manifest.json``) or hold ``latest`` (itself
    or under ``checkpoints/``); a fresh run must not start over an earlier run's checkpoints."""
    root = Path(a.output_dir) / "checkpoints"
    if not a.resume:
        if (root / "latest").exists():
            raise SystemExit(f"{root} holds checkpoints of an earlier run: pass --resume auto to "
                             "continue it, or choose another --output_dir")
        return
    if a.resume == "auto":
        return  # the loop says whether it resumed or started fresh
    p = Path(a.resume)
    if not p.exists():
        raise SystemExit(f"checkpoint not found: {a.resume}")
    for d in (p, p / "checkpoints"):
        if (d / "latest").exists():
            target = d / (d / "latest").read_text().strip()
            if not (target / "manifest.json").exists():
                raise SystemExit(f"cannot resume from {a.resume}: {d / 'latest'} names {target}, "
                                 "which is not a complete checkpoint (no manifest.json)")
            return
    if not (p / "manifest.json").exists():
        raise SystemExit(f"cannot resume from {a.resume}: not a complete checkpoint (no "
                         "manifest.json: the save was interrupted, or this is not a checkpoint "
                         "directory) and no checkpoints/latest under it")


def _same_source(x: str, y: str) -> bool:
    """Whether two data sources are the same text (same path, same file, or equal bytes)."""
    import filecmp

    if x == y:
        return True
    if x.startswith("hf:") or y.startswith("hf:") or not (Path(x).exists() and Path(y).exists()):
        return False
    return os.path.samefile(x, y) or filecmp.cmp(x, y, shallow=False)


def check_validation_set(a) -> None:
    """Validation perplexity on the training text is training perplexity: refused unless
    ``--valid_equals_train`` (then warned about). With neither file given, the bundled corpus has
    its own held-out part."""
    if not a.train_file:
        return
    same = not a.valid_file or _same_source(a.train_file, a.valid_file)
    if same and not getattr(a, "valid_equals_train", False):
        what = "no --valid_file was given" if not a.valid_file else \
            f"--valid_file {a.valid_file} is the same text as --train_file"
        raise SystemExit(f"{what}: the validation perplexity would be training perplexity. Pass a "
                         "held-out --valid_file, or --valid_equals_train to accept that")


def resolve_precision(p: str) -> str:
    """``auto``: bf16 where the GPU supports it, fp32 otherwise (CPU)."""
    if p == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return p


def make_accelerator(grad_accum: int, precision: str):
    """Accelerator on gloo for multi-process CPU runs, without DeepSpeed's CPU shm build."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # DeepSpeed JIT-builds a shared-memory comm op on CPU (~30 s, /dev/shm leftovers); gloo
        # needs none of it and the results are identical.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else []
    return Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=precision,
                       kwargs_handlers=kwargs)


def shard_fsdp2(model, blocks, precision: str) -> None:
    """FSDP2 applied here, per block then the root (accelerate skips its FSDP plugin on CPU).
    Replaces the parameters by DTensors: build the optimizer afterwards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def use_fsdp2(flag: bool) -> bool:
    """--fsdp2, or an accelerate FSDP config (configs/accelerate/fsdp2.yaml)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def prepare(acc, model, opt, a, fsdp2: bool):
    """accelerate.prepare (DDP / DeepSpeed); an FSDP2-sharded model is used as it is."""
    if fsdp2:
        return model, opt
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # no dataloader to infer from; clipping is DeepSpeed's (default would be 1.0)
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=a.batch_size,
                                   gradient_clipping=a.grad_clip, zero_allow_untested_optimizer=True)
    return acc.prepare(model, opt)


def run_to_end(acc, fn):
    """``fn()``, then every rank meets before the process group goes (gloo aborts a process whose
    peer left first). Also after a SIGTERM checkpoint (all ranks stop together); not after an
    error, where waiting for peers would hide the failure from the launcher."""
    from .loop import STOPPED_EXITS

    try:
        out = fn()
    except SystemExit as e:
        if e.code in STOPPED_EXITS:
            _finish(acc)
        raise
    _finish(acc)
    return out


def _finish(acc) -> None:
    """Every rank meets, then the trackers close; the process group is left to the process's end
    (:func:`main_entry`), not destroyed here."""
    from .world import world_barrier

    world_barrier()
    for tracker in acc.trackers:
        tracker.finish()


def main_entry(main) -> None:
    """A launch script's ``__main__``: run ``main()``, then end the process with
    :func:`~ramda_ds.training.world.exit_process` (0, or the SIGTERM / Ctrl-C checkpoint's exit
    code) once every rank is done; a Ctrl-C outside the training loop (while loading, or a second
    one) is one line and exit 130; errors propagate as usual (a traceback and exit code 1)."""
    from .loop import INTERRUPTED_EXIT, STOPPED_EXITS
    from .world import exit_process

    try:
        main()
    except SystemExit as e:
        if e.code in STOPPED_EXITS:
            exit_process(e.code)
        raise
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted (Ctrl-C) outside a step boundary: no checkpoint was written for "
                  "this point (earlier checkpoints, if any, are kept; --resume auto continues the "
                  "latest)", file=sys.stderr, flush=True)
        exit_process(INTERRUPTED_EXIT)
    exit_process(0)


def start(a):
    """Accelerator, resolved precision and output directory of a run (seeded)."""
    precision = resolve_precision(a.precision)
    acc = make_accelerator(a.grad_accum, precision)
    torch.manual_seed(a.seed)
    out = Path(a.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    return acc, precision, out


def corpus(acc, a, out: Path) -> tuple[str, str]:
    """(train, valid) sources: the given ones, or Python's bundled docs written to out/data."""
    from . import data

    if a.train_file:
        if getattr(a, "valid_equals_train", False) and acc.is_main_process:
            print("warning: --valid_equals_train: valid_ppl is measured on the training text "
                  "(training perplexity, not generalization)", file=sys.stderr)
        return a.train_file, a.valid_file or a.train_file
    with acc.local_main_process_first():
        return tuple(data.default_corpus(out / "data"))


def wrap(acc, a, model, blocks, precision, groups_of, keep_structured: bool = False):
    """FSDP2 (before the optimizer) or accelerate.prepare, then the ramda_ds view; returns
    (model, optimizer, setup row). ``groups_of(model)`` builds the param groups (after FSDP2 has
    replaced the parameters)."""
    from ..sharding import attach

    n_params = sum(p.numel() for p in model.parameters())
    fsdp2 = use_fsdp2(a.fsdp2)
    if fsdp2:
        shard_fsdp2(model, blocks, precision)
    opt = make_optimizer(a, model, groups_of, keep_structured)
    model, opt = prepare(acc, model, opt, a, fsdp2)
    view = attach(opt, model) if a.optimizer != "adamw" else None
    setup = dict(world_size=acc.num_processes, backend=backend_name(acc, fsdp2),
                 view=type(view).__name__, distributed_type=acc.distributed_type.name,
                 precision=precision, optimizer=a.optimizer, lam=a.lam,
                 milestones=list(parse_milestones(a.milestones)), params=n_params,
                 dtensor_params=sum(type(p).__name__ == "DTensor" for p in model.parameters()),
                 valid_equals_train=bool(getattr(a, "valid_equals_train", False)),
                 step_kernels=step_kernels(opt))
    return model, opt, setup


def step_kernels(opt) -> str:
    """What RAMDA's step runs on in this run (its ``backend`` resolved per tensor), for the log."""
    from ..optim import RAMDA, ProxGen
    from ..optim.base import find_structured
    from ..optim.fast import kernel_plan

    inner = find_structured(opt)
    return kernel_plan(inner) if isinstance(inner, (RAMDA, ProxGen)) else "torch"


def backend_name(acc, fsdp2: bool) -> str:
    """What really runs: fsdp2 (applied by the script, which accelerate reports as "NO" on CPU),
    deepspeed-zeroN, ddp or single."""
    if fsdp2:
        return "fsdp2"
    ds = acc.state.deepspeed_plugin
    if ds is not None:
        return f"deepspeed-zero{ds.zero_stage}"
    return "ddp" if acc.num_processes > 1 else "single"


def loop_config(a, **extra):
    from .loop import LoopConfig

    return LoopConfig(steps=a.steps, output_dir=a.output_dir, grad_accum=a.grad_accum,
                      grad_clip=a.grad_clip, eval_every=a.eval_every, save_every=a.save_every,
                      keep_last=a.keep_last, resume=a.resume,
                      allow_hparam_change=a.allow_hparam_change,
                      diverge_factor=getattr(a, "diverge_factor", 2.0), **extra)
