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

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ramda_ds.training.launch import (BACKEND_HELP, OPTIMIZERS, corpus, loop_config, main_entry,
                                      make_task, read_args, run_to_end, start, validate_common,
                                      wrap)
from ramda_ds.training.run_checkpoint import KEEP_LAST


@dataclass
class RunArgs:
    preset: str = field(default="tiny", metadata={"help": "Transformer-XL size: tiny | base"})
    dropout: float = field(default=-1.0, metadata={"help": "override the preset's dropout (>= 0)"})
    train_file: str = field(default="", metadata={"help": "text/json/parquet; default: Python docs"})
    valid_file: str = field(default="", metadata={
        "help": "held-out text; required with --train_file (or --valid_equals_train)"})
    valid_equals_train: bool = field(default=False, metadata={
        "help": "allow validating on the training text (reports training perplexity; warned)"})
    tokenizer: str = field(default="", metadata={"help": "SentencePiece .model; default: train one"})
    vocab_size: int = 2000
    optimizer: str = field(default="ramda", metadata={"help": " | ".join(OPTIMIZERS)})
    lr: float = 2e-2
    lam: float = 1e-5
    momentum: float = 0.1
    grouping: str = field(default="input", metadata={"help": "group rule of regularized weights: "
                                                     "input (columns) | output (rows)"})
    solver: str = "pg"
    backend: str = field(default="torch", metadata={"help": BACKEND_HELP})
    milestones: str = field(default="400", metadata={"help": "comma-separated restart steps"})
    steps: int = 600
    batch_size: int = 8
    grad_clip: float = 0.25
    diverge_factor: float = field(default=2.0, metadata={
        "help": "stop (exit 3) when the mean loss of 10 steps exceeds this × the first step's, or "
                "the loss rose for 50 steps; 0: only a non-finite loss stops the run"})
    grad_accum: int = 1
    eval_every: int = 100
    save_every: int = field(default=200, metadata={"help": "checkpoint period; 0: end/SIGTERM only"})
    keep_last: int = KEEP_LAST
    resume: str = field(default="", metadata={"help": "'auto' (latest checkpoint) or a directory"})
    allow_hparam_change: bool = field(default=False, metadata={
        "help": "resume although lam/grouping differ from the checkpoint's (recorded)"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on a bf16 GPU) | bf16 | no"})
    fsdp2: bool = False
    seed: int = 0
    output_dir: str = "runs/lm"


def parse_args(argv=None) -> RunArgs:
    args = read_args(RunArgs, argv)
    validate(args)
    return args


def validate(a: RunArgs) -> None:
    validate_common(a, (a.train_file, a.valid_file, a.tokenizer))
    if a.grouping not in ("input", "output"):
        raise SystemExit(f"grouping must be input or output, got {a.grouping!r}")
    if a.preset not in ("tiny", "base"):
        raise SystemExit(f"preset must be tiny or base, got {a.preset!r}")
    if not (a.dropout == -1 or 0 <= a.dropout < 1):
        raise SystemExit(f"dropout must be in [0, 1) (or -1: the preset's), got {a.dropout}")
    if a.vocab_size < 8 and not a.tokenizer:
        raise SystemExit(f"vocab_size must be >= 8, got {a.vocab_size}")


def lm_groups(a: RunArgs):
    """Attention and FFN weights, grouped by ``--grouping``; embeddings, norms, biases free."""
    from ramda_ds.param_groups import build_param_groups

    return lambda model: build_param_groups(model, "group_lasso", lam=a.lam, exclude=["embed.*"],
                                            grouping={"*": a.grouping})


def main(argv=None):
    a = parse_args(argv)
    from ramda_ds.models import TransfoXLConfig, TransfoXLLM
    from ramda_ds.training.loop import train
    from ramda_ds.training import data

    acc, precision, out = start(a)
    train_file, valid_file = corpus(acc, a, out)
    tok = a.tokenizer
    if not tok:
        prefix = out / "data" / f"sp{a.vocab_size}"
        if acc.is_main_process and not Path(f"{prefix}.model").exists():
            print(f"training a SentencePiece tokenizer ({a.vocab_size} pieces) on {train_file}",
                  file=sys.stderr, flush=True)
        with acc.local_main_process_first():
            tok = data.train_tokenizer(train_file, str(out / "data" / f"sp{a.vocab_size}"), a.vocab_size)
    with acc.local_main_process_first():  # the datasets cache is built once, not by 2 ranks at once
        train_lines, valid_lines = data.load_lines(train_file), data.load_lines(valid_file)
    train_ids, valid_ids = data.encode(train_lines, tok), data.encode(valid_lines, tok)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=tok).vocab_size()
    cfg = TransfoXLConfig.preset(a.preset, vocab)
    if a.dropout >= 0:
        cfg.dropout = a.dropout
    model = TransfoXLLM(cfg)
    task = make_task(acc, a, train_ids, valid_ids, cfg.tgt_len, txl_forward)
    # RAMDA keeps Ŵ (the structured point, what python -m ramda_ds.export writes by default)
    model, opt, setup = wrap(acc, a, model, model.layers, precision, lm_groups(a),
                             keep_structured=a.optimizer == "ramda")
    setup["model_config"] = asdict(cfg)  # for the export
    setup["model"] = f"Transformer-XL {a.preset}"  # named in plot.png's title
    loop = loop_config(a, structured=a.optimizer == "ramda")  # report Ŵ and W, labelled
    rows = run_to_end(acc, lambda: train(acc, model, opt, task, loop, setup))
    return rows


def txl_forward(model, x, mems):
    """Through the wrapper's forward (DDP / DeepSpeed / FSDP hooks run): (logits, new memory)."""
    return model(x, mems)


if __name__ == "__main__":
    main_entry(main)
