"""The LM entry point: real 1- and 2-process runs (accelerate + DeepSpeed ZeRO-2, torchrun + FSDP2)
on the bundled corpus, and bad configurations failing before any process group starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_sharded import ROOT, free_port

SCRIPT = str(ROOT / "launch" / "train_lm.py")
FAST = ["--steps", "6", "--eval_every", "3", "--vocab_size", "500", "--batch_size", "4"]


def run(cmd, tmp_path, timeout=600, env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path),
               **(env or {}))
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("args,msg", [(["--optimizer", "adam"], "unknown optimizer"),
                                      (["--lam", "-1"], "lam must be >= 0"),
                                      (["--train_file", "nope.txt"], "file not found: nope.txt")])
def test_bad_configs_fail_before_anything_starts(args, msg, tmp_path):
    p = run([sys.executable, SCRIPT, *args, "--output_dir", str(tmp_path / "o")], tmp_path)
    assert p.returncode != 0 and msg in p.stderr
    assert not (tmp_path / "o").exists()


def test_single_process_run_learns_and_reports(tmp_path):
    out = tmp_path / "o"
    p = run([sys.executable, SCRIPT, "--steps", "40", "--eval_every", "20", "--vocab_size", "500",
             "--output_dir", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    setup, first, last = rows(out)[0], rows(out)[1], rows(out)[-1]
    assert setup["view"] == "Unsharded" and setup["world_size"] == 1 and setup["backend"] == "single"
    assert last["valid_ppl_W"] < first["valid_ppl_W"] < 500
    assert "validation perplexity" in p.stdout and "weighted group sparsity" in p.stdout
    assert set(last["layer_sparsity_W"]) >= {"layers.0.ff.down.weight", "layers.1.attn.o.weight"}
    # PG runs ≥ 2 iterations on unscreened groups; λ = 1e-5 screens some groups but not all
    assert last["solver_iters_max"] >= 2 and 0 < last["screened_frac"] < 1
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000040"


def test_deepspeed_zero2_two_processes_through_accelerate(tmp_path):
    """ZeRO-2 through accelerate, with the default torch step and with --backend auto (the native
    kernels on the flat partitions' pieces): both learn, and print the same numbers."""
    runs = {}
    for backend in ("torch", "auto"):
        out = tmp_path / backend
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
               "--zero_stage", "2", "--num_processes", "2", "--main_process_port",
               str(free_port()), SCRIPT, *FAST, "--grad_accum", "2", "--backend", backend,
               "--output_dir", str(out)]
        p = run(cmd, tmp_path)
        assert p.returncode == 0, p.stderr[-4000:]
        setup = rows(out)[0]
        assert setup["distributed_type"] == "DEEPSPEED" and setup["view"] == "ZeroFlatView"
        assert setup["backend"] == "deepspeed-zero2"
        assert setup["step_kernels"] == ("torch" if backend == "torch" else "native")
        assert setup["world_size"] == 2 and learned(out)
        runs[backend] = rows(out)
    for a, b in zip(runs["torch"][1:], runs["auto"][1:]):
        for key in ("valid_ppl_W", "valid_ppl_structured", "wgs_W", "loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), key


def test_native_kernels_give_the_torch_runs_numbers(tmp_path):
    """--backend auto on CPU (the C kernels) against the default torch step: the same run."""
    runs = {}
    for backend in ("torch", "auto"):
        out = tmp_path / backend
        p = run([sys.executable, SCRIPT, *FAST, "--steps", "12", "--milestones", "8",
                 "--backend", backend, "--output_dir", str(out)], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[backend] = rows(out)
    assert runs["torch"][0]["step_kernels"] == "torch" and runs["auto"][0]["step_kernels"] == "native"
    for a, b in zip(runs["torch"][1:], runs["auto"][1:]):
        for key in ("valid_ppl_W", "valid_ppl_structured", "wgs_W", "loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6), key


def learned(out) -> bool:
    """Validation perplexity fell from the first evaluation (step 3) to the last (step 6)."""
    evals = [r["valid_ppl_W"] for r in rows(out)[1:]]
    return len(evals) == 2 and evals[1] < evals[0] < 600


def test_fsdp2_config_two_processes_really_shard(tmp_path):
    """accelerate skips its FSDP plugin on CPU; the script applies fully_shard itself."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--main_process_port",
           str(free_port()), SCRIPT, *FAST, "--backend", "auto", "--output_dir", str(out)]
    p = run(cmd, tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    setup = rows(out)[0]
    assert setup["view"] == "FSDP2View" and setup["dtensor_params"] > 0 and setup["world_size"] == 2
    assert setup["step_kernels"] == "native"
    assert setup["backend"] == "fsdp2"  # accelerate itself says distributed_type "NO" here
    assert learned(out)


def test_ddp_config_two_processes(tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--main_process_port",
           str(free_port()), SCRIPT, *FAST, "--backend", "auto", "--output_dir", str(out)]
    p = run(cmd, tmp_path, env={"ACCELERATE_USE_CPU": "true"})
    assert p.returncode == 0, p.stderr[-4000:]
    setup = rows(out)[0]
    assert setup["distributed_type"] == "MULTI_CPU" and setup["view"] == "Unsharded"
    assert setup["backend"] == "ddp"
    assert setup["step_kernels"] == "native"  # DDP ranks hold whole tensors: the C kernels run
    assert setup["world_size"] == 2 and learned(out)


def test_two_machines_simulated_on_loopback_with_the_zero2_config(tmp_path):
    """Two launcher invocations (machine_rank 0 and 1, one process each) form one 2-rank job."""
    out, port = tmp_path / "o", str(free_port())
    procs = []
    for rank in ("0", "1"):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "zero2.yaml"), "--num_machines", "2",
               "--machine_rank", rank, "--main_process_ip", "127.0.0.1", "--main_process_port",
               port, "--num_processes", "2", "--deepspeed_multinode_launcher", "standard", SCRIPT,
               *FAST, "--output_dir", str(out)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se[-4000:]
    setup = rows(out)[0]
    assert setup["world_size"] == 2 and setup["distributed_type"] == "DEEPSPEED"


def test_run_presets_parse(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    import train_lm

    tiny = train_lm.parse_args([str(ROOT / "configs" / "runs" / "tiny.yaml")])
    assert tiny.steps == 600 and tiny.lam == 1e-5
    with pytest.raises(SystemExit, match="file not found"):  # WikiText-103 is not shipped
        train_lm.parse_args([str(ROOT / "configs" / "runs" / "transformer_xl_wt103.yaml")])


def test_one_keep_last_default_everywhere(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    import finetune_llm
    import train_lm

    from ramda_ds.training.loop import LoopConfig
    from ramda_ds.training.run_checkpoint import RunCheckpointer

    defaults = {RunCheckpointer(tmp_path).keep_last, LoopConfig(1, str(tmp_path)).keep_last,
                train_lm.RunArgs().keep_last, finetune_llm.FinetuneArgs().keep_last}
    assert defaults == {2}
