"""Scale model of ramda_ds's sharded step: Llama-7B/-70B at 8, 64 and 512 ranks, in one process.

    PYTHONPATH=. python bench/scale_model.py                     # README table (~1-2 min, 2 cores)
    PYTHONPATH=. python bench/scale_model.py --full              # every rank simulated, slow
    PYTHONPATH=. python bench/scale_model.py --models llama-7b --worlds 64 --regularize linear

Nothing is allocated: models live on the meta device, and one process plays rank r of N through
torch's fake process group (``dist.init_process_group("fake", store=FakeStore(), ...)``).  What is
run is the library's own code: the views' ``describe`` (``ZeroFlatView``, ``Zero3View``,
``FSDP2View``), ``make_segment`` / ``SegmentGroups``, and ``set_spans`` (the collective-free part
of ``attach_spans``; its ``all_gather_object`` is replaced by computing every rank's
``span_inputs`` in-process).  Collective sizes come from the solvers' own ``_combine`` called with
a recording reducer, in the order ``solve_pg`` / ``solve_exact`` issue them (checked against real
2-process runs by tests/test_scale_model.py).

Layouts:

* ``zero12`` — DeepSpeed 0.19 ZeRO-1/2 flat partitions (stage_1_and_2.py): each param group's
  parameters concatenated (``parameter_alignment`` off: no per-parameter padding), padded to a
  multiple of ``2·N`` (``nccl_start_alignment_factor · world``), rank r holding
  ``[r·len/N, (r+1)·len/N)``; fragment addresses by DeepSpeed's own ``link_hp_params`` on meta
  tensors.  One ``optimizer.step()`` per param group.
* ``zero3`` — every parameter split into ``ceil(numel/N)`` elements per rank (the last ranks
  padded), sub-groups by DeepSpeed's ``_create_fp16_sub_groups`` (``sub_group_size`` 1e9, the
  default); one ``optimizer.step()`` per sub-group.
* ``fsdp2_shard0`` / ``fsdp2_shard1`` — ``fully_shard`` per decoder layer then the root (as
  launch/train_lm.py), default ``Shard(0)`` or ``shard_placement_fn=shard_columns()``.

Regularized tensors: ``finetune`` = what launch/finetune_llm.py regularizes by default
(``mlp.down_proj`` input columns and ``self_attn.o_proj`` per head, ``head:128``); ``linear`` =
``build_param_groups``' default, every ``nn.Linear`` weight (lm_head included) input-wise.

Counted: ramda_ds's own all-reduces only (not DeepSpeed's/FSDP's gradient and parameter traffic).
Spanning groups, bytes per collective and collectives per step are global (the same on every rank,
checked on the simulated ranks); state, span bytes and set-up time are per simulated rank (max).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ramda_ds.comm import ProcessGroupReducer, Reducer
from ramda_ds.layout import make_segment
from ramda_ds.sharding.base import set_spans, span_inputs
from ramda_ds.solvers import _combine

F64 = torch.float64
MODELS = {  # Llama-2 shapes (vocab 32000)
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}
LAYOUTS = ("zero12", "zero3", "fsdp2_shard0", "fsdp2_shard1")
STATE_BYTES = 12  # RAMDA: V, U, W0 in fp32 (keep_structured=True, as finetune_llm uses: +4)
PG_MAX_ITERS, EXACT_MAX_ITERS = 100, 50  # the optimizers' / solve_exact's defaults
DS_SUB_GROUP_SIZE = int(1e9)  # DeepSpeed's zero_optimization.sub_group_size default


# ----------------------------------------------------------------------------- model, groups
_PRISTINE: dict = {}


def meta_llama(shape: dict):
    """A Llama of ``shape`` on the meta device (built once per shape, then copied)."""
    key = tuple(sorted(shape.items()))
    if key not in _PRISTINE:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.initialization import no_init_weights

        with torch.device("meta"), no_init_weights():
            _PRISTINE[key] = LlamaForCausalLM(LlamaConfig(**shape))
    return copy.deepcopy(_PRISTINE[key])


def param_groups(model, regularize: str, lam: float = 1e-6) -> list[dict]:
    """The optimizer's param groups, built as the launch script / ``build_param_groups`` does."""
    from ramda_ds.param_groups import build_param_groups

    if regularize == "linear":
        return build_param_groups(model, "group_lasso", lam=lam)
    if regularize == "finetune":
        from ramda_ds.hf.units import unit_param_groups

        return unit_param_groups(model, lam)  # FFN neurons and heads, as finetune_llm.py
    raise ValueError(f"regularize must be 'finetune' or 'linear', got {regularize!r}")


@contextmanager
def fake_rank(rank: int, world: int):
    """This process is rank ``rank`` of ``world`` (torch's fake process group: no traffic)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- layouts
class _Sim:
    """One layout of one model at N ranks: what rank ``rank`` is handed, and every rank's
    ``describe`` output.  Subclasses build the objects the real view reads."""

    def __init__(self, shape, regularize, world):
        self.shape, self.regularize, self.world = shape, regularize, world

    def build(self, rank):  # -> (view, [(tensor, group)], calls: [[handed index]])
        raise NotImplementedError

    def describe_as(self, q):  # every handed tensor's describe() as rank q (same objects)
        raise NotImplementedError


class Zero12Sim(_Sim):
    """Stand-in for ``DeepSpeedZeroOptimizer`` (the attributes ``ZeroFlatView`` reads)."""

    def __init__(self, shape, regularize, world):
        super().__init__(shape, regularize, world)
        self.model = meta_llama(shape)
        self.groups = param_groups(self.model, regularize)
        self.names = {id(p): n for n, p in self.model.named_parameters()}
        align = 2 * world  # nccl_start_alignment_factor (2) * dp world size
        self.part = [math.ceil(sum(p.numel() for p in g["params"]) / align) * align // world
                     for g in self.groups]

    def _zero(self, q, flats=None):
        """Link every parameter's ``_hp_mapping`` to rank ``q``'s partition (DeepSpeed's code)."""
        from deepspeed.utils import link_hp_params

        flats = flats or [torch.empty(n, device="meta") for n in self.part]
        for i, (g, flat, n) in enumerate(zip(self.groups, flats, self.part)):
            link_hp_params(lp_param_list=g["params"], flat_hp_partition=flat, gradient_dict={},
                           offload_gradient_dict={}, use_offload=False, param_group_index=i,
                           partition_start=q * n, partition_size=n, dp_group=None)
        return SimpleNamespace(single_partition_of_fp32_groups=flats,
                               bit16_groups=[g["params"] for g in self.groups])

    def build(self, rank):
        from ramda_ds.sharding.deepspeed import ZeroFlatView

        zero = self._zero(rank)
        self.rank, self.flats = rank, zero.single_partition_of_fp32_groups
        self.view = ZeroFlatView(zero, ProcessGroupReducer(None), self.names)
        handed = list(zip(zero.single_partition_of_fp32_groups, self.groups))
        return self.view, handed, [[i] for i in range(len(handed))]  # a step() per group

    def describe_as(self, q):
        from ramda_ds.sharding.deepspeed import ZeroFlatView

        zero = self._zero(q)
        view = ZeroFlatView(zero, None, self.names)
        out = [view.describe(f, g) for f, g in zip(zero.single_partition_of_fp32_groups,
                                                  self.groups)]
        self._zero(self.rank, self.flats)  # the parameters are shared: back to the built rank
        return out


class Zero3Sim(_Sim):
    """Stand-in for ``DeepSpeedZeroOptimizer_Stage3`` (``fp16_groups`` = sub-groups)."""

    def __init__(self, shape, regularize, world):
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

        super().__init__(shape, regularize, world)
        model = meta_llama(shape)
        self.groups = param_groups(model, regularize)
        name = {id(p): n for n, p in model.named_parameters()}
        self.names, self.fp16_groups, self.sub_group_to_group_id = {}, [], []
        for gi, g in enumerate(self.groups):
            params = []
            for p in g["params"]:
                part = math.ceil(p.numel() / world)  # Init._aligned_size(p) // world
                sp = SimpleNamespace(ds_numel=p.numel(), ds_shape=tuple(p.shape), shape=(0,),
                                     ds_tensor=SimpleNamespace(ds_numel=part),
                                     partition_numel=lambda part=part: part)
                self.names[id(sp)] = name[id(p)]
                params.append(sp)
            for sub in Stage3._create_fp16_sub_groups(
                    SimpleNamespace(sub_group_size=DS_SUB_GROUP_SIZE), params):
                self.fp16_groups.append(sub)
                self.sub_group_to_group_id.append(gi)
        self.flats = [torch.empty(sum(p.ds_tensor.ds_numel for p in sub), device="meta")
                      for sub in self.fp16_groups]
        self.zero = SimpleNamespace(fp16_groups=self.fp16_groups, fp32_partitioned_groups_flat=self.flats,
                                    sub_group_to_group_id=self.sub_group_to_group_id)

    def build(self, rank):
        from ramda_ds.sharding.deepspeed import Zero3View

        comm = ProcessGroupReducer(None)
        view = Zero3View(self.zero, comm, self.names, dist.get_rank())
        handed = [(f, self.groups[gi]) for f, gi in zip(self.flats, self.sub_group_to_group_id)]
        return view, handed, [[i] for i in range(len(handed))]  # a step() per sub-group

    def describe_as(self, q):
        from ramda_ds.sharding.deepspeed import Zero3View

        view = Zero3View(self.zero, None, self.names, q)
        return [view.describe(f, self.groups[gi])
                for f, gi in zip(self.flats, self.sub_group_to_group_id)]


class FSDP2Sim(_Sim):
    """A meta Llama wrapped by ``fully_shard`` under the fake process group of rank ``rank``;
    other ranks' ``describe`` by the same DTensors with the mesh coordinate set to theirs."""

    columns = False

    def __init__(self, shape, regularize, world):
        super().__init__(shape, regularize, world)

    def build(self, rank):
        from torch.distributed.fsdp import fully_shard

        from ramda_ds.sharding.fsdp import FSDP2View, shard_columns

        from torch.distributed.device_mesh import init_device_mesh

        model = meta_llama(self.shape)
        # fully_shard's default mesh (the world), named per rank: torch caches DTensor specs by
        # mesh equality, which ignores the rank, so a second fake rank in this process would
        # otherwise get the first one's mesh (and its coordinate)
        kw = dict(mesh=init_device_mesh("cpu", (self.world,), mesh_dim_names=(f"dp{rank}",)))
        if self.columns:
            kw["shard_placement_fn"] = shard_columns()
        for block in model.model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        self.groups = param_groups(model, self.regularize)  # after fully_shard, as required
        names = {id(p): n for n, p in model.named_parameters()}
        self.handed = [(p, g) for g in self.groups for p in g["params"]]
        self.meshes = list({id(p.device_mesh): p.device_mesh for p, _ in self.handed}.values())
        self.view = FSDP2View(ProcessGroupReducer(self.meshes[0].get_group(0)), names)
        return self.view, self.handed, [list(range(len(self.handed)))]  # one step() call

    def describe_as(self, q):
        for mesh in self.meshes:  # 1-D meshes: rank q's coordinate is q
            mesh._sym_get_coordinate = lambda dim: q
        try:
            return [self.view.describe(p, g) for p, g in self.handed]
        finally:
            for mesh in self.meshes:
                del mesh._sym_get_coordinate  # the class's method again


class FSDP2ColsSim(FSDP2Sim):
    columns = True


SIMS = {"zero12": Zero12Sim, "zero3": Zero3Sim, "fsdp2_shard0": FSDP2Sim,
        "fsdp2_shard1": FSDP2ColsSim}


# ----------------------------------------------------------------------------- collectives
class Recorder(Reducer):
    """A reducer that sends nothing and logs (op, bytes) of every all-reduce."""

    def __init__(self, world):
        self.world_size, self.log = world, []

    def sum_(self, buf):
        self.log.append(("sum", buf.numel() * buf.element_size()))

    def max_(self, buf):
        self.log.append(("max", buf.numel() * buf.element_size()))


def solve_collectives(segs, world, solver, iters) -> list[tuple[str, str, int]]:
    """(stage, op, bytes) of every all-reduce one ``solve_pg`` / ``solve_exact`` call issues
    for the subproblems of ``segs`` when problem i stops after ``iters[i]`` iterations.

    Order as in ramda_ds/solvers.py: screening (‖b_g‖², 1 vector per group), group extremes of P
    (max; PG 1 vector, exact 2), then per iteration j the spanning sums of the live problems
    (PG 3: ‖Y‖², Σ P Y², Σ b Y; exact 2) plus, from j = 2 on, the previous iteration's scalars of
    the problems that went on (PG 2: Q, residual²; exact 1: unconverged count) — in sharded mode
    iterate j is decided one collective later, so a problem stopping after K is in K+1
    collectives — and the final statistics (PG 4 scalars per problem, exact 2)."""
    pg = solver == "pg"
    probs = [SimpleNamespace(span=s.span, b=torch.empty(0), n=s.groups.num_groups) for s in segs]
    rec, seen = Recorder(world), {}

    def stage(name, ps, nvec, scalars=None, op="sum"):
        """``_combine`` of ``nvec`` per-group vectors of ``ps`` and ``scalars`` (memoized:
        the same problems and scalar count send the same bytes)."""
        key = (name, tuple(map(id, ps)), len(scalars) if scalars else None)
        if key not in seen:
            vs = [[torch.zeros(p.n, dtype=F64) for _ in range(nvec)] for p in ps]
            before = len(rec.log)
            _combine(rec, ps, vs, scalars, op=op)
            seen[key] = [(name, *e) for e in rec.log[before:]]
        return seen[key]

    out = stage("screen", probs, 1)
    out += stage("extremes", probs, 1 if pg else 2, op="max")
    cap = PG_MAX_ITERS if pg else EXACT_MAX_ITERS
    pending = None
    for j in range(1, cap + 1):
        live = [i for i, k in enumerate(iters) if j <= k + 1 or k >= cap]
        if not live:
            break
        out += stage("iteration", [probs[i] for i in live], 3 if pg else 2, pending)
        go = [i for i in live if j <= iters[i]]
        pending = [torch.zeros(2 if pg else 1, dtype=F64) for _ in go] or None
    out += stage("stats", probs, 0, [torch.zeros(4 if pg else 2, dtype=F64) for _ in probs])
    return out


def step_collectives(per_call, groups_of_call, world, solver, k):
    """All-reduces of one training step: per ``optimizer.step()`` call the gradient agreement
    (max of 1 + #params flags) and one solve per regularized param group of the call.  ``k``:
    iterations of every tensor, or ``{parameter name: iterations}``."""
    out = []
    for segs_by_group, nparams in zip(per_call, groups_of_call):
        out.append(("agree", "max", 8 * (1 + nparams)))
        for segs in segs_by_group:
            if segs:
                iters = [k[s.name] for s in segs] if isinstance(k, dict) else [k] * len(segs)
                out += solve_collectives(segs, world, solver, iters)
    return out


# ----------------------------------------------------------------------------- one config
def simulate(shape: dict, world: int, layout: str, regularize: str = "finetune",
             ranks=None, pg_iters: int = 10, exact_passes: int = 5) -> dict:
    """The scale-model numbers of one (model, N, layout); ``ranks`` to simulate explicitly
    (default: 0, N/2, N−1).  ``pg_iters`` / ``exact_passes``: iterations of every tensor or
    ``{name: iterations}``.  ``inputs`` of the result: every rank's ``span_inputs`` per handed
    tensor (what ``attach_spans`` all-gathers).  Raises ValueError if the view refuses the layout."""
    ranks = sorted(set(ranks if ranks is not None else (0, world // 2, world - 1)))
    sim = SIMS[layout](shape, regularize, world)
    every = None
    per_rank = {}
    for r in ranks:
        with fake_rank(r, world):
            view, handed, calls = sim.build(r)
            if every is None:  # every rank's all-gathered span inputs, computed here
                every = []
                for q in range(world):
                    desc = sim.describe_as(q)
                    every.append([span_inputs([make_segment(group=g, **d) for d in ds])
                                  for ds, (_, g) in zip(desc, handed)])
            t0 = time.perf_counter()
            segs_of = []
            for h, (p, g) in enumerate(handed):
                segs = [make_segment(group=g, **d) for d in view.describe(p, g)]
                set_spans(segs, [every[q][h] for q in range(world)], r)
                segs_of.append(segs)
            setup = time.perf_counter() - t0
            for h, segs in enumerate(segs_of):  # the simulated rank saw what it computed for r
                assert span_inputs(segs) == every[r][h], f"rank {r}: describe differs ({layout})"
            per_rank[r] = _rank_numbers(view, handed, calls, segs_of, world, pg_iters,
                                        exact_passes, setup)
    first = per_rank[ranks[0]]
    for r, v in per_rank.items():  # global quantities agree on every simulated rank
        for key in ("spanning", "groups", "pg", "exact", "pg_next", "exact_next", "spanning_by"):
            assert v[key] == first[key], (layout, world, r, key)
    return dict(world=world, layout=layout, regularize=regularize, ranks=ranks,
                spanning=first["spanning"], groups=first["groups"],
                spanning_by=first["spanning_by"], pg=first["pg"], exact=first["exact"],
                pg_next=first["pg_next"], exact_next=first["exact_next"],
                pg_iters=pg_iters, exact_passes=exact_passes,
                state_bytes=max(v["state_bytes"] for v in per_rank.values()),
                span_bytes=max(v["span_bytes"] for v in per_rank.values()),
                setup_s=max(v["setup_s"] for v in per_rank.values()),
                handed=first["handed"], step_calls=first["step_calls"], inputs=every)


def _rank_numbers(view, handed, calls, segs_of, world, k_pg, k_exact, setup):
    spanning_by, groups, span_bytes = {}, 0, 0
    for (p, g), segs in zip(handed, segs_of):
        for s in segs:
            if s.groups is None or g["lam"] == 0:
                continue
            spanning_by[s.name] = 0 if s.span is None else s.span.count
            if s.span is not None:
                span_bytes += sum(t.numel() * t.element_size()
                                  for t in (s.span.local_idx, s.span.global_pos, s.span.owned))
    for g in {id(g): g for _, g in handed}.values():
        if g["lam"] > 0 and g.get("regularizer"):
            from ramda_ds.layout import layout_of

            groups += sum(layout_of(g, shp).groups for shp in g["param_shapes"])
    per_call, nparams = [], []
    for call in calls:
        by_group = {}
        for h in call:
            p, g = handed[h]
            if g["lam"] > 0:
                by_group.setdefault(id(g), []).extend(
                    s for s in segs_of[h] if s.groups is not None and not s.replicated)
        per_call.append(list(by_group.values()))
        nparams.append(len(call))
    res = {}
    for solver, k in (("pg", k_pg), ("exact", k_exact)):
        res[solver] = step_collectives(per_call, nparams, world, solver, k)
        res[solver + "_next"] = step_collectives(per_call, nparams, world, solver,
                                                 k + 1 if isinstance(k, int) else k)
    numel = sum(view.local(p).numel() for p, _ in handed)
    return dict(spanning=sum(spanning_by.values()), groups=groups, spanning_by=spanning_by,
                state_bytes=STATE_BYTES * numel, span_bytes=span_bytes, setup_s=setup,
                handed=len(handed), step_calls=len(calls), **res)


# ----------------------------------------------------------------------------- report
def _fmt_bytes(n):
    for unit, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= s:
            return f"{n / s:.1f} {unit}"
    return f"{n} B"


def summary(res: dict) -> dict:
    """Table cells: iteration all-reduce bytes, collectives per step as a + b·K."""
    out = {}
    for solver, k in (("pg", res["pg_iters"]), ("exact", res["exact_passes"])):
        now, nxt = len(res[solver]), len(res[solver + "_next"])
        it = [b for st, _, b in res[solver] if st == "iteration"]
        out[solver] = dict(calls=now, slope=nxt - now, const=now - (nxt - now) * k,
                           iter_bytes=max(it) if it else 0,
                           step_bytes=sum(b for *_, b in res[solver]))
    return out


def row(model, res) -> str:
    if "error" in res:
        return f"| {model} | {res['world']} | {res['layout']} | refused: {res['error']} |"
    s = summary(res)
    frac = res["spanning"] / res["groups"] if res["groups"] else 0.0
    cells = [model, str(res["world"]), res["layout"],
             f"{res['spanning']:,} / {res['groups']:,} ({100 * frac:.1f}%)"]
    for solver, k in (("pg", res["pg_iters"]), ("exact", res["exact_passes"])):
        c = s[solver]
        cells += [_fmt_bytes(c["iter_bytes"]),
                  f"{c['const']} + {c['slope']}·K = {c['calls']} (K={k})"]
    cells += [_fmt_bytes(s["pg"]["step_bytes"]), _fmt_bytes(res["state_bytes"]),
              _fmt_bytes(res["span_bytes"]), f"{1e3 * res['setup_s']:.0f}"]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| model | ranks | layout | spanning groups | PG all-reduce / iteration | PG all-reduces / "
          "step | exact all-reduce / pass | exact all-reduces / step | PG bytes / step | "
          "V,U,W0 / rank | spans / rank | set-up ms / rank |\n|" + "---|" * 12)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama-7b,llama-70b")
    ap.add_argument("--worlds", default="8,64,512")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--regularize", default="finetune", choices=("finetune", "linear"))
    ap.add_argument("--pg_iters", type=int, default=10, help="PG iterations per tensor (K)")
    ap.add_argument("--exact_passes", type=int, default=5, help="Newton passes per tensor")
    ap.add_argument("--full", action="store_true", help="simulate every rank explicitly")
    ap.add_argument("--json", default="", help="also write the raw results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # small ops only; threads just contend
    print(f"regularized: {a.regularize}; PG K={a.pg_iters}, exact n={a.exact_passes} per tensor; "
          f"ranks simulated: {'all' if a.full else '0, N/2, N-1'}\n")
    print(HEADER)
    raw, t_all = [], time.perf_counter()
    for model in a.models.split(","):
        for world in (int(w) for w in a.worlds.split(",")):
            for layout in a.layouts.split(","):
                try:
                    res = simulate(MODELS[model], world, layout, a.regularize,
                                   ranks=range(world) if a.full else None,
                                   pg_iters=a.pg_iters, exact_passes=a.exact_passes)
                except ValueError as e:
                    res = dict(world=world, layout=layout, error=str(e).split(";")[0])
                print(row(model, res), flush=True)
                raw.append(dict(model=model, **{k: v for k, v in res.items()
                                                if k not in ("spanning_by", "inputs")}))
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
