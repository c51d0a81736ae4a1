"""Fine-tuning path: a tiny randomly initialised Llama saved with save_pretrained, loaded from disk."""

import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_sharded import ROOT, free_port
from test_train_lm import run

SCRIPT = str(ROOT / "launch" / "finetune_llm.py")


def test_tiny_llama_finetune_groups_ffn_neurons_and_heads(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    out = tmp_path / "o"
    p = run([sys.executable, SCRIPT, "--model_path", str(tmp_path / "llama"), "--steps", "5",
             "--lam", "1e-2", "--lr", "1e-2", "--output_dir", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 5 and s["ppl"] < 1e6
    units = s["units"]
    assert set(units) == {f"model.layers.{i}.{m}" for i in range(2)
                          for m in ("mlp.down_proj.weight", "self_attn.o_proj.weight")}
    assert all(total == 64 for n, (_, total) in units.items() if "down_proj" in n)  # neurons
    assert all(total == 4 for n, (_, total) in units.items() if "o_proj" in n)  # heads
    assert s["wgs"] > 0  # a strong λ removes some units


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


def test_zero3_partitioned_at_load_then_resumed_on_one_process(tmp_path):
    """ZeRO-3 with zero3_init_flag (how a 7B model fits: weights partitioned as they load), then
    its checkpoint continued by a single process: same weights and state within fp32 tolerance."""
    from test_resume import assert_close, final_state

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    common = ["--model_path", str(tmp_path / "llama"), "--steps", "4", "--eval_every", "2",
              "--save_every", "2", "--lam", "1e-3", "--lr", "1e-2"]
    p = run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage",
             "3", "--zero3_init_flag", "true", "--num_processes", "2", "--main_process_port",
             str(free_port()), SCRIPT, *common, "--batch_size", "2", "--output_dir",
             str(tmp_path / "z3")], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    setup = json.loads((tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["view"] == "Zero3View" and setup["world_size"] == 2
    p = run([sys.executable, SCRIPT, *common, "--batch_size", "4", "--output_dir", str(tmp_path / "one"),
             "--resume", str(tmp_path / "z3" / "checkpoints" / "step_00000002")], tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    assert_close(final_state(tmp_path / "z3", 4), final_state(tmp_path / "one", 4), 1e-4, "z3 -> 1")
    assert Path(tmp_path / "one" / "summary.json").exists()
