"""The pruning core: pure functions on a state dict and a config (no files, no optimizer).

A *unit* is one FFN neuron or one attention head. A unit can be removed when the layer's output
does not change without it:

* its output weights are zero (a column of Llama's ``down_proj`` / block of ``o_proj`` columns;
  a row of GPT-2's Conv1D ``mlp.c_proj`` / block of ``attn.c_proj`` rows), or
* its input weights are zero and its contribution is a constant that is folded exactly into the
  output bias: GPT-2's neuron ``j`` with a zero ``c_fc`` column outputs ``gelu(b_j)``, so
  ``c_proj.bias += gelu(b_j) · c_proj.weight[j]``; a Llama neuron with a zero ``gate_proj`` (or
  ``up_proj``) row and no bias outputs ``silu(0)·u = 0``. A unit that is neither stays.

GQA (Llama/Qwen2/Mistral): K/V head ``k`` serves query heads ``k·g … k·g+g−1``; it goes only
when all of them go. Every K/V head kept in a layer keeps the same number ``g'`` of query heads
(what ``repeat_kv`` needs): the groups with fewer live heads are padded with removed heads of the
same group, which add exactly zero (their output weights are zero).

``zero_units`` finds the removable units, ``plan`` chooses what each layer keeps (per layer, or
one width for all layers), ``prune`` slices the tensors and returns the new state dict and the
per-layer sizes. ``prune`` checks every unit it drops and raises if one is not removable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class PruneError(ValueError):
    """A unit asked to be removed changes the model's function, or the model is not supported."""


# ---------------------------------------------------------------------------- model families
@dataclass(frozen=True)
class Family:
    """How one architecture names its per-layer tensors and sizes."""

    name: str
    layers: str  # prefix of layer i, with {i}

    def sizes(self, cfg) -> dict:  # hidden, layers, ffn, heads, kv, head_dim
        raise NotImplementedError


class LlamaFamily(Family):
    """Llama, Qwen2, Mistral: SwiGLU MLP (gate/up/down) and GQA attention (q/k/v/o)."""

    def sizes(self, cfg) -> dict:
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return dict(hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, ffn=cfg.intermediate_size,
                    heads=heads, kv=kv, head_dim=hd)

    def uniform_heads_ok(self, cfg, heads: int, kv: int) -> bool:
        # LlamaConfig refuses num_attention_heads that do not divide hidden_size, head_dim or not
        return cfg.hidden_size % heads == 0 and heads % kv == 0


class GPT2Family(Family):
    """GPT-2: Conv1D ``c_fc``/``c_proj`` MLP (GELU), fused ``c_attn`` (q|k|v), MHA."""

    def sizes(self, cfg) -> dict:
        inner = cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd
        return dict(hidden=cfg.n_embd, layers=cfg.n_layer, ffn=inner, heads=cfg.n_head,
                    kv=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head)

    def uniform_heads_ok(self, cfg, heads: int, kv: int) -> bool:
        # GPT2Attention derives head_dim = n_embd / n_head: the head count cannot change
        return heads == cfg.n_head


LLAMA = LlamaFamily("llama", "model.layers.{i}.")
GPT2 = GPT2Family("gpt2", "transformer.h.{i}.")
FAMILIES = {"llama": LLAMA, "qwen2": LLAMA, "mistral": LLAMA, "gpt2": GPT2}


def family_of(cfg) -> Family:
    fam = FAMILIES.get(getattr(cfg, "model_type", None))
    if fam is None:
        raise PruneError(f"export supports model types {sorted(FAMILIES)}, not "
                         f"{getattr(cfg, 'model_type', type(cfg).__name__)!r}")
    if fam is GPT2 and (getattr(cfg, "add_cross_attention", False)):
        raise PruneError("GPT-2 with cross-attention is not supported by the export")
    return fam


# ---------------------------------------------------------------------------- per-unit views
def _t(sd, key):
    if key not in sd:
        raise PruneError(f"the state dict has no {key}")
    return sd[key]


class _Layer:
    """One layer's tensors seen per unit (row u = unit u), whatever the family's layout:
    ``ffn_out`` / ``ffn_in`` [units, ...] output / input weights of FFN units, ``head_out`` /
    ``head_in`` [heads, ...] of query heads."""

    def __init__(self, fam: Family, sd, cfg, i: int):
        self.fam, self.sd, self.s, self.p = fam, sd, fam.sizes(cfg), fam.layers.format(i=i)

    # FFN -----------------------------------------------------------------
    def ffn_out(self) -> torch.Tensor:
        """[units, hidden]: unit j's output weights."""
        if self.fam is GPT2:
            return _t(self.sd, self.p + "mlp.c_proj.weight")
        return _t(self.sd, self.p + "mlp.down_proj.weight").t()

    def ffn_in(self) -> list[torch.Tensor]:
        """[units, hidden] per input projection (rows of gate/up, columns of c_fc)."""
        if self.fam is GPT2:
            return [_t(self.sd, self.p + "mlp.c_fc.weight").t()]
        return [_t(self.sd, self.p + f"mlp.{n}.weight") for n in ("gate_proj", "up_proj")]

    def ffn_removable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(drop, fold): bool [units] masks of units whose output weights are zero, and of the
        other units whose input weights are zero with a foldable (or zero) constant output."""
        out_zero = (self.ffn_out() == 0).all(1)
        fold = torch.zeros_like(out_zero)
        if self.fam is GPT2:
            in_zero = (self.ffn_in()[0] == 0).all(1)
            if self.sd.get(self.p + "mlp.c_proj.bias") is not None or \
                    self.sd.get(self.p + "mlp.c_fc.bias") is None:
                fold = in_zero & ~out_zero
        else:
            gate, up = self.ffn_in()
            has_gb = self.sd.get(self.p + "mlp.gate_proj.bias") is not None
            has_ub = self.sd.get(self.p + "mlp.up_proj.bias") is not None
            zero_out = ((gate == 0).all(1) & (not has_gb)) | ((up == 0).all(1) & (not has_ub))
            out_zero = out_zero | zero_out  # these output exactly 0: nothing to fold
        return out_zero, fold

    # heads ---------------------------------------------------------------
    def head_out(self) -> torch.Tensor:
        """[heads, head_dim * hidden]: head h's output weights."""
        H, d = self.s["heads"], self.s["head_dim"]
        if self.fam is GPT2:
            return _t(self.sd, self.p + "attn.c_proj.weight").reshape(H, -1)
        w = _t(self.sd, self.p + "self_attn.o_proj.weight")  # [hidden, H*d]
        return w.view(w.shape[0], H, d).permute(1, 2, 0).reshape(H, -1)

    def head_in(self) -> torch.Tensor:
        """[heads, ...]: norms source for query heads (q rows / q columns of c_attn)."""
        H, d = self.s["heads"], self.s["head_dim"]
        if self.fam is GPT2:
            w = _t(self.sd, self.p + "attn.c_attn.weight")  # [hidden, 3*hidden]
            return w.view(w.shape[0], 3, H, d).permute(2, 1, 3, 0).reshape(H, -1)
        return _t(self.sd, self.p + "self_attn.q_proj.weight").view(H, -1)

    def head_removable(self) -> torch.Tensor:
        return (self.head_out() == 0).all(1)


def zero_units(fam: Family, sd: dict, cfg) -> list[dict]:
    """Per layer: ``ffn`` (bool [units], removable), ``fold`` (removable by folding into the
    output bias), ``heads`` (bool [heads]), and the unit norms used to refill a uniform layout."""
    out = []
    for i in range(fam.sizes(cfg)["layers"]):
        L = _Layer(fam, sd, cfg, i)
        drop, fold = L.ffn_removable()
        fnorm = sum(w.double().square().sum(1) for w in [L.ffn_out(), *L.ffn_in()])
        hnorm = L.head_out().double().square().sum(1) + L.head_in().double().square().sum(1)
        out.append(dict(ffn=drop | fold, fold=fold, heads=L.head_removable(), ffn_norm=fnorm,
                        head_norm=hnorm))
    return out


# ---------------------------------------------------------------------------- what each layer keeps
@dataclass
class Keep:
    """Indices a layer keeps: FFN units, query heads (grouped by K/V head, ``g`` per group), K/V
    heads; ``live_*``: how many of them are not removable (the rest pad/refill)."""

    ffn: list[int]
    heads: list[int]
    kv: list[int]
    live_ffn: int = 0
    live_heads: int = 0
    extra: dict = field(default_factory=dict)


def _by_norm(idx, norm):
    return sorted(idx, key=lambda j: (-float(norm[j]), j))


def _heads(zero, norm, H, KV, n_kv: int | None, g_new: int | None):
    """(kv kept, query heads kept in GQA order, g') with live heads first, padded or refilled
    with the largest-norm removable heads of the same group."""
    g = H // KV
    live = [[h for h in range(k * g, (k + 1) * g) if not zero[h]] for k in range(KV)]
    alive_kv = [k for k in range(KV) if live[k]]
    need_g = max([len(x) for x in live] + [1])
    g_new = need_g if g_new is None else g_new
    n_kv = max(1, len(alive_kv)) if n_kv is None else n_kv
    kv_norm = [sum(float(norm[h]) for h in range(k * g, (k + 1) * g)) for k in range(KV)]
    kv = sorted(alive_kv + _by_norm([k for k in range(KV) if k not in alive_kv], kv_norm)
                [:n_kv - len(alive_kv)])
    q = []
    for k in kv:
        dead = _by_norm([h for h in range(k * g, (k + 1) * g) if zero[h]], norm)
        q += sorted(live[k] + dead[:g_new - len(live[k])])
    return kv, q, g_new


def live_counts(zeros: list[dict], layout: str, multiple_of: int) -> tuple[list[int], list[int]]:
    """Checked layout arguments; the live FFN units and heads per layer."""
    if layout not in ("per_layer", "uniform"):
        raise PruneError(f"layout must be per_layer or uniform, got {layout!r}")
    if multiple_of < 1:
        raise PruneError(f"multiple_of must be >= 1, got {multiple_of}")
    return ([int((~z["ffn"]).sum()) for z in zeros], [int((~z["heads"]).sum()) for z in zeros])


def plan(fam: Family, cfg, zeros: list[dict], layout: str = "per_layer",
         multiple_of: int = 1) -> list[Keep]:
    """What each layer keeps. ``per_layer``: its own live units (at least one of each kind; a
    padding unit adds zero). ``uniform``: the same counts in every layer — FFN: the maximum over
    layers rounded up to ``multiple_of``; heads: the smallest (K/V, query-per-K/V) counts that
    hold every layer's live heads and that the stock config accepts — refilled with the
    largest-norm removable units."""
    s = fam.sizes(cfg)
    H, KV, I = s["heads"], s["kv"], s["ffn"]
    live_f, live_h = live_counts(zeros, layout, multiple_of)
    n_ffn = n_kv = g_new = None
    if layout == "uniform":
        n_ffn = min(I, max(multiple_of, math.ceil(max(live_f + [1]) / multiple_of) * multiple_of))
        g = H // KV
        need = [_heads(z["heads"], z["head_norm"], H, KV, None, None) for z in zeros]
        need_kv, need_g = max(len(kv) for kv, _, _ in need), max(gg for _, _, gg in need)
        # the fewest heads in total that hold every layer's live heads and that the config takes
        cands = sorted((k * gg, k, gg) for k in range(need_kv, KV + 1)
                       for gg in range(need_g, g + 1) if fam.uniform_heads_ok(cfg, k * gg, k))
        _, n_kv, g_new = cands[0]
    keeps = []
    for z, lf, lh in zip(zeros, live_f, live_h):
        live = [j for j in range(I) if not z["ffn"][j]]
        dead = _by_norm([j for j in range(I) if z["ffn"][j]], z["ffn_norm"])
        want = max(1, lf) if n_ffn is None else n_ffn
        ffn = sorted(live + dead[:want - len(live)])
        kv, q, _ = _heads(z["heads"], z["head_norm"], H, KV, n_kv, g_new)
        keeps.append(Keep(ffn=ffn, heads=q, kv=kv, live_ffn=lf, live_heads=lh))
    return keeps


# ---------------------------------------------------------------------------- slicing
def _rows(w, idx, block=1):
    """Rows ``idx`` of ``w`` in blocks of ``block`` rows."""
    rows = torch.tensor([j * block + r for j in idx for r in range(block)], dtype=torch.long)
    return w.index_select(0, rows).contiguous()


def _cols(w, idx, block=1):
    cols = torch.tensor([j * block + r for j in idx for r in range(block)], dtype=torch.long)
    return w.index_select(1, cols).contiguous()


def prune(fam: Family, sd: dict, cfg, keeps: list[Keep]) -> tuple[dict, list[dict]]:
    """The state dict with only the kept units, and per layer ``{intermediate_size,
    num_attention_heads, num_key_value_heads}``. Every dropped unit is checked: removable
    (output weights zero), or folded exactly into the output bias; otherwise PruneError."""
    s = fam.sizes(cfg)
    H, KV, d, I = s["heads"], s["kv"], s["head_dim"], s["ffn"]
    zeros = zero_units(fam, sd, cfg)
    new = dict(sd)
    sizes = []
    for i, (k, z) in enumerate(zip(keeps, zeros)):
        p = fam.layers.format(i=i)
        dropped_f = sorted(set(range(I)) - set(k.ffn))
        bad = [j for j in dropped_f if not z["ffn"][j]]
        if bad:
            raise PruneError(f"layer {i}: FFN units {bad[:5]} are not zero; removing them would "
                             "change the model")
        dropped_h = sorted(set(range(H)) - set(k.heads))
        bad = [h for h in dropped_h if not z["heads"][h]]
        if bad:
            raise PruneError(f"layer {i}: attention heads {bad[:5]} are not zero; removing them "
                             "would change the model")
        g = H // KV
        for h in k.heads:
            if h // g not in k.kv:
                raise PruneError(f"layer {i}: query head {h} kept without its K/V head {h // g}")
        folded = [j for j in dropped_f if z["fold"][j]]
        if fam is GPT2:
            _prune_gpt2(new, p, k, folded, H, d)
        else:
            _prune_llama(new, p, k, d)
        k.extra["folded"] = folded
        sizes.append(dict(intermediate_size=len(k.ffn), num_attention_heads=len(k.heads),
                          num_key_value_heads=len(k.kv)))
    return new, sizes


def _prune_llama(sd, p, k: Keep, d):
    m, a = p + "mlp.", p + "self_attn."
    for name in ("gate_proj", "up_proj"):
        sd[m + name + ".weight"] = _rows(sd[m + name + ".weight"], k.ffn)
        if m + name + ".bias" in sd:
            sd[m + name + ".bias"] = sd[m + name + ".bias"][k.ffn].contiguous()
    sd[m + "down_proj.weight"] = _cols(sd[m + "down_proj.weight"], k.ffn)
    sd[a + "q_proj.weight"] = _rows(sd[a + "q_proj.weight"], k.heads, d)
    for name in ("k_proj", "v_proj"):
        sd[a + name + ".weight"] = _rows(sd[a + name + ".weight"], k.kv, d)
    for name, idx in (("q_proj", k.heads), ("k_proj", k.kv), ("v_proj", k.kv)):
        if a + name + ".bias" in sd:
            sd[a + name + ".bias"] = _rows(sd[a + name + ".bias"][:, None], idx, d)[:, 0]
    sd[a + "o_proj.weight"] = _cols(sd[a + "o_proj.weight"], k.heads, d)


def _prune_gpt2(sd, p, k: Keep, folded, H, d):
    m, a = p + "mlp.", p + "attn."
    w_fc, b_fc = sd[m + "c_fc.weight"], sd.get(m + "c_fc.bias")
    w_pr = sd[m + "c_proj.weight"]  # [inner, hidden]
    if folded and b_fc is not None:  # constant gelu(b_j) * c_proj row j goes into the bias
        const = F.gelu(b_fc[folded].double(), approximate="tanh") @ w_pr[folded].double()
        sd[m + "c_proj.bias"] = (sd[m + "c_proj.bias"].double() + const).to(w_pr.dtype)
    sd[m + "c_fc.weight"] = _cols(w_fc, k.ffn)
    if b_fc is not None:
        sd[m + "c_fc.bias"] = b_fc[k.ffn].contiguous()
    sd[m + "c_proj.weight"] = _rows(w_pr, k.ffn)
    # fused c_attn [hidden, 3 * H * d]: q, k, v blocks of heads
    cols = [part * H + h for part in range(3) for h in k.heads]
    sd[a + "c_attn.weight"] = _cols(sd[a + "c_attn.weight"], cols, d)
    sd[a + "c_attn.bias"] = _rows(sd[a + "c_attn.bias"][:, None], cols, d)[:, 0]
    sd[a + "c_proj.weight"] = _rows(sd[a + "c_proj.weight"], k.heads, d)


def parameter_counts(fam: Family, sd: dict) -> dict:
    """Parameters per layer and in total (tied tensors counted once)."""
    seen, per_layer, total = set(), {}, 0
    for key, t in sd.items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel()
        prefix = fam.layers.split("{i}")[0]
        if key.startswith(prefix):
            i = int(key[len(prefix):].split(".")[0])
            per_layer[i] = per_layer.get(i, 0) + t.numel()
    return dict(total=total, layers=[per_layer.get(i, 0) for i in range(len(per_layer))])
