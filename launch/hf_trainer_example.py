"""Structured-sparse fine-tuning with Hugging Face ``Trainer`` + RAMDA (copy and adapt).

    python launch/hf_trainer_example.py --model_path MODEL --train_file data.txt --output_dir out
    accelerate launch --use_deepspeed --zero_stage 3 --zero3_init_flag true --zero3_save_16bit_model \\
        true --num_processes 8 launch/hf_trainer_example.py --model_path MODEL --train_file data.txt \\
        --output_dir out
    accelerate launch --config_file configs/accelerate/fsdp2.yaml \\
        launch/hf_trainer_example.py --model_path MODEL --train_file data.txt --output_dir out

Any ``TrainingArguments`` flag works (``--deepspeed ds_config.json``, ``--max_steps``,
``--save_steps``, ``--resume_from_checkpoint out/checkpoint-200``; on CPU ``--ddp_backend gloo``
for 2+ processes). MODEL is a local directory with a tokenizer; the text is cut into blocks of
``--block_size`` tokens. The units (FFN neurons, attention heads) are group-lasso regularized with
``--lam``; each log row reports the weighted group sparsity and units kept.
"""

from dataclasses import dataclass

import torch
from datasets import load_dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments,
                          default_data_collator)

from ramda_ds.hf import RamdaConfig, RamdaTrainer
from ramda_ds.hf.setup import cpu_friendly, shard_fsdp2_if_needed
from ramda_ds.training.world import exit_process


@dataclass
class Args:
    model_path: str
    train_file: str
    lam: float = 1e-4
    momentum: float = 0.1  # the paper's c; 1: W = Ŵ, exactly sparse at every step
    backend: str = "torch"  # RAMDA's step kernels: torch | auto | native | triton (README: Fast step)
    block_size: int = 64
    target: float = 0.0  # fraction of the units kept, met in this run (docs/compression.md); 0: off
    distill: float = 0.0  # β of the distillation from the starting model; 0: off


def main():
    cpu_friendly()  # no-op with CUDA
    a, targs = HfArgumentParser((Args, TrainingArguments)).parse_args_into_dataclasses()
    # after TrainingArguments, so that ZeRO-3's zero3_init_flag partitions the weights as they load
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    shard_fsdp2_if_needed(model)  # CPU only: accelerate applies FSDP2 itself on GPUs
    tok = AutoTokenizer.from_pretrained(a.model_path)
    ids = [i for t in load_dataset("text", data_files=a.train_file)["train"]["text"]
           for i in tok(t)["input_ids"]]
    n = a.block_size
    blocks = [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]
    data = [dict(input_ids=b, labels=b) for b in blocks]
    trainer = RamdaTrainer(model=model, args=targs, train_dataset=data,
                           data_collator=default_data_collator,
                           ramda=RamdaConfig(lam=a.lam, momentum=a.momentum, backend=a.backend,
                                             target=a.target, distill=a.distill))
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_model()
    trainer.accelerator.wait_for_everyone()  # every rank is done before any process ends


if __name__ == "__main__":
    main()
    exit_process(0)  # skips the gloo teardown that can abort a rank at exit
