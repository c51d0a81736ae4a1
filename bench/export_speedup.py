"""What the export buys: speed of the exported model and quality against the usual alternative.

Quality (tiny Llama with GQA, trained here from the same initial weights on the bundled Python
docs, SentencePiece vocabulary): (a) RAMDA with group lasso on FFN neurons and attention heads,
exported (structured point Ŵ, removable units dropped); (b) AdamW for the same steps, then the
same number of FFN units and query heads per layer removed by smallest group norm (what a user
would otherwise do; a K/V head goes when all its query heads go) and exported the same way; (c)
AdamW dense, for reference. Validation perplexity (token-weighted, whole validation stream) of
each *exported* model and its parameter count.

Speed: the dense vs the exported model's forward pass on CPU (GPU too with --device cuda),
latency at batch 1 and throughput (tokens/s) at batch 8, interleaved, medians; measured on the
quality model and on a wider random Llama pruned to the same per-layer kept fractions (the tiny
model's time is mostly per-op overhead).

    python bench/export_speedup.py [--steps 150 --lam 3e-4 --hidden 64 --device cpu]

The last line printed is a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ramda_ds.training import data
from ramda_ds.export import export_weights
from ramda_ds.optim import RAMDA
from ramda_ds.param_groups import build_param_groups


def llama(hidden, layers, inter, heads, kv, vocab, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv, head_dim=hidden // heads,
                                        max_position_embeddings=512, tie_word_embeddings=False))


def batches(ids, batch, seq, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq + 1] for s in starts])


def train(model, opt, ids, a):
    model.train()
    for xy in batches(ids, a.batch, a.seq, a.steps, seed=1):
        loss = model(input_ids=xy[:, :-1], labels=xy[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def perplexity(model, ids, seq):
    """exp of the token-weighted mean next-token loss over the whole validation stream."""
    model.eval()
    total, n = 0.0, 0
    chunks = ids[: (len(ids) - 1) // seq * seq + 1]
    for s in range(0, len(chunks) - 1, seq * 8):
        x = torch.stack([chunks[t:t + seq] for t in range(s, min(s + seq * 8, len(chunks) - seq), seq)])
        y = torch.stack([chunks[t + 1:t + seq + 1] for t in range(s, min(s + seq * 8, len(chunks) - seq), seq)])
        logits = model(input_ids=x).logits
        total += F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="sum").item()
        n += y.numel()
    return math.exp(total / n)


def export(model, out, tensors=None):
    from transformers import AutoModelForCausalLM

    tensors = tensors or {n: p.detach() for n, p in model.named_parameters()}
    r = export_weights(tensors, out, config=model.config, verbose=False)
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval(), r


def smallest_norm_masked(model, counts):
    """AdamW's weights with, per layer, the same number of FFN units and query heads as RAMDA
    removed, chosen by smallest group norm (down_proj column, o_proj head block)."""
    t = {n: p.detach().clone() for n, p in model.named_parameters()}
    hd = model.config.head_dim
    for i, (n_ffn, n_heads) in enumerate(counts):
        down = t[f"model.layers.{i}.mlp.down_proj.weight"]
        down[:, down.norm(dim=0).argsort()[:n_ffn]] = 0
        o = t[f"model.layers.{i}.self_attn.o_proj.weight"]
        norms = o.view(o.shape[0], -1, hd).norm(dim=(0, 2))
        for h in norms.argsort()[:n_heads].tolist():
            o[:, h * hd:(h + 1) * hd] = 0
    return t


def removed_counts(report):
    return [(x["ffn"][1] - x["ffn_live"], x["heads"][1] - x["heads_live"]) for x in report["layers"]]


def time_forward(models: dict, batch, seq, vocab, reps, device):
    """Median forward time per model, interleaved (round i runs every model once)."""
    x = torch.randint(0, vocab, (batch, seq), device=device)
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=x)  # warm-up
        for _ in range(reps):
            for k, m in models.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(input_ids=x)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def speed(dense, pruned, a, label):
    dense, pruned = dense.to(a.device), pruned.to(a.device)
    v = dense.config.vocab_size
    lat = time_forward({"dense": dense, "pruned": pruned}, 1, a.seq_time, v, a.reps, a.device)
    thr = time_forward({"dense": dense, "pruned": pruned}, 8, a.seq_time, v, max(3, a.reps // 3), a.device)
    tok = {k: 8 * a.seq_time / t for k, t in thr.items()}
    row = dict(model=label, params_dense=sum(p.numel() for p in dense.parameters()),
               params_pruned=sum(p.numel() for p in pruned.parameters()),
               latency_ms_dense=1e3 * lat["dense"], latency_ms_pruned=1e3 * lat["pruned"],
               latency_speedup=lat["dense"] / lat["pruned"], tokens_per_s_dense=tok["dense"],
               tokens_per_s_pruned=tok["pruned"], throughput_speedup=tok["pruned"] / tok["dense"])
    print(f"{label:>22}: params {row['params_pruned']:,}/{row['params_dense']:,}  latency "
          f"(batch 1 x {a.seq_time}) {row['latency_ms_dense']:.2f} -> {row['latency_ms_pruned']:.2f} ms "
          f"({row['latency_speedup']:.2f}x)  throughput (batch 8) {tok['dense']:,.0f} -> "
          f"{tok['pruned']:,.0f} tokens/s ({row['throughput_speedup']:.2f}x)", flush=True)
    return row


def wide_like(report, a):
    """A wider random Llama whose layers keep the fractions the quality run's export kept."""
    H, KV, I = 8, 4, a.wide_hidden * 4
    dense = llama(a.wide_hidden, len(report["layers"]), I, H, KV, 4000, seed=2).eval()
    t = {n: p.detach().clone() for n, p in dense.named_parameters()}
    hd = a.wide_hidden // H
    for i, x in enumerate(report["layers"]):
        keep_ffn = max(1, round(I * x["ffn"][0] / x["ffn"][1]))
        t[f"model.layers.{i}.mlp.down_proj.weight"][:, keep_ffn:] = 0
        kv_frac, g_frac = x["kv_heads"][0] / x["kv_heads"][1], \
            (x["heads"][0] / x["kv_heads"][0]) / (x["heads"][1] / x["kv_heads"][1])
        kv_keep, g_keep = max(1, round(KV * kv_frac)), max(1, round(H // KV * g_frac))
        o = t[f"model.layers.{i}.self_attn.o_proj.weight"]
        for h in range(H):
            if h // (H // KV) >= kv_keep or h % (H // KV) >= g_keep:
                o[:, h * hd:(h + 1) * hd] = 0
    with torch.no_grad():
        for n, p in dense.named_parameters():
            p.copy_(t[n])
    return dense, t


# ------------------------------------------------------------------ Transformer-XL quality row
def txl_train(model, opt, ids, a):
    """Segment recurrence with memory, as launch/train_lm.py trains it."""
    model.train()
    mems, it = None, 0
    while it < a.steps:
        for x, y in data.segments(data.lm_streams(ids, a.batch), model.config.tgt_len):
            loss, mems = model.loss(x, y, mems)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
            opt.zero_grad()
            it += 1
            if it == a.steps:
                break
        mems = None
    return model.eval()


@torch.no_grad()
def txl_perplexity(model, ids, batch=8):
    """exp of the token-weighted mean loss over the validation stream, with memory."""
    model.eval()
    total, n, mems = 0.0, 0, None
    for x, y in data.segments(data.lm_streams(ids, batch), model.config.tgt_len):
        logits, mems = model(x, mems)
        total += F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="sum").item()
        n += y.numel()
    return math.exp(total / n)


def txl_rows(a, train_ids, valid_ids, work):
    """(a) RAMDA on FFN units (ff.down columns) and heads (attn.o per head), export of Ŵ;
    (b) AdamW, then the same number of units per layer zeroed by smallest group norm, exported;
    (c) AdamW dense."""
    from ramda_ds.export.txl import export as txl_export
    from ramda_ds.models import TransfoXLConfig, TransfoXLLM

    def make():
        torch.manual_seed(0)
        return TransfoXLLM(TransfoXLConfig.preset("tiny", a.vocab))

    m = make()
    dh = m.config.d_head
    rules = {"*.ff.down.weight": "input", "*.attn.o.weight": f"head:{dh}"}
    opt = RAMDA(build_param_groups(m, "group_lasso", lam=a.txl_lam, include=list(rules),
                                   grouping=rules), lr=a.txl_lr, c=0.1, keep_structured=True)
    txl_train(m, opt, train_ids, a)
    w_hat = {n: opt.state[p]["structured"].view_as(p).clone() for n, p in m.named_parameters()}
    r_ramda = txl_export(w_hat, work / "txl_ramda", m.config, verbose=False)
    counts = removed_counts(r_ramda)
    d = make()
    txl_train(d, torch.optim.AdamW(d.parameters(), lr=a.adamw_lr), train_ids, a)
    t = {n: p.detach().clone() for n, p in d.named_parameters()}
    for i, (n_ffn, n_heads) in enumerate(counts):
        down = t[f"layers.{i}.ff.down.weight"]
        down[:, down.norm(dim=0).argsort()[:n_ffn]] = 0
        o = t[f"layers.{i}.attn.o.weight"]
        for h in o.view(o.shape[0], -1, dh).norm(dim=(0, 2)).argsort()[:n_heads].tolist():
            o[:, h * dh:(h + 1) * dh] = 0
    r_adamw = txl_export(t, work / "txl_adamw", d.config, verbose=False)
    load = TransfoXLLM.from_pretrained
    rows = [dict(method="Transformer-XL: RAMDA + export (Ŵ)", params=r_ramda["params_after"],
                 ppl=txl_perplexity(load(work / "txl_ramda"), valid_ids)),
            dict(method="Transformer-XL: AdamW + smallest-norm pruning", params=r_adamw["params_after"],
                 ppl=txl_perplexity(load(work / "txl_adamw"), valid_ids)),
            dict(method="Transformer-XL: AdamW dense", params=r_adamw["params_before"],
                 ppl=txl_perplexity(d, valid_ids))]
    print(f"quality: tiny Transformer-XL, {a.steps} steps, removed (FFN units, heads) per layer "
          f"{counts}", flush=True)
    for r in rows:
        print(f"  {r['method']:>46}: validation perplexity {r['ppl']:8.2f}, parameters "
              f"{r['params']:,}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--hidden", type=int, default=64, help="width of the quality model")
    ap.add_argument("--lam", type=float, default=3e-4)
    ap.add_argument("--lr", type=float, default=1e-2, help="RAMDA lr (AdamW: --adamw_lr)")
    ap.add_argument("--adamw_lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seq_time", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--wide_hidden", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--txl_lam", type=float, default=3e-4, help="λ of the Transformer-XL row")
    ap.add_argument("--txl_lr", type=float, default=2e-2)
    ap.add_argument("--no_txl", action="store_true", help="skip the Transformer-XL quality row")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="export_bench-"))
    train_file, valid_file = data.default_corpus(work / "data")
    sp = data.train_tokenizer(train_file, str(work / "data" / f"sp{a.vocab}"), a.vocab)
    train_ids = data.encode(data.load_lines(train_file), sp)
    valid_ids = data.encode(data.load_lines(valid_file), sp)
    shape = dict(hidden=a.hidden, layers=2, inter=4 * a.hidden, heads=4, kv=2, vocab=a.vocab)
    t0 = time.perf_counter()

    # (a) RAMDA + export of Ŵ
    m = llama(**shape)
    groups = build_param_groups(m, "group_lasso", lam=a.lam, include=[
        "*.mlp.down_proj.weight", "*.self_attn.o_proj.weight"], grouping={
        "*.mlp.down_proj.weight": "input", "*.self_attn.o_proj.weight": f"head:{a.hidden // 4}"})
    opt = RAMDA(groups, lr=a.lr, momentum=0.1, keep_structured=True)
    train(m, opt, train_ids, a)
    print(f"RAMDA trained [{time.perf_counter() - t0:.0f} s]", flush=True)
    w_hat = {n: opt.state[p]["structured"].view_as(p).clone() for n, p in m.named_parameters()}
    ramda_model, ramda_r = export(m, work / "ramda", w_hat)
    # (b) AdamW, then smallest-norm pruning of as many units per layer; (c) AdamW dense
    d = llama(**shape)
    train(d, torch.optim.AdamW(d.parameters(), lr=a.adamw_lr), train_ids, a)
    counts = removed_counts(ramda_r)
    adamw_model, adamw_r = export(d, work / "adamw", smallest_norm_masked(d, counts))
    rows = [dict(method="RAMDA + export (Ŵ)", ppl=perplexity(ramda_model, valid_ids, a.seq),
                 params=ramda_r["params_after"]),
            dict(method="AdamW + smallest-norm pruning", ppl=perplexity(adamw_model, valid_ids, a.seq),
                 params=adamw_r["params_after"]),
            dict(method="AdamW dense", ppl=perplexity(d, valid_ids, a.seq),
                 params=adamw_r["params_before"])]
    print(f"quality: tiny Llama {shape}, {a.steps} steps, removed (FFN units, query heads) per "
          f"layer {counts}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    for r in rows:
        print(f"  {r['method']:>32}: validation perplexity {r['ppl']:8.2f}, parameters "
              f"{r['params']:,}", flush=True)

    if not a.no_txl:
        rows += txl_rows(a, train_ids, valid_ids, work)

    with torch.no_grad():  # the dense model carrying Ŵ
        for n, p in m.named_parameters():
            p.copy_(w_hat[n])
    speeds = [speed(m.eval(), ramda_model, a, "tiny Llama (RAMDA)")]
    wide, t = wide_like(ramda_r, a)
    wide_pruned, _ = export(wide, work / "wide", t)
    speeds.append(speed(wide, wide_pruned, a, f"Llama h{a.wide_hidden} (same keep)"))
    print(json.dumps(dict(quality=rows, speed=speeds, removed=counts, steps=a.steps, lam=a.lam,
                          device=a.device)))


if __name__ == "__main__":
    main()
