"""Structured-sparse fine-tuning with Hugging Face ``Trainer`` + RAMDA (copy and adapt).

    python -m ramda_ds.training.tiny_model runs/tiny-llama       # a tiny Llama with its tokenizer
    python launch/hf_trainer_example.py --model_path runs/tiny-llama --train_file data.txt \\
        --output_dir runs/hf --use_cpu --max_steps 40 --save_steps 20
    accelerate launch --config_file configs/accelerate/zero3.yaml launch/hf_trainer_example.py \\
        --model_path MODEL --train_file data.txt --output_dir out --ddp_backend gloo
    accelerate launch --config_file configs/accelerate/fsdp2.yaml launch/hf_trainer_example.py \\
        --model_path MODEL --train_file data.txt --output_dir out --ddp_backend gloo

Any ``TrainingArguments`` flag works (``--deepspeed ds_config.json``, ``--max_steps``,
``--save_steps``, ``--resume_from_checkpoint out/checkpoint-200``; on CPU ``--ddp_backend gloo``
for 2+ processes). MODEL is a local directory with a tokenizer; the text is cut into blocks of
``--block_size`` tokens. The units (FFN neurons, attention heads) are group-lasso regularized with
``--lam``; each log row reports the weighted group sparsity and units kept.

Checked before anything is loaded or written, each a one-line error (exit 2 for the command line,
1 otherwise): unknown or missing flags, a model directory without ``config.json`` or a tokenizer,
a missing or empty ``--train_file``, a missing ``--resume_from_checkpoint``, an ``output_dir``
holding an earlier run's checkpoints (pass ``--resume_from_checkpoint`` to continue it, or
``--overwrite_output_dir`` to remove them), and what ``RamdaTrainer`` refuses (a DeepSpeed config
with its own optimizer, ZeRO-Offload, ``weight_decay > 0``, ...).
"""

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import ramda_ds.training  # noqa: F401  (first: silences DeepSpeed's "Setting accelerator to CPU")
from ramda_ds.hf.setup import cpu_friendly
from ramda_ds.training.world import exit_process

PROG = "hf_trainer_example.py"


@dataclass
class Args:
    model_path: str = field(metadata={"help": "local HF model directory with its tokenizer"})
    train_file: str = field(metadata={"help": "text file to train on (one document per line)"})
    lam: float = field(default=1e-4, metadata={"help": "λ of the group lasso on the units"})
    momentum: float = field(default=0.1, metadata={
        "help": "the paper's c; 1: W = Ŵ, exactly sparse at every step"})
    backend: str = field(default="torch", metadata={
        "help": "RAMDA's step kernels: torch | auto | native | triton (README: Fast step)"})
    block_size: int = field(default=64, metadata={"help": "tokens per training sequence"})
    target: float = field(default=0.0, metadata={
        "help": "fraction of the units kept, met in this run (docs/compression.md); 0: off"})
    distill: float = field(default=0.0, metadata={
        "help": "β of the distillation from the starting model; 0: off"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "remove the checkpoint-N directories an earlier run left in output_dir"})


def fail(message: str, code: int = 1) -> None:
    """One line on rank 0 (every rank gets here), then every rank exits with ``code``."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    exit_process(code)


def checkpoints_in(output_dir: str) -> list[str]:
    d = Path(output_dir)
    found = [c for c in d.glob("checkpoint-*") if c.is_dir() and c.name[11:].isdigit()]
    return [c.name for c in sorted(found, key=lambda c: int(c.name[11:]))]


def check(a: Args, targs) -> None:
    """The one-line checks of the module docstring (files first, then the Trainer's refusals)."""
    from ramda_ds.hf.trainer import refuse_unsupported

    if not (Path(a.model_path) / "config.json").exists():
        fail(f"--model_path {a.model_path} is not a local HF model directory (no config.json); "
             "python -m ramda_ds.training.tiny_model DIR makes a tiny one")
    if not any((Path(a.model_path) / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                                           "vocab.json")):
        fail(f"--model_path {a.model_path} has no tokenizer (tokenizer.json, tokenizer.model or "
             "vocab.json): save the model's tokenizer there with tokenizer.save_pretrained(DIR)")
    p = Path(a.train_file)
    if not p.is_file() or not p.read_text(errors="replace").strip():
        fail(f"--train_file {a.train_file} " + ("is empty" if p.is_file() else "not found"))
    resume = targs.resume_from_checkpoint
    if resume and not Path(resume).is_dir():
        fail(f"--resume_from_checkpoint {resume} not found")
    old = checkpoints_in(targs.output_dir)
    if old and not resume and not a.overwrite_output_dir:
        fail(f"--output_dir {targs.output_dir} holds checkpoints of an earlier run ({', '.join(old)})"
             f": pass --resume_from_checkpoint {Path(targs.output_dir) / old[-1]} to continue it, "
             "--overwrite_output_dir to remove them, or another --output_dir")
    try:
        refuse_unsupported(targs)
    except ValueError as e:
        fail(str(e))
    if old and not resume and int(os.environ.get("RANK", "0")) == 0:
        print(f"--overwrite_output_dir: removing {', '.join(old)} from {targs.output_dir}",
              file=sys.stderr, flush=True)
        for name in old:
            shutil.rmtree(Path(targs.output_dir) / name)


def main():
    from ramda_ds.training.launch import parse_cli
    from transformers import HfArgumentParser, TrainingArguments

    cpu_friendly()  # no-op with CUDA
    a, targs = parse_cli(HfArgumentParser((Args, TrainingArguments), prog=PROG))
    check(a, targs)

    import torch
    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from ramda_ds.hf import RamdaConfig, RamdaTrainer
    from ramda_ds.hf.setup import shard_fsdp2_if_needed

    # after TrainingArguments, so that ZeRO-3's zero3_init_flag partitions the weights as they load
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    shard_fsdp2_if_needed(model)  # CPU only: accelerate applies FSDP2 itself on GPUs
    tok = AutoTokenizer.from_pretrained(a.model_path)
    disable_progress_bars()  # datasets' "Generating train split" bar for a local file
    ids = [i for t in load_dataset("text", data_files=a.train_file)["train"]["text"]
           for i in tok(t)["input_ids"]]
    n = a.block_size
    blocks = [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]
    if len(blocks) < targs.per_device_train_batch_size * targs.world_size:
        fail(f"--train_file {a.train_file} gives {len(ids)} tokens, {len(blocks)} blocks of "
             f"--block_size {n}: too few for one global batch; give more text")
    data = [dict(input_ids=b, labels=b) for b in blocks]
    try:
        trainer = RamdaTrainer(model=model, args=targs, train_dataset=data,
                               data_collator=default_data_collator,
                               ramda=RamdaConfig(lam=a.lam, momentum=a.momentum, backend=a.backend,
                                                 target=a.target, distill=a.distill))
    except ValueError as e:  # what RamdaTrainer refuses (e.g. FSDP1), named in one line
        fail(str(e))
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_model()
    trainer.accelerator.wait_for_everyone()  # every rank is done before any process ends


if __name__ == "__main__":
    main()
    exit_process(0)  # skips the gloo teardown that can abort a rank at exit
