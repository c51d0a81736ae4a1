"""Failure paths: a checkpoint that cannot lie, a failed write that cannot hang or lose a run,
divergence and bad input that stop with a message instead of a traceback.

Mostly in-process (RunCheckpointer and the training loop on a tiny MLP, one process); the
behaviour that is about ranks (a write failing on one of two ranks) runs 2 real processes.
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_sharded import ROOT, free_port

from ramda_ds.checkpoint import CheckpointError
from ramda_ds.optim import RAMDA
from ramda_ds.param_groups import build_param_groups
from ramda_ds.training import run_checkpoint
from ramda_ds.training.run_checkpoint import LATEST, MANIFEST, MANIFEST_SHA, RunCheckpointer

SCRIPT = str(ROOT / "launch" / "train_lm.py")


# ---------------------------------------------------------------------------------- fixtures
def make(lam=1e-3, grouping="input"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    groups = build_param_groups(model, "group_lasso", lam=lam, exclude=["2.*"],
                                grouping={"*": grouping})
    return model, RAMDA(groups, lr=0.05, momentum=0.1)


def train_steps(model, opt, n):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), x[:, :1]).backward()
        opt.step()


def tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*"))
            if p.is_file()}


@pytest.fixture
def saved(tmp_path):
    """A checkpoints root holding step 3 of a 3-step run."""
    model, opt = make()
    train_steps(model, opt, 3)
    ck = RunCheckpointer(tmp_path / "checkpoints")
    ck.save(3, opt, dict(position=3, grad_accum=1), run_checkpoint.rng_state())
    return ck.root


def rewrite(ckpt: Path, edit, rehash=True):
    """Edit the manifest; ``rehash``: also write its new sha256 (a consistent-looking lie)."""
    m = json.loads((ckpt / MANIFEST).read_text())
    edit(m)
    text = json.dumps(m, indent=1)
    (ckpt / MANIFEST).write_text(text)
    if rehash:
        (ckpt / MANIFEST_SHA).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def refused(ckpt, match, **kw):
    """Loading ``ckpt`` into a fresh optimizer raises ``match``; nothing on disk changes."""
    root = ckpt.parent
    before = tree(root)
    model, opt = make(**kw)
    with pytest.raises(CheckpointError, match=match):
        RunCheckpointer(root).load(ckpt, opt)
    assert tree(root) == before


# ---------------------------------------------------------------- 1. the manifest is verified
def test_an_edited_manifest_is_refused_by_its_hash(saved):
    ck = saved / "step_00000003"
    rewrite(ck, lambda m: m.update(step=5), rehash=False)
    refused(ck, "does not match its sha256")


def test_a_manifest_without_its_hash_is_refused(saved):
    (saved / "step_00000003" / MANIFEST_SHA).unlink()
    refused(saved / "step_00000003", "cannot be verified")


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(step=5), "says step 5, but the optimizer state in it has taken 3 steps"),
    (lambda m: m.update(step=2), "says step 2, but the optimizer state in it has taken 3 steps"),
    (lambda m: m.update(files={}), "lists no files"),
    (lambda m: m["files"].pop("trainer/rank0.safetensors"), "trainer/rank0.safetensors missing"),
    (lambda m: m.update(world_size=2), "trainer/rank1.safetensors missing"),
    (lambda m: m.pop("fingerprint"), "malformed: no 'fingerprint'"),
    (lambda m: m.pop("files"), "malformed: no 'files'"),
    (lambda m: m.update(step="3"), "'step' must be int"),
    (lambda m: m["fingerprint"].pop("params"), "needs 'optimizer' and 'params'"),
])
def test_manifest_fields_are_cross_checked(saved, tmp_path, edit, match):
    """A rehashed (consistent-looking) manifest whose fields disagree with the files."""
    ck = tmp_path / "ckpt"  # not named step_*: only the files can contradict the step
    shutil.copytree(saved / "step_00000003", ck)
    rewrite(ck, edit)
    refused(ck, match)


def test_the_step_must_match_the_directory_name(saved):
    ck = saved / "step_00000003"
    rewrite(ck, lambda m: m.update(step=4))
    refused(ck, "says step 4, the directory is step_00000003")


def test_empty_files_list_does_not_switch_off_the_integrity_check(saved, tmp_path):
    """The issue's case: ``"files": {}`` and a flipped byte in a weights file."""
    ck = tmp_path / "ckpt"
    shutil.copytree(saved / "step_00000003", ck)
    shard = ck / "weights" / "rank0.safetensors"
    b = bytearray(shard.read_bytes())
    b[-5] ^= 1
    shard.write_bytes(bytes(b))
    rewrite(ck, lambda m: m.update(files={}))
    refused(ck, "lists no files")


@pytest.mark.parametrize("content,match", [(b"\xff\xfe\x00", "is corrupt"),
                                           (b"../../etc", "is corrupt"),
                                           (b"step_00000099", "names step_00000099, which")])
def test_a_bad_latest_is_a_clear_error(saved, content, match):
    (saved / LATEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        RunCheckpointer(saved).resolve("auto")
    with pytest.raises(CheckpointError, match=match):
        RunCheckpointer(saved).resolve(str(saved))


def test_a_manifest_that_is_not_utf8_is_a_clear_error(saved):
    (saved / "step_00000003" / MANIFEST).write_bytes(b"\xff{}")
    refused(saved / "step_00000003", "is corrupt")


# ---------------------------------------------- 5. the objective (λ, grouping) is fingerprinted
@pytest.mark.parametrize("kw,what", [(dict(lam=2e-3), "lam 0.001 != this run's 0.002"),
                                     (dict(grouping="output"), "grouping 'input'")])
def test_a_changed_objective_is_refused_unless_allowed(saved, kw, what):
    ck = saved / "step_00000003"
    refused(ck, what, **kw)
    model, opt = make(**kw)
    loaded = RunCheckpointer(saved).load(ck, opt, allow_change=True)
    (change,) = loaded.changes
    assert change["tensors"] == 1 and change["first"] == "0.weight"
    loaded.apply()  # the state itself loads
    ref, ref_opt = make()
    train_steps(ref, ref_opt, 3)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------ 3. any write error, the previous one kept
def fail_at(monkeypatch, where, rank=None):
    """Make the ``where`` write of a save raise as a full disk would."""
    from safetensors import SafetensorError

    import ramda_ds.checkpoint as shard_module

    full = "Error while serializing: IoError(Os { code: 28, kind: StorageFull, " \
           "message: \"No space left on device\" })"

    def broken_save_file(*a, **k):
        raise SafetensorError(full)
    if where == "weights":
        monkeypatch.setattr(shard_module, "save_file", broken_save_file)
    elif where == "trainer":
        monkeypatch.setattr(run_checkpoint, "save_file", broken_save_file)
    else:
        real = run_checkpoint._write_tmp
        name = {"manifest": MANIFEST, "manifest_sha": MANIFEST_SHA, "latest": LATEST}[where]

        def broken_write(path, text):
            if path.name == name:
                raise OSError(28, "No space left on device", str(path))
            return real(path, text)
        monkeypatch.setattr(run_checkpoint, "_write_tmp", broken_write)


@pytest.mark.parametrize("where", ["weights", "trainer", "manifest", "manifest_sha", "latest"])
def test_a_failed_write_keeps_the_previous_checkpoint(saved, monkeypatch, where):
    model, opt = make()
    train_steps(model, opt, 4)
    ck = RunCheckpointer(saved)
    before = tree(saved)
    fail_at(monkeypatch, where)
    with pytest.raises(CheckpointError, match=r"rank 0: writing .* failed: .*disk is full"):
        ck.save(4, opt, dict(position=4, grad_accum=1), run_checkpoint.rng_state())
    monkeypatch.undo()
    assert tree(saved) == before  # nothing half-written left, latest unchanged
    model, opt = make()
    ck.load(ck.resolve("auto"), opt).apply()  # the previous checkpoint is usable


def try_mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


def test_a_really_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC on a small tmpfs (needs root; skipped otherwise)."""
    disk = tmp_path / "disk"
    if not try_mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs (not root)")
    try:
        model, opt = make()
        train_steps(model, opt, 1)
        ck = RunCheckpointer(disk / "checkpoints")
        ck.save(1, opt, dict(position=1, grad_accum=1), run_checkpoint.rng_state())
        before = tree(disk)
        st = os.statvfs(disk)
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 4096))  # leave one page
        train_steps(model, opt, 1)
        with pytest.raises(CheckpointError, match="disk is full"):
            ck.save(2, opt, dict(position=2, grad_accum=1), run_checkpoint.rng_state())
        filler.unlink()
        assert tree(disk) == before
        model, opt = make()
        ck.load(ck.resolve("auto"), opt).apply()
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_write_failing_on_one_of_two_ranks_stops_both_promptly(tmp_path):
    """2 ranks (FSDP2, gloo): each write of a save fails in turn on one rank; both ranks raise the
    same message right away (the timeout proves nothing waits), the previous checkpoint stays."""
    worker = str(ROOT / "tests" / "dist" / "save_failure_worker.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), worker, str(tmp_path)]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"result{r}.json").read_text()) for r in (0, 1))
    msgs = [{k: v for k, v in r.items() if not k.endswith(" seconds")} for r in (r0, r1)]
    assert msgs[0] == msgs[1]  # the same message on every rank (their timings differ a little)
    for case, rank in [("weights", 1), ("weights", 0), ("trainer", 1), ("manifest", 0),
                       ("latest", 0)]:
        msg = r0[f"{case}@{rank}"]
        assert f"rank {rank}: writing" in msg and "disk is full" in msg, (case, msg)
        assert r0[f"{case}@{rank} seconds"] < 30
        assert r0[f"{case}@{rank} latest"] == "step_00000001"
    assert r0["then"] == "step_00000002"  # the next save works, and what it wrote loads


# ------------------------------------------------------------------ 4. divergence, in the loop
class ToyTask:
    """Regression on random inputs through the training loop; ``poison(i, loss)`` alters the
    loss of the i-th micro-batch (from 0), ``ppl`` the evaluated values."""

    def __init__(self, poison=None, ppl=None):
        self.poison, self.ppl, self.calls, self.evals = poison, ppl, 0, 0

    def batches(self, position):
        while True:
            g = torch.Generator().manual_seed(position)
            x = torch.randn(8, 6, generator=g)
            yield x, x[:, :1]
            position += 1

    def loss(self, model, batch):
        loss = F.mse_loss(model(batch[0]), batch[1])
        self.calls += 1
        return self.poison(self.calls - 1, loss) if self.poison else loss

    def evaluate(self, model):
        self.evals += 1
        return dict(valid_ppl=self.ppl(self.evals) if self.ppl else 1.0)

    def meta(self):
        return dict(global_batch=8)

    def carry(self):
        return {}

    def restore(self, saved, position):
        pass


def run_loop(out, task, steps=6, resume="", lam=1e-3, allow=False, **cfg):
    from ramda_ds.training.launch import make_accelerator
    from ramda_ds.training.loop import LoopConfig, train

    acc = make_accelerator(1, "no")
    model, opt = make(lam=lam)
    config = LoopConfig(steps=steps, output_dir=str(out), eval_every=cfg.pop("eval_every", 100),
                        save_every=cfg.pop("save_every", 1), keep_last=10, resume=resume,
                        allow_hparam_change=allow, **cfg)
    return train(acc, model, opt, task, config, dict(event="setup"))


def metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def saved_steps(out):
    return sorted(p.name for p in (Path(out) / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("poison,what", [
    (lambda i, loss: loss + math.inf, "mean training loss inf"),
    (lambda i, loss: loss + 1e4, "mean training loss 1000"),  # finite, but exp(loss) overflows
    (lambda i, loss: loss * math.nan, "non-finite gradient"),  # the optimizer's FloatingPointError
])
def test_divergence_stops_and_sets_aside_the_diverged_state(tmp_path, capsys, poison, what):
    """Loss of step 4 bad: the state after step 3 is diverged, so its checkpoint goes to
    diverged/ and latest points at step 2; exit code 3, a message, no traceback."""
    task = ToyTask(lambda i, loss: poison(i, loss) if i >= 3 else loss)
    with pytest.raises(SystemExit) as e:
        run_loop(tmp_path, task)
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "step 4: the run diverged: " + what in err and "names step_00000002" in err, err
    assert saved_steps(tmp_path) == ["step_00000001", "step_00000002"]
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "step_00000002"
    assert [p.name[:13] for p in (tmp_path / "checkpoints" / "diverged").iterdir()] == [
        "step_00000003"]
    last = metrics(tmp_path)[-1]
    assert last["step"] == 4 and last["diverged"] is True


def test_a_loss_far_above_its_start_stops_the_run(tmp_path, capsys):
    """Finite but failing (the issue's --lr 10: 7.6 → 60 nats): the mean loss of a 10-step
    window above 2 × the first step's stops the run with exit 3, a reason, summary.json."""
    task = ToyTask(lambda i, loss: loss * 50 if i >= 20 else loss)
    with pytest.raises(SystemExit) as e:
        run_loop(tmp_path, task, steps=60, save_every=10)
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "step 30: the run diverged: the mean training loss of steps 21-30" in err, err
    assert "more than 2× the first step's" in err
    last = metrics(tmp_path)[-1]
    assert last["step"] == 30 and last["diverged"] is True and "first step" in last["reason"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diverged"] is True and summary["step"] == 30
    from ramda_ds.export.api import ExportError, export_run

    assert saved_steps(tmp_path) == ["step_00000010", "step_00000020"]
    with pytest.raises(ExportError, match="diverged at step 30 .*--allow_diverged"):
        export_run(tmp_path, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_a_throughput_drop_is_noted_once():
    from ramda_ds.training.loop import slowdown

    pace = dict(tokens=0, time=0.0, best=0.0, noted=False)
    seen = [slowdown(pace, t, s) for t, s in ((1000, 1), (2000, 2), (2500, 4.5), (3000, 9))]
    assert seen == [0.0, 0.0, 5.0, 0.0]


def test_a_loss_rising_for_a_long_stretch_stops_the_run(tmp_path, capsys):
    """A slow climb that never reaches 2 × the start: 5 window means in a row rose."""
    from ramda_ds.training.loop import DivergenceWatch

    task = ToyTask(lambda i, loss: loss.detach() * 0 + 1.0 + 0.004 * max(0, i - 30) + 0 * loss)
    with pytest.raises(SystemExit) as e:
        run_loop(tmp_path, task, steps=200, save_every=0)
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "the training loss rose for 50 steps in a row" in err, err
    assert metrics(tmp_path)[-1]["step"] == 80  # windows 21-30 < 31-40 < ... < 71-80
    # a flat or falling loss with noise never stops; the state round-trips through JSON
    w, g = DivergenceWatch(2.0), torch.Generator().manual_seed(0)
    for step in range(1, 1001):
        assert w.update(step, 3.0 + 5.0 / step + 0.3 * torch.rand(1, generator=g).item()) is None
        if step == 500:
            w = DivergenceWatch(2.0, state=json.loads(json.dumps(w.state())))
    assert DivergenceWatch(0.0).update(1, math.inf) is None  # off


def test_ctrl_c_saves_a_checkpoint_like_sigterm(tmp_path, capsys):
    """SIGINT during step 3: the step finishes, a checkpoint of step 3 is saved, one line,
    exit 130 (no KeyboardInterrupt traceback); --resume auto continues from it."""
    import signal

    def interrupt(i, loss):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss
    with pytest.raises(SystemExit) as e:
        run_loop(tmp_path, ToyTask(interrupt), steps=6, save_every=0)
    assert e.value.code == 130
    out = capsys.readouterr()
    assert "SIGINT (Ctrl-C): saved" in out.out and "step 3; resume with --resume auto" in out.out
    assert saved_steps(tmp_path) == ["step_00000003"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    run_loop(tmp_path, ToyTask(), steps=6, resume="auto", save_every=0)
    assert saved_steps(tmp_path)[-1] == "step_00000006"


def test_huge_perplexities_print_in_four_digits():
    from ramda_ds.training.loop import final_report, fmt

    assert fmt(93.3214) == "93.32" and fmt(1.0335e87) == "1.034e+87" and fmt(math.inf) == "inf"
    line = final_report(dict(step=5, valid_ppl_W=1.0335e87, wgs_W=0.5), None, "1 s")
    assert "validation perplexity 1.034e+87" in line and len(line) < 120


def test_an_infinite_perplexity_is_reported_and_not_saved(tmp_path, capsys):
    task = ToyTask(ppl=lambda n: math.inf if n == 2 else 5.0)
    with pytest.raises(SystemExit) as e:
        run_loop(tmp_path, task, eval_every=2)
    assert e.value.code == 3
    assert "step 4: the run diverged: valid_ppl_W inf" in capsys.readouterr().err
    assert saved_steps(tmp_path) == ["step_00000001", "step_00000002", "step_00000003"]
    rows = [r for r in metrics(tmp_path) if "step" in r]
    assert [(r["step"], r["valid_ppl_W"]) for r in rows] == [(2, 5.0), (4, math.inf)]


def test_perplexity_overflow_is_inf_not_an_exception():
    """StreamTask.evaluate of a model that is confidently wrong (mean loss ≈ 1e4 nats)."""
    from ramda_ds.training.launch import make_accelerator
    from ramda_ds.training.tasks import StreamTask

    V = 7
    model = nn.Embedding(V, V)
    with torch.no_grad():
        model.weight.copy_(1e4 * torch.eye(V).roll(2, dims=1))  # predicts token t + 2

    def forward(m, x, mem):
        return m(x), None
    ids = torch.arange(200) % 3  # the next token is (t + 1) % 3: never t + 2
    task = StreamTask(make_accelerator(1, "no"), ids, ids, 2, 5, forward)
    assert task.evaluate(model)["valid_ppl"] == math.inf


# ---------------------------------------------------------------- resume checks in the loop
def test_the_data_position_must_be_step_times_grad_accum(tmp_path):
    run_loop(tmp_path / "a", ToyTask(), steps=2)
    ck = tmp_path / "a" / "checkpoints" / "step_00000002"
    rewrite(ck, lambda m: m["meta"].update(position=5))
    before = tree(tmp_path)
    with pytest.raises(SystemExit, match=r"data position 5 is not step 2 × grad_accum 1"):
        run_loop(tmp_path / "b", ToyTask(), steps=4, resume=str(ck))
    assert tree(tmp_path) == before


def test_a_changed_lambda_is_refused_then_allowed_and_recorded(tmp_path):
    run_loop(tmp_path, ToyTask(), steps=2)
    with pytest.raises(SystemExit, match="lam 0.001 != this run's 0.002.*--allow_hparam_change"):
        run_loop(tmp_path, ToyTask(), steps=3, resume="auto", lam=2e-3)
    run_loop(tmp_path, ToyTask(), steps=3, resume="auto", lam=2e-3, allow=True)
    (resume,) = [r for r in metrics(tmp_path) if r.get("event") == "resume"]
    assert resume["hparam_changes"] == [dict(setting="lam", checkpoint=1e-3, now=2e-3, tensors=1,
                                             first="0.weight")]
    assert json.loads((tmp_path / "checkpoints" / "step_00000003" / MANIFEST).read_text())[
        "fingerprint"]["params"]["0.weight"]["lam"] == 2e-3


# --------------------------------------------------------------------- 5. CLI values checked
def parse(argv):
    sys.path.insert(0, str(ROOT / "launch"))
    import train_lm

    return train_lm.parse_args(argv)


@pytest.mark.parametrize("args,msg", [
    (["--milestones", "abc"], "milestones must be comma-separated step numbers"),
    (["--milestones", "300,200"], "milestones must be strictly increasing"),
    (["--milestones", "0"], "milestones must be strictly increasing steps >= 1"),
    (["--dropout", "1.5"], r"dropout must be in \[0, 1\)"),
    (["--save_every", "-1"], "save_every must be >= 0"),
    (["--lr", "nan"], "lr must be a finite number > 0"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--lam", "nan"], "lam must be >= 0"),
    (["--momentum", "0"], r"momentum .* must be in \(0, 1\]"),
    (["--momentum", "0.9"], r"looks like torch/MADGRAD.s convention .* pass c=0.1"),
    (["--grad_clip", "-1"], "grad_clip must be >= 0"),
    (["--solver", "newton"], "solver must be pg or exact"),
    (["--backend", "cuda"], r"backend must be one of \('auto', 'torch', 'triton', 'native'\)"),
    (["--backend", "native", "--optimizer", "adamw"], "applies to RAMDA's and ProxGen's step only"),
    (["--preset", "huge"], "preset must be tiny or base"),
    (["--vocab_size", "2"], "vocab_size must be >= 8"),
])
def test_bad_values_are_refused_with_a_message(args, msg):
    with pytest.raises(SystemExit, match=msg):
        parse(args)


@pytest.mark.parametrize("argv,msg", [
    (["--stpes", "3"], "unknown option --stpes; did you mean --steps"),
    (["--learning_rate", "3"], "unknown option --learning_rate; did you mean --lr?"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--diverge_factor", "0.5"], None),
])
def test_a_mistyped_flag_is_one_line_with_the_closest_flag(argv, msg, capsys):
    if msg is None:
        with pytest.raises(SystemExit, match="diverge_factor must be > 1"):
            parse(argv)
        return
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_a_deepspeed_config_with_an_optimizer_is_refused(tmp_path, monkeypatch):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2},
                               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(cfg))
    with pytest.raises(SystemExit, match=r"has a section \"optimizer\" \('AdamW'\): ramda_ds "
                                         r"supplies the optimizer \(ramda\)"):
        parse(["--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["train_file", "valid_file"])
@pytest.mark.parametrize("content", ["", "  \n\n \t\n"])
def test_empty_corpora_are_refused_before_anything_starts(tmp_path, which, content):
    empty, good = tmp_path / "empty.txt", tmp_path / "good.txt"
    empty.write_text(content)
    good.write_text("some text\n")
    files = {**dict(train_file=good, valid_file=good), which: empty}
    with pytest.raises(SystemExit, match=f"{which} {empty} is empty"):
        parse([f"--{k}={v}" for k, v in files.items()])


def test_a_corpus_too_short_for_the_global_batch_is_refused():
    from types import SimpleNamespace

    from ramda_ds.training.launch import make_accelerator, make_task

    acc = make_accelerator(1, "no")
    a = SimpleNamespace(batch_size=8)
    with pytest.raises(SystemExit, match="validation text gives 15 tokens, too few for a global "
                                         "batch of 8 rows"):
        make_task(acc, a, torch.arange(100), torch.arange(15), 4, None)
    make_task(acc, a, torch.arange(16), torch.arange(16), 4, None)  # 2 tokens per row suffice


def test_divergence_from_the_command_line_is_a_message_not_a_traceback(tmp_path):
    """The issue's ``--lr 1e6``: loss overflows at step 2; exit 3; the checkpoint of step 1
    (the diverged state) set aside; no OverflowError."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    p = subprocess.run([sys.executable, SCRIPT, "--lr", "1e6", "--steps", "6", "--eval_every", "3",
                        "--save_every", "1", "--vocab_size", "300", "--batch_size", "4",
                        "--output_dir", str(out)], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "the run diverged: mean training loss" in p.stderr
    assert not list((out / "checkpoints").glob("step_*"))
    assert not (out / "checkpoints" / LATEST).exists()


def test_a_full_disk_on_rank_1_stops_a_two_rank_run_with_one_message(tmp_path):
    """The issue's hang: rank 1's weights write fails (SafetensorError) during the step-4 save of
    a 2-rank FSDP2 run; both ranks exit with the same message, promptly; step 2 stays latest."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "tests" / "dist" / "fail_during_save.py"), "1", "2", SCRIPT, "--fsdp2",
           "--steps", "4", "--eval_every", "4", "--save_every", "2", "--vocab_size", "300",
           "--batch_size", "4", "--output_dir", str(out)]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    said = [x for x in p.stderr.splitlines() if "saving the checkpoint of step 4 failed" in x]
    assert len(said) == 2, p.stderr[-4000:]
    assert said[0].split("failed")[1] == said[1].split("failed")[1]  # the same on both ranks
    assert "rank 1: writing" in said[0] and "disk is full" in said[0]
    assert (out / "checkpoints" / LATEST).read_text() == "step_00000002"
    assert saved_steps(out) == ["step_00000002"]
