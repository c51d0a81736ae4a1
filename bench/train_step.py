"""Time one whole training step (forward + backward + ``step()`` + ``zero_grad()``) with RAMDA
against ``torch.optim.AdamW`` on real models, measured in the same run.

Models: (a) this repo's tiny Transformer-XL (``TransfoXLConfig.preset("tiny")``, segment memory
carried across steps, group lasso on every Linear weight except the tied embedding, as
``launch/train_lm.py``); (b) a tiny randomly initialised Llama built in memory from
``transformers.LlamaConfig`` (group lasso on FFN neurons ``mlp.down_proj`` and attention heads
``self_attn.o_proj``, as ``launch/finetune_llm.py``). Every optimizer gets its own copy of the same
initial weights and the same batches (random token ids). Steps are interleaved: in round ``i``
every optimizer does its step ``i`` (the order rotates each round), so drifts of the machine hit all
of them alike. After ``--warmup`` untimed rounds (state allocated, RAMDA's screening and PG
iteration counts settled) ``--steps`` rounds are timed; the table gives medians, the ratio of each
optimizer's median step to AdamW's, the time of ``opt.step()`` alone, and for the proximal
optimizers the PG iterations and active/screened groups of the timed steps
(``opt.last_stats``). The reference is ``AdamW(foreach=True)`` (as ``bench/optimizer_step.py``);
the default ``AdamW()`` is timed too (on CPU it is the per-tensor loop).

    python bench/train_step.py [--model both|txl|llama --steps 20 --warmup 5 --device cpu]

The last line printed is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ramda_ds.models.transformer_xl import TransfoXLConfig, TransfoXLLM
from ramda_ds.optim import RAMDA, ProxGen
from ramda_ds.param_groups import build_param_groups

REF = "AdamW(foreach)"
LLAMA_PRUNABLE = {"*.mlp.down_proj.weight": "input", "*.self_attn.o_proj.weight": "head:64"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- models
class TXL:
    """Tiny Transformer-XL; ``loss(model, batch, carry) -> (loss, carry)`` carries the memory."""

    name = "txl"

    def __init__(self, args):
        self.cfg = TransfoXLConfig.preset("tiny", args.vocab)
        self.seq = self.cfg.tgt_len
        self.lr = args.txl_lr

    def build(self):
        return TransfoXLLM(self.cfg)

    def describe(self):
        c = self.cfg
        return (f"Transformer-XL tiny: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, "
                f"d_inner {c.d_inner}, vocab {c.vocab_size}, tgt_len {c.tgt_len}, mem_len {c.mem_len}")

    def groups(self, model, lam, **kw):
        return build_param_groups(model, "group_lasso", lam=lam, exclude=["embed.*"], **kw)

    @staticmethod
    def loss(model, x, y, carry):
        logits, mems = model(x, carry)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), mems


class Llama:
    """Tiny random Llama (transformers), no download."""

    name = "llama"

    def __init__(self, args):
        from transformers import LlamaConfig

        self.cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.llama_hidden,
                               intermediate_size=args.llama_intermediate,
                               num_hidden_layers=args.llama_layers,
                               num_attention_heads=args.llama_heads,
                               num_key_value_heads=args.llama_heads,
                               max_position_embeddings=max(512, args.llama_seq))
        self.seq = args.llama_seq
        self.lr = args.llama_lr

    def build(self):
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(self.cfg)

    def describe(self):
        c = self.cfg
        return (f"Llama (random init): {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_attention_heads} heads, intermediate {c.intermediate_size}, "
                f"vocab {c.vocab_size}, seq {self.seq}")

    def groups(self, model, lam, **kw):
        return build_param_groups(model, "group_lasso", lam=lam, include=list(LLAMA_PRUNABLE),
                                  grouping=LLAMA_PRUNABLE, **kw)

    @staticmethod
    def loss(model, x, y, carry):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), None


# ----------------------------------------------------------------------------- optimizers
def optimizer_configs(spec, lam):
    """(name, factory(model) -> optimizer). RAMDA/MADGRAD at the model's lr, ProxGen at AdamW's."""
    lr = spec.lr
    return [
        (REF, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)),
        ("AdamW(default)", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
        ("MADGRAD (RAMDA λ=0)", lambda m: RAMDA(m.parameters(), lr=lr, c=0.1)),
        ("RAMDA+PG", lambda m: RAMDA(spec.groups(m, lam), lr=lr, c=0.1, solver="pg")),
        ("RAMDA+exact", lambda m: RAMDA(spec.groups(m, lam), lr=lr, c=0.1, solver="exact")),
        ("ProxGen+PG", lambda m: ProxGen(spec.groups(m, lam), lr=1e-3, solver="pg")),
        # backend="auto": the native C kernels on CPU, Triton on CUDA (README: Fast step)
        ("MADGRAD auto", lambda m: RAMDA(m.parameters(), lr=lr, c=0.1, backend="auto")),
        ("RAMDA+PG auto", lambda m: RAMDA(spec.groups(m, lam), lr=lr, c=0.1, solver="pg",
                                          backend="auto")),
        ("RAMDA+exact auto", lambda m: RAMDA(spec.groups(m, lam), lr=lr, c=0.1, solver="exact",
                                             backend="auto")),
    ]


class Runner:
    """One optimizer on its own copy of the model; ``step(i)`` does training step i."""

    def __init__(self, name, model, opt, spec, batches, device):
        self.name, self.model, self.opt, self.spec = name, model, opt, spec
        self.batches, self.device = batches, device
        self.carry = None
        self.total, self.opt_time, self.iters, self.active, self.screened = [], [], [], [], []
        self.losses, self.fwd_bwd, self.solve_time, self._spent = [], [], [], []
        if hasattr(opt, "_solve"):  # time the subproblem solver (one call per param group)
            inner = opt._solve

            def timed(*a, **k):
                sync(device)
                t = time.perf_counter()
                inner(*a, **k)
                sync(device)
                self._spent.append(time.perf_counter() - t)
            opt._solve = timed

    def step(self, i, timed):
        x, y = self.batches[i]
        sync(self.device)
        t0 = time.perf_counter()
        loss, self.carry = self.spec.loss(self.model, x, y, self.carry)
        loss.backward()
        sync(self.device)
        t1 = time.perf_counter()
        self._spent.clear()
        self.opt.step()
        sync(self.device)
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        t3 = time.perf_counter()
        self.losses.append(loss.item())
        if not timed:
            return
        self.total.append(t3 - t0)
        self.opt_time.append(t2 - t1)
        self.fwd_bwd.append(t1 - t0)
        if hasattr(self.opt, "_solve"):
            self.solve_time.append(sum(self._spent))
        stats = list(getattr(self.opt, "last_stats", {}).values())
        if stats:  # one entry per regularized tensor, overwritten every step
            self.iters.extend(s.iterations for s in stats)
            self.active.append(sum(s.active_groups for s in stats))
            self.screened.append(sum(s.screened_groups for s in stats))


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def bench_model(spec, args, device):
    torch.manual_seed(args.seed)
    base = spec.build().to(device).train()
    n_params = sum(p.numel() for p in base.parameters())
    n_reg = sum(p.numel() for g in spec.groups(base, args.lam) if g["regularizer"] for p in g["params"])
    rounds = args.warmup + args.steps
    gen = torch.Generator().manual_seed(args.seed + 1)
    # one token stream per row, cut into consecutive segments (Transformer-XL's memory follows it)
    stream = torch.randint(spec.cfg.vocab_size, (args.batch, rounds * spec.seq + 1), generator=gen)
    batches = [(stream[:, i * spec.seq:(i + 1) * spec.seq].to(device),
                stream[:, i * spec.seq + 1:(i + 1) * spec.seq + 1].to(device)) for i in range(rounds)]
    runners = []
    for name, make in optimizer_configs(spec, args.lam):
        if args.only and name not in args.only and name != REF:
            continue
        torch.manual_seed(args.seed)
        model = spec.build().to(device).train()
        model.load_state_dict(base.state_dict())
        runners.append(Runner(name, model, make(model), spec, batches, device))
    del base
    for i in range(rounds):
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            torch.manual_seed(args.seed + 1000 + i)  # same dropout masks for everyone
            r.step(i, timed=i >= args.warmup)

    print(f"\n== {spec.describe()}")
    print(f"   {n_params / 1e6:.2f}M parameters ({n_reg / 1e6:.2f}M group-lasso regularized, "
          f"λ={args.lam:g}), batch {args.batch}×{spec.seq} tokens, RAMDA/MADGRAD lr {spec.lr:g}, "
          f"AdamW/ProxGen lr 1e-3; {args.warmup} warm-up + {args.steps} timed interleaved steps, "
          f"median [IQR]")
    ref = next(r for r in runners if r.name == REF)
    ref_total, ref_opt = statistics.median(ref.total), statistics.median(ref.opt_time)
    hdr = (f"{'optimizer':20s} {'step ms':>8s} {'[IQR]':>13s} {'vs AdamW':>8s} {'fwd+bwd':>8s} "
           f"{'opt.step':>8s} {'vs AdamW':>8s} {'solve':>7s} {'PG iters mean/max':>17s} {'active/screened':>15s} "
           f"{'loss':>6s}")
    print(hdr)
    rows = {}
    for r in runners:
        tot, ost = statistics.median(r.total), statistics.median(r.opt_time)
        lo, hi = quartiles(r.total)
        fb = statistics.median(r.fwd_bwd)
        solve = f"{statistics.median(r.solve_time) * 1e3:7.1f}" if r.solve_time else f"{'-':>7s}"
        iters = (f"{statistics.mean(r.iters):.1f}/{max(r.iters)}" if r.iters else "-")
        groups = (f"{statistics.median(r.active):.0f}/{statistics.median(r.screened):.0f}"
                  if r.active else "-")
        print(f"{r.name:20s} {tot * 1e3:8.1f} [{lo * 1e3:5.1f},{hi * 1e3:6.1f}] {tot / ref_total:7.3f}x "
              f"{fb * 1e3:8.1f} {ost * 1e3:8.1f} {ost / ref_opt:7.2f}x {solve} {iters:>17s} {groups:>15s} "
              f"{r.losses[-1]:6.3f}")
        rows[r.name] = dict(step_ms=round(tot * 1e3, 2), ratio=round(tot / ref_total, 4),
                            opt_step_ms=round(ost * 1e3, 2), opt_ratio=round(ost / ref_opt, 3),
                            solve_ms=round(statistics.median(r.solve_time) * 1e3, 2) if r.solve_time else None,
                            pg_iters_mean=round(statistics.mean(r.iters), 2) if r.iters else None,
                            active_groups=round(statistics.median(r.active)) if r.active else None,
                            screened_groups=round(statistics.median(r.screened)) if r.active else None)
    for name in ("RAMDA+PG", "RAMDA+PG auto"):
        if name not in rows:
            continue
        # paired per-round ratio: robust to drifts that the interleaving spreads over all rows
        pg = next(r for r in runners if r.name == name)
        paired = statistics.median(a / b for a, b in zip(pg.total, ref.total))
        rows[name]["paired_ratio"] = round(paired, 4)
        verdict = "meets" if rows[name]["ratio"] <= 1.05 else "misses"
        print(f"{name} / AdamW(foreach) step: {rows[name]['ratio']:.3f} "
              f"(median of per-round ratios {paired:.3f}); target <= 1.05 ({verdict}), paper 1.11")
    return dict(params=n_params, regularized=n_reg, batch=args.batch, seq=spec.seq, rows=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("txl", "llama", "both"), default="both")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer first")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--llama-seq", type=int, default=128)
    ap.add_argument("--llama-hidden", type=int, default=256)
    ap.add_argument("--llama-intermediate", type=int, default=688)
    ap.add_argument("--llama-layers", type=int, default=4)
    ap.add_argument("--llama-heads", type=int, default=4)
    ap.add_argument("--lam", type=float, default=1e-5)
    ap.add_argument("--txl-lr", type=float, default=2e-2, help="RAMDA/MADGRAD lr (launch/train_lm.py)")
    ap.add_argument("--llama-lr", type=float, default=1e-2, help="RAMDA/MADGRAD lr")
    ap.add_argument("--only", nargs="*", default=None,
                    help="optimizer rows to run (AdamW(foreach) always runs), e.g. RAMDA+PG")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    print(f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads)")
    specs = {"txl": [TXL], "llama": [Llama], "both": [TXL, Llama]}[args.model]
    summary = {"device": str(device), "threads": torch.get_num_threads(), "steps": args.steps,
               "warmup": args.warmup}
    t0 = time.perf_counter()
    for cls in specs:
        spec = cls(args)
        summary[spec.name] = bench_model(spec, args, device)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
