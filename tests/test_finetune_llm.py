"""Fine-tuning path: a tiny randomly initialised Llama saved with save_pretrained, loaded from disk.

The structured model Ŵ (what export ships) and the weights W are both evaluated and labelled; the
Ŵ numbers are checked against an independent evaluation of a model loaded with Ŵ from the
checkpoint (1 process, ZeRO-3 and FSDP2 at 2 ranks). Degenerate inputs are refused before
anything is loaded or written.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from test_sharded import ROOT, free_port
from test_train_lm import run

SCRIPT = str(ROOT / "launch" / "finetune_llm.py")
sys.path.insert(0, str(ROOT / "launch"))
import finetune_llm  # noqa: E402

CFG = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_llama(path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(path)
    return str(path)


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_state(out, step):
    from ramda_ds.checkpoint import full_state

    d = Path(out) / "checkpoints" / f"step_{step:08d}"
    world = json.loads((d / "manifest.json").read_text())["world_size"]
    return full_state([d / "weights" / f"rank{r}.safetensors" for r in range(world)])


def independent_ppl(model_path, out, state, key, global_batch, eval_tokens, seq_len=64):
    """Perplexity of a fresh model holding ``state[*][key]`` (Ŵ: "structured", W: "param") on
    the run's validation tokens, computed here on whole batches (not through the loop)."""
    from ramda_ds.training import data

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.load_state_dict({n: t[key] for n, t in state.items()}, strict=True)
    model.eval()
    ids = data.encode(data.load_lines(str(Path(out) / "data" / "pydoc_valid.txt")),
                      str(Path(out) / "data" / "sp300.model")) % 300
    streams = data.lm_streams(ids[:eval_tokens + 1], global_batch)
    tot, n = 0.0, 0
    with torch.no_grad():
        for x, y in data.segments(streams, seq_len):
            logits = model(input_ids=x).logits
            tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   reduction="sum").item()
            n += y.numel()
    return math.exp(tot / n)


def assert_both_models_reported(out, model_path, step, global_batch, eval_tokens):
    """The last row has Ŵ and W numbers that differ, each equal to an independent evaluation."""
    last = rows(out)[-1]
    assert last["step"] == step and last["W_is_structured"] is False
    assert {"valid_ppl_structured", "valid_ppl_W", "wgs_structured", "wgs_W",
            "layer_sparsity_structured", "layer_sparsity_W"} <= last.keys()
    assert last["wgs_structured"] > last["wgs_W"]  # W is not exactly sparse yet
    assert abs(last["valid_ppl_structured"] / last["valid_ppl_W"] - 1) > 1e-4
    state = checkpoint_state(out, step)
    for key, name in (("structured", "valid_ppl_structured"), ("param", "valid_ppl_W")):
        ref = independent_ppl(model_path, out, state, key, global_batch, eval_tokens)
        assert abs(last[name] / ref - 1) < 1e-5, (name, last[name], ref)


def test_tiny_llama_reports_structured_and_dense_models(tmp_path):
    """Without milestones W ≠ Ŵ: both are evaluated, labelled, and the headline is Ŵ's."""
    model = tiny_llama(tmp_path / "llama")
    out = tmp_path / "o"
    p = run([sys.executable, SCRIPT, "--model_path", model, "--steps", "6", "--milestones", "",
             "--lam", "1e-2", "--lr", "1e-2", "--eval_tokens", "700", "--resume", "auto",
             "--output_dir", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--resume auto: no checkpoint" in p.stdout and "starting fresh" in p.stdout
    setup = rows(out)[0]
    assert setup["backend"] == "single" and setup["headline"] == "structured"
    assert setup["milestones"] == [] and setup["valid_tokens"] <= 700
    assert [r["step"] for r in rows(out)[1:]] == [1, 2, 3, 4, 5, 6]  # eval_every: steps / 10
    assert_both_models_reported(out, model, 6, 4, 700)
    s = json.loads((out / "summary.json").read_text())
    last = rows(out)[-1]
    assert s["model"] == "structured" and s["ppl"] == last["valid_ppl_structured"]
    assert s["W"] == dict(ppl=last["valid_ppl_W"], wgs=last["wgs_W"]) and not s["W_is_structured"]
    units = s["units"]
    assert set(units) == {f"model.layers.{i}.{m}" for i in range(2)
                          for m in ("mlp.down_proj.weight", "self_attn.o_proj.weight")}
    assert all(total == 64 for n, (_, total) in units.items() if "down_proj" in n)  # neurons
    assert all(total == 4 for n, (_, total) in units.items() if "o_proj" in n)  # heads
    assert s["wgs"] > 0  # a strong λ removes some units
    assert "structured model Ŵ (what export ships): validation perplexity" in p.stdout
    assert "W ≠ Ŵ" in p.stdout and "steps after the last milestone" in p.stdout
    assert (out / "plot.png").exists() and (out / "plot_units.png").exists()


def test_auto_milestones_make_W_exactly_structured(tmp_path):
    """The default schedule: one restart such that c = min(c0·√i, 1) reaches 1 by the end."""
    assert finetune_llm.auto_milestones(200, 0.1) == "100"
    assert finetune_llm.auto_milestones(1000, 0.1) == "900"
    assert finetune_llm.auto_milestones(60, 0.1) == "30"  # too short for c0: c ends at 0.55
    assert finetune_llm.auto_milestones(8, 0.5) == "4" and finetune_llm.auto_milestones(1, 0.5) == ""
    model = tiny_llama(tmp_path / "llama")
    out = tmp_path / "o"
    p = run([sys.executable, SCRIPT, "--model_path", model, "--steps", "8", "--momentum", "0.5",
             "--lam", "1e-2", "--lr", "1e-2", "--solver", "exact", "--output_dir", str(out)],
            tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert rows(out)[0]["milestones"] == [4] and rows(out)[0]["solver"] == "exact"
    last = rows(out)[-1]
    assert last["W_is_structured"] is True and last["wgs_W"] == last["wgs_structured"] > 0
    assert last["valid_ppl_W"] == last["valid_ppl_structured"]
    assert "W ≠ Ŵ" not in p.stdout


def test_missing_model_path_fails_clearly(tmp_path):
    p = run([sys.executable, SCRIPT, "--model_path", str(tmp_path / "none")], tmp_path)
    assert p.returncode != 0 and "local HF checkpoint" in p.stderr


def test_group_pattern_matching_no_parameter_fails_before_start(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4)).save_pretrained(
        tmp_path / "llama")
    p = run([sys.executable, SCRIPT, "--model_path", str(tmp_path / "llama"), "--groups",
             "*.mlp.fc2.weight=input", "--output_dir", str(tmp_path / "o")], tmp_path)
    assert p.returncode != 0 and "'*.mlp.fc2.weight' matches no parameter" in p.stderr
    assert not (tmp_path / "o").exists()


def refused(argv, capsys, tmp_path) -> str:
    """main(argv) stops before anything is loaded or written; returns its message."""
    out = tmp_path / "refused_out"
    with pytest.raises(SystemExit) as e:
        finetune_llm.main([*argv, "--output_dir", str(out)])
    assert not out.exists() or not any(p.name != "checkpoints" for p in out.iterdir())
    return str(e.value.code) + capsys.readouterr().err


def test_gpt2_without_tokenizer_files_is_refused(tmp_path, capsys):
    """transformers returns an empty tokenizer (len 1, every text -> []): nothing to train on."""
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=4, n_positions=128)
                    ).save_pretrained(tmp_path / "gpt2")
    msg = refused(["--model_path", str(tmp_path / "gpt2")], capsys, tmp_path)
    assert "tokenizer" in msg and "is unusable" in msg and "--tokenizer train" in msg
    assert "--units heads" in msg and "not regularized" in msg  # GPT-2 heads: said, not dropped
    a = finetune_llm.parse_args(["--model_path", str(tmp_path / "gpt2"), "--tokenizer", "train",
                                 "--output_dir", str(tmp_path / "o")])
    assert a.tokenizer == "train" and not (tmp_path / "o").exists()


def test_validation_on_training_text_needs_a_flag(tmp_path, capsys):
    model = tiny_llama(tmp_path / "llama")
    (tmp_path / "train.txt").write_text("some text\n" * 50)
    shutil.copy(tmp_path / "train.txt", tmp_path / "copy.txt")
    base = ["--model_path", model, "--train_file", str(tmp_path / "train.txt")]
    assert "no --valid_file" in refused(base, capsys, tmp_path)
    msg = refused([*base, "--valid_file", str(tmp_path / "copy.txt")], capsys, tmp_path)
    assert "same text as --train_file" in msg and "--valid_equals_train" in msg
    a = finetune_llm.parse_args([*base, "--valid_equals_train", "--output_dir", str(tmp_path / "o")])
    assert a.valid_equals_train


def test_resume_targets_are_checked_before_anything_is_loaded(tmp_path, capsys):
    model = tiny_llama(tmp_path / "llama")
    base = ["--model_path", model]
    assert "checkpoint not found" in refused([*base, "--resume", str(tmp_path / "nope")],
                                             capsys, tmp_path)
    (tmp_path / "notackpt").mkdir()
    assert "not a complete checkpoint (no manifest.json" in refused(
        [*base, "--resume", str(tmp_path / "notackpt")], capsys, tmp_path)
    # a fresh run over an earlier run's checkpoints
    (tmp_path / "refused_out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "refused_out" / "checkpoints" / "latest").write_text("step_00000002")
    assert "--resume auto" in refused(base, capsys, tmp_path)
    assert "not a complete checkpoint" in refused(
        [*base, "--resume", str(tmp_path / "refused_out")], capsys, tmp_path)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        finetune_llm.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 32768)" in text and "(default: auto)" in text
    assert "default: 'ramda'" in text or "(default: ramda)" in text
    assert "default: 64" in text  # fields without their own help string


def test_zero3_partitioned_at_load_then_resumed_on_one_process(tmp_path):
    """ZeRO-3 with zero3_init_flag (how a 7B model fits: weights partitioned as they load), then
    its checkpoint continued by a single process: same weights and state within fp32 tolerance.
    Evaluating Ŵ swaps ZeRO-3's partitions (tiny parameters stay gathered as "persistent"): its
    perplexity equals an independent evaluation of Ŵ, and W's is W's."""
    from test_resume import assert_close, final_state

    model = tiny_llama(tmp_path / "llama")
    common = ["--model_path", model, "--steps", "4", "--eval_every", "2", "--save_every", "2",
              "--lam", "1e-2", "--lr", "1e-2", "--eval_tokens", "700"]
    p = run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage",
             "3", "--zero3_init_flag", "true", "--num_processes", "2", "--main_process_port",
             str(free_port()), SCRIPT, *common, "--batch_size", "2", "--output_dir",
             str(tmp_path / "z3")], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    setup = rows(tmp_path / "z3")[0]
    assert setup["view"] == "Zero3View" and setup["world_size"] == 2
    assert setup["backend"] == "deepspeed-zero3" and setup["milestones"] == [2]
    assert_both_models_reported(tmp_path / "z3", model, 4, 4, 700)
    p = run([sys.executable, SCRIPT, *common, "--batch_size", "4", "--output_dir", str(tmp_path / "one"),
             "--resume", str(tmp_path / "z3" / "checkpoints" / "step_00000002")], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert_close(final_state(tmp_path / "z3", 4), final_state(tmp_path / "one", 4), 1e-4, "z3 -> 1")
    assert Path(tmp_path / "one" / "summary.json").exists()


def test_fsdp2_two_ranks_evaluate_the_structured_model(tmp_path):
    """FSDP2 keeps the root's parameters gathered after an evaluation forward; the Ŵ swap
    reshards so that both evaluations see the weights they claim to."""
    model = tiny_llama(tmp_path / "llama")
    out = tmp_path / "o"
    p = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", str(free_port()), SCRIPT, "--fsdp2", "--model_path", model,
             "--steps", "3", "--milestones", "", "--lam", "1e-2", "--lr", "1e-2",
             "--batch_size", "2", "--eval_tokens", "700", "--output_dir", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    setup = rows(out)[0]
    assert setup["backend"] == "fsdp2" and setup["view"] == "FSDP2View" and setup["world_size"] == 2
    assert_both_models_reported(out, model, 3, 4, 700)


# ---------------------------------------------------------------------------- size target
TARGET = ["--units", "ffn", "--target", "0.5", "--target_ramp", "4", "--target_stable", "2",
          "--target_max_identify", "6", "--lr", "1e-2", "--eval_tokens", "700", "--eval_every", "2"]


def _kept(out):
    s = json.loads((Path(out) / "summary.json").read_text())
    return s, {n: t - z for n, (z, t) in s["units"].items()}


def test_target_is_met_exactly_and_resume_is_bitwise_across_the_freeze(tmp_path):
    """--target 0.5: the support is frozen on exactly half of the FFN units, W is then the
    structured model (no W ≠ Ŵ), the freeze is logged and marked; a run resumed from a checkpoint
    before the freeze ends bit for bit where the uninterrupted one does."""
    from test_resume import assert_close, final_state

    model = tiny_llama(tmp_path / "llama")
    full = tmp_path / "full"
    p = run([sys.executable, SCRIPT, "--model_path", model, *TARGET, "--steps", "10",
             "--save_every", "3", "--keep_last", "5", "--output_dir", str(full)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s, kept = _kept(full)
    assert s["units_kept"] == 0.5 and sum(kept.values()) == 64  # 2 layers × 64 neurons, half kept
    assert s["W_is_structured"] is True and s["ppl"] == s["W"]["ppl"]
    assert 4 <= s["support_frozen_at"] <= 6 and "support frozen at 0.5000" in p.stdout
    frozen = [r for r in rows(full) if "support_frozen_at" in r]
    assert len(frozen) == 1 and frozen[0]["step"] == s["support_frozen_at"]
    assert rows(full)[0]["milestones"] == [] and rows(full)[0]["target"] == 0.5
    assert "W ≠ Ŵ" not in p.stdout
    # export ships that model: exactly the kept neurons per layer, the run's perplexity
    from ramda_ds.export.api import export_run

    report = export_run(full, tmp_path / "exported", verbose=False)
    sizes = [layer["intermediate_size"] for layer in json.loads(
        (tmp_path / "exported" / "config.json").read_text())["layer_sizes"]]
    assert sizes == [kept[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(2)]
    assert report["logits_max_rel_diff"] < 1e-5
    # resume from step 3 (identification) to the end: bitwise the uninterrupted run
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step_00000003", part / "checkpoints" / "step_00000003")
    (part / "checkpoints" / "latest").write_text("step_00000003")
    p = run([sys.executable, SCRIPT, "--model_path", model, *TARGET, "--steps", "10",
             "--save_every", "3", "--resume", "auto", "--output_dir", str(part)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_close(final_state(full, 10), final_state(part, 10), 0, "resumed across the freeze")
    assert _kept(part)[1] == kept


def test_prune_recover_baseline_keeps_the_target_and_holds_zeros(tmp_path):
    """--method prune_recover: activation ranking at step 0, AdamW on the kept units; the pruned
    units are exactly zero at the end, and a RAMDA run's allocation can be imposed."""
    model = tiny_llama(tmp_path / "llama")
    out = tmp_path / "pr"
    p = run([sys.executable, SCRIPT, "--model_path", model, "--method", "prune_recover",
             "--units", "ffn", "--target", "0.25", "--steps", "4", "--lr", "1e-3",
             "--eval_tokens", "700", "--output_dir", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s, kept = _kept(out)
    assert kept == {f"model.layers.{i}.mlp.down_proj.weight": 16 for i in range(2)}
    assert s["support_frozen_at"] == 0 and rows(out)[0]["optimizer"] == "proxgen"
    assert "prune_recover: kept 32 of 128 units" in p.stdout + p.stderr
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"units": {"model.layers.0.mlp.down_proj.weight": [60, 64],
                                           "model.layers.1.mlp.down_proj.weight": [36, 64]}}))
    p = run([sys.executable, SCRIPT, "--model_path", model, "--method", "prune_recover",
             "--prune_criterion", "weight", "--prune_allocation", str(alloc), "--units", "ffn",
             "--target", "0.25", "--steps", "2", "--eval_tokens", "700",
             "--output_dir", str(tmp_path / "pr2")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _kept(tmp_path / "pr2")[1] == {"model.layers.0.mlp.down_proj.weight": 4,
                                          "model.layers.1.mlp.down_proj.weight": 28}


@pytest.mark.parametrize("args,msg", [
    (["--target", "1.5"], "target must be a fraction kept"),
    (["--target", "0.5", "--milestones", "3"], "leave --milestones at auto"),
    (["--target", "0.5", "--optimizer", "proxgen"], "identifies units with RAMDA"),
    (["--method", "prune_recover"], "needs --target"),
    (["--method", "prune_recover", "--target", "0.5", "--prune_allocation", "nope.json"],
     "prune_allocation must be"),
    (["--target", "0.5", "--steps", "10", "--target_ramp", "8"], "not before --steps"),
    (["--distill", "2"], "distill must be in [0, 1]")])
def test_bad_compression_settings_fail_before_anything_is_written(tmp_path, capsys, args, msg):
    model = tiny_llama(tmp_path / "llama")
    with pytest.raises(SystemExit) as e:
        finetune_llm.parse_args(["--model_path", model, "--output_dir", str(tmp_path / "o"), *args])
    assert msg in str(e.value.code)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("launcher", ["zero2", "zero3", "fsdp2"])
def test_target_under_sharding_equals_one_process(tmp_path, launcher):
    """The recipe under ZeRO-2/3 and FSDP2 at 2 ranks: the critical values are completed across
    shards, so the same units are kept and the support is frozen at the same step as in one
    process; the shipped model's numbers agree (the distillation teacher is sharded too)."""
    model = tiny_llama(tmp_path / "llama")
    common = ["--model_path", model, *TARGET, "--steps", "8", "--distill", "0.5"]
    one = tmp_path / "one"
    p = run([sys.executable, SCRIPT, *common, "--batch_size", "4", "--output_dir", str(one)],
            tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    port = str(free_port())
    if launcher == "fsdp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", port, SCRIPT, "--fsdp2"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
               "--zero_stage", launcher[-1], "--num_processes", "2", "--main_process_port", port,
               SCRIPT]
    two = tmp_path / "two"
    p = run([*cmd, *common, "--batch_size", "2", "--output_dir", str(two)], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    setup = rows(two)[0]
    assert setup["world_size"] == 2 and setup["distill"]["beta"] == 0.5
    total = rows(one)[0]["distill"]["teacher_params_per_rank"]
    if launcher in ("zero3", "fsdp2"):  # the teacher is sharded as the student
        assert setup["distill"]["teacher_params_per_rank"] == -(-total // 2)
    s1, k1 = _kept(one)
    s2, k2 = _kept(two)
    assert s1["support_frozen_at"] == s2["support_frozen_at"] and k1 == k2
    assert s2["units_kept"] == 0.5
    assert math.isclose(s1["ppl"], s2["ppl"], rel_tol=1e-4), (s1["ppl"], s2["ppl"])


def test_target_resumed_under_zero2_across_the_freeze_is_bitwise(tmp_path):
    """ZeRO-2 at 2 ranks: a run resumed from a checkpoint taken before the freeze (λ per step,
    the support not yet frozen) ends bit for bit where the uninterrupted one does; the support,
    sharded like V, is rebuilt from the checkpoint."""
    from test_resume import assert_close, final_state

    model = tiny_llama(tmp_path / "llama")

    def launch(out, *extra):
        return run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
                    "--zero_stage", "2", "--num_processes", "2", "--main_process_port",
                    str(free_port()), SCRIPT, "--model_path", model, *TARGET, "--steps", "9",
                    "--batch_size", "2", "--save_every", "3", "--keep_last", "5",
                    "--output_dir", str(out), *extra], tmp_path)
    p = launch(tmp_path / "full")
    assert p.returncode == 0, p.stderr[-3000:]
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003",
                    part / "checkpoints" / "step_00000003")
    (part / "checkpoints" / "latest").write_text("step_00000003")
    p = launch(part, "--resume", "auto")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_close(final_state(tmp_path / "full", 9), final_state(part, 9), 0, "zero2 resumed")
    assert _kept(part)[1] == _kept(tmp_path / "full")[1]
    support = final_state(part, 9)["model.layers.0.mlp.down_proj.weight"]["support"]
    assert support.view(-1, 64).amax(0).sum() == _kept(part)[1]["model.layers.0.mlp.down_proj.weight"]
