"""Language-model pretraining of Transformer-XL with RAMDA (or a baseline), structured-sparse.

    python launch/train_lm.py                                   # tiny model, Python's docs, CPU
    accelerate launch --config_file configs/accelerate/zero2.yaml launch/train_lm.py  # or ddp,
    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/train_lm.py  # zero3, ...
    torchrun --nproc-per-node 2 launch/train_lm.py --fsdp2      # FSDP2 applied by this script

Arguments are the fields of :class:`RunArgs` (``--help``), or a YAML file: ``train_lm.py run.yaml``.
Prints validation perplexity and weighted group sparsity; writes ``metrics.jsonl`` to output_dir.
Checkpoints go to output_dir/checkpoints every ``save_every`` steps, at the end and on SIGTERM;
``--resume auto`` continues the latest one, also on another number of processes (same global batch).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

OPTIMIZERS = ("ramda", "proxgen", "rmda", "proxsgd", "adamw")


@dataclass
class RunArgs:
    preset: str = field(default="tiny", metadata={"help": "Transformer-XL size: tiny | base"})
    dropout: float = field(default=-1.0, metadata={"help": "override the preset's dropout (>= 0)"})
    train_file: str = field(default="", metadata={"help": "text/json/parquet; default: Python docs"})
    valid_file: str = field(default="")
    tokenizer: str = field(default="", metadata={"help": "SentencePiece .model; default: train one"})
    vocab_size: int = 2000
    optimizer: str = field(default="ramda", metadata={"help": " | ".join(OPTIMIZERS)})
    lr: float = 2e-2
    lam: float = 1e-5
    momentum: float = 0.1
    grouping: str = field(default="input", metadata={"help": "group rule of regularized weights: "
                                                     "input (columns) | output (rows)"})
    solver: str = "pg"
    milestones: str = field(default="400", metadata={"help": "comma-separated restart steps"})
    steps: int = 600
    batch_size: int = 8
    grad_clip: float = 0.25
    grad_accum: int = 1
    eval_every: int = 100
    save_every: int = field(default=200, metadata={"help": "checkpoint period; 0: end/SIGTERM only"})
    keep_last: int = 2
    resume: str = field(default="", metadata={"help": "'auto' (latest checkpoint) or a directory"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on a bf16 GPU) | bf16 | no"})
    fsdp2: bool = False
    seed: int = 0
    output_dir: str = "runs/lm"


def read_args(cls, argv=None):
    """A ``cls`` dataclass from the command line, or from one YAML file given as the only argument."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    return args


def parse_args(argv=None) -> RunArgs:
    args = read_args(RunArgs, argv)
    validate(args)
    return args


def validate_common(a, files) -> None:
    """The checks both scripts share; fail before any process group starts, naming the problem."""
    if a.optimizer not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {a.optimizer!r}; choose one of {OPTIMIZERS}")
    if a.lam < 0:
        raise SystemExit(f"lam must be >= 0, got {a.lam}")
    for f in files:
        if f and not f.startswith("hf:") and not Path(f).exists():
            raise SystemExit(f"file not found: {f}")
    if a.steps < 1 or a.batch_size < 1 or a.grad_accum < 1 or a.eval_every < 1 or a.keep_last < 1:
        raise SystemExit("steps, batch_size, grad_accum, eval_every and keep_last must be >= 1")
    if a.precision not in ("auto", "bf16", "no"):
        raise SystemExit(f"precision must be auto, bf16 or no, got {a.precision!r}")
    if a.resume and a.resume != "auto" and not Path(a.resume).exists():
        raise SystemExit(f"checkpoint not found: {a.resume}")
    if a.resume and a.optimizer == "adamw":
        raise SystemExit("resuming needs a ramda_ds optimizer; the AdamW baseline keeps no checkpoints")


def validate(a: RunArgs) -> None:
    validate_common(a, (a.train_file, a.valid_file, a.tokenizer))
    if a.grouping not in ("input", "output"):
        raise SystemExit(f"grouping must be input or output, got {a.grouping!r}")


def make_optimizer(a: RunArgs, model):
    from ramda_ds.optim import RAMDA, RMDA, ProxGen, ProxSGD
    from ramda_ds.param_groups import build_param_groups

    if a.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=a.lr)
    ms = tuple(int(m) for m in a.milestones.split(",") if m)
    groups = build_param_groups(model, "group_lasso", lam=a.lam, exclude=["embed.*"],
                                grouping={"*": a.grouping})
    if a.optimizer == "ramda":
        return RAMDA(groups, lr=a.lr, momentum=a.momentum, solver=a.solver, milestones=ms)
    if a.optimizer == "rmda":
        return RMDA(groups, lr=a.lr, momentum=a.momentum, milestones=ms)
    if a.optimizer == "proxsgd":
        return ProxSGD(groups, lr=a.lr, momentum=a.momentum, milestones=ms)
    return ProxGen(groups, lr=a.lr, solver=a.solver, milestones=ms)


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
    from ramda_ds.training.loop import PREEMPTED_EXIT

    try:
        out = fn()
    except SystemExit as e:
        if e.code == PREEMPTED_EXIT:
            _finish(acc)
        raise
    _finish(acc)
    return out


def _finish(acc) -> None:
    from ramda_ds.comm import world_barrier

    world_barrier()
    acc.end_training()


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
    from ramda_ds import data

    if a.train_file:
        return a.train_file, a.valid_file or a.train_file
    with acc.local_main_process_first():
        return tuple(data.default_corpus(out / "data"))


def wrap(acc, a, model, blocks, precision, make_opt):
    """FSDP2 (before the optimizer) or accelerate.prepare, then the ramda_ds view; returns
    (model, optimizer, setup row)."""
    from ramda_ds.sharding import attach

    n_params = sum(p.numel() for p in model.parameters())
    fsdp2 = use_fsdp2(a.fsdp2)
    if fsdp2:
        shard_fsdp2(model, blocks, precision)
    opt = make_opt(a, model)
    model, opt = prepare(acc, model, opt, a, fsdp2)
    view = attach(opt, model) if a.optimizer != "adamw" else None
    setup = dict(world_size=acc.num_processes, view=type(view).__name__,
                 distributed_type=acc.distributed_type.name, precision=precision,
                 optimizer=a.optimizer, params=n_params,
                 dtensor_params=sum(type(p).__name__ == "DTensor" for p in model.parameters()))
    return model, opt, setup


def loop_config(a, **extra):
    from ramda_ds.training.loop import LoopConfig

    return LoopConfig(steps=a.steps, output_dir=a.output_dir, grad_accum=a.grad_accum,
                      grad_clip=a.grad_clip, eval_every=a.eval_every, save_every=a.save_every,
                      keep_last=a.keep_last, resume=a.resume, **extra)


def main(argv=None):
    a = parse_args(argv)
    from ramda_ds import data
    from ramda_ds.models import TransfoXLConfig, TransfoXLLM
    from ramda_ds.training.loop import train
    from ramda_ds.training.tasks import StreamTask

    acc, precision, out = start(a)
    train_file, valid_file = corpus(acc, a, out)
    tok = a.tokenizer
    if not tok:
        with acc.local_main_process_first():
            tok = data.train_tokenizer(train_file, str(out / "data" / f"sp{a.vocab_size}"), a.vocab_size)
    train_ids = data.encode(data.load_lines(train_file), tok)
    valid_ids = data.encode(data.load_lines(valid_file), tok)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=tok).vocab_size()
    cfg = TransfoXLConfig.preset(a.preset, vocab)
    if a.dropout >= 0:
        cfg.dropout = a.dropout
    model = TransfoXLLM(cfg)
    task = StreamTask(acc, train_ids, valid_ids, a.batch_size, cfg.tgt_len, txl_forward)
    model, opt, setup = wrap(acc, a, model, model.layers, precision, make_optimizer)
    loop = loop_config(a)
    rows = run_to_end(acc, lambda: train(acc, model, opt, task, loop, setup))
    return rows


def txl_forward(model, x, mems):
    """Through the wrapper's forward (DDP / DeepSpeed / FSDP hooks run): (logits, new memory)."""
    return model(x, mems)


if __name__ == "__main__":
    main()
