"""Fine-tuning path: a tiny randomly initialised Llama saved with save_pretrained, loaded from disk."""

import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_sharded import ROOT
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
