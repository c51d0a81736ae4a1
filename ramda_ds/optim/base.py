"""What every ramda_ds optimizer shares: validation, the restart schedule, segments, the solvers.

Param-group keys (all plain Python values, so they live in ``state_dict()``):

* ``regularizer``: ``"group_lasso"`` | ``"l1"`` | ``"nuclear"`` | ``None``; ``lam`` (λ ≥ 0);
  ``grouping`` for group lasso (see :mod:`ramda_ds.groups`).
* ``milestones`` (optimizer steps after which a new stage starts), ``gamma`` (lr/ε decay),
  ``final_stage_ramp`` (c = min(c0·√i, 1) in the stage after the last milestone).

Counters live in each tensor's state (``step``), not in the group: under ZeRO-3 one param group
is stepped once per sub-group, and a tensor without a gradient does not advance.  The stage is a
function of ``step``: ``stage = #{m ∈ milestones : step > m}``, the step inside the stage
``i = step − m_stage``, and the effective lr (ε) is ``group["lr"] · γ^stage`` — so an LR scheduler
that rewrites ``group["lr"]`` composes with the restart decay instead of overwriting it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..layout import Segment, Unsharded, layout_of
from ..regularizers import REGULARIZERS as _REGULARIZERS
from ..regularizers import group_tau, is_regularized, regularizer_of  # noqa: F401 (re-exported)
from ..solvers import SolverStats, Subproblem, solve_exact, solve_pg

REGULARIZERS = tuple(_REGULARIZERS)  # the names a param group's ``regularizer`` may take


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class StructuredOptimizer(torch.optim.Optimizer):
    """Base class; subclasses implement :meth:`_update_group` (the algorithm, one screen).

    ``last_stats`` maps parameter names to the :class:`SolverStats` of their latest solve (kept
    across calls: DeepSpeed ZeRO steps one param group per call).
    """

    #: per-tensor state that a restart zeroes / sets to W (subclasses override)
    restart_zero: tuple[str, ...] = ()
    restart_copy: tuple[str, ...] = ()
    #: what the fused kernels run for this optimizer (:mod:`.fast`): the plan's ``kind`` and, per
    #: kernel path, the solvers; empty: the torch step only
    kernel_kind: str | None = None
    kernel_support: dict[str, tuple[str, ...]] = {}

    def __init__(self, params, defaults: dict, view=None):
        defaults = {**dict(regularizer=None, lam=0.0, grouping="input", milestones=(), gamma=0.1,
                           final_stage_ramp=True), **defaults}
        self.view = view if view is not None else Unsharded()
        self.last_stats: dict[str, SolverStats] = {}
        self._writeback: list = []  # (local param, flat copy) of non-contiguous params this group
        # stores kept in memory, not checkpointed (the kernels receive them in the step plan):
        self._warm_roots: dict = {}  # exact solver, warm_start: root positions by segment
        self._pg_hints: dict = {}  # PG chunk lengths by segment name (speed only)
        self._kernel_cache: dict = {}  # per param group: index vectors of the sharded table
        self._agreed_paths: dict = {}  # the kernel path every rank agreed on, per backend/device
        super().__init__(params, defaults)  # validates every group (add_param_group)
        self.register_load_state_dict_pre_hook(_keep_state_dtypes)
        self.register_load_state_dict_post_hook(_unwrap_state)

    # ------------------------------------------------------------------ validation
    def _validate_group(self, g: dict, i: int) -> None:
        where = f"param_groups[{i}]"
        if "backend" in g:  # RAMDA, ProxGen: the step's kernels (ramda_ds.kernels)
            from .. import kernels

            kernels.check_backend(g["backend"], where)
        _check(isinstance(g["lr"], (int, float)) and math.isfinite(g["lr"]) and g["lr"] >= 0,
               f"{where}: lr must be a finite number >= 0, got {g['lr']!r}")
        _check(g["regularizer"] in REGULARIZERS,
               f"{where}: unknown regularizer {g['regularizer']!r}; expected one of {REGULARIZERS}")
        _check(math.isfinite(g["lam"]) and g["lam"] >= 0, f"{where}: lam must be >= 0, got {g['lam']!r}")
        ms = tuple(g["milestones"])
        _check(all(isinstance(m, int) and m > 0 for m in ms) and list(ms) == sorted(set(ms)),
               f"{where}: milestones must be strictly increasing positive ints, got {ms!r}")
        g["milestones"] = ms
        _check(0 < g["gamma"] <= 1, f"{where}: gamma must be in (0, 1], got {g['gamma']!r}")
        if "c" in g:
            _check(0 < g["c"] <= 1, f"{where}: c (the paper's averaging weight, old name momentum) "
                                    f"must be in (0, 1], got {g['c']!r}")
        if "eps" in g:
            _check(g["eps"] > 0, f"{where}: eps must be > 0, got {g['eps']!r}")
        if "max_iters" in g:  # optimizers with a subproblem solver
            _check(g.get("solver", "pg") in ("pg", "exact"),
                   f"{where}: solver must be 'pg' or 'exact', got {g.get('solver')!r}")
            _check(isinstance(g["max_iters"], int) and g["max_iters"] >= 1,
                   f"{where}: max_iters must be an int >= 1, got {g['max_iters']!r}")
            _check(0 <= g["rtol"] < 1, f"{where}: rtol must be in [0, 1), got {g['rtol']!r}")
            _check(isinstance(g.get("warm_start", False), bool),
                   f"{where}: warm_start must be True or False, got {g.get('warm_start')!r}")
            e = g.get("inexact_eps0")
            _check(e is None or e > 0, f"{where}: inexact_eps0 must be None or > 0, got {e!r}")
        why = regularizer_of(g).validate(g, where, isinstance(self.view, Unsharded))
        _check(why is None, why)
        _check(len(g["param_names"]) == len(g["params"]) == len(g["param_shapes"]),
               f"{where}: param_names / param_shapes must have one entry per parameter")
        for name, shape in zip(g["param_names"], g["param_shapes"]):  # fail now, not at a step
            layout_of(g, tuple(shape), name)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then: names and original shapes recorded (``param_names``,
        ``param_shapes``: given, or ``param_groups[i][k]`` and the tensor's shape), and the group
        validated, so a bad group is refused before any step."""
        i = len(self.param_groups)
        params = param_group["params"]
        if not isinstance(params, set):  # torch refuses sets with its own message
            params = [params] if torch.is_tensor(params) else list(params)
            param_group = dict(param_group, params=params)
            if params and all(isinstance(x, tuple) for x in params):  # named parameters
                param_group.update(params=[t for _, t in params], param_names=[n for n, _ in params])
                params = param_group["params"]
            param_group.setdefault("param_names",
                                   [f"param_groups[{i}][{k}]" for k in range(len(params))])
            param_group.setdefault("param_shapes",
                                   [tuple(getattr(p, "ds_shape", p.shape)) for p in params])
        if "momentum" in param_group:  # a group-level override in the deprecated spelling
            param_group["c"] = averaging_weight(param_group.pop("c", None), param_group.pop("momentum"))
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1], i)
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict):
        """As torch's, except that each group keeps this optimizer's ``backend`` (where it has
        one): it says how the step runs here (like the device), not what is computed, and a
        checkpoint written with another one must not switch it silently."""
        backends = [g.get("backend") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, b in zip(self.param_groups, backends):
            if b is not None:
                g["backend"] = b

    def _kernel_path(self, group: dict, collective: bool = True, device=None) -> str:
        """The path of :mod:`ramda_ds.kernels` this group's step takes (``backend`` resolved
        for its device).  Under a sharded view every rank must take the same one (their
        collectives differ), so the first step agrees on it with one all-reduce: if any rank's
        kernels did not build or pass their self-test (``"auto"``), all take torch.
        ``collective=False`` (the run's log): the agreed path if known, else this rank's;
        ``device``: the group's (ZeRO-3 empties ``params`` between its sub-groups' steps)."""
        from .. import kernels

        dev = device if device is not None else group["params"][0].device
        path = kernels.choose(group["backend"], dev)
        if not self.view.sharded or path == "torch" and not collective:
            return path
        agreed = self._agreed_paths
        key = (group["backend"], str(dev), path)
        if key not in agreed and collective:
            local = self.view.local(group["params"][0].detach())
            refuse = torch.tensor([0.0 if path != "torch" else 1.0], dtype=torch.float64,
                                  device=local.device)
            self.view.comm.max_(refuse)
            agreed[key] = path if refuse.item() == 0 else "torch"
            if agreed[key] != path:
                import warnings

                warnings.warn(f"ramda_ds: backend={group['backend']!r} resolved to {path!r} here "
                              "but another rank cannot run it; every rank uses torch")
        return agreed.get(key, path)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        present = self._agree_on_gradients()
        self._hold_support()
        for group in self.param_groups:
            if group["lr"] == 0:  # the probing step of DCP / accelerate: create state, change nothing
                for _, p, w, g in self._params(group, present):
                    self.local_state(p, w)
            else:
                self._update_group(group, present)
                for p, w in self._writeback:
                    p.detach().copy_(w.view(p.shape))
            self._writeback.clear()
        return loss

    def _agree_on_gradients(self) -> set[int]:
        """ids of params to update; raises on NaN/Inf before anything changes.

        Sharded: one max-all-reduce makes every rank agree (a rank may hold an empty shard
        without a gradient, or see the only NaN), so all ranks run the same collectives.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        local = [self.view.local(p.grad) if p.grad is not None else None for p in params]
        norms = torch._foreach_norm([g for g in local if g is not None]) if any(
            g is not None for g in local) else []
        bad = bool(norms) and not bool(torch.stack(norms).isfinite().all())
        has = [g is not None for g in local]
        if self.view.comm.world_size > 1:
            device = self.view.local(params[0].detach()).device if params else None
            flags = torch.tensor([float(bad)] + [float(h) for h in has], dtype=torch.float64,
                                 device=device)
            self.view.comm.max_(flags)
            bad, has = bool(flags[0]), [bool(f) for f in flags[1:]]
        if bad:
            raise FloatingPointError(
                "non-finite gradient (NaN or Inf); the parameters and optimizer state of the param "
                "groups in this step() call were left unchanged (DeepSpeed ZeRO-1/2 steps one "
                "group per call). Lower the learning rate, clip gradients or check the loss.")
        return {id(p) for p, h in zip(params, has) if h}

    def _hold_support(self) -> None:
        """G ← G∘support on tensors with a frozen support (:mod:`ramda_ds.compress.support`):
        removed units get no gradient, on every step path (torch and the kernels alike)."""
        for p, st in self.state.items():
            if "support" in st and p.grad is not None:
                g = self.view.local(p.grad.detach())
                s = self.view.local(st["support"]).view(g.shape).to(g.dtype)
                g.mul_(s)

    # ------------------------------------------------------------------ restart schedule
    def _advance(self, group: dict, st: dict) -> tuple[int, int]:
        """Count one step of this tensor; return (stage, step inside the stage, from 1)."""
        st["step"] += 1
        step = int(st["step"].item())
        ms = group["milestones"]
        stage = sum(step > m for m in ms)
        return stage, step - (ms[stage - 1] if stage else 0)

    @staticmethod
    def _decayed(group: dict, key: str, stage: int) -> float:
        return group[key] * group["gamma"] ** stage

    @staticmethod
    def _c(group: dict, stage: int, i: int) -> float:
        """The averaging weight c (the paper's momentum); grows as min(c0·√i, 1) in the final stage."""
        c0 = group["c"]
        if group["final_stage_ramp"] and group["milestones"] and stage == len(group["milestones"]):
            return min(c0 * math.sqrt(i), 1.0)
        return c0

    def _maybe_restart(self, group: dict, st: dict, w: torch.Tensor) -> None:
        """After a milestone step: zero the accumulators, W0 ← W (App. A.1)."""
        if int(st["step"].item()) not in group["milestones"]:
            return
        for k in self.restart_zero:
            st[k].zero_()
        for k in self.restart_copy:
            st[k].copy_(w)

    # ------------------------------------------------------------------ helpers for subclasses
    def _params(self, group: dict, present: set[int], writeback: bool = True):
        """(index, param, flat local param, flat local grad) for params to update.

        The flat param is a view (or, for non-contiguous layouts such as channels_last, a copy
        written back after the update; ``writeback=False``: a copy that is not, for a look that
        changes nothing) in logical row-major order of this rank's local tensor; the grad is in
        the state dtype (float64 for float64 params, else float32), zeros where this rank has no
        gradient but another rank does.
        """
        for k, p in enumerate(group["params"]):
            if id(p) not in present:
                continue
            lp = self.view.local(p.detach())
            w = lp.view(-1) if lp.is_contiguous() else lp.reshape(-1)
            if writeback and not lp.is_contiguous():
                self._writeback.append((lp, w))
            dtype = state_dtype(p)
            if p.grad is None:
                g = torch.zeros(w.shape, dtype=dtype, device=w.device)
            else:
                g = self.view.local(p.grad.detach()).reshape(-1).to(dtype)
            yield k, p, w, g

    def local_state(self, p: torch.Tensor, w: torch.Tensor | None = None) -> dict:
        """This rank's flat local views of ``self.state[p]``, created on first use from ``w``
        (the flat local parameter; default: read from ``p``).

        Per-element state is stored as the view wants (a DTensor like ``p`` under FSDP2).
        """
        st = self.state[p]
        if not st:
            if w is None:
                w = self.view.local(p.detach()).reshape(-1)
            new = dict(step=torch.zeros((), dtype=torch.float32),
                       **self.init_state(w, state_dtype(p)))
            st.update({k: self.view.wrap_state(p, v) for k, v in new.items()})
        return {k: (self.view.local(v).view(-1) if torch.is_tensor(v) and v.dim() else v)
                for k, v in st.items()}

    def add_state(self, p: torch.Tensor, key: str) -> torch.Tensor:
        """A new zero per-element state tensor ``key`` of ``p`` (e.g. RAMDA's ``structured`` when
        a checkpoint holds it); returns its flat local view."""
        local = self.view.local(p.detach())
        self.state[p][key] = self.view.wrap_state(
            p, torch.zeros(local.numel(), dtype=state_dtype(p), device=local.device))
        return self.view.local(self.state[p][key]).view(-1)

    def init_state(self, w: torch.Tensor, dtype: torch.dtype) -> dict:
        """Fresh state of one tensor: per-element tensors like ``w`` in ``dtype``, 0-d scalars."""
        raise NotImplementedError

    def state_keys(self) -> set[str]:
        """The per-element state keys of this optimizer (without optional ones like Ŵ); worked
        out once (the fast steps ask per tensor and step)."""
        if "_state_keys" not in self.__dict__:
            e = torch.zeros(0)
            self._state_keys = frozenset(k for k, v in self.init_state(e, e.dtype).items() if v.dim())
        return set(self._state_keys)

    def _segments(self, group: dict, p: torch.Tensor, k: int) -> list[Segment]:
        return self.view.segments(p, group, k)

    def _solve(self, group: dict, items: list[tuple[Segment, Subproblem, int]]) -> None:
        """Solve the group's subproblems ``(segment, subproblem, step)`` with its solver, batched
        by the reducer the view names for each segment; record stats by parameter name.

        ``step`` is the tensor's own step count t (in its stage) for PG's inexactness tolerance
        ε_t = ``inexact_eps0``/t. Segments the view solves locally (replicated, or ``local_solve``
        tensors with no spanning group) stop PG on their own groups: per rank, within tolerance.
        """
        reg = regularizer_of(group)
        if not reg.batched:  # solved tensor by tensor (L1's closed form, the nuclear norm's PG)
            for seg, prob, _ in items:
                stats = reg.solve(prob, seg.shape, group)
                if stats is not None:
                    self.last_stats[seg.name] = stats
            return
        batches: dict[int, tuple] = {}
        for seg, prob, step in items:
            comm = self.view.comm_for(seg)
            batches.setdefault(id(comm), (comm, []))[1].append((seg, prob, step))
        for comm, batch in batches.values():
            probs = [prob for _, prob, _ in batch]
            if group.get("solver", "pg") == "exact":
                # warm_start: each group's root position from its previous solve (kept per group
                # in memory, not checkpointed: a resumed run matches to float precision)
                warm = self._warm_roots if group.get("warm_start") else None
                for seg, pr, _ in batch if warm is not None else ():
                    pr.root_at = warm.get((seg.name, seg.lo, seg.hi))
                stats = solve_exact(probs, comm)
                for seg, pr, _ in batch if warm is not None else ():
                    warm[(seg.name, seg.lo, seg.hi)] = pr.root_at
            else:
                eps0 = group.get("inexact_eps0")
                tol = None if eps0 is None else [eps0 / step for _, _, step in batch]
                stats = solve_pg(probs, comm, group["max_iters"], group["rtol"], tol)
            for (seg, _, _), st in zip(batch, stats):
                self.last_stats[seg.name] = st

    def _prox_(self, group: dict, items: list[tuple[Segment, torch.Tensor, float]]) -> None:
        """In place ``x ← prox_{τψ}(x)`` in closed form (RMDA, ProxSGD); one collective per
        reducer."""
        batches: dict[int, tuple] = {}
        for seg, x, tau in items:
            comm = self.view.comm_for(seg)
            batches.setdefault(id(comm), (comm, []))[1].append((seg, x, tau))
        for comm, batch in batches.values():
            regularizer_of(group).prox_(batch, comm)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer state of a float64 parameter is float64; of any other (fp32, bf16, fp16) fp32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def averaging_weight(c: float | None, momentum: float | None) -> float:
    """The paper's c from ``c=`` or the older spelling ``momentum=`` (which means c here).

    ``momentum`` in (0.5, 1) is refused: in torch's and MADGRAD's convention momentum is the
    weight of the *old* average (0.9 there is c = 0.1 here), and such a value is almost always
    that convention; c = 1 (no averaging) and c ≤ 0.5 (the same under both readings at 0.5) are
    accepted under either name.
    """
    if momentum is None:
        return 0.1 if c is None else c
    if c is not None:
        raise ValueError("pass c (the paper's averaging weight) or its old name momentum, not both")
    if 0.5 < momentum < 1:
        raise ValueError(
            f"momentum={momentum} looks like torch/MADGRAD's convention (weight of the old "
            f"average); ramda_ds's averaging weight is the paper's c = weight of the NEW point, "
            f"W <- (1-c)W + c*W_hat. For that convention pass c={1 - momentum:g}; if you really "
            f"mean c={momentum}, pass c={momentum}.")
    return momentum


def find_structured(optimizer):
    """The ramda_ds optimizer inside accelerate / DeepSpeed wrappers (``.optimizer`` chains), or
    None (e.g. AdamW)."""
    for _ in range(5):
        if isinstance(optimizer, StructuredOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class _Kept:
    """Hides a state tensor from torch's load_state_dict, which casts floating-point state to the
    parameter's dtype (fp32 V/U/W0 of a bf16 parameter would come back as bf16, float64 α as fp32)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


def _keep_state_dtypes(optimizer, state_dict):
    """Copy of ``state_dict`` with state tensors wrapped (the caller's dict is untouched)."""
    state = {pid: {k: (_Kept(v) if torch.is_tensor(v) else v) for k, v in st.items()}
             for pid, st in state_dict["state"].items()}
    return {**state_dict, "state": state}


def _unwrap_state(optimizer):
    """Unwrap, keeping the saved dtype; per-element state moves to the parameter's device, 0-d
    counters (step, α) stay on the CPU where they are created (reading them needs no sync)."""
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, _Kept):
                st[k] = v.tensor.to(device=p.device) if v.tensor.dim() else v.tensor
