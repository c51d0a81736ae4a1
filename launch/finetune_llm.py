"""Structured-sparse fine-tuning of a local Hugging Face causal LM (Llama, Qwen, GPT-2 families).

    python launch/finetune_llm.py --model_path path/to/checkpoint [--train_file data.txt]
    accelerate launch --use_deepspeed --zero_stage 3 --num_processes 8 launch/finetune_llm.py ...

Prunable units are the groups: FFN intermediate neurons (input columns of ``mlp.down_proj``; rows
of GPT-2's transposed ``mlp.c_proj``) and attention heads (input columns of ``self_attn.o_proj``
grouped per head). Everything else is trained without regularization. The model is loaded with
``from_pretrained(path)`` (no download); without a tokenizer in ``path`` a SentencePiece model is
trained on the corpus (vocabulary ≤ the model's). Work in progress towards issue 4.
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

sys.path.insert(0, os.path.dirname(__file__))
from train_lm import OPTIMIZERS  # noqa: E402


@dataclass
class FinetuneArgs:
    model_path: str = field(default="", metadata={"help": "local HF checkpoint directory"})
    train_file: str = field(default="", metadata={"help": "text file; default: Python docs"})
    optimizer: str = "ramda"
    lr: float = 1e-3
    lam: float = 1e-5
    momentum: float = 0.1
    units: str = field(default="ffn,heads", metadata={"help": "ffn, heads, or both"})
    seq_len: int = 64
    batch_size: int = 4
    steps: int = 100
    output_dir: str = "runs/finetune"


def validate(a: FinetuneArgs) -> None:
    if not a.model_path or not (Path(a.model_path) / "config.json").exists():
        raise SystemExit(f"--model_path must be a local HF checkpoint with config.json, got {a.model_path!r}")
    if a.optimizer not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {a.optimizer!r}; choose one of {OPTIMIZERS}")
    if a.lam < 0:
        raise SystemExit(f"lam must be >= 0, got {a.lam}")
    if a.train_file and not Path(a.train_file).exists():
        raise SystemExit(f"file not found: {a.train_file}")
    if not set(a.units.split(",")) <= {"ffn", "heads"}:
        raise SystemExit(f"units must be ffn and/or heads, got {a.units!r}")


def prunable_groups(model, a: FinetuneArgs):
    """Param groups whose group-lasso groups are FFN neurons and attention heads."""
    from ramda_ds.param_groups import build_param_groups

    cfg = model.config
    names = [n for n, _ in model.named_parameters()]
    include, grouping = [], {}
    units = a.units.split(",")
    if "ffn" in units:
        for pat, rule in (("*.mlp.down_proj.weight", "input"), ("*.mlp.c_proj.weight", "output")):
            if any(__import__("fnmatch").fnmatch(n, pat) for n in names):
                include.append(pat)
                grouping[pat] = rule
    if "heads" in units:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if any(n.endswith("self_attn.o_proj.weight") for n in names):
            include.append("*.self_attn.o_proj.weight")
            grouping["*.self_attn.o_proj.weight"] = f"head:{head_dim}"
    if not include:
        raise SystemExit("found no prunable units (mlp.down_proj / mlp.c_proj / self_attn.o_proj) "
                         f"in {type(model).__name__}")
    return build_param_groups(model, "group_lasso", lam=a.lam, include=include, grouping=grouping)


def main(argv=None):
    from transformers import AutoModelForCausalLM, HfArgumentParser

    (a,) = HfArgumentParser(FinetuneArgs).parse_args_into_dataclasses(argv)
    validate(a)
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from ramda_ds import data
    from ramda_ds.metrics import tensor_sparsity, weighted_group_sparsity
    from ramda_ds.optim import RAMDA, RMDA, ProxGen, ProxSGD
    from ramda_ds.sharding import attach

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]
                      if multi and not torch.cuda.is_available() else [])
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(a.model_path)
    vocab = model.config.vocab_size
    train_file = a.train_file or data.default_corpus(out / "data")[0]
    with acc.local_main_process_first():
        tok = data.train_tokenizer(train_file, str(out / "data" / f"sp{min(vocab, 2000)}"),
                                   min(vocab, 2000))
    ids = data.encode(data.load_lines(train_file), tok) % vocab
    streams = data.lm_streams(ids, a.batch_size * acc.num_processes)[acc.process_index::acc.num_processes]
    groups = prunable_groups(model, a)
    kw = dict(lr=a.lr)
    opt = {"ramda": lambda: RAMDA(groups, momentum=a.momentum, keep_structured=True, **kw),
           "rmda": lambda: RMDA(groups, momentum=a.momentum, **kw),
           "proxsgd": lambda: ProxSGD(groups, momentum=a.momentum, **kw),
           "proxgen": lambda: ProxGen(groups, **kw),
           "adamw": lambda: torch.optim.AdamW(model.parameters(), **kw)}[a.optimizer]()
    model, opt = acc.prepare(model, opt)
    if a.optimizer != "adamw":
        attach(opt, model)
    t0, step = time.time(), 0
    for x, y in data.segments(streams, a.seq_len):
        if step == a.steps:
            break
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        step += 1
    inner = opt
    while not hasattr(inner, "view") and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    # RAMDA's W is an average that is only exactly sparse once c = 1: report its Ŵ, the
    # structure an export would keep
    structured = isinstance(inner, RAMDA)
    rows = tensor_sparsity(inner, structured) if a.optimizer != "adamw" else []
    summary = dict(steps=step, loss=loss.item(), ppl=math.exp(min(loss.item(), 50)),
                   wgs=weighted_group_sparsity(inner, structured) if rows else 0.0,
                   units={r.name: [r.zero_groups, r.groups] for r in rows},
                   seconds=time.time() - t0)
    if acc.is_main_process:
        print(json.dumps(summary))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    acc.end_training()


if __name__ == "__main__":
    main()
