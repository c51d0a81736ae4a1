"""The Triton step against the pure-torch reference, run by Triton's CPU interpreter."""

import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("TRITON_INTERPRET", "1")  # (conftest.py sets it before anything imports triton)
pytest.importorskip("triton")

from ramda_ds import kernels  # noqa: E402
from ramda_ds.optim import RAMDA  # noqa: E402
from ramda_ds.param_groups import build_param_groups  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.interpreting(), reason="needs TRITON_INTERPRET=1")


class Net(nn.Module):
    """One tensor per geometry the kernels tile: columns (K = 1), rows (R = 1), conv (K > 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 5, 3)
        self.fc = nn.Linear(20, 37)
        self.rows = nn.Linear(37, 6)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.rows(torch.tanh(self.fc(h)))


def run(backend, steps=6, warm_start=False):
    net = Net()
    groups = build_param_groups(net, "group_lasso", lam=1e-1, grouping={"rows.weight": "output"})
    opt = RAMDA(groups, lr=0.05, momentum=0.1, solver="exact", backend=backend,
                keep_structured=True, milestones=(4,), warm_start=warm_start)
    g = torch.Generator().manual_seed(1)
    stats = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, generator=g), torch.randn(8, 6, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        stats.append({k: (v.active_groups, v.screened_groups) for k, v in opt.last_stats.items()})
    return net, opt, stats


@pytest.mark.parametrize("warm_start", [False, True])
def test_triton_step_matches_the_torch_step(warm_start):
    before = kernels.LAUNCHES[0]
    ref_net, ref_opt, ref_stats = run("torch", warm_start=warm_start)
    assert kernels.LAUNCHES[0] == before
    net, opt, stats = run("triton", warm_start=warm_start)
    assert kernels.LAUNCHES[0] > before  # the kernels ran
    assert stats == ref_stats  # same screening decisions, step by step
    assert bool(opt._warm_roots) == warm_start  # the Triton path keeps the positions (one store)
    for (name, a), b in zip(ref_net.named_parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        if name.endswith("weight"):
            for key in ("grad_sum", "grad_sq_sum", "initial", "structured"):
                torch.testing.assert_close(opt.state[b][key], ref_opt.state[a][key], rtol=1e-5,
                                           atol=1e-6)
            hat, ref_hat = opt.state[b]["structured"], ref_opt.state[a]["structured"]
            assert torch.equal(hat == 0, ref_hat == 0)
    assert any(s[1] > 0 for s in ref_stats[-1].values())  # some groups are zero
    assert any(s[0] > 0 for s in ref_stats[-1].values())  # and some are not


def test_auto_never_picks_triton_for_cpu_tensors_and_triton_needs_a_runnable_device(monkeypatch):
    before = kernels.LAUNCHES[0]
    run("auto", steps=1)
    assert kernels.LAUNCHES[0] == before
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        run("triton", steps=1)


def test_bad_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        RAMDA([nn.Parameter(torch.zeros(2, 2))], backend="cuda")


def test_self_test_passes_on_the_interpreter():
    from ramda_ds.kernels.selftest import check

    before = kernels.LAUNCHES[0]
    assert check("triton", torch.device("cpu"))
    assert kernels.LAUNCHES[0] > before


def test_triton_pg_step_matches_the_torch_step():
    """PG with the paper's stop rule on the Triton kernels (chunks of iterations per block)."""
    from step_models import run as run_steps

    ref = run_steps("torch", steps=6, lam=1e-2, milestones=(4,))
    before = kernels.LAUNCHES[0]
    got = run_steps("triton", steps=6, lam=1e-2, milestones=(4,))
    assert kernels.LAUNCHES[0] > before
    assert got[2] == ref[2]  # same PG iterations and screening, step by step
    last = ref[2][-1]
    assert max(s[0] for s in last.values()) >= 5 and any(s[1] > 0 for s in last.values())
    for (name, a), b in zip(ref[0].named_parameters(), got[0].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
        hat, ref_hat = got[1].state[b]["structured"], ref[1].state[a]["structured"]
        torch.testing.assert_close(hat, ref_hat, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(hat == 0, ref_hat == 0)


def test_every_triton_kernel_compiles_for_an_h200_without_one(tmp_path):
    """The interpreter checks the kernels' arithmetic, not that Triton's compiler accepts them:
    ``python -m ramda_ds.kernels.compile_check`` runs the real compiler for sm_90 down to a
    cubin (in a fresh process without TRITON_INTERPRET and a fresh cache) for every kernel with
    the argument types the steps pass."""
    import subprocess
    import sys
    from pathlib import Path

    from ramda_ds.kernels.compile_check import supported

    if not supported():
        pytest.skip("this Triton's compiler API differs from 3.9's that compile_check uses")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.run([sys.executable, "-m", "ramda_ds.kernels.compile_check", "--arch", "90"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 11 and all(ln.startswith("ok") for ln in lines), p.stdout


def test_triton_kernels_take_a_table_with_no_rows():
    """A rank of a sharded view whose shards of a param group are all empty (FSDP2 Shard(0) of a
    weight with fewer rows than ranks) builds a table with no rows; its kernel calls must do
    nothing, so that the rank goes on to the step's collectives (found in review: it raised)."""
    from ramda_ds.kernels import table
    from ramda_ds.kernels.triton_pg import _Kernels

    k = _Kernels(table.Table([], [], [], [], [], 0, []), torch.device("cpu"))
    k.free()
    bb, cst, pmax = k.stage()
    assert bb.numel() == cst.numel() == pmax.numel() == 0
    empty = torch.zeros(0, dtype=torch.float64)
    assert k.iterate(torch.zeros(0, dtype=torch.int32), empty, empty, 6, 8).shape == (3, 0)
    assert k.exact_iter(torch.zeros(0, dtype=torch.int32), empty).shape == (2, 0)
    assert [t.numel() for t in k.exact_stage()] == [0, 0, 0]
    k.exact_finish(empty, torch.zeros(0))
    k.finish(empty, [])
