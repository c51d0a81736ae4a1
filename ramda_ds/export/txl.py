"""Export of the project's Transformer-XL (:class:`ramda_ds.models.TransfoXLLM`): zero FFN units
and attention heads removed, per layer (``layer_d_inner`` / ``layer_n_head`` in the config) or one
width for all layers; loads with ``TransfoXLLM.from_pretrained(out)``.

Layer i (``layers.{i}.``), FFN ``y = down(relu(up·x + b)) + c``; unit j is row j of
``ff.up.weight`` / ``ff.up.bias`` and column j of ``ff.down.weight``. Removable when

* its ``down`` column is zero (it adds 0), or
* its ``up`` row is zero: it outputs the constant ``relu(b_j)``, folded exactly into the output
  bias, ``c += down[:, j] · relu(b_j)``.

Attention head h: its q, k, v rows of ``attn.qkv.weight`` (viewed ``[3, H, d_head, d_model]``), its
rows of ``attn.r_net.weight`` and of ``r_w_bias`` / ``r_r_bias``, its ``d_head`` columns of
``attn.o.weight``. Removable when its ``o`` columns are zero, or its v rows are (the attention
weights sum to 1 and v has no bias: the head outputs att·v = 0). The memory (hidden states,
``d_model`` wide) is unchanged, so the pruned model continues a dense model's memory too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import RTOL, ExportError, check_shapes, copy_tokenizer, format_report, write_atomically
from .prune import Family, PruneError, live_counts, parameter_counts


class TransfoXLFamily(Family):
    """The project's Transformer-XL as an export family: its sizes, how to recognise its config,
    and its own export (:func:`export`: its model is not a transformers one)."""

    def sizes(self, cfg) -> dict:
        return dict(hidden=cfg.d_model, layers=cfg.n_layer, ffn=cfg.d_inner, heads=cfg.n_head,
                    kv=cfg.n_head, head_dim=cfg.d_head)

    def matches(self, cfg) -> bool:
        return is_txl_config(cfg)

    def export(self, tensors: dict, out: Path, cfg, **options) -> dict:
        return export(tensors, out, cfg, **options)


TXL = TransfoXLFamily("transfo_xl", "layers.{i}.")


def is_txl_config(d) -> bool:
    """Whether a config (object or config.json dict) is a TransfoXLConfig."""
    from ..models import TransfoXLConfig

    if isinstance(d, TransfoXLConfig):
        return True
    return isinstance(d, dict) and "model_type" not in d and {"d_head", "mem_len"} <= d.keys()


def _layer(sd, cfg, i):
    p = f"layers.{i}."
    H, dh = cfg.n_head_of(i), cfg.d_head
    up, down = sd[p + "ff.up.weight"], sd[p + "ff.down.weight"]
    qkv = sd[p + "attn.qkv.weight"].view(3, H, dh, -1)
    o = sd[p + "attn.o.weight"].view(-1, H, dh).transpose(0, 1)  # [H, D, dh]
    return p, up, down, qkv, o


def zero_units(sd: dict, cfg) -> list[dict]:
    """Per layer: ``ffn`` (bool [units], removable), ``fold`` (removable by folding its constant
    into ``ff.down.bias``), ``heads`` (bool [heads]) and the norms that refill a uniform layout."""
    out = []
    for i in range(cfg.n_layer):
        p, up, down, qkv, o = _layer(sd, cfg, i)
        out_zero = (down == 0).all(0)
        in_zero = (up == 0).all(1)
        heads = (o == 0).flatten(1).all(1) | (qkv[2] == 0).flatten(1).all(1)
        fnorm = down.double().square().sum(0) + up.double().square().sum(1)
        hnorm = o.double().square().flatten(1).sum(1) + qkv.double().square().sum((0, 2, 3))
        out.append(dict(ffn=out_zero | in_zero, fold=in_zero & ~out_zero, heads=heads,
                        ffn_norm=fnorm, head_norm=hnorm))
    return out


def _keep(zero, norm, n):
    """The live indices plus the largest-norm removable ones, ``n`` in all, in order."""
    live = [j for j in range(len(zero)) if not zero[j]]
    dead = sorted((j for j in range(len(zero)) if zero[j]), key=lambda j: (-float(norm[j]), j))
    return sorted(live + dead[:n - len(live)])


def plan(cfg, zeros: list[dict], layout: str = "per_layer", multiple_of: int = 1) -> list[dict]:
    """Per layer ``{"ffn": [units kept], "heads": [heads kept]}``: its own live units (at least
    one of each; a removable one left in adds 0) or, ``uniform``, the same counts in every layer
    (FFN: the maximum over layers rounded up to ``multiple_of``), refilled by largest norm."""
    live_f, live_h = live_counts(zeros, layout, multiple_of)
    keeps = []
    for i, (z, lf, lh) in enumerate(zip(zeros, live_f, live_h)):
        if layout == "uniform":
            nf = max(multiple_of, math.ceil(max(live_f + [1]) / multiple_of) * multiple_of)
            nf, nh = min(len(z["ffn"]), nf), max(live_h + [1])
        else:
            nf, nh = max(1, lf), max(1, lh)
        keeps.append(dict(ffn=_keep(z["ffn"], z["ffn_norm"], nf),
                          heads=_keep(z["heads"], z["head_norm"], nh), live_ffn=lf, live_heads=lh))
    return keeps


def prune(sd: dict, cfg, keeps: list[dict]):
    """(state dict with only the kept units, config of the pruned model, units folded per layer).
    Every dropped unit is checked removable, else PruneError."""
    from dataclasses import asdict

    from ..models import TransfoXLConfig

    zeros = zero_units(sd, cfg)
    new, folded = dict(sd), []
    for i, (k, z) in enumerate(zip(keeps, zeros)):
        p, up, down, qkv, o = _layer(sd, cfg, i)
        for kind, n in (("ffn", up.shape[0]), ("heads", qkv.shape[1])):
            bad = [j for j in sorted(set(range(n)) - set(k[kind])) if not z[kind][j]]
            if bad:
                what = "FFN units" if kind == "ffn" else "attention heads"
                raise PruneError(f"layer {i}: {what} {bad[:5]} are not zero; removing them "
                                   "would change the model")
        fold = [j for j in range(up.shape[0]) if j not in k["ffn"] and z["fold"][j]]
        f, h = torch.tensor(k["ffn"]), torch.tensor(k["heads"])
        b = sd[p + "ff.up.bias"]
        if fold:  # the constant relu(b_j) · down[:, j] of units without input weights
            const = down[:, fold].double() @ F.relu(b[fold].double())
            new[p + "ff.down.bias"] = (sd[p + "ff.down.bias"].double() + const).to(b.dtype)
        new[p + "ff.up.weight"] = up.index_select(0, f).contiguous()
        new[p + "ff.up.bias"] = b.index_select(0, f).contiguous()
        new[p + "ff.down.weight"] = down.index_select(1, f).contiguous()
        D = qkv.shape[-1]
        new[p + "attn.qkv.weight"] = qkv.index_select(1, h).reshape(-1, D).contiguous()
        new[p + "attn.r_net.weight"] = sd[p + "attn.r_net.weight"].view(
            qkv.shape[1], cfg.d_head, D).index_select(0, h).reshape(-1, D).contiguous()
        new[p + "attn.o.weight"] = o.index_select(0, h).transpose(0, 1).reshape(D, -1).contiguous()
        for name in ("r_w_bias", "r_r_bias"):
            new[p + "attn." + name] = sd[p + "attn." + name].index_select(0, h).contiguous()
        folded.append(fold)
    d = asdict(cfg)
    layer_f, layer_h = [len(k["ffn"]) for k in keeps], [len(k["heads"]) for k in keeps]
    if len(set(layer_f)) == 1 and len(set(layer_h)) == 1:  # one width: a plain config
        d.update(d_inner=layer_f[0], n_head=layer_h[0], layer_d_inner=None, layer_n_head=None)
    else:
        d.update(layer_d_inner=layer_f, layer_n_head=layer_h)
    return new, TransfoXLConfig(**d), folded


def dense_model(tensors: dict, cfg):
    """The Transformer-XL carrying ``tensors`` (fp32, eval); refuses a checkpoint of another
    model."""
    from ..models import TransfoXLLM

    torch.manual_seed(0)  # the init is overwritten; seeded so that nothing random leaks in
    model = TransfoXLLM(cfg).float()
    params = dict(model.named_parameters())
    if set(tensors) != set(params):
        raise ExportError(
            f"the checkpoint is not of this Transformer-XL ({cfg.n_layer} layers, d_model "
            f"{cfg.d_model}): it holds {sorted(set(tensors) - set(params))[:3]} that the model "
            f"has not, lacks {sorted(set(params) - set(tensors))[:3]}")
    check_shapes(tensors, params)
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    return model.eval()


def logits_rel_diff(a, b, cfg, n=2, seed=0) -> float:
    """Max relative logits difference over two segments of ``tgt_len`` tokens, the second one
    attending to the memory of the first (each model carries its own memory)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n, 2 * cfg.tgt_len), generator=g)
    worst = 0.0
    with torch.no_grad():
        ma = mb = None
        for seg in ids.split(cfg.tgt_len, 1):
            (la, ma), (lb, mb) = a(seg, ma), b(seg, mb)
            la, lb = la.double(), lb.double()
            worst = max(worst, ((la - lb).abs().max() / la.abs().max().clamp_min(1e-30)).item())
    return worst


def export(tensors: dict, out: Path, cfg, *, layout="per_layer", multiple_of=1,
           weights="structured", source=None, run_dir=None, verbose=True) -> dict:
    """Prune, check (logits with memory, before anything is written), write: ``config.json``,
    ``model.safetensors`` (``TransfoXLLM.save_pretrained``), the run's tokenizer and
    ``pruning.json``."""
    from ..models import TransfoXLConfig, TransfoXLLM

    out = Path(out)
    if out.exists():
        raise ExportError(f"output directory {out} exists; choose a new one (nothing was written)")
    if not isinstance(cfg, TransfoXLConfig):
        cfg = TransfoXLConfig(**cfg)
    dense = dense_model(tensors, cfg)
    sd = {k: v.detach() for k, v in dense.state_dict().items()}
    try:
        zeros = zero_units(sd, cfg)
        keeps = plan(cfg, zeros, layout, multiple_of)
        new_sd, new_cfg, folded = prune(sd, cfg, keeps)
    except PruneError as e:
        raise ExportError(str(e)) from None
    pruned = TransfoXLLM(new_cfg).float().eval()
    if new_cfg.tie_weights:
        new_sd.pop("out.weight", None)
        new_sd["out.weight"] = new_sd["embed.weight"]
    pruned.load_state_dict(new_sd)
    rel = logits_rel_diff(dense, pruned, cfg)
    if not rel <= RTOL:
        raise ExportError(f"the pruned model's logits differ from the dense model's by {rel:.2e} "
                          f"(relative, > {RTOL:g}): refusing to write {out}")
    before = parameter_counts(TXL, sd)
    after = parameter_counts(TXL, pruned.state_dict())
    layers = [dict(layer=i, ffn=[len(k["ffn"]), cfg.d_inner_of(i)], ffn_live=k["live_ffn"],
                   heads=[len(k["heads"]), cfg.n_head_of(i)], heads_live=k["live_heads"],
                   kv_heads=[len(k["heads"]), cfg.n_head_of(i)], folded_ffn_units=len(fo),
                   params=[after["layers"][i], before["layers"][i]])
              for i, (k, fo) in enumerate(zip(keeps, folded))]
    report = dict(weights="structured point Ŵ (RAMDA)" if weights == "structured" else "W",
                  layout=layout, multiple_of=multiple_of, model_type="transfo_xl (ramda_ds)",
                  params_before=before["total"], params_after=after["total"],
                  kept_fraction=round(after["total"] / before["total"], 6),
                  logits_max_rel_diff=rel, logits_check="2 segments of tgt_len, with memory",
                  layers=layers, source=source or {}, taken_from_base_model=[],
                  load="ramda_ds.models.TransfoXLLM.from_pretrained(dir)")
    if verbose:
        print(format_report(report), flush=True)

    def write(tmp: Path):
        pruned.save_pretrained(tmp)
        report["tokenizer"] = copy_tokenizer(None, run_dir, tmp, modulo=False)
        (tmp / "pruning.json").write_text(json.dumps(report, indent=1))
    write_atomically(out, write)
    return report
