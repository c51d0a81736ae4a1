"""Hugging Face ``Trainer`` + RAMDA (``ramda_ds.hf``) through ``launch/hf_trainer_example.py``: one
process, DeepSpeed ZeRO-2 (with gradient accumulation) and ZeRO-3 (``zero3_init_flag``) and FSDP2
at 2 ranks through ``accelerate launch``, equal to the 1-process run with the same global batch;
a Trainer checkpoint resumed equals the uninterrupted run, also across backends (ZeRO-3 → FSDP2);
refused configurations; TRL's ``SFTTrainer``.

The runs share one tiny Llama (saved with ``save_pretrained``, with a word-level tokenizer) and are
cached per module: the FSDP2 run continues the ZeRO-3 run's ``checkpoint-2``.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_sharded import ROOT, free_port
from test_train_lm import run

EXAMPLE = str(ROOT / "launch" / "hf_trainer_example.py")
# global batch 4 (4 × 1 process or 2 × 2 ranks), 4 optimizer steps, checkpoints at 2 and 4;
# momentum (c) = 1 makes W = Ŵ, so the saved weights hold exact zeros after the first step. The
# Trainer's default linear decay: a resumed run must continue the schedule's lr, not restart it
COMMON = ["--block_size", "16", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2",
          "--learning_rate", "1e-2", "--lam", "1e-3", "--momentum", "1", "--lr_scheduler_type",
          "linear", "--weight_decay", "0", "--report_to", "none", "--seed", "0",
          "--disable_tqdm", "true"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def make_model(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(200)]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[j] for j in torch.randint(0, 200, (40,), generator=g).tolist())
             for _ in range(40)]
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>",
                                  pad_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=1, pad_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(d / "llama")
    tok.save_pretrained(d / "llama")


class Runs:
    """Each launch once per module; ``get(name)`` returns its output directory."""

    LAUNCH = {
        "ref": lambda: [sys.executable, EXAMPLE, "--use_cpu", "--per_device_train_batch_size", "4"],
        "native": lambda: [sys.executable, EXAMPLE, "--use_cpu", "--per_device_train_batch_size", "4",
                           "--backend", "auto"],
        "resumed": lambda: [sys.executable, EXAMPLE, "--use_cpu", "--per_device_train_batch_size",
                            "4", "--resume_from_checkpoint", "ref/checkpoint-2"],
        # 1 sample × 2 accumulated micro-batches × 2 ranks
        "zero2_accum": lambda: [*ACCELERATE, "--use_deepspeed", "--zero_stage", "2",
                                "--gradient_accumulation_steps", "2", "--num_processes", "2",
                                "--main_process_port", str(free_port()), EXAMPLE, "--ddp_backend",
                                "gloo", "--per_device_train_batch_size", "1",
                                "--gradient_accumulation_steps", "2"],
        "zero3": lambda: [*ACCELERATE, "--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag",
                          "true", "--zero3_save_16bit_model", "true", "--num_processes", "2",
                          "--main_process_port", str(free_port()), EXAMPLE, "--ddp_backend",
                          "gloo", "--per_device_train_batch_size", "2"],
        "zero3_native": lambda: [*ACCELERATE, "--use_deepspeed", "--zero_stage", "3",
                                 "--zero3_init_flag", "true", "--zero3_save_16bit_model", "true",
                                 "--num_processes", "2", "--main_process_port", str(free_port()),
                                 EXAMPLE, "--ddp_backend", "gloo", "--per_device_train_batch_size",
                                 "2", "--backend", "auto"],
        "fsdp2": lambda: [*ACCELERATE, "--config_file",
                          str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"),
                          "--main_process_port", str(free_port()), EXAMPLE, "--ddp_backend",
                          "gloo", "--per_device_train_batch_size", "2"],
        "fsdp2_from_zero3": lambda: [*ACCELERATE, "--config_file",
                                     str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"),
                                     "--main_process_port", str(free_port()), EXAMPLE,
                                     "--ddp_backend", "gloo", "--per_device_train_batch_size", "2",
                                     "--resume_from_checkpoint", "zero3/checkpoint-2"],
        # a size target with distillation: 1 process and ZeRO-3 at 2 ranks (the teacher sharded)
        "target": lambda: [sys.executable, EXAMPLE, "--use_cpu", "--per_device_train_batch_size",
                           "4", "--target", "0.5", "--distill", "0.5"],
        "target_zero3": lambda: [*ACCELERATE, "--use_deepspeed", "--zero_stage", "3",
                                 "--zero3_save_16bit_model", "true",
                                 "--num_processes", "2", "--main_process_port", str(free_port()),
                                 EXAMPLE, "--ddp_backend", "gloo", "--per_device_train_batch_size",
                                 "2", "--target", "0.5", "--distill", "0.5"],
    }
    AFTER = {"target": ["--max_steps", "6"], "target_zero3": ["--max_steps", "6"]}  # over COMMON's
    NEEDS = {"resumed": "ref", "fsdp2_from_zero3": "zero3"}

    def __init__(self, d: Path):
        self.d, self.done = d, set()

    def get(self, name: str) -> Path:
        if name not in self.done:
            if name in self.NEEDS:
                self.get(self.NEEDS[name])
            cmd = [*self.LAUNCH[name](), "--model_path", "llama", "--train_file", "train.txt",
                   *COMMON, *self.AFTER.get(name, []), "--output_dir", name]
            p = run(cmd, self.d)
            assert p.returncode == 0, p.stderr[-4000:]
            self.done.add(name)
        return self.d / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_model(d)
    return Runs(d)


def weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def setup(out: Path) -> dict:
    return json.loads((out / "ramda_ds_setup.json").read_text())


def train_rows(out: Path, step: int = 4) -> list[dict]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [r for r in state["log_history"] if "loss" in r]


def zero_units(w: dict) -> dict:
    """Zero FFN neurons (columns of down_proj) and heads (8-column blocks of o_proj) per layer."""
    out = {}
    for name, t in w.items():
        if name.endswith("mlp.down_proj.weight"):
            out[name] = (t.abs().sum(0) == 0).nonzero().flatten().tolist()
        elif name.endswith("self_attn.o_proj.weight"):
            out[name] = (t.view(t.shape[0], 4, 8).abs().sum((0, 2)) == 0).nonzero().flatten().tolist()
    return out


def assert_same_run(ref: Path, other: Path, rtol: float = 1e-5) -> None:
    a, b = weights(ref), weights(other)
    assert a.keys() == b.keys()
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)).item()
        assert rel <= rtol, f"{k}: relative difference {rel:.2e}"
    assert zero_units(a) == zero_units(b)
    ra, rb = train_rows(ref), train_rows(other)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):  # the logged numbers too (a wrong loss scale would show here)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert {k: v for k, v in x.items() if k.startswith("units_kept/")} == \
            {k: v for k, v in y.items() if k.startswith("units_kept/")}


def test_one_process_trains_logs_and_checkpoints_in_ramda_format(runs):
    from ramda_ds.checkpoint import full_state

    out = runs.get("ref")
    assert setup(out)["view"] == "Unsharded" and setup(out)["optimizer"] == "RAMDA"
    rows = train_rows(out)
    last = rows[-1]
    assert 0 < last["wgs"] < 1 and last["solver_iters_mean"] >= 1
    kept = {k.removeprefix("units_kept/"): v for k, v in last.items() if k.startswith("units_kept/")}
    assert set(kept) == {f"model.layers.{i}.{m}" for i in range(2)
                         for m in ("mlp.down_proj.weight", "self_attn.o_proj.weight")}
    w = weights(out)
    zeros = zero_units(w)
    assert kept == {n: (64 if "down" in n else 4) - len(z) for n, z in zeros.items()}  # W's units
    assert sum(map(len, zeros.values())) > 0 and all(v > 0 for v in kept.values())
    # the checkpoint holds the ramda_ds state (the master weights = the saved model), no pickle of it
    ck = out / "checkpoint-4"
    assert not (ck / "optimizer.pt").exists() and not list(ck.glob("global_step*"))
    state = full_state([ck / "ramda_ds_optim" / "rank0.safetensors"])
    assert set(state) == set(w)
    for name, t in w.items():
        assert torch.equal(state[name]["param"].view_as(t), t), name
    assert {"grad_sum", "grad_sq_sum", "initial", "structured"} <= set(state["lm_head.weight"])
    meta = json.loads((ck / "ramda_ds_trainer.json").read_text())
    assert meta["optimizer"] == "RAMDA" and meta["step"] == 4 and meta["world_size"] == 1
    assert meta["base_model"] == str((runs.d / "llama").resolve())


def test_native_kernels_give_the_same_run(runs):
    """``--backend auto`` on CPU: RAMDA's step on the C kernels, the run of the torch step."""
    ref, native = runs.get("ref"), runs.get("native")
    assert setup(ref)["step_kernels"] == "torch" and setup(native)["step_kernels"] == "native"
    assert setup(native)["config"]["backend"] == "auto"
    assert_same_run(ref, native, rtol=1e-6)


def test_zero3_with_the_native_kernels_gives_the_same_run(runs):
    """ZeRO-3 + ``--backend auto``: the kernels run on the ranks' partitions (pieces of every
    weight, groups all-reduced each PG iteration): the one-process torch run's weights, zero
    units and logged numbers."""
    out = runs.get("zero3_native")
    assert setup(out)["view"] == "Zero3View" and setup(out)["step_kernels"] == "native"
    assert_same_run(runs.get("ref"), out)


def test_trainer_checkpoint_resumed_equals_uninterrupted(runs):
    """Bitwise, under the linear lr decay: the step after the resume runs at the scheduler's lr
    (the ramda_ds state does not carry the groups' lr; before the fix it ran at the initial lr)."""
    ref, resumed = runs.get("ref"), runs.get("resumed")
    a, b = weights(ref), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: data order, RNG and state continue
    assert train_rows(ref) == train_rows(resumed)  # loss, grad norm, WGS, units, solver iterations
    lrs = [r["learning_rate"] for r in train_rows(ref)]
    assert lrs[0] > lrs[1] > 0  # the schedule really decays


def test_example_refuses_in_one_line_before_anything_is_written(runs, tmp_path):
    """Mistakes at the command line of the example: one line each, exit 2 (flags) or 1, nothing
    written; an output_dir with an earlier run's checkpoints needs --resume_from_checkpoint or
    --overwrite_output_dir; a DeepSpeed config with an optimizer is refused before loading."""
    d = runs.get("ref").parent
    base = [sys.executable, EXAMPLE, "--model_path", "llama", "--use_cpu", "--report_to", "none"]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"},
                              "train_micro_batch_size_per_gpu": "auto"}))
    cases = [(["--train_file", "train.txt", "--output_dir", "x1", "--lerning_rate", "1"], 2,
              "unknown option --lerning_rate; did you mean --learning_rate"),
             (["--output_dir", "x2"], 2, "the following arguments are required: --train_file"),
             (["--train_file", "nope.txt", "--output_dir", "x3"], 1, "--train_file nope.txt not found"),
             (["--train_file", "train.txt", "--output_dir", "ref"], 1,
              "holds checkpoints of an earlier run (checkpoint-2, checkpoint-4): pass "
              "--resume_from_checkpoint ref/checkpoint-4"),
             (["--train_file", "train.txt", "--output_dir", "x4", "--weight_decay", "0.1"], 1,
              "set weight_decay=0")]
    for argv, code, msg in cases:
        p = run([*base, *argv], d)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == code and msg in lines[-1] and "Traceback" not in p.stderr, p.stderr
    assert not [x for x in d.glob("x*")]
    p = run([*base, "--train_file", "train.txt", "--output_dir", "x5", "--deepspeed", str(ds)], d)
    assert p.returncode == 1 and 'remove its "optimizer" section' in p.stderr.splitlines()[-1], \
        p.stderr[-3000:]
    # 2 ranks: the refusal is the first line, once (rank 0), before the launcher's own report
    p = run([*ACCELERATE, "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
             "--main_process_port", str(free_port()), EXAMPLE, "--model_path", "llama",
             "--train_file", "train.txt", "--output_dir", "x6", "--ddp_backend", "gloo",
             "--weight_decay", "0.1", "--report_to", "none"], d)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and lines[0] == (
        "hf_trainer_example.py: error: weight_decay=0.1 would be ignored: ramda_ds optimizers "
        "regularize with RamdaConfig(lam=...); set weight_decay=0"), p.stderr[-3000:]
    assert sum("weight_decay=0.1" in x for x in lines) == 1 and not (d / "x6").exists()


def test_zero2_two_ranks_with_accumulation_equal_one_process(runs):
    out = runs.get("zero2_accum")
    s = setup(out)
    assert s["view"] == "ZeroFlatView" and s["world_size"] == 2 and s["distributed_type"] == "DEEPSPEED"
    assert_same_run(runs.get("ref"), out)


def test_zero3_partitioned_at_load_equals_one_process(runs):
    out = runs.get("zero3")
    s = setup(out)
    assert s["view"] == "Zero3View" and s["world_size"] == 2
    assert s["partitioned_at_load"] == 21  # zero3_init_flag: every weight partitioned by zero.Init
    assert_same_run(runs.get("ref"), out)


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_from_zero3"])
def test_fsdp2_two_ranks_equal_one_process_also_continuing_a_zero3_checkpoint(runs, name):
    """accelerate does not apply FSDP on CPU: the example shards with fully_shard itself."""
    out = runs.get(name)
    s = setup(out)
    assert s["view"] == "FSDP2View" and s["world_size"] == 2 and s["dtensor_params"] == 21
    assert s["distributed_type"] == "MULTI_CPU"  # accelerate sees the 2 ranks (ACCELERATE_USE_CPU)
    assert_same_run(runs.get("ref"), out)


REFUSALS = r'''
import json, os, sys, torch
from transformers import AutoModelForCausalLM, TrainingArguments
from ramda_ds.hf import RamdaConfig, RamdaTrainer
from ramda_ds.hf.setup import cpu_friendly

def zero(stage, **kw):
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "zero_optimization": {"stage": stage, **kw}}

cases = {"ds_optimizer": dict(deepspeed={**zero(2), "optimizer": {"type": "AdamW"}}),
         "offload": dict(deepspeed=zero(3, offload_optimizer={"device": "cpu"})),
         "weight_decay": dict(weight_decay=0.01), "optimizers": None, "world": dict(ddp_backend="gloo")}
names = sys.argv[1].split(",")
if "world" not in names:
    cpu_friendly()
out = {}
for name in [n for n in names if n != "other_units"]:
    model = AutoModelForCausalLM.from_pretrained("llama")
    kw, extra = cases[name] or {}, {}
    if name == "optimizers":
        extra = dict(optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    args = TrainingArguments(output_dir="o_" + name, report_to="none",
                             use_cpu="deepspeed" not in kw and name != "world", **kw)
    try:
        RamdaTrainer(model=model, args=args, train_dataset=[], ramda=RamdaConfig(), **extra)
    except ValueError as e:
        out[name] = str(e)
if "other_units" in names:  # resuming a checkpoint of other units: refused before any step
    model = AutoModelForCausalLM.from_pretrained("llama")
    args = TrainingArguments(output_dir="o_other_units", report_to="none", use_cpu=True,
                             max_steps=4, weight_decay=0.0)
    data = [dict(input_ids=[2] * 16, labels=[2] * 16)] * 8
    t = RamdaTrainer(model=model, args=args, train_dataset=data, ramda=RamdaConfig(units="ffn"))
    try:
        t.train(resume_from_checkpoint="ref/checkpoint-2")
    except ValueError as e:
        out["other_units"] = str(e)
if os.environ.get("RANK", "0") == "0":  # (two ranks' lines on one pipe can interleave)
    print("REFUSED " + json.dumps(out), flush=True)
'''


def refused(stdout: str) -> dict:
    return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("REFUSED "))[8:])


def test_refused_configurations_stop_before_anything_is_written(runs):
    d = runs.get("ref").parent
    (d / "refusals.py").write_text(REFUSALS)
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    cases = "ds_optimizer,offload,weight_decay,optimizers,other_units"
    p = run([sys.executable, "refusals.py", cases], d, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    msg = refused(p.stdout)
    assert "names its own optimizer ('AdamW')" in msg["ds_optimizer"]
    assert 'remove its "optimizer" section' in msg["ds_optimizer"]
    assert "offload_optimizer.device" in msg["offload"] and "ZeRO-Offload" in msg["offload"]
    assert "set weight_decay=0" in msg["weight_decay"]
    assert "drop optimizers=(opt, ...)" in msg["optimizers"]
    assert "units: 'ffn,heads' there, 'ffn' here" in msg["other_units"]
    # 2 processes that accelerate does not see as distributed (fsdp2.yaml on CPU without
    # ACCELERATE_USE_CPU): the loss would be scaled by the world size
    p = run([*ACCELERATE, "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"),
             "--main_process_port", str(free_port()), "refusals.py", "world"], d)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=true" in refused(p.stdout)["world"]
    assert not [f for o in d.glob("o_*") for f in o.rglob("*")]  # (Trainer.train makes o_other_units)


SFT = r'''
import sys
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from ramda_ds.hf import RamdaConfig, RamdaMixin


class RamdaSFTTrainer(RamdaMixin, SFTTrainer):
    pass


args = SFTConfig(output_dir="sft", max_steps=2, save_steps=2, logging_steps=2,
                 per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant",
                 weight_decay=0.0, report_to="none", use_cpu=True, max_length=16, disable_tqdm=True)
t = RamdaSFTTrainer(model=AutoModelForCausalLM.from_pretrained("llama"), args=args,
                    train_dataset=load_dataset("text", data_files="train.txt")["train"],
                    processing_class=AutoTokenizer.from_pretrained("llama"),
                    ramda=RamdaConfig(lam=1e-3, momentum=1.0))
t.train()
print("OPTIMIZER", type(t.ramda_optimizer).__name__)
'''


def test_trl_sft_trainer_with_the_mixin(runs):
    pytest.importorskip("trl")
    d = runs.d
    (d / "sft.py").write_text(SFT)
    p = run([sys.executable, "sft.py"], d)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OPTIMIZER RAMDA" in p.stdout
    assert (d / "sft" / "checkpoint-2" / "ramda_ds_optim" / "COMPLETE").exists()
    last = train_rows(d / "sft", 2)[-1]
    assert last["wgs"] > 0 and "units_kept/model.layers.0.mlp.down_proj.weight" in last


def test_size_target_with_distillation_in_the_trainer(runs):
    """RamdaConfig(target=0.5, distill=0.5): the support is frozen on exactly half the units by
    the last step, logged units say so, the checkpoint carries the recipe's state, and ZeRO-3 at
    2 ranks (its teacher sharded by FSDP2) keeps the same units as one process."""
    import json

    one, two = runs.get("target"), runs.get("target_zero3")
    for out in (one, two):
        meta = json.loads((out / "checkpoint-6" / "ramda_ds_trainer.json").read_text())
        assert meta["compress"]["frozen_at"] is not None and meta["ramda"]["target"] == 0.5
        last = train_rows(out, 6)[-1]
        kept = {k: v for k, v in last.items() if k.startswith("units_kept/")}
        assert sum(v for k, v in kept.items() if "down_proj" in k) == 64  # of 2 × 64 neurons
        assert sum(v for k, v in kept.items() if "o_proj" in k) == 4  # of 2 × 4 heads
    assert json.loads((one / "checkpoint-6" / "ramda_ds_trainer.json").read_text())["compress"][
        "frozen_at"] == json.loads((two / "checkpoint-6" / "ramda_ds_trainer.json").read_text())[
        "compress"]["frozen_at"]
    assert zero_units(weights(one)) == zero_units(weights(two))
