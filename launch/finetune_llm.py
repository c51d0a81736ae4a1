"""Structured-sparse fine-tuning of a local Hugging Face causal LM (Llama, Qwen, GPT-2 families).

    python launch/finetune_llm.py --model_path path/to/checkpoint [--train_file data.txt]
    accelerate launch --use_deepspeed --zero_stage 3 --num_processes 8 launch/finetune_llm.py ...

Prunable units are the groups: FFN intermediate neurons (input columns of ``mlp.down_proj``; rows
of GPT-2's transposed ``mlp.c_proj``) and attention heads (input columns of ``self_attn.o_proj``
grouped per head). Everything else is trained without regularization. The model is loaded with
``from_pretrained(path)`` (no download); without a tokenizer in ``path`` a SentencePiece model is
trained on the corpus (vocabulary ≤ the model's). ``--groups "PATTERN=RULE;..."`` replaces the
default units. Training, metrics and checkpoints (``--save_every``, ``--resume auto``) are those of
``train_lm.py``; the end of a run writes ``summary.json`` with the units kept per tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ramda_ds.training.launch import (corpus, loop_config, make_task, read_args,
                                      run_to_end, start, validate_common, wrap)
from ramda_ds.training.run_checkpoint import KEEP_LAST


@dataclass
class FinetuneArgs:
    model_path: str = field(default="", metadata={"help": "local HF checkpoint directory"})
    train_file: str = field(default="", metadata={"help": "text/json/parquet; default: Python docs"})
    valid_file: str = field(default="")
    optimizer: str = "ramda"
    lr: float = 1e-3
    lam: float = 1e-5
    momentum: float = 0.1
    milestones: str = field(default="", metadata={"help": "comma-separated restart steps"})
    units: str = field(default="ffn,heads", metadata={"help": "ffn, heads, or both"})
    groups: str = field(default="", metadata={"help": "custom units: 'PATTERN=RULE;...' with RULE "
                                              "input | output | head:D (replaces --units)"})
    seq_len: int = 64
    batch_size: int = 4
    grad_accum: int = 1
    grad_clip: float = 1.0
    steps: int = 100
    eval_every: int = 50
    save_every: int = 0
    keep_last: int = KEEP_LAST
    resume: str = ""
    allow_hparam_change: bool = False  # resume although lam/units differ (recorded in metrics)
    precision: str = "auto"
    fsdp2: bool = False
    seed: int = 0
    output_dir: str = "runs/finetune"


def parse_args(argv=None) -> FinetuneArgs:
    a = read_args(FinetuneArgs, argv)
    validate(a)
    return a


def validate(a: FinetuneArgs) -> None:
    """Fail before any process group starts, naming the problem (the model is built on the meta
    device to check the group patterns against its parameter names)."""
    if not a.model_path or not (Path(a.model_path) / "config.json").exists():
        raise SystemExit(f"--model_path must be a local HF checkpoint with config.json, got {a.model_path!r}")
    validate_common(a, (a.train_file, a.valid_file))
    if not set(a.units.split(",")) <= {"ffn", "heads"}:
        raise SystemExit(f"units must be ffn and/or heads, got {a.units!r}")
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.model_path))
    from ramda_ds.hf.units import unit_patterns

    try:
        unit_patterns(model, a.units, a.groups)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def unit_groups(a: FinetuneArgs):
    """The prunable units (:mod:`ramda_ds.hf.units`) regularized, everything else free."""
    from ramda_ds.hf.units import unit_param_groups

    def groups_of(model):
        return unit_param_groups(model, a.lam, a.units, a.groups)
    return groups_of


def tokenize(acc, a: FinetuneArgs, vocab: int, out: Path):
    """Token ids of the train and validation text: the checkpoint's tokenizer if it has one,
    else a SentencePiece model trained on the corpus (ids folded into the model's vocabulary)."""
    from ramda_ds.training import data

    train_file, valid_file = corpus(acc, a, out)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model_path)
    except (OSError, ValueError, TypeError):
        tok = None
    if tok is not None:
        def ids(f):
            return torch.tensor([i for t in data.load_lines(f)["text"] for i in
                                 tok(t)["input_ids"] + [tok.eos_token_id or 0]])
        return ids(train_file), ids(valid_file)
    size = min(vocab, 2000)
    with acc.local_main_process_first():
        sp = data.train_tokenizer(train_file, str(out / "data" / f"sp{size}"), size)
    return (data.encode(data.load_lines(train_file), sp) % vocab,
            data.encode(data.load_lines(valid_file), sp) % vocab)


def causal_lm_forward(model, x, memory):
    return model(input_ids=x).logits, None


def main(argv=None):
    a = parse_args(argv)
    from transformers import AutoModelForCausalLM

    from ramda_ds.metrics import tensor_sparsity
    from ramda_ds.training.loop import train, unwrap

    acc, precision, out = start(a)
    # fp32 master weights whatever the checkpoint's dtype (--precision sets the compute dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    train_ids, valid_ids = tokenize(acc, a, model.config.vocab_size, out)
    task = make_task(acc, a, train_ids, valid_ids, a.seq_len, causal_lm_forward)
    blocks = getattr(getattr(model, "model", None), "layers", None) or \
        getattr(getattr(model, "transformer", None), "h", [])
    model, opt, setup = wrap(acc, a, model, blocks, precision, unit_groups(a),
                             keep_structured=a.optimizer == "ramda")
    setup["model"] = a.model_path
    # RAMDA's W is an average that is only exactly sparse once c = 1: report its Ŵ, the
    # structure an export would keep
    loop = loop_config(a, structured=a.optimizer == "ramda")

    def run():
        rows = train(acc, model, opt, task, loop, setup)
        inner = unwrap(opt)
        units = tensor_sparsity(inner, loop.structured) if inner else []
        last = rows[-1] if rows else {}
        summary = dict(steps=a.steps, loss=last.get("loss"), ppl=last.get("valid_ppl"),
                       wgs=last.get("wgs", 0.0), units={r.name: [r.zero_groups, r.groups] for r in units})
        if acc.is_main_process:
            print(json.dumps(summary))
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    return run_to_end(acc, run)


if __name__ == "__main__":
    main()
