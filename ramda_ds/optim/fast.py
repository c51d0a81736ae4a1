"""The fast step, the optimizer's side: which tensors take the kernels, the plan, the epilogue.

One rule decides the path of every tensor, and both the step (:func:`step`) and the run's log
(:func:`tensor_paths`, :func:`kernel_plan`) ask it:

1. :func:`route` — the param group as a whole: ``backend`` resolved for its device (and agreed
   across ranks, :meth:`~.base.StructuredOptimizer._kernel_path`), what the optimizer declares it
   runs on the kernels (``kernel_support``), whole tensors or a sharded view, and the settings
   rule :func:`settings_refusal`;
2. :func:`tensor_refusal` — one tensor: dtype, layout in memory, device, its optimizer state and
   (unsharded) whether it is regularized whole or not at all;
3. all or none: the Triton exact step (and an unregularized group on Triton) takes every tensor
   of the group or none.

:func:`step` then advances the selected tensors' counters (the optimizer's ``kernel_scalars``),
builds the :class:`~ramda_ds.kernels.plan.Plan`, has the kernels execute it and applies the
epilogue: solver statistics by name, RAMDA's Ŵ (``keep_structured``) and restarts.  The kernels
see tensors and numbers only; the stores they update (warm-start positions, PG chunk hints, the
sharded index cache) are the optimizer's declared attributes, passed in the plan.
"""

from __future__ import annotations

import warnings

import torch

from .. import kernels
from ..kernels.plan import Plan, Problem, TensorStep, execute
from ..regularizers import active, group_tau, is_regularized, regularizer_of

MAX_GRID_Y = 65535  # rows (tensors) of a Triton table: a CUDA grid's y dimension


def settings_refusal(group: dict) -> str | None:
    """The settings rule, the same for unsharded and sharded views: a group whose regularizer
    acts (λ > 0, a regularizer named) must use one the kernels implement
    (:attr:`~ramda_ds.regularizers.Regularizer.kernels`) and, with PG, the paper's stop rule
    (``inexact_eps0`` unset: condition (7) stopping is the torch path's).  A group whose
    regularizer does not act takes the kernels' unregularized update whatever it names, and the
    exact solver ignores ``inexact_eps0`` on every path."""
    if not active(group):
        return None
    if not regularizer_of(group).kernels:
        return f"regularizer {group['regularizer']}"
    if group.get("solver", "pg") != "exact" and group.get("inexact_eps0") is not None:
        return "inexact_eps0 (condition (7) stopping)"
    return None


def _support_text(opt) -> str:
    paths = " and ".join(opt.kernel_support)
    solvers = "/".join(sorted({s.upper() for v in opt.kernel_support.values() for s in v}))
    return f"{type(opt).__name__} has a {paths} {solvers} step only"


def route(opt, group: dict, collective: bool = True, device=None) -> tuple[str, str | None]:
    """``(path, None)`` when the group's step runs on the kernels of ``path``, else
    ``("torch", why)`` (``why`` None: torch was asked for).  ``collective``: the step (the first
    one agrees on the path across ranks); False: the log (no communication)."""
    if group["backend"] == "torch":
        return "torch", None
    solver = group.get("solver", "pg")
    if not any(solver in solvers for solvers in opt.kernel_support.values()):
        return "torch", _support_text(opt)  # (decided before the path: no collective)
    dev = device if device is not None else group["params"][0].device
    path = opt._kernel_path(group, collective, dev)
    if path == "torch":
        return "torch", (f"no fast kernels for {dev} tensors here"
                         if kernels.choose(group["backend"], dev) == "torch"
                         else "another rank cannot run the kernels, so none does")
    if solver not in opt.kernel_support.get(path, ()):
        return "torch", _support_text(opt)
    if not opt.view.sharded and opt.view.comm.world_size > 1:
        return "torch", "the kernels need whole tensors; this view shards them"
    why = settings_refusal(group)
    if why is not None:
        return "torch", why
    if path == "triton" and not opt.view.sharded and len(group["params"]) > MAX_GRID_Y:
        return "torch", f"more than {MAX_GRID_Y} tensors in one param group"
    return path, None


def whole_group(opt, group: dict, path: str) -> bool:
    """Whether the group's tensors take the kernels all together or not at all (the Triton
    exact step, which also runs an unregularized group on Triton)."""
    return path == "triton" and not opt.view.sharded and (
        group.get("solver", "pg") == "exact" or not active(group))


def tensor_refusal(opt, group: dict, k, p, w, path: str, device, g=None) -> str | None:
    """Why tensor ``p`` (its flat local ``w``; ``k`` its index in the group) cannot take the
    kernels of ``path``, or None.  Under a sharded view only from properties every rank shares,
    without asking for segments (their first use is a collective).  ``device``: the group's;
    ``g``: the gradient, at a step."""
    if p.dtype != torch.float32:
        return f"param dtype {p.dtype}"
    local = opt.view.local(p.detach())
    if (not local.is_contiguous() if opt.view.sharded
            else not w.is_contiguous() or w.data_ptr() != p.data_ptr()):
        return "not a contiguous row-major tensor (e.g. channels_last)"
    if path == "native" and w.device.type != "cpu":
        return f"on {w.device}, not cpu"
    if not opt.view.sharded:
        segs = opt._segments(group, p, k)
        reg = [s for s in segs if is_regularized(group, s)]
        whole = (len(segs) == 1 and segs[0].span is None and segs[0].lo == 0
                 and segs[0].hi == w.numel())
        if reg and not (whole and reg[0].groups.group_lo == 0 and len(reg[0].groups.pieces) == 1):
            return "regularized only in part, or sharded"
    why = state_problem(opt, p, w)
    if why is not None:
        return why
    if w.device != device:
        return f"on {w.device}, its group on {device}"
    if g is not None and (g.dtype != torch.float32 or g.device != w.device):
        return f"gradient {g.dtype} on {g.device}"
    return None


def state_problem(opt, p, w) -> str | None:
    """Why ``p``'s existing optimizer state cannot be read by a float32 kernel, or None (a
    float64 checkpoint loaded into a float32 model keeps float64 V/U/W0)."""
    st = opt.state.get(p) or {}
    for key in sorted(opt.state_keys()):
        t = st.get(key)
        if t is not None and torch.is_tensor(t):
            t = opt.view.local(t)
        if t is not None and (not torch.is_tensor(t) or t.dtype != torch.float32
                              or not t.is_contiguous() or t.device != w.device
                              or t.numel() != w.numel()):
            return f"state {key} is {getattr(t, 'dtype', type(t).__name__)}, not float32 like the param"
    return None


def select(opt, group: dict, present: set, path: str) -> list:
    """``(k, p, w, g)`` of the tensors of this step that take the kernels of ``path``, decided
    before anything changes (no write-back copies are made for them)."""
    everything = whole_group(opt, group, path)
    todo, dev = [], None
    for k, p, w, g in opt._params(group, present, writeback=False):
        dev = w.device if dev is None else dev
        if tensor_refusal(opt, group, k, p, w, path, dev, g) is None:
            todo.append((k, p, w, g.contiguous()))
        elif everything:
            return []
    return todo


def step(opt, group: dict, present: set) -> set:
    """The kernels' step for the tensors of ``group`` they take; returns their ids (the torch
    path runs the others)."""
    if group["backend"] == "torch" or not group["params"]:
        return set()
    path, _ = route(opt, group)
    if path == "torch":
        return set()
    todo = select(opt, group, present, path)
    if not todo:
        return set()
    segments = [[seg for seg in opt._segments(group, p, k) if is_regularized(group, seg)]
                for k, p, _, _ in todo]
    comm = None
    if opt.view.sharded:
        # at most 5 pieces and a free row per segment and one free row per tensor: a bound that
        # is the same on every rank, checked before any state changes
        bound = sum(6 * len(segs) for segs in segments) + len(todo)
        if path == "triton" and bound > MAX_GRID_Y:
            warnings.warn(f"ramda_ds: up to {bound} table rows, more than the {MAX_GRID_Y} of a "
                          "CUDA grid's y dimension the Triton kernels use: this param group "
                          "takes the torch path")
            return set()
        comms = {id(c): c for segs in segments for c in map(opt.view.comm_for, segs)
                 if c.world_size > 1}
        if len(comms) > 1:
            raise RuntimeError("a sharded view named more than one reducer for one param group")
        comm = next(iter(comms.values()), None)
    ramda = opt.kernel_kind == "ramda"
    tensors, after = [], []
    for (k, p, w, g), regs in zip(todo, segments):
        st, (s1, s2, W0), scalars, scale = opt.kernel_scalars(group, p, w)
        z = torch.empty_like(w) if ramda and group.get("keep_structured") else None
        probs = [Problem(seg, group_tau(group, seg, scale),
                         opt.view.sharded and opt.view.comm_for(seg).world_size > 1)
                 for seg in regs]
        tensors.append(TensorStep(g, s1, s2, W0, w, z, scalars, probs))
        after.append((p, w, st, z))
    plan = Plan(opt.kernel_kind, group.get("solver", "pg"), tensors, group["max_iters"],
                group["rtol"], sharded=opt.view.sharded, regularized=active(group), comm=comm,
                warm=opt._warm_roots if group.get("warm_start") else None, hints=opt._pg_hints,
                cache=opt._kernel_cache.setdefault(id(group), {}))
    for seg, stats in execute(plan, path):
        opt.last_stats[seg.name] = stats
    for p, w, st, z in after if ramda else ():  # RAMDA's epilogue: Ŵ and restarts
        if z is not None:
            opt.state[p]["structured"] = opt.view.wrap_state(p, z)
        opt._maybe_restart(group, st, w)
    return {id(p) for p, *_ in after}


def tensor_paths(opt, group: dict) -> list:
    """``(path, why or None)`` per tensor of ``group``: the path :func:`step` gives it and, when
    a requested fast path is not taken, why (the same rule, asked without communicating)."""
    params = [p for p, g, _ in opt.view.tensors(opt) if g is group]  # (ZeRO-3: its sub-groups)
    n = len(params)
    if group["backend"] == "torch" or not n:
        return [("torch", None)] * n
    dev = params[0].device
    path, why = route(opt, group, collective=False, device=dev)
    if path == "torch":
        return [("torch", why)] * n
    out = []
    named = ([(None, p, opt.view.name(p)) for p in params] if opt.view.sharded else
             [(k, p, group["param_names"][k]) for k, p in enumerate(group["params"])])
    for k, p, name in named:
        lp = opt.view.local(p.detach())
        w = lp.view(-1) if lp.is_contiguous() else lp.reshape(-1)
        why = tensor_refusal(opt, group, k, p, w, path, dev)
        out.append((path, None) if why is None else ("torch", f"{name}: {why}"))
    refused = [w for _, w in out if w is not None]
    if whole_group(opt, group, path) and refused:  # all of a group's tensors or none
        return [("torch", refused[0])] * n
    return out


def kernel_plan(opt) -> str:
    """What RAMDA's (or ProxGen's) step runs on, per tensor, for the run's log: ``"native"``,
    ``"torch"``, or e.g. ``"native for 30 tensors; torch for 2 (lm_head.weight: param dtype
    torch.bfloat16)"``."""
    counts: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for group in opt.param_groups:
        for path, why in tensor_paths(opt, group):
            counts[path] = counts.get(path, 0) + 1
            if why is not None:
                reasons.setdefault(path, why)
    if len(counts) == 1 and not reasons:
        return next(iter(counts))
    return "; ".join(f"{path} for {n} tensors" + (f" ({reasons[path]})" if path in reasons else "")
                     for path, n in counts.items())
