"""Language-model pretraining of Transformer-XL with RAMDA (or a baseline), structured-sparse.

    python launch/train_lm.py                                   # tiny model, Python's docs, CPU
    accelerate launch --multi_gpu --num_processes 2 launch/train_lm.py --steps 200   # DDP
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 launch/train_lm.py
    torchrun --nproc-per-node 2 launch/train_lm.py --fsdp2      # FSDP2 applied by this script

Arguments are the fields of :class:`RunArgs` (``--help``), or a YAML file: ``train_lm.py run.yaml``.
Prints validation perplexity and weighted group sparsity; writes ``metrics.jsonl`` to output_dir.
Status: work in progress towards the full entry point (configs, fine-tuning, checkpoints, plots).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

OPTIMIZERS = ("ramda", "proxgen", "rmda", "proxsgd", "adamw")


@dataclass
class RunArgs:
    preset: str = field(default="tiny", metadata={"help": "Transformer-XL size: tiny | base"})
    train_file: str = field(default="", metadata={"help": "text/json/parquet; default: Python docs"})
    valid_file: str = field(default="")
    tokenizer: str = field(default="", metadata={"help": "SentencePiece .model; default: train one"})
    vocab_size: int = 2000
    optimizer: str = field(default="ramda", metadata={"help": " | ".join(OPTIMIZERS)})
    lr: float = 2e-2
    lam: float = 1e-5
    momentum: float = 0.1
    solver: str = "pg"
    milestones: str = field(default="400", metadata={"help": "comma-separated restart steps"})
    steps: int = 600
    batch_size: int = 8
    grad_clip: float = 0.25
    grad_accum: int = 1
    eval_every: int = 200
    fsdp2: bool = False
    seed: int = 0
    output_dir: str = "runs/lm"


def parse_args(argv=None) -> RunArgs:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(RunArgs)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    validate(args)
    return args


def validate(a: RunArgs) -> None:
    """Fail before any process group starts, naming the problem."""
    if a.optimizer not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {a.optimizer!r}; choose one of {OPTIMIZERS}")
    if a.lam < 0:
        raise SystemExit(f"lam must be >= 0, got {a.lam}")
    for f in (a.train_file, a.valid_file, a.tokenizer):
        if f and not Path(f).exists():
            raise SystemExit(f"file not found: {f}")
    if a.steps < 1 or a.batch_size < 1 or a.grad_accum < 1:
        raise SystemExit("steps, batch_size and grad_accum must be >= 1")


def make_optimizer(a: RunArgs, model):
    from ramda_ds.optim import RAMDA, RMDA, ProxGen, ProxSGD
    from ramda_ds.param_groups import build_param_groups

    if a.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=a.lr)
    ms = tuple(int(m) for m in a.milestones.split(",") if m)
    groups = build_param_groups(model, "group_lasso", lam=a.lam, exclude=["embed.*"])
    if a.optimizer == "ramda":
        return RAMDA(groups, lr=a.lr, momentum=a.momentum, solver=a.solver, milestones=ms)
    if a.optimizer == "rmda":
        return RMDA(groups, lr=a.lr, momentum=a.momentum, milestones=ms)
    if a.optimizer == "proxsgd":
        return ProxSGD(groups, lr=a.lr, momentum=a.momentum, milestones=ms)
    return ProxGen(groups, lr=a.lr, solver=a.solver, milestones=ms)


def main(argv=None):
    a = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from ramda_ds import data
    from ramda_ds.metrics import weighted_group_sparsity
    from ramda_ds.models import TransfoXLConfig, TransfoXLLM
    from ramda_ds.sharding import attach

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # DeepSpeed JIT-builds a shared-memory comm op on CPU (~30 s, /dev/shm leftovers); gloo
        # needs none of it and the results are identical.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if multi and not torch.cuda.is_available() else []
    acc = Accelerator(gradient_accumulation_steps=a.grad_accum, kwargs_handlers=kwargs)
    torch.manual_seed(a.seed)
    out = Path(a.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    train_file, valid_file = a.train_file, a.valid_file
    if not train_file:
        with acc.local_main_process_first():
            train_file, valid_file = data.default_corpus(out / "data")
    tok = a.tokenizer
    if not tok:
        with acc.local_main_process_first():
            tok = data.train_tokenizer(train_file, str(out / "data" / f"sp{a.vocab_size}"), a.vocab_size)
    train = data.encode(data.load_lines(train_file), tok)
    valid = data.encode(data.load_lines(valid_file or train_file), tok)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=tok).vocab_size()
    cfg = TransfoXLConfig.preset(a.preset, vocab)
    model = TransfoXLLM(cfg)
    rank, world = acc.process_index, acc.num_processes
    streams = data.lm_streams(train, a.batch_size * world)[rank::world]
    vstreams = data.lm_streams(valid, a.batch_size * world)[rank::world]
    if a.fsdp2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = make_optimizer(a, model)
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # no dataloader to infer from; clipping is DeepSpeed's (default would be 1.0)
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=a.batch_size,
                                   gradient_clipping=a.grad_clip, zero_allow_untested_optimizer=True)
    if not a.fsdp2:  # accelerate would wrap an FSDP2 model in DDP on CPU
        model, opt = acc.prepare(model, opt)
    view = attach(opt, model) if a.optimizer != "adamw" else None
    setup = dict(event="setup", world_size=world, view=type(view).__name__,
                 distributed_type=acc.distributed_type.name,
                 dtensor_params=sum(type(p).__name__ == "DTensor" for p in model.parameters()))
    if acc.is_main_process:
        print(json.dumps(setup), flush=True)
        with open(out / "metrics.jsonl", "w") as f:
            f.write(json.dumps(setup) + "\n")

    def evaluate():
        model.eval()
        tot, n, mems = 0.0, 0, None
        with torch.no_grad():
            for x, y in data.segments(vstreams, cfg.tgt_len):
                loss, mems = _loss(model, x, y, mems)
                tot, n = tot + loss.item() * y.numel(), n + y.numel()
        t = torch.tensor([tot, n], dtype=torch.float64, device=acc.device)
        t = acc.reduce(t, reduction="sum")
        model.train()
        return math.exp(t[0].item() / t[1].item())

    step, mems, t0, log = 0, None, time.time(), []
    it = iter(data.segments(streams, cfg.tgt_len))
    while step < a.steps:
        try:
            x, y = next(it)
        except StopIteration:
            it, mems = iter(data.segments(streams, cfg.tgt_len)), None
            continue
        with acc.accumulate(model):
            loss, mems = _loss(model, x, y, mems)
            acc.backward(loss)
            if acc.sync_gradients and a.grad_clip > 0:
                acc.clip_grad_norm_(model.parameters(), a.grad_clip)
            opt.step()
            opt.zero_grad()
        step += 1
        if step % a.eval_every == 0 or step == a.steps:
            ppl = evaluate()
            wgs = weighted_group_sparsity(_inner(opt)) if a.optimizer != "adamw" else 0.0
            row = dict(step=step, loss=loss.item(), valid_ppl=ppl, wgs=wgs,
                       tokens_per_s=step * x.numel() * world / (time.time() - t0))
            log.append(row)
            if acc.is_main_process:
                print(json.dumps(row), flush=True)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
    if acc.is_main_process:
        print(f"validation perplexity {log[-1]['valid_ppl']:.2f}, weighted group sparsity "
              f"{log[-1]['wgs']:.3f} ({time.time() - t0:.0f} s)")
    acc.end_training()
    return log


def _loss(model, x, y, mems):
    """Through the wrapper's forward (DDP / DeepSpeed / FSDP hooks run), then cross-entropy."""
    logits, mems = model(x, mems)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), mems


def _inner(opt):
    while not hasattr(opt, "view") and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


if __name__ == "__main__":
    main()
