"""Transformer-XL language model (Dai et al., 2019): segment-level recurrence with a memory of
the previous segments' hidden states and relative positional attention.

Attention score of query i and key j (relative distance i − j), per head (paper's eq. terms
(a)+(c) and (b)+(d))::

    A_ij = (q_i + u)ᵀ k_j + (q_i + v)ᵀ W_r R_{i−j}

with R the sinusoid encoding, u, v learned biases (``r_w_bias``, ``r_r_bias``). The (b)+(d)
term is computed for all distances at once and aligned with the "relative shift".  Keys and
values run over ``[memory; current segment]``; memory is detached (no gradient into the past).

``save_pretrained(dir)`` / ``from_pretrained(dir)`` write and read ``config.json`` and
``model.safetensors``, as Hugging Face models do (transformers 5 no longer ships Transformer-XL).
A pruned model (``python -m ramda_ds.export``) has per-layer FFN widths and head counts
(``layer_d_inner``, ``layer_n_head`` in its config; absent in older configs: uniform).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransfoXLConfig:
    vocab_size: int = 1000
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    d_head: int = 16
    d_inner: int = 256
    tgt_len: int = 32
    mem_len: int = 32
    dropout: float = 0.1
    dropatt: float = 0.0
    tie_weights: bool = True
    # per-layer widths (a pruned model, ``python -m ramda_ds.export``); None: d_inner / n_head
    layer_d_inner: list[int] | None = None
    layer_n_head: list[int] | None = None

    def __post_init__(self):
        for key in ("layer_d_inner", "layer_n_head"):
            v = getattr(self, key)
            if v is not None and (len(v) != self.n_layer or min(v) < 1):
                raise ValueError(f"{key} must list {self.n_layer} sizes >= 1, got {v!r}")

    def d_inner_of(self, i: int) -> int:
        return self.layer_d_inner[i] if self.layer_d_inner else self.d_inner

    def n_head_of(self, i: int) -> int:
        return self.layer_n_head[i] if self.layer_n_head else self.n_head

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> "TransfoXLConfig":
        """``tiny`` (CPU) or ``base`` (the paper's WikiText-103 base: 16 layers, d 410, 10 heads)."""
        presets = {
            "tiny": dict(n_layer=2, d_model=64, n_head=4, d_head=16, d_inner=256, tgt_len=32,
                         mem_len=32),
            "base": dict(n_layer=16, d_model=410, n_head=10, d_head=41, d_inner=2100, tgt_len=150,
                         mem_len=150, dropout=0.1),
        }
        if name not in presets:
            raise ValueError(f"unknown Transformer-XL preset {name!r}; choose from {list(presets)}")
        return cls(vocab_size=vocab_size, **presets[name])


def _rel_shift(x: torch.Tensor) -> torch.Tensor:
    """[B, H, Q, K] scores by relative position (K = klen, column j ↔ distance klen−1−j) → by key."""
    b, h, q, k = x.shape
    x = F.pad(x, (1, 0))  # [B, H, Q, K+1]
    x = x.view(b, h, k + 1, q)[:, :, 1:].view(b, h, q, k)
    return x


class RelMultiHeadAttn(nn.Module):
    def __init__(self, c: TransfoXLConfig, n_head: int | None = None):
        super().__init__()
        self.h, self.dh = n_head or c.n_head, c.d_head
        self.qkv = nn.Linear(c.d_model, 3 * self.h * c.d_head, bias=False)
        self.r_net = nn.Linear(c.d_model, self.h * c.d_head, bias=False)
        self.o = nn.Linear(self.h * c.d_head, c.d_model, bias=False)
        self.r_w_bias = nn.Parameter(torch.zeros(self.h, c.d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(self.h, c.d_head))
        self.norm = nn.LayerNorm(c.d_model)
        self.drop, self.dropatt = nn.Dropout(c.dropout), nn.Dropout(c.dropatt)

    def forward(self, x, r, mem, mask):
        """x [B, Q, D]; r [K, D] encodings of distances K−1..0; mem [B, M, D]; mask [Q, K]."""
        B, Q, _ = x.shape
        cat = torch.cat([mem, x], 1) if mem is not None else x
        K = cat.shape[1]
        q, k, v = self.qkv(cat).view(B, K, 3, self.h, self.dh).unbind(2)
        q = q[:, -Q:]
        rk = self.r_net(r).view(K, self.h, self.dh)
        ac = torch.einsum("bqhd,bkhd->bhqk", q + self.r_w_bias, k)
        bd = _rel_shift(torch.einsum("bqhd,khd->bhqk", q + self.r_r_bias, rk))
        score = (ac + bd) / math.sqrt(self.dh)
        score = score.masked_fill(mask, float("-inf"))
        att = self.dropatt(score.softmax(-1))
        out = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, Q, self.h * self.dh)
        return self.norm(x + self.drop(self.o(out)))


class FeedForward(nn.Module):
    def __init__(self, c: TransfoXLConfig, d_inner: int | None = None):
        super().__init__()
        d_inner = d_inner or c.d_inner
        self.up, self.down = nn.Linear(c.d_model, d_inner), nn.Linear(d_inner, c.d_model)
        self.norm, self.drop = nn.LayerNorm(c.d_model), nn.Dropout(c.dropout)

    def forward(self, x):
        return self.norm(x + self.drop(self.down(self.drop(F.relu(self.up(x))))))


class Layer(nn.Module):
    def __init__(self, c: TransfoXLConfig, i: int = 0):
        super().__init__()
        self.attn, self.ff = RelMultiHeadAttn(c, c.n_head_of(i)), FeedForward(c, c.d_inner_of(i))

    def forward(self, x, r, mem, mask):
        return self.ff(self.attn(x, r, mem, mask))


class TransfoXLLM(nn.Module):
    """``forward(ids [B, Q], mems) -> (logits [B, Q, V], new mems)``; ``loss(ids, targets, mems)``."""

    def __init__(self, config: TransfoXLConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Layer(c, i) for i in range(c.n_layer))
        self.out = nn.Linear(c.d_model, c.vocab_size)
        if c.tie_weights:
            self.out.weight = self.embed.weight
        self.drop = nn.Dropout(c.dropout)
        inv = 1.0 / (10000 ** (torch.arange(0, c.d_model, 2.0) / c.d_model))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        """Normal(0, 0.02) weights, zero biases (the reference implementation's init_std)."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def init_mems(self, batch: int):
        return None

    def forward(self, ids, mems=None):
        B, Q = ids.shape
        M = 0 if mems is None else mems[0].shape[1]
        K = M + Q
        pos = torch.arange(K - 1, -1, -1.0, device=ids.device)  # distances K−1 .. 0
        ang = pos[:, None] * self.inv_freq[None]
        r = self.drop(torch.cat([ang.sin(), ang.cos()], -1))
        # query i (absolute M+i) may see keys j ≤ M+i
        mask = torch.ones(Q, K, dtype=torch.bool, device=ids.device).triu(M + 1)
        h = self.drop(self.embed(ids) * math.sqrt(self.config.d_model))
        hidden = [h]
        for i, layer in enumerate(self.layers):
            h = layer(h, r, None if mems is None else mems[i], mask)
            hidden.append(h)
        new_mems = self._update_mems(hidden, mems)
        return self.out(self.drop(h)), new_mems

    @torch.no_grad()
    def _update_mems(self, hidden, mems):
        L = self.config.mem_len
        if L == 0:
            return None
        out = []
        for i, h in enumerate(hidden[:-1]):
            cat = h if mems is None else torch.cat([mems[i], h], 1)
            out.append(cat[:, -L:].detach())
        return out

    def loss(self, ids, targets, mems=None):
        logits, mems = self(ids, mems)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), mems

    # ------------------------------------------------------------------ HF-style save / load
    def save_pretrained(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_weights:
            state.pop("out.weight", None)
        save_file(state, str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path) -> "TransfoXLLM":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json (not a saved TransfoXLLM)")
        model = cls(TransfoXLConfig(**json.loads((path / "config.json").read_text())))
        state = load_file(str(path / "model.safetensors"))
        if model.config.tie_weights:
            state["out.weight"] = state["embed.weight"]
        model.load_state_dict(state)
        return model
