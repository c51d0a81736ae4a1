"""Structured-sparse fine-tuning of a local Hugging Face causal LM (Llama, Qwen, GPT-2 families).

    python -m ramda_ds.training.tiny_model runs/tiny-llama && \
        python launch/finetune_llm.py --model_path runs/tiny-llama
    accelerate launch --use_deepspeed --zero_stage 3 --num_processes 8 launch/finetune_llm.py ...

Prunable units are the groups: FFN intermediate neurons (input columns of ``mlp.down_proj``; rows
of GPT-2's transposed ``mlp.c_proj``) and attention heads (input columns of ``self_attn.o_proj``
grouped per head). Everything else is trained without regularization. The model is loaded with
``from_pretrained(path)`` (no download); without a tokenizer in ``path`` a SentencePiece model is
trained on the corpus (vocabulary ≤ the model's); a tokenizer that cannot encode text is refused.
``--groups "PATTERN=RULE;..."`` replaces the default units. Training and checkpoints
(``--save_every``, ``--resume auto``) are those of ``train_lm.py``. Every evaluation measures
RAMDA's structured model Ŵ (what export ships; ``*_structured``) and the weights W (``*_W``);
the last line and ``summary.json`` lead with Ŵ and list the units kept per tensor. Defaults
sparsify: one restart placed so that W becomes exactly Ŵ by the end (``--milestones auto``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ramda_ds.training.launch import (BACKEND_HELP, OPTIMIZERS, corpus, loop_config, main_entry,
                                      make_task, read_args, run_to_end, start, validate_common,
                                      wrap)
from ramda_ds.training.run_checkpoint import KEEP_LAST

LAM = 1e-4  # default λ: removes ~30% of the README tiny Llama's FFN neurons in 200 steps (README sweep)


@dataclass
class FinetuneArgs:
    model_path: str = field(default="", metadata={"help": "local HF checkpoint directory"})
    train_file: str = field(default="", metadata={
        "help": "text/json/parquet or hf:NAME; default: Python's docs (with a held-out part)"})
    valid_file: str = field(default="", metadata={
        "help": "held-out text; required with --train_file (or --valid_equals_train)"})
    valid_equals_train: bool = field(default=False, metadata={
        "help": "allow validating on the training text (reports training perplexity; warned)"})
    eval_tokens: int = field(default=32768, metadata={
        "help": "validation tokens per evaluation (the first ones); 0: the whole file"})
    tokenizer: str = field(default="auto", metadata={
        "help": "auto: the checkpoint's tokenizer, or a SentencePiece model trained on the corpus "
                "when it has none | train: always train SentencePiece"})
    optimizer: str = field(default="ramda", metadata={"help": " | ".join(OPTIMIZERS)})
    lr: float = field(default=1e-3, metadata={"help": "learning rate η"})
    lam: float = field(default=LAM, metadata={
        "help": "λ of the group lasso on the units: larger removes more (see README's sweep)"})
    momentum: float = field(default=0.1, metadata={"help": "RAMDA's averaging weight c0 (paper's c)"})
    solver: str = field(default="pg", metadata={"help": "RAMDA/ProxGen subproblem solver: pg | exact"})
    backend: str = field(default="torch", metadata={"help": BACKEND_HELP})
    milestones: str = field(default="auto", metadata={
        "help": "comma-separated restart steps, '' for none, or auto: one restart at "
                "max(steps − ⌈1/c0²⌉, steps/2), so that c = min(c0·√i, 1) reaches 1 and W "
                "becomes exactly the sparse Ŵ by the end"})
    units: str = field(default="ffn,heads", metadata={"help": "ffn, heads, or both"})
    target: float = field(default=0.0, metadata={
        "help": "size target: fraction kept (of the --units, or of the parameters with "
                "--target_of params), met in this run: RAMDA identifies the units with λ set per "
                "step, then the support is frozen and the kept units recover with λ = 0 "
                "(--lam is ignored); 0: off (a fixed --lam). See docs/compression.md"})
    target_of: str = field(default="units", metadata={"help": "units | params"})
    target_ramp: int = field(default=0, metadata={
        "help": "steps over which the kept fraction goes from 1 to --target; 0: 30%% of --steps"})
    target_stable: int = field(default=0, metadata={
        "help": "steps in a row the kept set must stay settled (≤ 1%% of units changing per "
                "step) before the support is frozen; 0: 3%% of --steps"})
    target_max_identify: int = field(default=0, metadata={
        "help": "freeze the support by this step at the latest; 0: ramp + 2·stable"})
    target_floor: float = field(default=0.0, metadata={
        "help": "each tensor keeps at least this fraction of its units"})
    recover_lr_scale: float = field(default=1.0, metadata={
        "help": "γ of the recovery: lr and ε × γ at the freeze and at each recovery restart"})
    recover_with: str = field(default="adamw", metadata={
        "help": "the recovery's update on the kept units: adamw (in RAMDA's buffers; fine-tunes a "
                "converged model better, see docs/compression.md) | ramda (λ = 0)"})
    recover_restart_every: int = field(default=0, metadata={
        "help": "restart RAMDA every N steps of the recovery (V, U ← 0, W0 ← W); 0: never"})
    method: str = field(default="ramda", metadata={
        "help": "ramda | prune_recover (the baseline: rank units by --prune_criterion at step 0, "
                "prune to --target, recover with AdamW on the kept units)"})
    prune_criterion: str = field(default="activation", metadata={"help": "activation | weight"})
    prune_allocation: str = field(default="uniform", metadata={
        "help": "uniform (one width for every layer) or a run's summary.json (its kept units "
                "per tensor, e.g. RAMDA's allocation)"})
    distill: float = field(default=0.0, metadata={
        "help": "β of the distillation loss β·T²·KL(teacher‖student) + (1−β)·CE, the teacher "
                "being the starting model (sharded as the student); 0: off"})
    distill_temperature: float = field(default=1.0, metadata={"help": "T of the distillation"})
    groups: str = field(default="", metadata={"help": "custom units: 'PATTERN=RULE;...' with RULE "
                                              "input | output | head:D (replaces --units)"})
    seq_len: int = field(default=64, metadata={"help": "tokens per sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per process and micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip; 0: off"})
    diverge_factor: float = field(default=2.0, metadata={
        "help": "stop (exit 3) when the mean loss of 10 steps exceeds this × the first step's, or "
                "the loss rose for 50 steps; 0: only a non-finite loss stops the run"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    eval_every: int = field(default=0, metadata={
        "help": "evaluation period in steps; 0: steps/10 (≥ 10 points on the plot)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint period; 0: end/SIGTERM only"})
    keep_last: int = field(default=KEEP_LAST, metadata={"help": "checkpoints kept"})
    resume: str = field(default="", metadata={"help": "'auto' (latest checkpoint) or a directory"})
    allow_hparam_change: bool = field(default=False, metadata={
        "help": "resume although lam/units differ from the checkpoint's (recorded in metrics)"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on a bf16 GPU) | bf16 | no"})
    fsdp2: bool = field(default=False, metadata={"help": "apply FSDP2 (also implied by an "
                                                 "accelerate FSDP config)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    output_dir: str = field(default="runs/finetune", metadata={"help": "metrics, plots, checkpoints"})


SAMPLE = "The quick brown fox jumps over the lazy dog. It was 3 o'clock."


def parse_args(argv=None) -> FinetuneArgs:
    a = read_args(FinetuneArgs, argv)
    validate(a)
    return a


def say(text: str) -> None:
    """A line on stderr, once per job (before the process group exists: by RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr)


def auto_milestones(steps: int, c0: float) -> str:
    """One restart at max(steps − ⌈1/c0²⌉, steps // 2): the final stage's c = min(c0·√i, 1)
    reaches 1 (W = Ŵ exactly) after ⌈1/c0²⌉ of its steps; "" when steps < 2."""
    m = max(steps - math.ceil(1 / c0 ** 2 - 1e-9), steps // 2)
    return str(m) if 0 < m < steps else ""


def validate(a: FinetuneArgs) -> None:
    """Fail before any process group starts or anything is written, naming the problem (the model
    is built on the meta device to check the group patterns against its parameter names; the
    tokenizer is loaded and tried on a sample). Resolves the ``auto`` defaults."""
    if not a.model_path or not (Path(a.model_path) / "config.json").exists():
        raise SystemExit(f"--model_path must be a local HF checkpoint with config.json, got {a.model_path!r}")
    if a.eval_every == 0:
        a.eval_every = max(1, a.steps // 10)
    validate_compression(a)
    if a.milestones.strip() == "auto":
        a.milestones = auto_milestones(a.steps, a.momentum) if a.optimizer != "adamw" and \
            0 < a.momentum <= 1 else ""
        need = math.ceil(1 / a.momentum ** 2 - 1e-9) if 0 < a.momentum <= 1 else 0
        if a.optimizer == "ramda" and a.milestones and a.steps - int(a.milestones) < need:
            final = a.steps - int(a.milestones)
            say(f"warning: --milestones auto = {a.milestones}: the final stage ({final} steps) "
                  f"is too short for c = min(c0·√i, 1) to reach 1 (c0 = {a.momentum} needs "
                  f"{need}); W will not be exactly sparse (Ŵ is reported and exported). Raise "
                  "--steps or --momentum")
    validate_common(a, (a.train_file, a.valid_file))
    if not set(a.units.split(",")) <= {"ffn", "heads"}:
        raise SystemExit(f"units must be ffn and/or heads, got {a.units!r}")
    if a.solver not in ("pg", "exact"):
        raise SystemExit(f"solver must be pg or exact, got {a.solver!r}")
    if a.tokenizer not in ("auto", "train"):
        raise SystemExit(f"tokenizer must be auto or train, got {a.tokenizer!r}")
    if a.eval_tokens < 0:
        raise SystemExit(f"eval_tokens must be >= 0 (0: the whole validation file), got {a.eval_tokens}")
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.model_path))
    from ramda_ds.hf.units import unit_param_groups, unit_patterns

    try:
        unit_patterns(model, a.units, a.groups, warn=say)
        unit_param_groups(model, a.lam, a.units, a.groups)  # each rule fits its tensors' shapes
    except ValueError as e:
        raise SystemExit(f"--groups / --units: {e}") from None
    checkpoint_tokenizer(a)


def validate_compression(a: FinetuneArgs) -> None:
    """--target / --method / --distill checked and resolved (before anything starts)."""
    from ramda_ds.compress.run import METHODS, read_allocation

    if a.method not in METHODS:
        raise SystemExit(f"method must be one of {METHODS}, got {a.method!r}")
    if not 0 <= a.distill <= 1 or a.distill_temperature <= 0:
        raise SystemExit(f"distill must be in [0, 1] (0: off) and distill_temperature > 0, got "
                         f"{a.distill} and {a.distill_temperature}")
    if a.method == "prune_recover":
        if not a.target:
            raise SystemExit("--method prune_recover needs --target (the fraction of units kept)")
        if a.optimizer not in ("ramda", "proxgen"):
            raise SystemExit("--method prune_recover recovers with AdamW (ProxGen at λ = 0); "
                             f"--optimizer {a.optimizer} does not apply")
        if a.prune_criterion not in ("activation", "weight"):
            raise SystemExit(f"prune_criterion must be activation or weight, got {a.prune_criterion!r}")
        if a.target_of != "units":
            raise SystemExit("--method prune_recover takes --target_of units")
        a.optimizer = "proxgen"
        try:
            read_allocation(a.prune_allocation)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if not a.target:
        return
    if a.method == "ramda" and a.optimizer != "ramda":
        raise SystemExit(f"--target identifies units with RAMDA; --optimizer {a.optimizer} does "
                         "not (use --method prune_recover for the prune-then-recover baseline)")
    if a.milestones.strip() not in ("auto", ""):
        raise SystemExit("--target schedules its own stages (identification, then recovery from "
                         "the frozen support): leave --milestones at auto")
    a.milestones = ""
    cfg = target_config(a, total_params=1)
    try:
        cfg.check(a.steps if a.method == "ramda" else None)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    a.target_ramp, a.target_stable = cfg.ramp, cfg.stable


def target_config(a: FinetuneArgs, total_params: int):
    from ramda_ds.compress.recipe import TargetConfig, resolve_ramp

    return resolve_ramp(TargetConfig(
        target=a.target, of=a.target_of, ramp=a.target_ramp, stable=a.target_stable,
        max_identify=a.target_max_identify, floor=a.target_floor,
        recover_lr_scale=a.recover_lr_scale, recover_restart_every=a.recover_restart_every,
        recover_with=a.recover_with, total_params=total_params), a.steps)


def checkpoint_tokenizer(a: FinetuneArgs):
    """The checkpoint's tokenizer, None to train SentencePiece (``--tokenizer train``, or no
    tokenizer files: Llama raises); refuses one that cannot encode text. transformers returns an
    empty GPT2Tokenizer (``len == 1``, every text → []) for a GPT-2 directory without its files."""
    if a.tokenizer == "train":
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model_path)
    except (OSError, ValueError, TypeError):
        return None
    ids = tok(SAMPLE)["input_ids"]
    problem = (f"its vocabulary has {len(tok)} token(s)" if len(tok) < 32 else
               "it encodes sample text to nothing" if not ids else
               "it encodes sample text to a single repeated id" if len(set(ids)) < 2 else None)
    if problem:
        raise SystemExit(f"the tokenizer in {a.model_path} ({type(tok).__name__}) is unusable: "
                         f"{problem}; training on its ids would learn nothing. Save the model's "
                         f"tokenizer next to it (tokenizer.save_pretrained('{a.model_path}')), or "
                         "pass --tokenizer train to train a SentencePiece model on the corpus")
    return tok


def unit_groups(a: FinetuneArgs):
    """The prunable units (:mod:`ramda_ds.hf.units`) regularized, everything else free."""
    from ramda_ds.hf.units import unit_param_groups

    def groups_of(model):
        if not a.target:
            return unit_param_groups(model, a.lam, a.units, a.groups)
        # a size target sets λ per step (0 from the freeze on): the units stay group-lasso groups
        groups = unit_param_groups(model, 1.0, a.units, a.groups)
        for g in groups:
            if g.get("regularizer") == "group_lasso":
                g.update(lam=0.0, target=True)
        return groups
    return groups_of


def tokenize(acc, a: FinetuneArgs, vocab: int, out: Path):
    """Token ids of the train and validation text: the checkpoint's tokenizer if it has one,
    else a SentencePiece model trained on the corpus (ids folded into the model's vocabulary)."""
    from ramda_ds.training import data

    train_file, valid_file = corpus(acc, a, out)
    with acc.local_main_process_first():  # the datasets cache is built once, not by 2 ranks at once
        train_lines, valid_lines = data.load_lines(train_file), data.load_lines(valid_file)
    tok = checkpoint_tokenizer(a)
    if tok is not None:
        def ids(lines):
            return torch.tensor([i for t in lines["text"] for i in
                                 tok(t)["input_ids"] + [tok.eos_token_id or 0]])
        return ids(train_lines), ids(valid_lines)
    size = min(vocab, 2000)
    if acc.is_main_process:
        print(f"no tokenizer used from {a.model_path}: training a SentencePiece model "
              f"({size} pieces) on the corpus", file=sys.stderr)
    with acc.local_main_process_first():
        sp = data.train_tokenizer(train_file, str(out / "data" / f"sp{size}"), size)
    return data.encode(train_lines, sp) % vocab, data.encode(valid_lines, sp) % vocab


def causal_lm_forward(model, x, memory):
    return model(input_ids=x).logits, None


def compression_hooks(a: FinetuneArgs, acc, model, opt, task, n_params: int):
    """The loop's hooks for --target / --method prune_recover (None without them)."""
    if not a.target:
        return None
    from ramda_ds.compress.importance import activation_scores
    from ramda_ds.compress.run import CompressionHooks, read_allocation
    from ramda_ds.hf.units import unit_patterns
    from ramda_ds.training.loop import unwrap
    from ramda_ds.training.world import world_sum_

    inner = unwrap(opt)

    def activations():  # 16 micro-batches of every rank's own rows, summed over ranks
        rules = unit_patterns(getattr(model, "module", model), a.units, a.groups)
        batches = task.batches(0)
        xs = [next(batches)[0].to(acc.device) for _ in range(16)]
        return activation_scores(model, rules, xs,
                                 reduce=lambda t: world_sum_(t.to(acc.device)).cpu())
    return CompressionHooks(inner, a.method, target_config(a, n_params), a.prune_criterion,
                            read_allocation(a.prune_allocation) if a.method == "prune_recover"
                            else None, activations)


def main(argv=None):
    a = parse_args(argv)
    from transformers import AutoModelForCausalLM

    from ramda_ds.hf.units import blocks_of
    from ramda_ds.metrics import tensor_sparsity
    from ramda_ds.training.loop import headline, train, unwrap

    acc, precision, out = start(a)
    # fp32 master weights whatever the checkpoint's dtype (--precision sets the compute dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    train_ids, valid_ids = tokenize(acc, a, model.config.vocab_size, out)
    task = make_task(acc, a, train_ids, valid_ids, a.seq_len, causal_lm_forward,
                     eval_tokens=a.eval_tokens)
    blocks = blocks_of(model)
    ramda = a.optimizer == "ramda"
    n_params = sum(p.numel() for p in model.parameters())
    teacher = None
    if a.distill:  # a frozen copy of the starting model, before wrapping changes it
        from ramda_ds.compress.distill import DistillTask, make_teacher
        from ramda_ds.training.launch import backend_name, use_fsdp2

        kind = "fsdp2" if use_fsdp2(a.fsdp2) else backend_name(acc, False)
        try:
            teacher, held = make_teacher(
                model, acc, precision, kind, blocks_of=blocks_of,
                load=lambda: AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32))
        except ValueError as e:
            raise SystemExit(str(e)) from None
        task = DistillTask(task, teacher, a.distill, a.distill_temperature)
    model, opt, setup = wrap(acc, a, model, blocks, precision, unit_groups(a), keep_structured=ramda)
    setup.update(model=a.model_path, solver=a.solver, valid_tokens=task.valid_tokens,
                 headline="structured" if ramda else "W", method=a.method)
    if teacher is not None:
        setup.update(distill=dict(beta=a.distill, temperature=a.distill_temperature,
                                  teacher_params_per_rank=held,
                                  teacher_bytes_per_rank=held * (2 if precision == "bf16" else 4)))
    hooks = compression_hooks(a, acc, model, opt, task, n_params)
    if hooks is not None:
        setup.update(target=a.target, target_of=a.target_of, target_ramp=a.target_ramp)
    # RAMDA's W is an average that is only exactly sparse once c = 1: every evaluation also
    # measures Ŵ, the structured model an export ships, and its numbers lead
    loop = loop_config(a, structured=ramda)

    def run():
        rows = train(acc, model, opt, task, loop, setup, hooks)
        inner = unwrap(opt)
        last = rows[-1] if rows else {}
        label, key = headline(last)
        units = tensor_sparsity(inner, key == "structured") if inner else []
        summary = dict(diverged=False, steps=a.steps, model=key, model_label=label,
                       loss=last.get("loss"),
                       ppl=last.get(f"valid_ppl_{key}"), wgs=last.get(f"wgs_{key}", 0.0),
                       units={r.name: [r.zero_groups, r.groups] for r in units})
        if key == "structured":
            summary.update(W=dict(ppl=last.get("valid_ppl_W"), wgs=last.get("wgs_W", 0.0)),
                           W_is_structured=last.get("W_is_structured"))
        if hooks is not None:
            kept = sum(t - z for z, t in summary["units"].values())
            total = sum(t for _, t in summary["units"].values())
            summary.update(method=a.method, target=a.target, target_of=a.target_of,
                           units_kept=kept / total if total else None,
                           support_frozen_at=hooks.frozen_at())
            if a.target_of == "params" and hooks.recipe is not None:
                summary["params_kept"] = hooks.recipe.kept_fraction
        if acc.is_main_process:
            print(json.dumps(summary))
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    return run_to_end(acc, run)


if __name__ == "__main__":
    main_entry(main)
