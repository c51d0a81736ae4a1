"""Checkpoint / resume of the LM script: exact (bitwise) for 1 process, ZeRO-2, ZeRO-3 and FSDP2 at
2 ranks; 2 → 1 and 1 → 2 processes for DeepSpeed and FSDP2 within fp32 tolerance; SIGTERM; bad
checkpoints refused with nothing changed on disk.

Every run is real: ``accelerate launch`` (DeepSpeed) or ``torchrun`` (FSDP2) with 2 processes on
gloo. An uninterrupted run saves at steps 4 and 8; a resumed run starts from its step-4 checkpoint
(in another output directory) and must reach the same step-8 checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_sharded import ROOT, free_port

from ramda_ds.training.run_checkpoint import MANIFEST

SCRIPT = str(ROOT / "launch" / "train_lm.py")
STEPS, SAVE = 8, 4
ARGS = ["--eval_every", "4", "--save_every", str(SAVE), "--vocab_size", "300", "--lam", "1e-3",
        "--milestones", "6",  # a restart between the checkpoint and the end
        "--dropout", "0"]  # masks depend on the world size; same-size resume is tested with dropout
BATCH = 4  # per rank at 2 ranks; the global batch (8) is what a resume must keep


def launcher(backend: str) -> list[str]:
    py = [sys.executable]
    if backend == "single":
        return py
    if backend == "fsdp2":
        return py + ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                     "127.0.0.1", "--master-port", str(free_port())]
    stage = {"zero2": "2", "zero3": "3"}[backend]
    return py + ["-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", stage,
                 "--num_processes", "2", "--main_process_port", str(free_port())]


def launch(backend, out, *extra, steps=STEPS, check=True, tmp=None):
    world = 1 if backend == "single" else 2
    cmd = launcher(backend) + [SCRIPT, *ARGS, "--steps", str(steps), "--output_dir", str(out),
                               "--batch_size", str(BATCH * 2 // world), *extra]
    if backend == "fsdp2":
        cmd.append("--fsdp2")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp or out.parent))
    p = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-5000:]
    return p


def final_state(out, step=STEPS):
    from ramda_ds.checkpoint import full_state

    d = Path(out) / "checkpoints" / f"step_{step:08d}"
    world = json.loads((d / MANIFEST).read_text())["world_size"]
    return full_state([d / "weights" / f"rank{r}.safetensors" for r in range(world)])


def metrics(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in ("loss", "valid_ppl_W", "wgs_W", "layer_sparsity_W")}
            for r in rows if "step" in r}


def assert_close(a, b, rtol, what):
    assert a.keys() == b.keys(), what
    for n in a:
        assert a[n].keys() == b[n].keys(), (what, n)
        for k in a[n]:
            if rtol == 0:
                assert torch.equal(a[n][k], b[n][k]), f"{what}: {n}.{k} differs"
            else:
                scale = a[n][k].abs().max().clamp_min(1e-12)
                rel = ((a[n][k].double() - b[n][k].double()).abs().max() / scale).item()
                assert rel <= rtol, f"{what}: {n}.{k} differs by {rel:.1e}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs, made on first use: backend -> output directory."""
    made = {}

    def get(backend, dropout="0"):
        if (backend, dropout) not in made:
            out = tmp_path_factory.mktemp(backend) / "full"
            launch(backend, out, "--dropout", dropout)
            made[backend, dropout] = out
        return made[backend, dropout]
    return get


@pytest.mark.parametrize("backend", ["single", "zero2", "zero3", "fsdp2"])
def test_resume_is_exact(backend, runs, tmp_path):
    """With dropout: the per-rank RNG streams continue too."""
    full = runs(backend, dropout="0.1")
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == [
        "latest", "step_00000004", "step_00000008"]
    out = tmp_path / "resumed"
    launch(backend, out, "--resume", str(full / "checkpoints" / "step_00000004"), "--dropout", "0.1")
    assert_close(final_state(full), final_state(out), 0, f"{backend} resumed")
    assert metrics(out)[STEPS] == metrics(full)[STEPS]
    state = final_state(out)["layers.0.ff.down.weight"]
    assert {"param", "grad_sum", "grad_sq_sum", "initial", "step", "alpha"} <= state.keys()


@pytest.mark.parametrize("saved,resumed", [("fsdp2", "single"), ("zero2", "single"),
                                           ("single", "fsdp2"), ("single", "zero3"),
                                           ("zero2", "zero3"), ("zero3", "fsdp2")])
def test_resume_on_another_world_size(saved, resumed, runs, tmp_path):
    full = runs(saved)
    out = tmp_path / "resumed"
    launch(resumed, out, "--resume", str(full / "checkpoints" / "step_00000004"))
    assert_close(final_state(full), final_state(out), 1e-4, f"{saved} -> {resumed}")
    a, b = metrics(full)[STEPS], metrics(out)[STEPS]
    assert abs(a["valid_ppl_W"] - b["valid_ppl_W"]) <= 1e-4 * a["valid_ppl_W"]


def test_only_the_newest_checkpoints_are_kept_and_fresh_runs_do_not_overwrite(tmp_path):
    out = tmp_path / "run"
    launch("single", out, "--save_every", "2", "--keep_last", "2", steps=7)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_00000006", "step_00000007"]
    p = launch("single", out, check=False)  # a fresh run into a directory with checkpoints
    assert p.returncode != 0 and "--resume auto" in p.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == names
    # going back to step 6: step 7 is an abandoned future, set aside (not deleted, not pruned in
    # favour of, not collided with)
    launch("single", out, "--resume", str(out / "checkpoints" / "step_00000006"),
           "--save_every", "2", "--keep_last", "2", steps=8)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "abandoned", "latest", "step_00000006", "step_00000008"]
    assert [p.name for p in (out / "checkpoints" / "abandoned").glob("*/*")] == ["step_00000007"]


def test_global_batch_must_match_to_resume(runs, tmp_path):
    full = runs("single")
    out = tmp_path / "resumed"
    p = launch("single", out, "--resume", str(full / "checkpoints" / "step_00000004"),
               "--batch_size", "4", check=False)
    assert p.returncode != 0 and "global_batch" in p.stderr


def test_sigterm_saves_and_exits_then_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, SCRIPT, *ARGS, "--steps", "100000", "--save_every", "100000",
           "--output_dir", str(out), "--batch_size", "8"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # the first evaluation row (step 4); the setup row's "step_start" does not count
    while not (out / "metrics.jsonl").exists() or '"step": ' not in (out / "metrics.jsonl").read_text():
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    so, se = p.communicate(timeout=300)
    assert p.returncode == 143, se[-3000:]
    latest = (out / "checkpoints" / "latest").read_text()
    step = int(latest.removeprefix("step_"))
    assert step >= 4 and "SIGTERM: saved" in so
    r = launch("single", out, "--resume", "auto", steps=step + 2)
    assert "resumed from" in r.stdout
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step + 2:08d}"
    steps = [json.loads(x).get("step") for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [s for s in steps if s is not None]
    assert logged == sorted(set(logged)) and logged[-1] == step + 2


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(runs, tmp_path):
    out = tmp_path / "run"
    killer = str(ROOT / "tests" / "dist" / "kill_during_save.py")
    cmd = [sys.executable, killer, "2", SCRIPT, *ARGS, "--steps", str(STEPS), "--batch_size", "8",
           "--output_dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (ckpts / "step_00000008.partial" / "weights" / "rank0.safetensors").exists()
    assert not (ckpts / "step_00000008").exists()
    launch("single", out, "--resume", "auto")  # from step 4, as if nothing happened
    assert not (ckpts / "step_00000008.partial").exists()
    assert_close(final_state(runs("single")), final_state(out), 0, "resumed after SIGKILL")


def tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage,message", [
    ("truncate", "corrupt or truncated"), ("flip", "corrupt or truncated"),
    ("manifest", "not a complete checkpoint"), ("other_model", "checkpoint shape"),
    ("other_optimizer", "written by RAMDA, this run uses ProxGen"),
    ("other_grouping", "grouping")])
def test_bad_checkpoints_are_refused_and_nothing_changes(damage, message, runs, tmp_path):
    import shutil

    src = runs("single") / "checkpoints" / "step_00000004"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    extra = []
    shard = ckpt / "weights" / "rank0.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-64])
    elif damage == "flip":
        b = bytearray(shard.read_bytes())
        b[-5] ^= 1
        shard.write_bytes(bytes(b))
    elif damage == "manifest":
        (ckpt / MANIFEST).unlink()
    elif damage == "other_model":
        extra = ["--vocab_size", "200"]
    elif damage == "other_optimizer":
        extra = ["--optimizer", "proxgen"]
    elif damage == "other_grouping":
        extra = ["--grouping", "output"]
    out = tmp_path / "out"
    out.mkdir()
    before = tree(tmp_path)
    p = launch("single", out, "--resume", str(ckpt), *extra, check=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-3000:]
    after = {k: v for k, v in tree(tmp_path).items() if not k.startswith("out/data/")}
    assert after == before  # the checkpoint and the output directory are untouched
