"""bench/scale_model.py against independent counts and a real 2-process run.

* Spanning groups at 2 and 4 simulated ranks == a brute-force count: every rank's elements of
  each regularized tensor enumerated from the partition rule, mapped to their group, and the
  groups touched by >= 2 ranks counted (no SegmentGroups, no set_spans).
* At 2 ranks, what the simulation says each rank holds (the inputs ``attach_spans`` all-gathers),
  the spanning groups, and the number and bytes of ramda_ds's all-reduces in a step (given the
  solver iterations the real run took) == a real torchrun run under DeepSpeed ZeRO-2/ZeRO-3 and
  FSDP2 Shard(0)/Shard(1) (tests/dist/scale_worker.py).
"""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "dist"))
import scale_model as sm  # noqa: E402
from scale_worker import SHAPE  # noqa: E402

LAYOUT = {"zero2": "zero12", "zero3": "zero3", "fsdp2": "fsdp2_shard0", "fsdp2_cols": "fsdp2_shard1"}


def rank_elements(layout, shapes, world):
    """Per rank, per tensor: the flat element indices the rank holds (numpy), from the rules."""
    out = [[None] * len(shapes) for _ in range(world)]
    if layout == "zero12":  # one flat: padded to a multiple of 2·world, equal contiguous parts
        total = sum(math.prod(s) for s in shapes)
        part = -(-total // (2 * world)) * 2 * world // world
        off = 0
        for i, s in enumerate(shapes):
            n = math.prod(s)
            for r in range(world):
                lo, hi = max(off, r * part), min(off + n, (r + 1) * part)
                out[r][i] = np.arange(lo, max(lo, hi)) - off
            off += n
        return out
    for i, s in enumerate(shapes):
        n, rows, cols = math.prod(s), s[0], math.prod(s[1:])
        idx = np.arange(n).reshape(rows, cols)
        for r in range(world):
            if layout == "zero3":
                part = -(-n // world)
                out[r][i] = np.arange(r * part, min(n, (r + 1) * part))
            elif layout == "fsdp2_shard1" and len(s) >= 2 and s[1] % world == 0:
                c = s[1] // world
                out[r][i] = idx.reshape(rows, s[1], -1)[:, r * c:(r + 1) * c].reshape(-1)
            else:  # Shard(0): torch.chunk of the rows
                c = -(-rows // world)
                out[r][i] = idx[r * c:(r + 1) * c].reshape(-1)
    return out


def brute_spanning(layout, world, regularize):
    model = sm.meta_llama(SHAPE)
    counts = {}
    for g in sm.param_groups(model, regularize):
        if not g["lam"]:
            continue
        shapes = g["param_shapes"]
        elems = rank_elements(layout, shapes, world)
        for i, (name, s) in enumerate(zip(g["param_names"], shapes)):
            cols = math.prod(s[1:])
            if g["grouping"] == "input":
                group = lambda e: (e % cols) // math.prod(s[2:])  # noqa: E731
            else:  # head:D
                d = int(g["grouping"].split(":")[1])
                group = lambda e: (e % cols) // d  # noqa: E731
            touched = np.zeros(cols, dtype=int)
            for r in range(world):
                touched[np.unique(group(elems[r][i]))] += 1
            counts[name] = int((touched >= 2).sum())
    return counts


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout,regularize", [("zero12", "finetune"), ("zero12", "linear"),
                                               ("zero3", "finetune"), ("fsdp2_shard0", "finetune"),
                                               ("fsdp2_shard1", "linear")])
def test_spanning_groups_equal_a_brute_force_count(layout, regularize, world):
    res = sm.simulate(SHAPE, world, layout, regularize, ranks=range(world))
    want = brute_spanning(layout, world, regularize)
    assert res["spanning_by"] == want
    assert res["spanning"] == sum(want.values())
    if world == 4 and layout != "fsdp2_shard1":  # (2 ranks may cut only between tensors)
        assert res["spanning"] > 0  # the check covers groups that span, not only local ones
    pg = sm.summary(res)["pg"]
    assert pg["slope"] >= 1 and pg["calls"] == pg["const"] + pg["slope"] * res["pg_iters"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    out = tmp / "scale.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(tmp / "ext"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "tests" / "dist" / "scale_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("backend", list(LAYOUT))
def test_two_rank_simulation_equals_a_real_two_rank_run(backend, real_run):
    for solver in ("pg", "exact"):
        got = real_run[backend, solver]
        iters = got["iterations"]
        res = sm.simulate(SHAPE, 2, LAYOUT[backend], "linear", ranks=[0, 1],
                          pg_iters=iters if solver == "pg" else 10,
                          exact_passes=iters if solver == "exact" else 5)
        assert res["inputs"] == got["inputs"], (backend, "ranks hold different elements")
        assert res["spanning_by"] == got["spans"], (backend, solver)
        sent = res[solver]
        assert len(sent) == got["calls"], (backend, solver, [s[0] for s in sent])
        assert sum(b for *_, b in sent) == got["bytes"], (backend, solver)
    assert len(set(real_run[backend, "pg"]["iterations"].values())) > 1 or backend == "fsdp2_cols"
