"""The native CPU step (``backend="native"``, C kernels compiled on first use) against the torch
reference: same iterates, same stopping iterations, independent of threads and chunking."""

import copy
import os
import subprocess
import sys

import madgrad
import pytest
import torch
import torch.nn as nn

from ramda_ds import kernels
from ramda_ds.cube_root import cube_root
from ramda_ds.kernels import native, native_build, table
from ramda_ds.optim import RAMDA
from ramda_ds.param_groups import build_param_groups
from step_models import Net, assert_same, run

if not native_build.has_compiler():  # a machine with a C compiler must build them: no skip then
    pytest.skip("no C compiler: the native kernels cannot be built", allow_module_level=True)


def test_cube_root_is_bitwise_the_torch_one():
    x = torch.rand(100_003, generator=torch.Generator().manual_seed(0)) * torch.logspace(-38, 38, 100_003)
    x[:5] = torch.tensor([0.0, 1.0, 8.0, 1e-40, 3.4e38])
    out = torch.empty_like(x)
    native_build.load().ramda_cbrt(x.data_ptr(), out.data_ptr(), x.numel())
    assert torch.equal(out.view(torch.int32), cube_root(x).view(torch.int32))


@pytest.mark.parametrize("solver", ["pg", "exact"])
def test_native_step_matches_the_torch_step(solver):
    before = native.CALLS[0]
    ref = run("torch", solver, milestones=(4,))
    assert native.CALLS[0] == before
    got = run("native", solver, milestones=(4,))  # a restart at step 4 included
    assert native.CALLS[0] > before  # the kernels ran
    assert_same(ref, got)
    last = ref[2][-1]
    assert any(s[2] > 0 for s in last.values()) and any(s[1] > 0 for s in last.values())
    if solver == "pg":
        assert max(s[0] for s in last.values()) >= 3  # PG ran several iterations
        for k, v in got[1].last_stats.items():  # Q of the returned iterate, as the torch path
            assert v.objective == pytest.approx(ref[1].last_stats[k].objective, rel=1e-9)


def test_warm_started_exact_solver_matches_the_torch_one():
    ref = run("torch", "exact", warm_start=True)
    got = run("native", "exact", warm_start=True)
    assert_same(ref, got)
    assert got[1]._warm_roots.keys() == ref[1]._warm_roots.keys()


def test_pg_results_do_not_depend_on_threads_or_chunk_lengths(monkeypatch):
    ref = run("native", steps=4)
    one = run("native", steps=4, step_threads=1 if torch.get_num_threads() > 1 else 2)
    # tiny chunks with many re-runs from a chunk's start, and one long chunk that overshoots
    monkeypatch.setattr(table, "FIRST_CHUNK", 2)
    monkeypatch.setattr(table, "NEXT_CHUNK", 1)
    short = run("native", steps=4)
    monkeypatch.setattr(table, "FIRST_CHUNK", 60)
    monkeypatch.setattr(table, "FIRST_SHARE", 3.0)
    long = run("native", steps=4)
    for other in (one, short, long):
        assert other[2] == ref[2]
        for a, b in zip(ref[0].parameters(), other[0].parameters()):
            assert torch.equal(a, b)


def test_pg_max_iters_caps_every_tensor():
    ref = run("torch", max_iters=3, steps=3)
    got = run("native", max_iters=3, steps=3)
    assert_same(ref, got)
    its = [s[0] for st in got[2] for s in st.values()]
    assert max(its) == 3


def test_without_regularizer_it_is_madgrad():
    torch.manual_seed(1)
    m1 = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 3))
    m2 = copy.deepcopy(m1)
    lr, eps, c = 0.02, 1e-6, 0.2
    o1 = RAMDA(m1.parameters(), lr=lr, c=c, eps=eps, backend="native")
    o2 = madgrad.MADGRAD(m2.parameters(), lr=lr - eps, momentum=1 - c, eps=eps)  # see test_optimizers
    g = torch.Generator().manual_seed(2)
    for _ in range(25):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters())) < 2e-6
    assert native.CALLS[0] > 0


def test_resume_from_a_state_dict_continues_exactly():
    full = run("native", steps=6)
    part_net, part_opt, _ = run("native", steps=3)
    net, g = Net(), torch.Generator().manual_seed(1)
    net.load_state_dict(part_net.state_dict())
    groups = build_param_groups(net, "group_lasso", lam=3e-2,
                                grouping={"rows.weight": "output", "heads.weight": "head:4"})
    opt = RAMDA(groups, lr=0.05, c=0.3, backend="native", keep_structured=True)
    opt.load_state_dict(part_opt.state_dict())  # chunk hints are not in it: they change no number
    for i in range(6):
        x, y = torch.randn(8, 3, 6, generator=g), torch.randn(8, 6, generator=g)
        if i < 3:
            continue
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    for a, b in zip(full[0].parameters(), net.parameters()):
        assert torch.equal(a, b)


def test_float64_and_unsupported_settings_take_the_torch_path():
    net = nn.Linear(6, 5).double()
    opt = RAMDA(build_param_groups(net, "group_lasso", lam=1e-2), backend="native")
    before = native.CALLS[0]
    net.weight.grad, net.bias.grad = torch.ones_like(net.weight), torch.ones_like(net.bias)
    opt.step()
    assert native.CALLS[0] == before  # float64: the torch path (its float64 parity tests)
    net = nn.Linear(6, 5)
    opt = RAMDA(build_param_groups(net, "group_lasso", lam=1e-2), backend="native",
                inexact_eps0=1e-3)
    net.weight.grad, net.bias.grad = torch.ones_like(net.weight), torch.ones_like(net.bias)
    opt.step()
    # condition (7) stop: the torch path, for the regularized group only (the same rule as under
    # a sharded view); the bias' unregularized group has no PG and takes the kernels' one pass
    from ramda_ds.optim.fast import tensor_paths
    assert [tensor_paths(opt, g) for g in opt.param_groups] == [
        [("native", None)], [("torch", "inexact_eps0 (condition (7) stopping)")]]
    assert native.CALLS[0] == before + 1
    assert opt.last_stats["weight"].iterations == 1  # condition (7) stopped it; the paper's
    #                                                   rule (the kernels') never stops before 2


def test_auto_uses_native_on_cpu_and_native_refuses_other_devices():
    before = native.CALLS[0]
    run("auto", steps=1)
    assert native.CALLS[0] > before
    assert kernels.choose("native", torch.device("cpu")) == "native"
    with pytest.raises(RuntimeError, match="CPU tensors"):
        kernels.choose("native", torch.device("meta"))


def test_no_compiler_is_a_clear_error_and_auto_falls_back(tmp_path, monkeypatch):
    """A fresh process with CC pointing nowhere and an empty cache: 'native' names the problem,
    'auto' warns and runs the torch path."""
    code = (
        "import warnings, torch, torch.nn as nn\n"
        "from ramda_ds.optim import RAMDA\n"
        "from ramda_ds.kernels import native\n"
        "net = nn.Linear(4, 3)\n"
        "net.weight.grad, net.bias.grad = torch.ones(3, 4), torch.ones(3)\n"
        "try:\n"
        "    RAMDA(net.parameters(), backend='native').step()\n"
        "except Exception as e:\n"
        "    print('NATIVE', type(e).__name__, e)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    RAMDA(net.parameters(), backend='auto').step()\n"
        "print('AUTO', native.CALLS[0], [str(x.message) for x in w])\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), RAMDA_DS_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "NATIVE NativeUnavailable" in out.stdout and "no-such-cc" in out.stdout
    assert "AUTO 0" in out.stdout and "using torch" in out.stdout


def test_concurrent_first_use_compiles_once_and_both_load(tmp_path):
    """Two processes (as two ranks) compiling into the same empty cache at once."""
    code = ("from ramda_ds.kernels import native_build as b\n"
            "print(b.load().ramda_cbrt is not None, b.library_path())\n")
    env = dict(os.environ, RAMDA_DS_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(o[0].startswith("True") for o in outs)
    libs = list(tmp_path.rglob("*.so"))
    assert len(libs) == 1 and not list(tmp_path.rglob("*.tmp"))  # no half-written file left


def _wide_run(backend, solver="pg", steps=4, threads=None):
    """Tensors split into several work items: columns (K = 1) over 2 and 3 items, rows
    ('output' of a [9000, 8] weight: R = 1, K = 8) over 3, so per-item Q shares, per-item Newton
    stops and the split over threads are exercised."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 2048), nn.Tanh(), nn.Linear(2048, 9000), nn.Tanh(),
                        nn.Linear(9000, 8), nn.Linear(8, 9000, bias=False))
    groups = build_param_groups(net, "group_lasso", lam=2e-3, grouping={"5.weight": "output"})
    opt = RAMDA(groups, lr=0.02, c=0.5, solver=solver, backend=backend)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        t = torch.get_num_threads()
        torch.set_num_threads(threads or t)
        try:
            opt.step()
        finally:
            torch.set_num_threads(t)
    return net, {k: (v.iterations, v.active_groups) for k, v in opt.last_stats.items()}


@pytest.mark.parametrize("solver", ["pg", "exact"])
def test_tensors_over_many_work_items_match_torch_and_any_thread_count(solver):
    from ramda_ds.kernels.native import _items

    geo = [[2048, 64, 1, 0], [8, 9000, 1, 0], [1, 9000, 8, 0]]  # [R, C, K] of three of the weights
    assert [len(_items(geo, [t])[0]) for t in range(3)] == [2, 3, 3]
    ref_net, ref_stats = _wide_run("torch", solver)
    net, stats = _wide_run("native", solver, threads=2)
    one_net, _ = _wide_run("native", solver, threads=1)
    assert stats == ref_stats
    assert any(a > 0 for _, a in stats.values())
    for a, b, c in zip(ref_net.parameters(), net.parameters(), one_net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
        assert torch.equal(b, c)  # every group lies in one item: the thread split changes no bit


def test_a_tensor_the_kernels_cannot_take_runs_on_torch_beside_the_others():
    """A channels_last conv and a float64-state tensor (a float64 checkpoint loaded into a float32
    model keeps float64 V/U/W0) take the torch path; the rest of their groups the kernels."""
    from ramda_ds.optim.ramda import kernel_plan

    def make(backend):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last),
                            nn.Flatten(), nn.Linear(16, 5), nn.Linear(5, 3))
        opt = RAMDA(build_param_groups(net, "group_lasso", lam=1e-2), lr=0.05, c=0.3,
                    backend=backend)
        return net, opt

    net64 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 5), nn.Linear(5, 3)).double()
    o64 = RAMDA(build_param_groups(net64, "group_lasso", lam=1e-2), lr=0.05, c=0.3)
    for p in net64.parameters():
        p.grad = torch.ones_like(p) * 1e-2
    o64.step()
    sd = o64.state_dict()
    for st in sd["state"].values():  # only the last Linear keeps float64 state
        st.update({k: v.float() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})
    order = [p for g in o64.param_groups for p in g["params"]]  # state_dict's numbering
    last = [id(p) for p in order].index(id(net64[3].weight))
    sd["state"][last].update({k: sd["state"][last][k].double() for k in ("grad_sum", "grad_sq_sum", "initial")})
    runs = []
    for backend in ("torch", "native"):
        net, opt = make(backend)
        opt.load_state_dict(copy.deepcopy(sd))  # (torch's load keeps the given tensors: no sharing)
        assert [g["backend"] for g in opt.param_groups] == [backend] * len(opt.param_groups)
        if backend == "native":
            plan = kernel_plan(opt)
            assert plan.startswith("native for 4 tensors; torch for 2 tensors") and "channels_last" in plan
            from ramda_ds.optim.ramda import _tensor_paths
            whys = [w for g in opt.param_groups for _, w in _tensor_paths(opt, g) if w]
            assert any(w.startswith("3.weight: state ") and "is torch.float64" in w for w in whys), whys
        g = torch.Generator().manual_seed(1)
        before = native.CALLS[0]
        for _ in range(3):
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        assert (native.CALLS[0] > before) == (backend == "native")
        runs.append(net)
    for a, b in zip(*(n.parameters() for n in runs)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_proxgen_pg_on_the_native_kernels_matches_torch(weight_decay):
    """ProxGen's AdamW stage in C, then the same PG chunks (c = 1: W = Ŵ); a restart stage."""
    from ramda_ds.optim import ProxGen

    def go(backend):
        net = Net()
        groups = build_param_groups(net, "group_lasso", lam=3e-2,
                                    grouping={"rows.weight": "output", "heads.weight": "head:4"})
        opt = ProxGen(groups, lr=3e-3, weight_decay=weight_decay, backend=backend,
                      milestones=(4,))
        g, stats = torch.Generator().manual_seed(1), []
        for _ in range(6):
            x, y = torch.randn(8, 3, 6, generator=g), torch.randn(8, 6, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            stats.append({k: (v.iterations, v.active_groups) for k, v in opt.last_stats.items()})
        return net, opt, stats

    before = native.CALLS[0]
    ref_net, ref_opt, ref_stats = go("torch")
    net, opt, stats = go("native")
    assert native.CALLS[0] > before
    assert stats == ref_stats
    assert any(a > 0 for a in (s[1] for s in stats[-1].values()))
    assert any(s[1] < n for s, n in zip(stats[-1].values(), (3, 20, 75, 6)))  # some groups zero
    for (name, a), b in zip(ref_net.named_parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(a == 0, b == 0), name
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[b][key], ref_opt.state[a][key], rtol=1e-5,
                                       atol=1e-9)
