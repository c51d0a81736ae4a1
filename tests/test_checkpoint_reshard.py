"""Optimizer state saved at one world size and loaded at another continues like the original run."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from common import batches, loss_fn, make_model, make_optimizer  # noqa: E402
from test_sharded import ROOT, free_port  # noqa: E402

from ramda_ds.checkpoint import CheckpointError, load_optimizer_state, save_optimizer_state  # noqa: E402
from ramda_ds.sharding.gather import gather_full_state  # noqa: E402

NAMES = ("RAMDA", "ProxGen")
STEPS_A, STEPS_B = 3, 2


def launch(backend, mode, ckpt, tmp_path):
    import subprocess

    out = tmp_path / f"{backend}_{mode}.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("RAMDA_TEST_INIT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "tests" / "dist" / "reshard_worker.py"), backend, mode, str(ckpt), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


def one_process(name, ckpt, mode, monkeypatch):
    """save: train A steps, save, train B; load: load, train B. Returns the gathered state."""
    d = ckpt / name
    if mode == "load":
        monkeypatch.setenv("RAMDA_TEST_INIT", str(d / "model.pt"))
    model = make_model()
    monkeypatch.delenv("RAMDA_TEST_INIT", raising=False)
    opt = make_optimizer(name, model)
    data = batches()

    def train(xs):
        for x, y in xs:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    if mode == "save":
        train(data[:STEPS_A])
        d.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), d / "model.pt")
        save_optimizer_state(opt, d)
    else:
        load_optimizer_state(opt, d)
    train(data[STEPS_A:STEPS_A + STEPS_B])
    return gather_full_state(opt)


def assert_same(a, b, what):
    assert set(a) == set(b)
    for n in a:
        assert set(a[n]) == set(b[n]), (what, n)
        for k in a[n]:
            scale = a[n][k].abs().max().clamp_min(1e-12)
            rel = ((a[n][k] - b[n][k]).abs().max() / scale).item()
            assert rel <= 1e-6, f"{what}: {n}.{k} differs by {rel:.2e}"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["fsdp2", "zero2"])
def test_two_ranks_to_one(backend, tmp_path, monkeypatch, one_thread):
    ckpt = tmp_path / "ckpt"
    continued = launch(backend, "save", ckpt, tmp_path)
    assert sorted(p.name for p in (ckpt / "RAMDA").iterdir()) == [
        "COMPLETE", "model.pt", "rank0.safetensors", "rank1.safetensors"]
    for name in NAMES:
        assert_same(continued[name], one_process(name, ckpt, "load", monkeypatch), f"{backend}->1 {name}")


@pytest.mark.parametrize("backend", ["zero3", "fsdp2_cols"])
def test_one_rank_to_two(backend, tmp_path, monkeypatch, one_thread):
    ckpt = tmp_path / "ckpt"
    continued = {name: one_process(name, ckpt, "save", monkeypatch) for name in NAMES}
    resumed = launch(backend, "load", ckpt, tmp_path)
    for name in NAMES:
        assert_same(continued[name], resumed[name], f"1->{backend} {name}")


def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path, monkeypatch, one_thread):
    ckpt = tmp_path / "ckpt"
    one_process("RAMDA", ckpt, "save", monkeypatch)
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    proxgen = make_optimizer("ProxGen", model)
    with pytest.raises(CheckpointError, match="ProxGen needs"):  # RAMDA state into ProxGen
        load_optimizer_state(proxgen, ckpt / "RAMDA")
    assert not proxgen.state  # checked before anything was written
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    shard = ckpt / "RAMDA" / "rank0.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="cannot read"):
        load_optimizer_state(make_optimizer("RAMDA", model), ckpt / "RAMDA")
    (ckpt / "RAMDA" / "COMPLETE").unlink()  # as if the save was killed before the end
    with pytest.raises(CheckpointError, match="not a complete"):
        load_optimizer_state(make_optimizer("RAMDA", model), ckpt / "RAMDA")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
