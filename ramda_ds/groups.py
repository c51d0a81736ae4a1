"""Group structure of a regularized tensor, derivable from its shape and a rule name alone.

Every group-structured regularizer views the row-major flattened tensor as ``[R, C, K]``; the
group of element ``(r, c, k)`` is ``c`` and every group has ``|g| = R * K`` elements:

==============  =========================================  ==================================
rule            tensor                                     ``(R, C, K)``
==============  =========================================  ==================================
``input``       Linear ``[out, in]``, Conv ``[out, in, *k]`` ``(out, in, prod(k))``: columns /
                LSTM/GRU ``[4H, in]``                       input channels
``output``      any ``[out, ...]``                          ``(1, out, prod(rest))``: rows
``head:D``      ``[out, heads * D]`` (attention o_proj)     ``(out, heads, D)``: one group per head
``element``     any (L1)                                    ``(1, numel, 1)``
==============  =========================================  ==================================

Because the layout only depends on the original shape, the same math runs on a flat shard of the
tensor: :class:`SegmentGroups` cuts a contiguous flat range ``[start, end)`` into at most five
views of shape ``[rows, ncols, k]`` whose group sums and per-group scalings are plain tensor ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

GROUPING_RULES = ("input", "output", "element", "head:<D>")


@dataclass(frozen=True)
class GroupLayout:
    """The ``[R, C, K]`` view of a flattened tensor; groups are the ``C`` middle slices."""

    rows: int
    groups: int
    inner: int

    @property
    def group_size(self) -> int:
        return self.rows * self.inner

    @property
    def numel(self) -> int:
        return self.rows * self.groups * self.inner

    @property
    def group_weight(self) -> float:
        """The paper's weight w_g = sqrt(|g|)."""
        return math.sqrt(self.group_size)


def layout_for(shape: Sequence[int], grouping: str, name: str = "<tensor>") -> GroupLayout:
    """Layout of a tensor of ``shape`` (the *original* parameter shape) under ``grouping``."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if grouping == "element":
        return GroupLayout(1, numel, 1)
    if len(shape) < 2:
        raise ValueError(
            f"grouping {grouping!r} needs a tensor of at least 2 dims, but {name} has shape "
            f"{list(shape)}; use grouping='element' (L1) or leave it unregularized"
        )
    inner = math.prod(shape[2:])
    if grouping == "input":
        return GroupLayout(shape[0], shape[1], inner)
    if grouping == "output":
        return GroupLayout(1, shape[0], numel // shape[0])
    if grouping.startswith("head:"):
        try:
            head_dim = int(grouping.split(":", 1)[1])
        except ValueError:
            head_dim = 0
        if head_dim <= 0 or len(shape) != 2 or shape[1] % head_dim:
            raise ValueError(
                f"grouping {grouping!r} needs a 2-D weight whose input size is a multiple of the "
                f"head size, but {name} has shape {list(shape)}"
            )
        return GroupLayout(shape[0], shape[1] // head_dim, head_dim)
    raise ValueError(f"unknown grouping {grouping!r} for {name}; expected one of {GROUPING_RULES}")


@dataclass(frozen=True)
class _Piece:
    lo: int  # local flat offsets [lo, hi)
    hi: int
    rows: int
    ncols: int
    inner: int
    col: int  # first group index of the piece, relative to SegmentGroups.group_lo


class SegmentGroups:
    """Groups touched by the flat range ``[start, end)`` of a tensor with ``layout``.

    Local per-group vectors have length ``num_groups`` and index groups
    ``group_lo .. group_lo + num_groups - 1`` of the whole tensor.  ``sum`` returns *partial* sums
    for groups that continue outside the range; the caller combines them across shards.
    """

    def __init__(self, layout: GroupLayout, start: int = 0, end: int | None = None,
                 group_offset: int = 0, weight_layout: GroupLayout | None = None):
        """``group_offset`` shifts group indices (a column-sharded tensor holds groups
        ``offset ..`` of the original); ``weight_layout`` is the original tensor's layout when
        ``layout`` describes only a local block (it fixes |g| and w_g)."""
        end = layout.numel if end is None else end
        if not 0 <= start <= end <= layout.numel:
            raise ValueError(f"segment [{start}, {end}) outside a tensor of {layout.numel} elements")
        self.layout = weight_layout or layout
        self.start, self.end = start, end
        raw = list(_cut(start, end, layout))
        lo = min((p[5] for p in raw), default=0)
        self.num_groups = max((p[5] + p[3] for p in raw), default=lo) - lo
        self.group_lo = lo + group_offset  # global index of local group 0
        self.pieces = [_Piece(a, b, r, n, k, c - lo) for a, b, r, n, k, c in raw]
        self.numel = end - start

    def _views(self, x: torch.Tensor):
        for p in self.pieces:
            yield p, x[p.lo:p.hi].view(p.rows, p.ncols, p.inner)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group sums of the local flat tensor ``x``, as float64 (see :func:`group_sums`)."""
        if len(self.pieces) == 1 and self.pieces[0].col == 0:
            p = self.pieces[0]
            return group_sums(x.view(p.rows, p.ncols, p.inner))
        out = torch.zeros(self.num_groups, dtype=torch.float64, device=x.device)
        for p, v in self._views(x):
            out[p.col:p.col + p.ncols] += group_sums(v)
        return out

    def dot(self, *xs: torch.Tensor) -> torch.Tensor:
        """Per-group sums of the elementwise product of 2 or 3 flat tensors, as float64.

        On CPU for float32 one numpy ``einsum`` per piece: the products are formed in float64
        (exact for two factors) and no float32 temporary is written, so it costs one pass instead
        of a multiply pass plus a reduction.  Elsewhere ``sum(x*y*…)`` as :meth:`sum`.
        """
        x0 = xs[0]
        if not (x0.device.type == "cpu" and all(x.dtype == torch.float32 for x in xs)):
            prod = xs[0] * xs[1]
            for x in xs[2:]:
                prod.mul_(x)
            return self.sum(prod)
        spec = ",".join(["rck"] * len(xs)) + "->c"
        out = torch.zeros(self.num_groups, dtype=torch.float64)
        for p in self.pieces:
            views = [x[p.lo:p.hi].view(p.rows, p.ncols, p.inner).numpy() for x in xs]
            out[p.col:p.col + p.ncols] += torch.from_numpy(
                np.einsum(spec, *views, dtype=np.float64, casting="safe"))
        return out

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group maxima; ``-inf`` for a group in the local range without a local element
        (a segment wrapping a row boundary), which the max-all-reduce then replaces."""
        out = torch.full((self.num_groups,), -math.inf, dtype=x.dtype, device=x.device)
        for p, v in self._views(x):
            seg = out[p.col:p.col + p.ncols]
            torch.maximum(seg, v.amax(dim=(0, 2)), out=seg)
        return out

    def amin(self, x: torch.Tensor) -> torch.Tensor:
        return -self.amax(-x)

    def mul(self, x: torch.Tensor, f: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out = x * f[group]`` (``out`` may be ``x``); ``f`` is a local per-group vector."""
        return self._apply(torch.mul, x, f, out)

    def add(self, x: torch.Tensor, f: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out = x + f[group]``."""
        return self._apply(torch.add, x, f, out)

    def _apply(self, op, x, f, out):
        out = torch.empty_like(x) if out is None else out
        f = f.to(x.dtype)
        for p, v in self._views(x):
            op(v, f[p.col:p.col + p.ncols].view(1, p.ncols, 1),
               out=out[p.lo:p.hi].view(p.rows, p.ncols, p.inner))
        return out

    def expand(self, f: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The per-element tensor ``f[group(i)]``."""
        return self.mul(torch.ones_like(like), f)


def group_sums(v: torch.Tensor) -> torch.Tensor:
    """``v.sum(dim=(0, 2))`` of a ``[rows, ncols, inner]`` view, returned in float64.

    Every element is accumulated in float64, so partial sums from different shards add up to the
    unsharded sum to ~1e-16 relative and PG's stop test (a relative decrease of 1e-8) takes the
    same decision sharded or not.  float32 summation would not: its ~1e-8 rounding, which depends
    on how a group is cut into pieces, flips stop decisions.  On CPU, torch's float64-accumulating
    sum of float32 runs ~15x slower than numpy's ``add.reduce(dtype=float64)``, so that is used.
    """
    if v.dtype == torch.float32 and v.device.type == "cpu":
        return torch.from_numpy(np.add.reduce(v.numpy(), axis=(0, 2), dtype=np.float64))
    return v.sum(dim=(0, 2), dtype=torch.float64)


def _cut(start: int, end: int, layout: GroupLayout):
    """Split [start, end) into views (lo, hi, rows, ncols, inner, first_group), local offsets."""
    C, K = layout.groups, layout.inner
    L = C * K
    pos = start
    while pos < end:
        within = pos % L
        col, k = divmod(within, K)
        left = end - pos
        if k or left < K:  # part of one group
            n = min(K - k, left)
            yield pos - start, pos - start + n, 1, 1, n, col
        elif col or left < L:  # whole groups inside one row
            n = min(C - col, left // K) * K
            yield pos - start, pos - start + n, 1, n // K, K, col
        else:  # whole rows
            n = (left // L) * L
            yield pos - start, pos - start + n, n // L, C, K, 0
        pos += n
