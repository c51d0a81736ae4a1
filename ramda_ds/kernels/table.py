r"""The per-step table of a param group's tensors that fused kernels consume.

One row per tensor: pointers to ``g, V, U, W0, P, b, W, Ŵ, Y, Y'`` (float32, contiguous), its
``[R, C, K]`` geometry with ``goff``, the offset of its groups in the concatenation of every
tensor's per-group vectors (−1: unregularized), and the scalars ``s = lr·√t, ε, c, mode``.
:func:`build` advances each tensor's step and α exactly as the torch path does and allocates the
scratch ``P, b`` and ``Y`` of PG's regularized tensors, so a kernel set (:mod:`.native` on CPU)
only needs the table to run a pass for all tensors at once.

Applies to unsharded, contiguous float32 tensors regularized by the group lasso whole or not at
all, with ``inexact_eps0`` unset; anything else takes the torch path.
"""

from __future__ import annotations

import math

import torch

from ..groups import GroupLayout

F64 = torch.float64
MODE_EXACT, MODE_PG, MODE_FREE = 0, 1, 2


def eligible(opt, group) -> bool:
    """Whether this group's step can run on the table at all (settings; tensors are checked in
    :func:`build`)."""
    return (opt.view.comm.world_size == 1 and group["regularizer"] in (None, "group_lasso")
            and group.get("inexact_eps0") is None and bool(group["params"]))


class Table:
    """``rows[t] = (p, w, state, Ŵ buffer or None, segment or None, layout)``; ``ptrs``, ``geom``,
    ``scal``: lists per row; ``taus``: τ per row (0 unregularized); ``G``: groups in all."""

    def __init__(self, rows, ptrs, geom, scal, taus, G, keep):
        self.rows, self.ptrs, self.geom, self.scal = rows, ptrs, geom, scal
        self.taus, self.G, self._keep = taus, G, keep  # _keep: buffers the pointers refer to


def build(opt, group, present, pg: bool):
    """The table for one step of ``group`` (advancing each tensor's step and α), or None (and
    nothing changed) when a tensor does not qualify."""
    from ..optim.base import group_tau, is_regularized

    todo = []
    for k, p, w, g in opt._params(group, present):  # check everything before changing anything
        segs = opt._segments(group, p, k)
        reg = [s for s in segs if is_regularized(group, s)]
        whole = (len(segs) == 1 and segs[0].span is None and segs[0].lo == 0
                 and segs[0].hi == w.numel())
        if (p.dtype != torch.float32 or not w.is_contiguous() or w.data_ptr() != p.data_ptr()
                or g.dtype != torch.float32 or g.device != w.device or not (whole or not reg)
                or (reg and (reg[0].groups.group_lo != 0 or len(reg[0].groups.pieces) != 1))):
            return None
        todo.append((p, w, g.contiguous(), reg[0] if reg else None))
    rows, ptrs, geom, scal, taus, keep, goff = [], [], [], [], [], [], 0
    for p, w, g, seg in todo:
        st = opt.local_state(p, w)
        stage, i = opt._advance(group, st)
        s = opt._decayed(group, "lr", stage) * math.sqrt(i)  # s_t = lr·√t
        st["alpha"] += s
        P, b = (torch.empty_like(w), torch.empty_like(w)) if pg and seg is not None else (None, None)
        Y = torch.empty_like(w) if pg and seg is not None else None  # Y' is allocated on demand
        z = torch.empty_like(w) if group["keep_structured"] else None
        if seg is not None:
            lay = seg.groups.layout
            geom.append([lay.rows, lay.groups, lay.inner, goff])
            goff += lay.groups
            taus.append(group_tau(group, seg, st["alpha"].item()))
        else:  # unregularized: Ŵ = W0 − V/P, no groups
            lay = GroupLayout(1, w.numel(), 1)
            geom.append([1, w.numel(), 1, -1])
            taus.append(0.0)
        mode = MODE_FREE if seg is None else (MODE_PG if pg else MODE_EXACT)
        ptrs.append([g.data_ptr(), st["grad_sum"].data_ptr(), st["grad_sq_sum"].data_ptr(),
                     st["initial"].data_ptr(), _ptr(P), _ptr(b), w.data_ptr(),
                     _ptr(z), _ptr(Y), 0])
        scal.append([s, opt._decayed(group, "eps", stage), opt._c(group, stage, i), float(mode)])
        rows.append((p, w, st, z, seg, lay))
        keep.append((g, P, b, Y))
    return Table(rows, ptrs, geom, scal, taus, goff, keep)


def _ptr(x) -> int:
    return 0 if x is None else x.data_ptr()
