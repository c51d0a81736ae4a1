"""The training loop shared by the launch scripts: accumulation, clipping, evaluation, metrics,
checkpoints every N steps and on SIGTERM, exact resume (also at another world size).

A *task* supplies what depends on the model family (see :class:`Task`); the loop owns the rest.
Positions are counted in micro-batches consumed per rank, so a resumed run reads exactly the
batches the uninterrupted run would have read (position = step × grad_accum, checked on resume).

Divergence stops the run with exit code 3 and nothing of the diverged state saved: a non-finite
gradient (the optimizer's FloatingPointError), a mean training loss that is not finite or whose
perplexity exp(loss) overflows (loss > 709.78 nats), a non-finite evaluation value (e.g.
validation perplexity inf), or a run that is failing while its numbers are still finite
(:class:`DivergenceWatch`: the mean loss of a window of steps above ``diverge_factor`` × the first
step's loss, or rising window after window for a long stretch). A training loss or gradient of
step k measures the state after step k − 1: a checkpoint of step k − 1 is therefore moved to
``checkpoints/diverged/`` and ``latest`` points at the newest earlier one; all other checkpoints
stay. The stop writes a ``"diverged": true`` row to metrics.jsonl and ``summary.json``.

SIGINT (Ctrl-C) is handled like SIGTERM: checkpoint at the next step boundary, one line, exit 130
(a second Ctrl-C interrupts at once).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ..checkpoint import CheckpointError
from .world import world_sum_
from .run_checkpoint import KEEP_LAST, RunCheckpointer, restore_rng, rng_state
from .run_logger import RunLogger

PREEMPTED_EXIT = 143  # 128 + SIGTERM: schedulers and torchrun --max-restarts treat it as a failure
INTERRUPTED_EXIT = 130  # 128 + SIGINT (Ctrl-C), after its checkpoint
STOPPED_EXITS = (PREEMPTED_EXIT, INTERRUPTED_EXIT)  # every rank stops together, checkpoint saved
DIVERGED_EXIT = 3  # a restart with the same settings would diverge again
LOG_MAX = math.log(sys.float_info.max)  # exp(loss) overflows beyond this (709.78)


@dataclass
class LoopConfig:
    steps: int
    output_dir: str
    grad_accum: int = 1
    grad_clip: float = 0.0
    eval_every: int = 100
    save_every: int = 0  # 0: only at the end and on SIGTERM
    keep_last: int = KEEP_LAST
    resume: str = ""  # "", "auto" (latest under output_dir/checkpoints) or a checkpoint directory
    allow_hparam_change: bool = False  # resume although λ / regularizer / grouping changed
    structured: bool = False  # also evaluate RAMDA's Ŵ (keep_structured=True): the headline model
    diverge_factor: float = 2.0  # DivergenceWatch; 0: only non-finite numbers stop the run


class Task(Protocol):
    def batches(self, position: int) -> Iterator: ...  # micro-batches from ``position`` on
    def loss(self, model, batch) -> torch.Tensor: ...
    def evaluate(self, model) -> dict: ...  # every rank calls it
    def meta(self) -> dict: ...  # what a resumed run must agree on (e.g. global batch size)
    def carry(self) -> dict: ...  # this rank's tensors to checkpoint (e.g. Transformer-XL memory)
    def restore(self, saved: list[dict], position: int) -> None: ...  # every saved rank's tensors


class Preemption:
    """SIGTERM or SIGINT (Ctrl-C) sets a flag; ranks agree on it at the next step boundary
    (:func:`step_boundary`), save and stop. A second SIGINT interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.flag = 0.0  # 0, or the signal number that asked to stop
        self._old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
        self.flag = float(signum)
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            print("\nCtrl-C: saving a checkpoint at the end of this step (Ctrl-C again to stop "
                  "without it)", file=sys.stderr, flush=True)

    def close(self):
        for s, old in self._old.items():
            signal.signal(s, old)


def step_boundary(acc, preempt, losses) -> tuple[int, float]:
    """(the stop signal of any rank or 0, mean training loss of the step over all ranks): one
    all-reduce (SIGTERM wins when ranks got different signals)."""
    flag = preempt.flag if preempt else 0.0
    t = torch.stack([torch.tensor(flag, device=acc.device), torch.stack(losses).mean().float()])
    t = world_sum_(torch.stack([t[0], (t[0] == signal.SIGTERM).float(), t[1]]))
    sig = 0 if t[0].item() == 0 else int(signal.SIGTERM) if t[1].item() > 0 else int(signal.SIGINT)
    return sig, t[2].item() / acc.num_processes


class DivergenceWatch:
    """A run that fails while its numbers are still finite (e.g. too large an lr): the training
    loss is averaged over windows of ``window`` steps; the run is failing when a window's mean is
    above ``factor`` × the loss of its first step (a model much worse than the one it started
    from), or when ``rising`` window means in a row each rose and the last is 10% above the best
    window (a loss that climbs for rising × window steps). ``factor = 0`` switches it off. The
    state goes into checkpoints, so a resumed run watches exactly as the uninterrupted one."""

    def __init__(self, factor: float, window: int = 10, rising: int = 5, state: dict | None = None):
        self.factor, self.window, self.rising = factor, window, rising
        s = state or {}
        self.first, self.best = s.get("first"), s.get("best")
        self.means, self.sum, self.n = list(s.get("means", [])), s.get("sum", 0.0), s.get("n", 0)

    def state(self) -> dict:
        return dict(first=self.first, best=self.best, means=self.means, sum=self.sum, n=self.n)

    def update(self, step: int, loss: float, rise_expected: bool = False) -> str | None:
        """The reason the run is failing after ``step``'s mean training ``loss``, or None.
        ``rise_expected``: the loss is meant to rise now (a size target removing units), so only
        the far-above-start rule applies, and a rising stretch counts from when it ends."""
        if not self.factor:
            return None
        if self.first is None:
            self.first = loss
        self.sum, self.n = self.sum + loss, self.n + 1
        if self.n < self.window:
            return None
        m, self.sum, self.n = self.sum / self.n, 0.0, 0
        self.best = m if self.best is None else min(self.best, m)
        self.means = (self.means + [m])[-(self.rising + 1):]
        w = self.window
        if self.first > 0 and m > self.factor * self.first:
            return (f"the mean training loss of steps {step - w + 1}-{step}, {m:.4g}, is more than "
                    f"{self.factor:g}× the first step's {self.first:.4g}")
        if rise_expected:
            self.means, self.best = [m], m
            return None
        ms = self.means
        if len(ms) > self.rising and all(b > a for a, b in zip(ms, ms[1:])) and \
                m > 1.1 * self.best > 0:
            return (f"the training loss rose for {self.rising * w} steps in a row (mean of "
                    f"{w} steps: {ms[0]:.4g} → {m:.4g} at step {step}; best {self.best:.4g})")
        return None


def fmt(value) -> str:
    """A number for a progress line: 2 decimals while short, 4 significant digits when huge."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    return f"{value:.2f}" if math.isfinite(value) and abs(value) < 1e5 else f"{value:.4g}"


def slowdown(pace: dict, tokens: int, train_time: float, ratio: float = 5.0) -> float:
    """Updates ``pace`` with the throughput since the last evaluation; returns how many times
    slower it is than the best interval so far when that is ≥ ``ratio`` (once per run), else 0."""
    dt = train_time - pace["time"]
    rate = (tokens - pace["tokens"]) / dt if dt > 0 else 0.0
    pace.update(tokens=tokens, time=train_time, rate=rate)
    if rate <= 0:
        return 0.0
    pace["best"] = max(pace["best"], rate)
    if pace["noted"] or pace["best"] < ratio * rate:
        return 0.0
    pace["noted"] = True
    return pace["best"] / rate


def solver_cap(opt) -> int:
    """The subproblem solver's iteration cap of the optimizer (0: it has no solver)."""
    if opt is None:
        return 0
    return max((g.get("max_iters", 0) for g in opt.param_groups), default=0)


def diverged(value: float) -> bool:
    """A loss that is not finite, or whose perplexity exp(loss) overflows."""
    return not math.isfinite(value) or value > LOG_MAX


def unwrap(opt):
    """The ramda_ds optimizer inside accelerate / DeepSpeed wrappers, or None (e.g. AdamW)."""
    from ..optim.base import find_structured

    return find_structured(opt)


def structure_metrics(opt, structured: bool) -> dict:
    """Weighted group sparsity and per-tensor group sparsity of W (``*_W``) and, with
    ``structured``, of Ŵ (``*_structured``); the last solves' statistics."""
    from ..metrics import tensor_sparsity, wgs_of

    if opt is None:
        return {}
    out = {}
    for label, of_hat in (("structured", True), ("W", False)) if structured else (("W", False),):
        rows = tensor_sparsity(opt, of_hat)  # one collective when sharded
        out[f"wgs_{label}"] = wgs_of(rows)
        out[f"layer_sparsity_{label}"] = {r.name: round(r.sparsity, 4) for r in rows}
    stats = list(opt.last_stats.values())
    if stats:
        out.update(solver_iters_mean=sum(s.iterations for s in stats) / len(stats),
                   solver_iters_max=max(s.iterations for s in stats),
                   screened_frac=sum(s.screened_groups for s in stats) /
                   max(1, sum(s.active_groups + s.screened_groups for s in stats)))
    return out


def evaluate(model, opt, task: Task, structured: bool) -> dict:
    """``task.evaluate`` of the weights W (keys ``*_W``) and, with ``structured``, of the
    structured model Ŵ that export ships (keys ``*_structured``; W restored bitwise after), plus
    ``W_is_structured``: whether W == Ŵ exactly (true once c reached 1 in the final stage)."""
    from .structured import structured_weights, weights_are_structured

    w = task.evaluate(model)
    out = {f"{k}_W": v for k, v in w.items()}
    if structured:
        same = weights_are_structured(opt)
        if same:  # c reached 1: Ŵ is W, evaluated already
            hat = w
        else:
            with structured_weights(opt):
                hat = task.evaluate(model)
        out = {**{f"{k}_structured": v for k, v in hat.items()}, **out, "W_is_structured": same}
    return out


def headline(row: dict) -> tuple[str, str]:
    """(label of the model whose numbers lead, key suffix): Ŵ when it was evaluated, else W."""
    if "valid_ppl_structured" in row:
        return "structured model Ŵ (what export ships)", "structured"
    return "weights W", "W"


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def _resume(acc, ramda, task: Task, cfg: LoopConfig, ckpt: RunCheckpointer):
    """Load ``cfg.resume`` (checked on every rank before anything changes) into the optimizer,
    the task and the RNG; returns (step, position, loaded or None, checkpoints set aside)."""
    try:
        path = ckpt.resolve(cfg.resume)
        if path is None:  # --resume auto, nothing saved yet: a fresh start
            return 0, 0, None, []
        loaded = ckpt.load(path, ramda, cfg.allow_hparam_change)
        mine = dict(task.meta(), grad_accum=cfg.grad_accum)
        saved = {k: loaded.meta.get(k) for k in mine}
        if mine != saved:
            raise CheckpointError(f"this run's {mine} != the checkpoint's {saved}")
        position = loaded.meta.get("position")
        if position != loaded.step * cfg.grad_accum:  # micro-batches per rank
            raise CheckpointError(f"the manifest's data position {position!r} is not step "
                                  f"{loaded.step} × grad_accum {cfg.grad_accum}: it is wrong")
    except CheckpointError as e:
        raise SystemExit(f"cannot resume from {cfg.resume}: {e}") from None
    loaded.apply()
    step, position = loaded.step, loaded.meta["position"]
    task.restore(loaded.trainer, position)
    if loaded.world_size == acc.num_processes:
        restore_rng(loaded.trainer[acc.process_index])
    else:  # no per-rank stream to continue: a fresh, rank- and step-dependent one
        torch.manual_seed(1_000_003 * step + acc.process_index)
    return step, position, loaded, ckpt.set_aside_after(step)


def train(acc, model, opt, task: Task, cfg: LoopConfig, setup: dict, hooks=None) -> list[dict]:
    """Run to ``cfg.steps`` optimizer steps (or until SIGTERM); returns the logged rows.

    ``hooks`` (:class:`ramda_ds.compress.run.CompressionHooks`): ``on_start`` once the start
    step is known (with its saved state on a resume), ``after_step`` after every optimizer step
    (its fields go into the evaluation rows; the support freeze is logged and marked on the
    plots), ``state_dict`` into every checkpoint's metadata."""
    ramda = unwrap(opt)
    ckpt = RunCheckpointer(checkpoint_root(cfg.output_dir), cfg.keep_last) if ramda else None
    if cfg.resume and ckpt is None:
        raise SystemExit("resuming needs a ramda_ds optimizer (the AdamW baseline keeps no "
                         "checkpoints)")
    if acc.gradient_accumulation_steps != cfg.grad_accum:
        raise SystemExit(f"accelerate accumulates {acc.gradient_accumulation_steps} micro-batches "
                         f"(from its config or environment), --grad_accum says {cfg.grad_accum}")
    if ckpt and not cfg.resume and ckpt.has_checkpoints():
        raise SystemExit(f"{ckpt.root} holds checkpoints of an earlier run: pass --resume auto "
                         "to continue it, or choose another --output_dir")
    step, position, loaded, moved = _resume(acc, ramda, task, cfg, ckpt) if cfg.resume else \
        (0, 0, None, [])
    log = RunLogger(cfg.output_dir, cfg.steps, acc.is_main_process, start_step=step)
    if step:
        log.resume(step)
        log.message(f"resumed from {loaded.path} at step {step} ({loaded.world_size} → "
                    f"{acc.num_processes} processes)")
        if moved:
            log.message(f"checkpoints after step {step} moved to {ckpt.root / 'abandoned'}: {moved}")
    elif cfg.resume == "auto":
        log.message(f"--resume auto: no checkpoint in {ckpt.root}: starting fresh")
    changes = loaded.changes if loaded else []
    for c in changes:
        log.message(f"--allow_hparam_change: {c['setting']} {c['checkpoint']!r} → {c['now']!r} "
                    f"on {c['tensors']} tensors (e.g. {c['first']}) from step {step} on")
    log.setup(dict(setup, event="resume" if step else "setup", step_start=step,
                   **(dict(hparam_changes=changes) if changes else {})))
    if hooks is not None:
        hooks.on_start(loaded.meta.get("compress") if loaded else None, step, log.message)
    preempt = Preemption() if ckpt else None
    recipe_row: dict = {}
    rows, tokens, train_time, start = [], 0, 0.0, step
    batches = task.batches(position)
    watch = DivergenceWatch(cfg.diverge_factor, state=loaded.meta.get("watch") if loaded else None)
    capped = []  # evaluations at which the subproblem solver hit its iteration cap
    pace = dict(tokens=0, time=0.0, best=0.0, noted=False)  # throughput between evaluations

    def stop_diverged(at: int, why: str, row: dict, before: bool):
        """Log the row, set aside a checkpoint of the diverged state, say what is kept, exit.
        ``before``: ``why`` was measured on the state of step ``at - 1`` (a training loss or
        gradient of step ``at``), which may have been saved. Every rank gets here together."""
        rows.append(dict(row, step=at, diverged=True, reason=why))
        log.log(rows[-1])
        if acc.is_main_process:  # the run's summary says it failed (export refuses such a run)
            (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(
                dict(diverged=True, step=at, reason=why, loss=row.get("loss")), indent=1))
        # ``before``: the checkpoint of step at - 1, if any, holds the diverged state
        moved, latest = ckpt.discard(at - 1 if before else at) if ckpt else (False, None)
        log.close()  # the bar ends its line before the message
        if acc.is_main_process:
            print(f"step {at}: the run diverged: {why}. Stopped without saving this state" +
                  (f"; the checkpoint of step {at - 1}, which holds the state that diverged, was "
                   f"moved to {ckpt.root / 'diverged'}" if moved else "") +
                  (f"; {ckpt.root / 'latest'} names {latest}: resume from it with a lower --lr "
                   "or a stronger --grad_clip" if latest else "; no good checkpoint is kept") +
                  ".", file=sys.stderr, flush=True)
        raise SystemExit(DIVERGED_EXIT)

    try:
        while step < cfg.steps:
            losses, t0 = [], time.perf_counter()
            try:
                for _ in range(cfg.grad_accum):
                    batch = next(batches)
                    position += 1
                    with acc.accumulate(model):
                        loss = task.loss(model, batch)
                        acc.backward(loss)
                        if acc.sync_gradients:
                            if cfg.grad_clip > 0:
                                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                            opt.step()
                            opt.zero_grad()
                    losses.append(loss.detach())
                    tokens += batch[1].numel() * acc.num_processes
            except FloatingPointError as e:  # raised on every rank (the optimizer agrees on it)
                stop_diverged(step + 1, str(e).rstrip("."), dict(error="non-finite gradient"), True)
            step += 1
            if hooks is not None:
                recipe_row = hooks.after_step(step)
                if recipe_row.get("stage") == "freeze":
                    log.log(dict(step=step, support_frozen_at=step, **recipe_row))
                    log.message(f"step {step}: support frozen at {recipe_row['kept_fraction']:.4f}"
                                " kept; the kept units now recover without shrinkage (λ = 0)")
            train_time += time.perf_counter() - t0
            log.advance()
            # SIGTERM: save right away (the launcher kills after TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
            stop, mean_loss = step_boundary(acc, preempt, losses)
            if diverged(mean_loss):
                stop_diverged(step, f"mean training loss {mean_loss:g}", dict(loss=mean_loss), True)
            failing = watch.update(step, mean_loss, rise_expected=recipe_row.get("stage") in (
                "identify", "freeze"))
            if failing:
                stop_diverged(step, failing, dict(loss=mean_loss), True)
            if not stop and (step % cfg.eval_every == 0 or step == cfg.steps):
                structured = cfg.structured and ramda is not None
                row = dict(step=step, loss=mean_loss, **recipe_row,
                           **evaluate(model, ramda, task, structured),
                           **structure_metrics(ramda, structured),
                           tokens_per_s=round(tokens / train_time, 1))
                bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
                if bad:
                    stop_diverged(step, ", ".join(f"{k} {row[k]}" for k in bad), row, False)
                rows.append(row)
                log.log(row)
                log.message(f"step {step}: loss {row['loss']:.3f}" + "".join(
                    f", {name} {fmt(row[k]) if d == 2 else f'{row[k]:.3f}'}" for k, name, d in (
                        ("valid_ppl_structured", "ppl(Ŵ)", 2), ("wgs_structured", "wgs(Ŵ)", 3),
                        ("valid_ppl_W", "ppl(W)", 2), ("wgs_W", "wgs(W)", 3)) if k in row))
                slower = slowdown(pace, tokens, train_time)
                if slower:
                    log.message(f"note: training runs {slower:.0f}× slower than earlier in this run "
                                f"({pace['best']:.0f} → {pace['rate']:.0f} tokens/s). Other work on "
                                "the machine does this; so do subnormal (denormal) floats on CPU "
                                "in a model whose weights blow up (measured: train_lm.py --lr 10 "
                                "--diverge_factor 0 ran 11× slower from step 150; "
                                "torch.set_flush_denormal(True) removed it, same numbers)")
                cap = solver_cap(ramda)
                if cap and row.get("solver_iters_max", 0) >= cap:
                    if not capped:
                        log.message(f"note: the subproblem solver ran into its iteration cap "
                                    f"({cap}) at step {step}: each step now costs up to {cap} "
                                    "solver iterations, which slows training down. A too large "
                                    "--lr (or --lam) does this; a run whose loss also climbs is "
                                    "diverging")
                    capped.append(step)
            if ckpt and (stop or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)):
                meta = dict(task.meta(), grad_accum=cfg.grad_accum, position=position,
                            watch=watch.state())
                if hooks is not None:
                    meta["compress"] = hooks.state_dict()
                try:
                    where = ckpt.save(step, ramda, meta, {**rng_state(), **task.carry()})
                except CheckpointError as e:
                    # said now, before the cleanup below: a rank that exits first makes torchrun
                    # stop the others, which must not lose their message (every rank says it)
                    print(f"saving the checkpoint of step {step} failed; the previous checkpoint "
                          f"and {ckpt.root / 'latest'} are intact: {e}", file=sys.stderr, flush=True)
                    raise SystemExit(1) from None
                if stop:
                    name = "SIGTERM" if stop == signal.SIGTERM else "SIGINT (Ctrl-C)"
                    log.message(f"{name}: saved {where} at step {step}; resume with --resume auto")
                    raise SystemExit(PREEMPTED_EXIT if stop == signal.SIGTERM else
                                     INTERRUPTED_EXIT)
    finally:
        if preempt:
            preempt.close()
        try:
            log.close()
        except OSError as e:  # e.g. the disk is full: keep the error that stopped the run
            print(f"warning: could not finish metrics/plot in {cfg.output_dir}: {e}",
                  file=sys.stderr, flush=True)
    if rows and acc.is_main_process:
        print(final_report(rows[-1], ramda, f"{train_time:.0f} s of training for {step - start} "
                           "steps"), flush=True)
    return rows


def final_report(last: dict, opt, timing: str) -> str:
    """The run's last line(s): which model the headline numbers belong to, both models when Ŵ was
    evaluated, and how to make W exactly sparse when it is not."""
    label, key = headline(last)
    text = (f"step {last['step']}: {label}: validation perplexity "
            f"{fmt(last.get(f'valid_ppl_{key}', math.nan))}, weighted group sparsity "
            f"{last.get(f'wgs_{key}', 0.0):.3f}")
    if key == "structured" and last.get("W_is_structured"):
        text += "; the weights W are exactly Ŵ (c reached 1)"
    elif key == "structured":
        text += (f"; weights W: validation perplexity {fmt(last.get('valid_ppl_W', math.nan))}, "
                 f"weighted group sparsity {last.get('wgs_W', 0.0):.3f}")
    text += f" ({timing})"
    if key == "structured" and not last.get("W_is_structured"):
        g = opt.param_groups[0] if opt is not None else {}
        c0, ms = g.get("momentum", 0.1), g.get("milestones", ())
        need = math.ceil(1 / c0 ** 2 - 1e-9)
        text += ("\nW ≠ Ŵ: the weights W are an average (W ← (1−c)·W + c·Ŵ) that is exactly "
                 "sparse only once c = 1; export Ŵ (the headline numbers are Ŵ's). To make W "
                 f"exactly Ŵ, end the run ≥ {need} steps after the last milestone (this run: "
                 f"{list(ms) if ms else 'no milestones, so c stays c0'}): in the final stage "
                 f"c = min(c0·√i, 1) reaches 1 at i = ⌈1/c0²⌉ = {need} (c0 = {c0}).")
    return text
