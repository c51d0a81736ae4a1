"""The compression yardstick: name a size, compare the shipped models at equal fine-tune steps.

    python bench/compression.py                 # the full table (≈ 1 h on 2 busy cores)
    python bench/compression.py --quick         # a smoke run (one size, one seed, few steps)

1. A small Llama (hidden 128, 4 layers, FFN 512, 4 heads / 2 K/V heads, vocabulary 2048) is
   pretrained with AdamW on the docstrings of Python's standard library, once, and cached
   (``--cache``). Its tokenizer is a SentencePiece model trained on the same text.
2. Every method then fine-tunes that base on a *different* corpus, Python's pydoc topics (95% /
   5% train / validation), for the same number of optimizer steps, all stages counted, and the
   validation perplexity of the model it ships is measured (the masked model: every removed unit
   is exactly zero, which is what export removes).
3. Methods, at each FFN kept fraction (``--sizes``):
   * ``recipe``: RAMDA identifies the units with a size target, the support is frozen, the kept
     units recover with λ = 0 (ramda_ds.compress.recipe), with and without distillation;
   * ``weight`` / ``activation`` + recovery: units ranked by output-weight norm or by mean
     activation (Minitron), pruned at step 0, then recovered with AdamW (ProxGen at λ = 0 with the
     support held: AdamW on the kept units) for all the steps; with and without KD; at uniform
     widths and at the recipe's own per-layer allocation;
   * references: the base, and the dense fine-tune (AdamW, and RAMDA at λ = 0).
   Every method's lr is tuned over ``--lrs`` on seed 0 (the best by validation perplexity), then
   run at that lr on every seed; the table reports the mean over seeds (and each seed).
Output: ``OUT/results.json`` (every run), ``OUT/table.md`` and ``OUT/plot.png`` (perplexity
against kept parameters).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ramda_ds.compress.distill import distill_loss  # noqa: E402
from ramda_ds.compress.importance import (activation_scores, allocation_of, keep_top,  # noqa: E402
                                          weight_scores)
from ramda_ds.compress.recipe import TargetConfig, TargetRecipe, resolve_ramp  # noqa: E402
from ramda_ds.compress.support import freeze_support  # noqa: E402
from ramda_ds.hf.units import unit_param_groups, unit_patterns  # noqa: E402
from ramda_ds.optim import RAMDA, ProxGen  # noqa: E402
from ramda_ds.training import data  # noqa: E402

MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


# ---------------------------------------------------------------------------- corpora and base
def stdlib_docstrings() -> list[str]:
    """Docstrings of the standard library's modules, classes and functions (sorted, unique)."""
    import importlib
    import inspect
    import warnings

    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3",
            "ensurepip", "venv", "pydoc_data", "test", "__main__", "pydoc"}
    names = sorted(n for n in getattr(sys, "stdlib_module_names", ()) if n not in skip
                   and not n.startswith("_"))
    seen, out = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
            objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v)
                            or inspect.isfunction(v) or inspect.isbuiltin(v)]
            for cls in [o for o in objs if inspect.isclass(o)]:
                objs += [v for _, v in sorted(vars(cls).items()) if inspect.isfunction(v)]
            for o in objs:
                doc = inspect.getdoc(o) if not isinstance(o, type(sys)) else o.__doc__
                if doc and len(doc) > 80 and doc not in seen:
                    seen.add(doc)
                    out.append(doc.strip())
    return out


def corpora(cache: Path) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    base_train, base_valid = cache / "stdlib_train.txt", cache / "stdlib_valid.txt"
    if not base_train.exists():
        docs = stdlib_docstrings()
        cut = len(docs) * 19 // 20
        base_train.write_text("\n".join(docs[:cut]))
        base_valid.write_text("\n".join(docs[cut:]))
    ft_train, ft_valid = data.default_corpus(cache)
    return dict(base_train=base_train, base_valid=base_valid, ft_train=Path(ft_train),
                ft_valid=Path(ft_valid))


def encode(path: Path, sp_model: str) -> torch.Tensor:
    return data.encode(data.load_lines(str(path)), sp_model)


class Stream:
    """Contiguous rows of a token stream, cut into (input, target) segments, cycling."""

    def __init__(self, ids: torch.Tensor, batch: int, seq: int):
        self.rows, self.seq = data.lm_streams(ids, batch), seq

    def batches(self):
        while True:
            yield from data.segments(self.rows, self.seq)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int = 8, seq: int = 64) -> float:
    model.eval()
    tot, n = 0.0, 0
    for x, y in data.segments(data.lm_streams(ids, batch), seq):
        logits = model(input_ids=x).logits
        tot += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1), reduction="sum").item()
        n += y.numel()
    model.train()
    return math.exp(tot / n)


def pretrain_base(cache: Path, files, sp_model: str, steps: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = cache / f"base-{steps}"
    if (out / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    train, valid = encode(files["base_train"], sp_model), encode(files["base_valid"], sp_model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.05)
    it = Stream(train, 8, 64).batches()
    t0 = time.time()
    for step in range(1, steps + 1):
        x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.reshape(-1, 2048),
                                                 y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 500 == 0 or step == steps:
            print(f"  base step {step}: loss {loss.item():.3f}, valid ppl "
                  f"{perplexity(model, valid):.2f} ({time.time() - t0:.0f} s)", flush=True)
    model.save_pretrained(out)
    return model


# ---------------------------------------------------------------------------- one fine-tune
class Bench:
    def __init__(self, args):
        self.a = args
        cache = Path(args.cache)
        self.files = corpora(cache)
        self.sp = data.train_tokenizer(str(self.files["base_train"]), str(cache / "sp2048"), 2048)
        self.base = pretrain_base(cache, self.files, self.sp, args.base_steps)
        self.ft_train = encode(self.files["ft_train"], self.sp)
        self.ft_valid = encode(self.files["ft_valid"], self.sp)
        self.base_valid = encode(self.files["base_valid"], self.sp)
        self.rules = unit_patterns(self.base, "ffn")
        self.total_params = sum(p.numel() for p in self.base.parameters())
        calib = Stream(self.ft_train, args.batch, args.seq).batches()
        self.scores = dict(weight=weight_scores(self.base, self.rules),
                           activation=activation_scores(
                               self.base, self.rules, [next(calib)[0] for _ in range(16)]))
        self.teacher = copy.deepcopy(self.base).eval()
        self.results: list[dict] = []
        self.on_record = None
        self.allocations: dict[tuple, dict] = {}  # (size, seed) → the recipe's kept per tensor

    def load_allocations(self) -> None:
        """The recipe's per-layer allocations (its best lr on the first seed) from the
        results.json files of ``--allocations``, as far as they are written."""
        for f in self.a.allocations or ():
            if not Path(f).exists():
                continue
            runs = [r for r in json.loads(Path(f).read_text())["runs"] if r["method"] == "recipe"]
            for size, kd in {(r["size"], r["kd"]) for r in runs}:
                mine = [r for r in runs if (r["size"], r["kd"]) == (size, kd)]
                first = min(r["seed"] for r in mine)
                if len([r for r in mine if r["seed"] == first]) < len(self.a.ramda_lrs.split(",")):
                    continue  # its lr sweep is not finished
                lr = min((r for r in mine if r["seed"] == first), key=lambda r: r["ppl"])["lr"]
                for r in mine:
                    if r["lr"] == lr:
                        self.allocations[(size, kd, r["seed"])] = r["allocation"]

    def kept_params(self, kept: dict | None) -> int:
        if kept is None:
            return self.total_params
        h = MODEL["hidden_size"]
        return self.total_params - sum(3 * h * int((~m).sum()) for m in kept.values())

    def train(self, model, opt, seed: int, kd: bool, after_step=None) -> None:
        torch.manual_seed(seed)
        it = Stream(self.ft_train, self.a.batch, self.a.seq).batches()
        for _ in range(seed * 7):  # seeds also differ in data order (a rotated start)
            next(it)
        for step in range(1, self.a.steps + 1):
            x, y = next(it)
            logits = model(input_ids=x).logits
            if kd:
                with torch.no_grad():
                    t_logits = self.teacher(input_ids=x).logits
                loss = distill_loss(logits, t_logits, y, beta=self.a.kd_beta)
            else:
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            if after_step is not None:
                after_step(step)

    def record(self, **row) -> dict:
        self.results.append(row)
        print("  " + json.dumps(row), flush=True)
        if self.on_record is not None:
            self.on_record()  # results.json stays current (other processes read allocations)
        return row

    def run(self, method: str, lr: float, seed: int, size: float | None = None,
            kd: bool = False, alloc: str = "uniform") -> dict:
        t0 = time.time()
        model = copy.deepcopy(self.base).train()
        kept, extra = None, {}
        if method == "dense_adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            self.train(model, opt, seed, kd)
        elif method == "dense_ramda":
            R = self.a.restart_every
            opt = RAMDA(model.parameters(), lr=lr, c=self.a.c0, gamma=self.a.gamma,
                        milestones=tuple(range(R, self.a.steps, R)) if R else (),
                        final_stage_ramp=False)
            self.train(model, opt, seed, kd)
        elif method in ("weight", "activation"):
            allocation = None
            if alloc == "recipe":
                allocation = next((self.allocations[k] for k in ((size, kd, seed), (size, False, seed),
                                                                 (size, kd, 0), (size, False, 0))
                                   if k in self.allocations), None)
                for _ in range(60 if allocation is None and self.a.allocations else 0):
                    time.sleep(30)  # another process is still running the recipe: wait for it
                    self.load_allocations()
                    allocation = next((self.allocations[k] for k in (
                        (size, kd, seed), (size, False, seed), (size, kd, 0), (size, False, 0))
                        if k in self.allocations), None)
                    if allocation is not None:
                        break
                if allocation is None:
                    raise RuntimeError("the recipe's allocation is needed first")
            kept = keep_top(self.scores[method], size, allocation)
            groups = unit_param_groups(model, 1.0, "ffn", lr=lr)
            opt = ProxGen([dict(g, lam=0.0) for g in groups], lr=lr, weight_decay=0.0)
            freeze_support(opt, kept, restart=False)  # zero the pruned units, hold them at zero
            self.train(model, opt, seed, kd)
        elif method == "recipe":
            groups = unit_param_groups(model, 1.0, "ffn")
            for g in groups:
                if g.get("regularizer") == "group_lasso":
                    g["target"] = True
            opt = RAMDA(groups, lr=lr, c=self.a.c0, keep_structured=True)
            cfg = resolve_ramp(TargetConfig(target=size, ramp=int(self.a.ramp * self.a.steps),
                               stable=self.a.stable, max_identify=int(self.a.max_identify *
                                                                      self.a.steps),
                               recover_lr_scale=self.a.recover_lr_scale,
                               recover_restart_every=self.a.restart_every, steps=self.a.steps,
                               recover_with=self.a.recover_with), self.a.steps)
            cfg.check(self.a.steps)
            recipe = TargetRecipe(opt, cfg)
            self.train(model, opt, seed, kd, recipe.after_step)
            from ramda_ds.compress.support import kept_groups

            kept = kept_groups(opt)
            extra = dict(frozen_at=recipe.frozen_at, allocation=allocation_of(kept))
        else:
            raise ValueError(method)
        ppl = perplexity(model, self.ft_valid)
        alloc = "own" if method == "recipe" else alloc
        row = dict(method=method, size=size, kd=kd, alloc=alloc if kept is not None else None,
                   lr=lr, seed=seed, ppl=round(ppl, 3), kept_params=self.kept_params(kept),
                   ffn_kept=(sum(int(m.sum()) for m in kept.values()) /
                             sum(m.numel() for m in kept.values())) if kept else 1.0,
                   seconds=round(time.time() - t0, 1), **extra)
        if kept is not None:
            row["per_layer"] = [int(m.sum()) for m in kept.values()]
            _check_zero(model, kept)
        return self.record(**row)

    def tuned(self, method: str, lrs, seeds, **kw) -> list[dict]:
        """Runs at every lr on seed 0, then at the best lr on the other seeds."""
        first = [self.run(method, lr, seeds[0], **kw) for lr in lrs]
        best = min(first, key=lambda r: r["ppl"])
        rows = [best] + [self.run(method, best["lr"], s, **kw) for s in seeds[1:]]
        for r in rows if method == "recipe" else ():  # the baselines' "recipe" allocation
            self.allocations[(kw["size"], kw["kd"], r["seed"])] = r["allocation"]
        return rows


def kd_cost(b: Bench, a, steps: int = 20, rounds: int = 3) -> str:
    """What distillation adds to a training step: blocks of ``steps`` steps with and without the
    teacher, interleaved ``rounds`` times in this process (same batches), and the teacher's bytes."""
    import torch.nn.functional as F

    model = copy.deepcopy(b.base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [next(Stream(b.ft_train, a.batch, a.seq).batches()) for _ in range(1)] * steps
    times = {False: [], True: []}
    for _ in range(rounds):
        for kd in (False, True):
            t0 = time.perf_counter()
            for x, y in batches:
                logits = model(input_ids=x).logits
                if kd:
                    with torch.no_grad():
                        t = b.teacher(input_ids=x).logits
                    loss = distill_loss(logits, t, y, beta=a.kd_beta)
                else:
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad()
            times[kd].append((time.perf_counter() - t0) / steps)
    plain, kd = min(times[False]), min(times[True])
    teacher_bytes = sum(p.numel() * p.element_size() for p in b.teacher.parameters())
    return (f"distillation cost: step {plain * 1e3:.1f} ms → {kd * 1e3:.1f} ms ({kd / plain:.2f}×; "
            f"best of {rounds} interleaved blocks of {steps} steps, batch {a.batch}×{a.seq}); "
            f"teacher weights {teacher_bytes / 2**20:.1f} MiB per process when replicated "
            f"(1/N of that per rank when sharded under ZeRO-3/FSDP2), plus its activations for one "
            "micro-batch (no backward)")


def _check_zero(model, kept) -> None:
    """The shipped model really lacks the removed units: their down_proj columns are exactly 0."""
    params = dict(model.named_parameters())
    for name, m in kept.items():
        cols = params[name].detach()[:, ~m]
        if cols.numel() and cols.abs().max().item() != 0:
            raise AssertionError(f"{name}: a removed unit is not zero")


# ---------------------------------------------------------------------------- the table
def summarize(results: list[dict], base_ppl: float, out: Path) -> str:
    def key(r):
        return (r["method"], r["size"], r["kd"], r["alloc"])
    groups: dict = {}
    for r in results:
        groups.setdefault(key(r), {})[r["seed"]] = r  # the last run per seed (the tuned lr)
    rows = []
    for (method, size, kd, alloc), by_seed in groups.items():
        by_seed = _tuned_only(results, method, size, kd, alloc, by_seed)
        ppls = [r["ppl"] for r in by_seed.values()]
        any_r = next(iter(by_seed.values()))
        rows.append(dict(method=method, size=size, kd=kd, alloc=alloc, lr=any_r["lr"],
                         ppl=statistics.mean(ppls), seeds=ppls, kept_params=any_r["kept_params"],
                         ffn_kept=statistics.mean(r["ffn_kept"] for r in by_seed.values())))
    lines = [f"base (no fine-tune): validation perplexity on the fine-tune corpus {base_ppl:.2f}",
             "", "| FFN kept | method | KD | allocation | lr | ppl (mean) | per seed | params kept |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-(r["size"] or 1.1), r["ppl"])):
        lines.append(f"| {r['ffn_kept']:.3f} | {r['method']} | {'yes' if r['kd'] else 'no'} | "
                     f"{r['alloc'] or '—'} | {r['lr']:g} | {r['ppl']:.2f} | "
                     f"{', '.join(f'{p:.2f}' for p in r['seeds'])} | {r['kept_params']:,} |")
    lines += ["", "| FFN kept | recipe | best baseline (its settings) | recipe − best | "
              "recipe + KD | best baseline, KD allowed | recipe+KD − best |", "|---|---|---|---|---|---|---|"]
    for size in sorted({r["size"] for r in rows if r["size"]}, reverse=True):
        at = [r for r in rows if r["size"] == size]

        def best(pred):
            c = [r for r in at if pred(r)]
            return min(c, key=lambda r: r["ppl"]) if c else None
        rec, rec_kd = best(lambda r: r["method"] == "recipe" and not r["kd"]), \
            best(lambda r: r["method"] == "recipe" and r["kd"])
        bl, bl_kd = best(lambda r: r["method"] != "recipe" and not r["kd"]), \
            best(lambda r: r["method"] != "recipe")
        if rec and bl and rec_kd and bl_kd:
            lines.append(
                f"| {size:g} | {rec['ppl']:.2f} | {bl['ppl']:.2f} ({bl['method']}, {bl['alloc']}) | "
                f"{rec['ppl'] - bl['ppl']:+.2f} | {rec_kd['ppl']:.2f} | {bl_kd['ppl']:.2f} "
                f"({bl_kd['method']}{' +KD' if bl_kd['kd'] else ''}, {bl_kd['alloc']}) | "
                f"{min(rec['ppl'], rec_kd['ppl']) - bl_kd['ppl']:+.2f} |")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    _plot(rows, base_ppl, out / "plot.png")
    return text


def _tuned_only(results, method, size, kd, alloc, by_seed):
    """Per seed, the run at the lr chosen on seed 0 (seed 0's lr sweep holds the others too)."""
    firsts = [r for r in results if (r["method"], r["size"], r["kd"], r["alloc"]) ==
              (method, size, kd, alloc) and r["seed"] == min(by_seed)]
    lr = min(firsts, key=lambda r: r["ppl"])["lr"]
    return {s: next(r for r in reversed(results) if (r["method"], r["size"], r["kd"], r["alloc"],
                                                      r["seed"], r["lr"]) ==
                    (method, size, kd, alloc, s, lr)) for s in by_seed}


def _plot(rows, base_ppl, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict = {}
    for r in rows:
        label = r["method"] + (" +KD" if r["kd"] else "") + \
            (f" ({r['alloc']} widths)" if r["alloc"] and r["method"] != "recipe" else "")
        series.setdefault(label, []).append((r["kept_params"], r["ppl"]))
    colors = plt.get_cmap("tab10")
    for i, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ax.plot([p for p, _ in pts], [q for _, q in pts], marker="o", color=colors(i % 10),
                ls="--" if "+KD" in label else "-", lw=2.5 if label.startswith("recipe") else 1.2,
                label=label)
    ax.set_xlabel("parameters kept (of the model's 1.51M)")
    ax.set_ylabel("validation perplexity, fine-tune corpus (mean of seeds)")
    ax.set_title(f"Compression bench: small Llama, stdlib docstrings → pydoc topics\n"
                 f"(base before fine-tuning: {base_ppl:.1f}; lower is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one size, one seed, 60 steps")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "ramda_ds" / "bench_compression"))
    p.add_argument("--out", default="runs/bench_compression")
    p.add_argument("--base_steps", type=int, default=2500)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--sizes", default="0.7,0.5,0.3")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lrs", default="5e-4,1e-3,2e-3", help="AdamW lrs (baselines, dense)")
    p.add_argument("--ramda_lrs", default="5e-4,1e-3,2e-3",
                   help="lrs of the recipe (its RAMDA and recovery stages alike) and dense RAMDA")
    p.add_argument("--c0", type=float, default=0.1)
    p.add_argument("--restart_every", type=int, default=50,
                   help="RAMDA restarts every N steps (dense; the recipe's recovery with ramda)")
    p.add_argument("--gamma", type=float, default=1.0, help="lr decay at RAMDA's restarts")
    p.add_argument("--ramp", type=float, default=0.1, help="identification ramp, fraction of steps")
    p.add_argument("--stable", type=int, default=0, help="0: 3%% of the steps")
    p.add_argument("--max_identify", type=float, default=0.2, help="fraction of steps")
    p.add_argument("--recover_lr_scale", type=float, default=1.0)
    p.add_argument("--kd_beta", type=float, default=0.5, help="weight of KL in the KD loss")
    p.add_argument("--base_only", action="store_true", help="build (or load) the base and stop")
    p.add_argument("--only", default="", help="comma-separated methods to run (default: all)")
    p.add_argument("--allocations", nargs="+", default=None,
                   help="results.json of recipe runs whose per-layer allocations the baselines use")
    p.add_argument("--recover_with", default="adamw", help="the recipe's recovery: adamw | ramda")
    p.add_argument("--kd_cost", action="store_true", help="only time a step with and without KD")
    p.add_argument("--merge", nargs="+", default=None,
                   help="only summarize: the results.json of earlier runs (e.g. one per size, run "
                        "in parallel) into OUT/table.md and OUT/plot.png")
    a = p.parse_args(argv)
    if a.merge:
        runs = [json.loads(Path(f).read_text()) for f in a.merge]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        results = [r for run in runs for r in run["runs"]]
        (out / "results.json").write_text(json.dumps(dict(merged=a.merge, runs=results,
                                                          base_ppl=runs[0]["base_ppl"]), indent=1))
        print(summarize(results, runs[0]["base_ppl"], out))
        return
    if a.base_only:
        a.only = "none"
    if a.quick:
        a.sizes, a.seeds, a.steps, a.lrs, a.ramda_lrs = "0.5", "0", 60, "1e-3", "1e-3"
        a.base_steps = min(a.base_steps, 300)
    torch.set_num_threads(1)  # the figures are perplexities; one thread per process is fastest here
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    b = Bench(a)
    b.load_allocations()
    base_ppl = perplexity(b.base, b.ft_valid)
    print(f"base: {b.total_params:,} parameters, validation perplexity on the fine-tune corpus "
          f"{base_ppl:.2f} (on its own held-out text {perplexity(b.base, b.base_valid):.2f})",
          flush=True)
    if a.base_only:
        return
    if a.kd_cost:
        print(kd_cost(b, a))
        return
    sizes = [float(s) for s in a.sizes.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    lrs = [float(x) for x in a.lrs.split(",")]
    rlrs = [float(x) for x in a.ramda_lrs.split(",")]
    only = set(a.only.split(",")) if a.only else None

    def want(m):
        return only is None or m in only
    if want("dense") or want("dense_adamw"):
        b.tuned("dense_adamw", lrs, seeds)
    if want("dense") or want("dense_ramda"):
        b.tuned("dense_ramda", rlrs, seeds)
    def save():
        (out / "results.json").write_text(json.dumps(dict(args=vars(a), base_ppl=base_ppl,
                                                          runs=b.results), indent=1))
    save()
    b.on_record = save
    for size in sizes:
        for kd in (False, True):
            if want("recipe"):
                b.tuned("recipe", rlrs, seeds, size=size, kd=kd)
            for crit in ("weight", "activation"):
                if want(crit):
                    best = b.tuned(crit, lrs, seeds, size=size, kd=kd, alloc="uniform")[0]["lr"]
                    if b.allocations or a.allocations:  # at RAMDA's widths, at the tuned lr
                        b.tuned(crit, [best], seeds, size=size, kd=kd, alloc="recipe")
        save()
    print(summarize(b.results, base_ppl, out))


if __name__ == "__main__":
    main()
