"""Export: the pruning core on forced-zero units (fast), then tiny Llama (GQA) and GPT-2 runs
fine-tuned with RAMDA on 2 ranks (FSDP2, ZeRO-3), exported in both layouts, reloaded with
from_pretrained and compared with the dense model carrying the same weights; bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from ramda_ds.export import ExportError, PruneError, export_run, export_weights, plan, prune, zero_units
from ramda_ds.export.prune import GPT2, LLAMA
from test_sharded import ROOT, free_port
from test_train_lm import run

SCRIPT = str(ROOT / "launch" / "finetune_llm.py")
RTOL = 1e-5


def tiny_llama(**kw):
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        **kw)).eval()


def tiny_gpt2(**kw):
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_inner=32,
                                      n_positions=128, **kw)).eval()


def rel_diff(a, b):
    return ((a.double() - b.double()).abs().max() / a.double().abs().max()).item()


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


X = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ the core, no launch
def llama_with_zeros():
    """Layer 0: heads 0, 1 (all of K/V head 0) and FFN units 0-9 zero. Layer 1: heads 0 and 2
    (one of each K/V pair: both K/V heads stay) and FFN unit 5 zero; unit 7 has a zero gate row
    (silu(0)·up = 0: removable too)."""
    m = tiny_llama()
    with torch.no_grad():
        a0, a1 = m.model.layers[0].self_attn, m.model.layers[1].self_attn
        a0.o_proj.weight[:, 0:16] = 0
        m.model.layers[0].mlp.down_proj.weight[:, :10] = 0
        a1.o_proj.weight[:, 0:8] = 0
        a1.o_proj.weight[:, 16:24] = 0
        m.model.layers[1].mlp.down_proj.weight[:, 5] = 0
        m.model.layers[1].mlp.gate_proj.weight[7] = 0
    return m


def test_core_llama_gqa_kv_head_goes_only_with_all_its_query_heads():
    m = llama_with_zeros()
    sd, cfg = {k: v.detach() for k, v in m.state_dict().items()}, m.config
    keeps = plan(LLAMA, cfg, zero_units(LLAMA, sd, cfg))
    assert keeps[0].kv == [1] and keeps[0].heads == [2, 3]  # K/V head 0 lost both query heads
    assert keeps[1].kv == [0, 1] and keeps[1].heads == [1, 3]  # each K/V head keeps one
    assert keeps[0].ffn == list(range(10, 32)) and 5 not in keeps[1].ffn and 7 not in keeps[1].ffn
    new, sizes = prune(LLAMA, sd, cfg, keeps)
    assert sizes == [dict(intermediate_size=22, num_attention_heads=2, num_key_value_heads=1),
                     dict(intermediate_size=30, num_attention_heads=2, num_key_value_heads=2)]
    assert new["model.layers.0.self_attn.k_proj.weight"].shape == (8, 32)
    assert torch.equal(new["model.layers.0.self_attn.k_proj.weight"],
                       sd["model.layers.0.self_attn.k_proj.weight"][8:16])


def test_core_pads_gqa_groups_to_equal_size_with_zero_heads():
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight[:, 0:8] = 0  # head 0 only: group 0 has 1 live
    sd, cfg = {k: v.detach() for k, v in m.state_dict().items()}, m.config
    keeps = plan(LLAMA, cfg, zero_units(LLAMA, sd, cfg))
    assert keeps[0].kv == [0, 1] and keeps[0].heads == [0, 1, 2, 3] and keeps[0].live_heads == 3


def test_core_refuses_to_drop_a_unit_that_is_not_zero():
    m = llama_with_zeros()
    sd, cfg = {k: v.detach() for k, v in m.state_dict().items()}, m.config
    keeps = plan(LLAMA, cfg, zero_units(LLAMA, sd, cfg))
    keeps[1].ffn = keeps[1].ffn[1:]  # unit 0 of layer 1 is live
    with pytest.raises(PruneError, match="layer 1: FFN units \\[0\\] are not zero"):
        prune(LLAMA, sd, cfg, keeps)
    keeps = plan(LLAMA, cfg, zero_units(LLAMA, sd, cfg))
    keeps[1].heads, keeps[1].kv = [3], [1]  # head 1 is live
    with pytest.raises(PruneError, match="heads \\[1\\] are not zero"):
        prune(LLAMA, sd, cfg, keeps)


@pytest.mark.parametrize("layout", ["per_layer", "uniform"])
def test_llama_forced_zeros_export_reload_equal_logits(layout, tmp_path):
    m = llama_with_zeros()
    r = export_weights(dict(m.named_parameters()), tmp_path / "out", config=m.config,
                       layout=layout, multiple_of=4, verbose=False)
    kw = {"trust_remote_code": True} if layout == "per_layer" else {}
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out", **kw)
    assert rel_diff(logits(m, X), logits(m2, X)) <= RTOL
    if layout == "uniform":  # max over layers (30) rounded to 4 = 32; heads: 2 K/V x 2 (layer 1 needs both)
        assert type(m2).__name__ == "LlamaForCausalLM"
        assert (m2.config.intermediate_size, m2.config.num_attention_heads,
                m2.config.num_key_value_heads) == (32, 4, 2)
    else:
        assert [L.mlp.down_proj.in_features for L in m2.model.layers] == [22, 30]
        assert [L.self_attn.k_proj.out_features for L in m2.model.layers] == [8, 16]
        assert r["params_after"] < r["params_before"]
    m2.generate(X[:1], max_new_tokens=4, do_sample=False)


def test_core_uniform_rounds_to_multiple_and_refills_by_norm():
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[:, :20] = 0  # 12 live
        m.model.layers[1].mlp.down_proj.weight[:, :27] = 0  # 5 live
        m.model.layers[1].mlp.up_proj.weight[3] *= 10  # the largest removable unit of layer 1
    sd, cfg = {k: v.detach() for k, v in m.state_dict().items()}, m.config
    keeps = plan(LLAMA, cfg, zero_units(LLAMA, sd, cfg), "uniform", multiple_of=8)
    assert [len(k.ffn) for k in keeps] == [16, 16]
    assert 3 in keeps[1].ffn and set(range(27, 32)) <= set(keeps[1].ffn)


def gpt2_with_zeros():
    """Layer 0: FFN rows 0-7 of c_proj and head 1 (c_proj rows 8-15) zero. Layer 1: FFN unit 3
    has a zero c_fc column but a bias: it outputs gelu(b_3), folded into c_proj's bias."""
    m = tiny_gpt2()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_()  # non-zero biases, so the folding matters
        h0, h1 = m.transformer.h
        h0.mlp.c_proj.weight[:8] = 0
        h0.attn.c_proj.weight[8:16] = 0
        h1.mlp.c_fc.weight[:, 3] = 0
        h1.attn.c_proj.weight[0:8] = 0
        h1.attn.c_proj.weight[24:32] = 0
    return m


def test_core_gpt2_folds_the_constant_of_a_unit_without_input_weights():
    m = gpt2_with_zeros()
    sd, cfg = {k: v.detach() for k, v in m.state_dict().items()}, m.config
    z = zero_units(GPT2, sd, cfg)
    assert z[1]["fold"].nonzero().flatten().tolist() == [3]
    keeps = plan(GPT2, cfg, z)
    new, sizes = prune(GPT2, sd, cfg, keeps)
    assert keeps[1].extra["folded"] == [3]
    assert sizes[0] == dict(intermediate_size=24, num_attention_heads=3, num_key_value_heads=3)
    assert sizes[1] == dict(intermediate_size=31, num_attention_heads=2, num_key_value_heads=2)
    b = sd["transformer.h.1.mlp.c_proj.bias"]
    assert not torch.equal(new["transformer.h.1.mlp.c_proj.bias"], b)


@pytest.mark.parametrize("layout", ["per_layer", "uniform"])
def test_gpt2_forced_zeros_export_reload_equal_logits(layout, tmp_path):
    m = gpt2_with_zeros()
    export_weights(dict(m.named_parameters()), tmp_path / "out", config=m.config, layout=layout,
                   verbose=False)
    kw = {"trust_remote_code": True} if layout == "per_layer" else {}
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out", **kw)
    assert rel_diff(logits(m, X), logits(m2, X)) <= RTOL
    heads = [h.attn.c_proj.weight.shape[0] // 8 for h in m2.transformer.h]
    assert heads == ([3, 2] if layout == "per_layer" else [4, 4])  # GPT-2: head_dim = n_embd/n_head
    m2.generate(X[:1], max_new_tokens=4, do_sample=False)


# ------------------------------------------------------------------------ 2-rank runs
def launch(tmp, model_dir, out, backend, *extra):
    if backend == "fsdp2":
        pre = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
        extra = (*extra, "--fsdp2")
    elif backend == "zero3":
        pre = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
               "--zero_stage", "3", "--num_processes", "2", "--main_process_port", str(free_port())]
    else:
        pre = [sys.executable]
    # no restart (--milestones ""): after one α, V, U restart 6 steps leave too little α·λ to zero
    # units; W ≠ Ŵ then, and the export takes Ŵ
    p = run([*pre, SCRIPT, "--model_path", str(model_dir), "--steps", "6", "--eval_every", "6",
             "--milestones", "", "--lr", "1e-2", "--batch_size", "2", "--output_dir", str(out),
             *extra], tmp)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Llama (GQA) fine-tuned on 2 FSDP2 ranks and a GPT-2 on 2 ZeRO-3 ranks, λ large enough
    that units go; weak heads (output weights scaled down) so that heads go too."""
    tmp = tmp_path_factory.mktemp("export_runs")
    torch.manual_seed(0)
    llama = tiny_llama(initializer_range=0.1)
    with torch.no_grad():
        llama.model.layers[0].self_attn.o_proj.weight[:, 0:16] *= 0.01  # all of K/V head 0
        llama.model.layers[1].self_attn.o_proj.weight[:, 16:24] *= 0.01
    llama.save_pretrained(tmp / "llama")
    gpt2 = tiny_gpt2(initializer_range=0.1)
    with torch.no_grad():
        gpt2.transformer.h[0].attn.c_proj.weight[8:16] *= 0.01
    gpt2.save_pretrained(tmp / "gpt2")
    launch(tmp, tmp / "llama", tmp / "llama_run", "fsdp2", "--lam", "1e-2")
    launch(tmp, tmp / "gpt2", tmp / "gpt2_run", "zero3", "--lam", "1e-2", "--tokenizer", "train",
           "--groups",
           "*.mlp.c_proj.weight=output;*.attn.c_proj.weight=output")
    return tmp


def masked_dense(run_dir, base):
    """The base model carrying the run's Ŵ, built without the export code."""
    from ramda_ds.checkpoint import full_state

    ckpt = Path(run_dir) / "checkpoints" / (Path(run_dir) / "checkpoints" / "latest").read_text()
    world = json.loads((ckpt / "manifest.json").read_text())["world_size"]
    state = full_state([ckpt / "weights" / f"rank{r}.safetensors" for r in range(world)])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    names = {n for n, _ in model.named_parameters()}
    assert set(state) == names  # embeddings, norms, lm_head: every trainable tensor is saved
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n]["structured"])
    return model, state


def test_llama_fsdp2_run_exports_both_layouts(runs, tmp_path):
    dense, state = masked_dense(runs / "llama_run", runs / "llama")
    assert json.loads((runs / "llama_run" / "metrics.jsonl").read_text().splitlines()[0])[
        "view"] == "FSDP2View"
    w_hat = lambda n: state[n]["structured"]  # noqa: E731
    zero_ffn = [int((w_hat(f"model.layers.{i}.mlp.down_proj.weight") == 0).all(0).sum()) for i in range(2)]
    zero_heads = [(w_hat(f"model.layers.{i}.self_attn.o_proj.weight").view(32, 4, 8) == 0)
                  .all(2).all(0).tolist() for i in range(2)]
    assert 0 < sum(zero_ffn) < 64 and any(any(z) for z in zero_heads)
    assert zero_heads[0][:2] == [True, True]  # K/V head 0 of layer 0 can go
    r = export_run(runs / "llama_run", tmp_path / "per_layer", verbose=False)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "per_layer", trust_remote_code=True)
    assert type(m).__name__ == "RamdaPrunedLlamaForCausalLM"
    assert [L.mlp.down_proj.in_features for L in m.model.layers] == [max(1, 32 - z) for z in zero_ffn]
    assert m.model.layers[0].self_attn.k_proj.out_features == 8  # one K/V head left
    assert rel_diff(logits(dense, X), logits(m, X)) <= RTOL
    assert r["params_after"] == sum(p.numel() for p in m.parameters()) < r["params_before"]
    assert r["weights"].startswith("structured") and r["source"]["world_size"] == 2
    assert r["taken_from_base_model"] == []
    m.generate(X[:1], max_new_tokens=4, do_sample=False)
    p = run([sys.executable, "-m", "ramda_ds.export", str(runs / "llama_run"), str(tmp_path / "uni"),
             "--layout", "uniform", "--multiple_of", "8"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "total parameters" in p.stdout
    u = AutoModelForCausalLM.from_pretrained(tmp_path / "uni")
    assert type(u).__name__ == "LlamaForCausalLM" and u.config.intermediate_size % 8 == 0
    assert rel_diff(logits(dense, X), logits(u, X)) <= RTOL
    assert (tmp_path / "uni" / "sentencepiece.model").exists()  # the run's tokenizer
    from transformers import AutoTokenizer  # ... also as tokenizer.json, with the run's ids

    import sentencepiece as spm

    text = "Return the value of the named attribute of object."
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "uni" / "sentencepiece.model"))
    assert AutoTokenizer.from_pretrained(tmp_path / "uni")(text)["input_ids"] == sp.encode(text)
    # both load in a process where importing ramda_ds fails (the venv may have it installed)
    torch.save(X, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "class Block:  # any import of ramda_ds fails\n"
            "    def find_spec(self, name, *a):\n"
            "        if name.split('.')[0] == 'ramda_ds': raise ImportError('ramda_ds imported')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from transformers import AutoModelForCausalLM as A\n"
            "x = torch.load('x.pt')\n"
            "u = A.from_pretrained('uni'); p = A.from_pretrained('per_layer', trust_remote_code=True)\n"
            "torch.save([u(input_ids=x).logits, p(input_ids=x).logits], 'y.pt')\n"
            "assert 'ramda_ds' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    q = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    yu, yp = torch.load(tmp_path / "y.pt")
    assert rel_diff(logits(dense, X), yu) <= RTOL and rel_diff(logits(dense, X), yp) <= RTOL


@pytest.mark.parametrize("layout", ["per_layer", "uniform"])
def test_gpt2_zero3_run_exports(layout, runs, tmp_path):
    dense, state = masked_dense(runs / "gpt2_run", runs / "gpt2")
    r = export_run(runs / "gpt2_run", tmp_path / "out", layout=layout, verbose=False)
    kw = {"trust_remote_code": True} if layout == "per_layer" else {}
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out", **kw)
    assert rel_diff(logits(dense, X), logits(m, X)) <= RTOL
    assert r["params_after"] < r["params_before"] and r["source"]["world_size"] == 2
    m.generate(X[:1], max_new_tokens=4, do_sample=False)


# ------------------------------------------------------------------------ bad input
def test_checkpoint_of_another_model_is_refused(runs, tmp_path):
    with pytest.raises(ExportError, match="different model"):
        export_run(runs / "llama_run", tmp_path / "out", base_model=runs / "gpt2")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_existing_output_directory_is_refused_and_untouched(runs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    p = run([sys.executable, "-m", "ramda_ds.export", str(runs / "llama_run"), str(tmp_path / "out")],
            tmp_path)
    assert p.returncode == 2 and "exists" in p.stderr
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_run_without_structured_point_says_to_export_w(runs, tmp_path):
    """ProxGen keeps no Ŵ: refused with the way out (--weights W), which then works."""
    launch(tmp_path, runs / "llama", tmp_path / "pg", "single", "--optimizer", "proxgen",
           "--lam", "1e-2", "--steps", "2")
    p = run([sys.executable, "-m", "ramda_ds.export", str(tmp_path / "pg"), str(tmp_path / "out")],
            tmp_path)
    assert p.returncode == 2 and "--weights W" in p.stderr and "ProxGen" in p.stderr
    assert not (tmp_path / "out").exists()
    r = export_run(tmp_path / "pg", tmp_path / "out", weights="W", verbose=False)
    assert r["weights"] == "W"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)


def test_export_refuses_when_pruned_logits_differ(tmp_path, monkeypatch):
    """The check before writing: a pruning that changed the function is refused, nothing written."""
    import ramda_ds.export.api as api

    real = api.P.prune

    def wrong(*a):
        sd, sizes = real(*a)
        sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"] * 1.001
        return sd, sizes
    monkeypatch.setattr(api.P, "prune", wrong)
    m = llama_with_zeros()
    with pytest.raises(ExportError, match="logits differ"):
        export_weights(dict(m.named_parameters()), tmp_path / "out", config=m.config, verbose=False)
    assert not list(tmp_path.iterdir())


def test_live_model_and_optimizer_export(tmp_path):
    """export_model on an unsharded RAMDA run in this process: Ŵ of the optimizer, not W."""
    from ramda_ds.export import export_model
    from ramda_ds.optim import RAMDA
    from ramda_ds.param_groups import build_param_groups

    m = tiny_llama(initializer_range=0.1)
    groups = build_param_groups(m, "group_lasso", lam=3e-2, grouping={
        "*.mlp.down_proj.weight": "input", "*.self_attn.o_proj.weight": "head:8"},
        include=["*.mlp.down_proj.weight", "*.self_attn.o_proj.weight"])
    opt = RAMDA(groups, lr=1e-2, keep_structured=True)
    for _ in range(4):
        x = torch.randint(0, 300, (4, 16))
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    r = export_model(m, opt, tmp_path / "out", verbose=False)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(opt.state[p]["structured"].view_as(p))
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert r["params_after"] < r["params_before"]
    assert rel_diff(logits(m, X), logits(m2, X)) <= RTOL


# ------------------------------------------------------------------------ a RamdaTrainer checkpoint
def test_hf_trainer_checkpoint_exports(tmp_path):
    """RamdaTrainer on 1 process, λ = 1e-3 (half the FFN units go in 4 steps): its
    ``checkpoint-N`` (ramda_ds_optim/ + the trainer json naming the base model) exports in both
    layouts (the latter found from the Trainer's output_dir), with the logits of the base model
    carrying the checkpoint's Ŵ."""
    from ramda_ds.checkpoint import full_state
    from test_hf_trainer import COMMON, EXAMPLE, make_model

    make_model(tmp_path)
    p = run([sys.executable, EXAMPLE, "--use_cpu", "--per_device_train_batch_size", "4",
             "--model_path", "llama", "--train_file", "train.txt", *COMMON, "--momentum", "0.1",
             "--save_steps", "4", "--output_dir", "hf"], tmp_path)  # c < 1: W is not Ŵ
    assert p.returncode == 0, p.stderr[-4000:]
    ck = tmp_path / "hf" / "checkpoint-4"
    assert not (ck / "manifest.json").exists()
    state = full_state([ck / "ramda_ds_optim" / "rank0.safetensors"])
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    with torch.no_grad():
        for n, q in dense.named_parameters():
            q.copy_(state[n]["structured"])
    zero_ffn = [int((state[f"model.layers.{i}.mlp.down_proj.weight"]["structured"] == 0).all(0)
                    .sum()) for i in range(2)]
    assert 0 < sum(zero_ffn) < 128
    x = torch.randint(0, 202, (2, 12), generator=torch.Generator().manual_seed(1))
    r = export_run(ck, tmp_path / "per_layer", verbose=False)
    assert r["source"]["kind"] == "trainer" and r["source"]["step"] == 4
    assert r["source"]["optimizer"] == "RAMDA" and r["source"]["world_size"] == 1
    assert r["source"]["base_model"] == str((tmp_path / "llama").resolve())
    assert r["logits_max_rel_diff"] <= RTOL and r["params_after"] < r["params_before"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "per_layer", trust_remote_code=True)
    widths = [L.mlp.down_proj.in_features for L in m.model.layers]
    assert widths == [max(1, 64 - z) for z in zero_ffn]
    assert rel_diff(logits(dense, x), logits(m, x)) <= RTOL
    assert (tmp_path / "per_layer" / "tokenizer.json").exists()
    r = export_run(tmp_path / "hf", tmp_path / "uniform", layout="uniform", verbose=False)
    assert r["source"]["checkpoint"] == str(ck)  # the newest checkpoint-N of the output_dir
    u = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform")
    assert type(u).__name__ == "LlamaForCausalLM"
    assert rel_diff(logits(dense, x), logits(u, x)) <= RTOL
    # an interrupted save (no COMPLETE marker) is refused, nothing written
    (ck / "ramda_ds_optim" / "COMPLETE").unlink()
    with pytest.raises(ExportError, match="no COMPLETE marker"):
        export_run(ck, tmp_path / "bad", verbose=False)
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------ Transformer-XL
def txl_with_zeros():
    """Layer 0: FFN units 0-9 (down columns) and head 1 (o columns) zero; unit 12 has a zero
    up row and bias 1: it outputs relu(1) = 1 times its down column, folded into down's bias.
    Layer 1: heads 0 and 3 have zero v rows (output att·v = 0)."""
    from ramda_ds.models import TransfoXLConfig, TransfoXLLM

    torch.manual_seed(0)
    cfg = TransfoXLConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, d_head=8, d_inner=64,
                          tgt_len=6, mem_len=6, dropout=0.0)
    m = TransfoXLLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1 or p.shape[0] == 4:  # biases, r_w_bias / r_r_bias: not zero
                p.normal_()
        L0, L1 = m.layers
        L0.ff.down.weight[:, :10] = 0
        L0.ff.up.weight[12], L0.ff.up.bias[12] = 0, 1.0
        L0.attn.o.weight[:, 8:16] = 0
        L1.attn.qkv.weight[64:72] = 0  # v block starts at 2 * 4 * 8
        L1.attn.qkv.weight[88:96] = 0
    return m


def txl_logits(model, ids, tgt):
    """Logits of consecutive segments, each attending to the memory of the previous ones."""
    out, mems = [], None
    with torch.no_grad():
        for seg in ids.split(tgt, 1):
            y, mems = model(seg, mems)
            out.append(y)
    return torch.cat(out, 1)


@pytest.mark.parametrize("layout", ["per_layer", "uniform"])
def test_txl_forced_zeros_export_reload_equal_logits_with_memory(layout, tmp_path):
    from ramda_ds.export.txl import export
    from ramda_ds.models import TransfoXLLM

    m = txl_with_zeros()
    r = export(dict(m.named_parameters()), tmp_path / "out", m.config, layout=layout,
               multiple_of=8, verbose=False)
    m2 = TransfoXLLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 50, (2, 18), generator=torch.Generator().manual_seed(3))
    assert rel_diff(txl_logits(m, ids, 6), txl_logits(m2, ids, 6)) <= RTOL
    assert r["layers"][0]["folded_ffn_units"] == (1 if layout == "per_layer" else 0)
    if layout == "per_layer":
        assert (m2.config.layer_d_inner, m2.config.layer_n_head) == ([53, 64], [3, 2])
        assert m2.layers[1].attn.qkv.weight.shape == (3 * 2 * 8, 32)
    else:  # max(53, 64) live units; max(3, 2) heads, layer 1 refilled with a zero head
        assert (m2.config.layer_d_inner, m2.config.d_inner, m2.config.n_head) == (None, 64, 3)
    assert r["params_after"] == sum(p.numel() for p in m2.parameters()) < r["params_before"]


def test_txl_config_without_per_layer_fields_loads_as_before(tmp_path):
    """A config.json written before layer_d_inner / layer_n_head existed."""
    from ramda_ds.models import TransfoXLLM

    m = txl_with_zeros()
    m.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    for k in ("layer_d_inner", "layer_n_head"):
        cfg.pop(k)
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    m2 = TransfoXLLM.from_pretrained(tmp_path / "old").eval()
    ids = torch.randint(0, 50, (2, 6))
    assert torch.equal(m(ids)[0], m2(ids)[0])


def test_txl_train_lm_run_exports(tmp_path):
    """launch/train_lm.py (1 process, rows grouped, λ large for 8 steps) → export of its checkpoint,
    per layer and uniform; reloaded, the logits of 3 segments with memory equal those of the
    Transformer-XL carrying the checkpoint's Ŵ (built here from the run's recorded config)."""
    from ramda_ds.checkpoint import full_state
    from ramda_ds.models import TransfoXLConfig, TransfoXLLM

    out = tmp_path / "lm"
    p = run([sys.executable, str(ROOT / "launch" / "train_lm.py"), "--steps", "8", "--eval_every",
             "8", "--vocab_size", "500", "--lam", "7e-5", "--grouping", "output", "--output_dir",
             str(out)], tmp_path)  # rows: up rows (units with a bias to fold), v rows of heads
    assert p.returncode == 0, p.stderr[-3000:]
    setup = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    cfg = TransfoXLConfig(**setup["model_config"])
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    state = full_state([ckpt / "weights" / "rank0.safetensors"])
    dense = TransfoXLLM(cfg).eval()
    with torch.no_grad():
        for n, q in dense.named_parameters():
            q.copy_(state[n]["structured"].view_as(q))
    w = {n: state[n]["structured"] for n in state}
    # an FFN unit goes with its down column zero, or its up row (its constant output folded)
    zero_ffn = [int(((w[f"layers.{i}.ff.down.weight"] == 0).all(0) |
                     (w[f"layers.{i}.ff.up.weight"] == 0).all(1)).sum()) for i in range(2)]
    # a head goes with its o columns or its v rows zero (qkv rows viewed [q|k|v, head, d_head])
    zero_heads = [int(((w[f"layers.{i}.attn.o.weight"].view(64, 4, 16) == 0).all(2).all(0) |
                       (w[f"layers.{i}.attn.qkv.weight"].view(3, 4, 16 * 64)[2] == 0).all(1))
                      .sum()) for i in range(2)]
    assert 0 < sum(zero_ffn) < 512 and 0 < sum(zero_heads) < 8
    r = export_run(out, tmp_path / "per_layer", verbose=False)
    assert r["weights"].startswith("structured") and r["source"]["kind"] == "run"
    assert sum(x["folded_ffn_units"] for x in r["layers"]) > 0
    m = TransfoXLLM.from_pretrained(tmp_path / "per_layer").eval()
    assert m.config.layer_d_inner == [256 - z for z in zero_ffn]
    assert m.config.layer_n_head == [4 - z for z in zero_heads]
    ids = torch.randint(0, 500, (2, 3 * cfg.tgt_len), generator=torch.Generator().manual_seed(2))
    ref = txl_logits(dense, ids, cfg.tgt_len)
    assert rel_diff(ref, txl_logits(m, ids, cfg.tgt_len)) <= RTOL
    assert r["params_after"] == sum(q.numel() for q in m.parameters()) < r["params_before"]
    assert (tmp_path / "per_layer" / "sentencepiece.model").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "per_layer")("print(x)")["input_ids"]
    r = export_run(ckpt, tmp_path / "uniform", layout="uniform", multiple_of=8, verbose=False)
    u = TransfoXLLM.from_pretrained(tmp_path / "uniform").eval()
    assert u.config.layer_d_inner is None and u.config.d_inner % 8 == 0
    assert rel_diff(ref, txl_logits(u, ids, cfg.tgt_len)) <= RTOL
    # the checkpoint is verified as a resume verifies it: a flipped byte, an edited manifest
    f = ckpt / "trainer" / "rank0.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(ExportError, match="corrupt or truncated"):
        export_run(out, tmp_path / "bad", verbose=False)
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    mf = ckpt / "manifest.json"
    mf.write_text(mf.read_text().replace('"step": 8', '"step": 7'))
    with pytest.raises(ExportError, match="does not match its sha256"):
        export_run(out, tmp_path / "bad", verbose=False)
    assert not (tmp_path / "bad").exists()


def test_txl_checkpoint_of_another_model_is_refused(tmp_path):
    from dataclasses import replace

    from ramda_ds.export.txl import export

    m = txl_with_zeros()
    with pytest.raises(ExportError, match="different model"):
        export(dict(m.named_parameters()), tmp_path / "out", replace(m.config, d_inner=32))
    assert not list(tmp_path.iterdir())


def test_txl_live_model_and_optimizer_export(tmp_path):
    """export_model on a Transformer-XL trained here with RAMDA (rows grouped): Ŵ, with memory."""
    from ramda_ds.export import export_model
    from ramda_ds.models import TransfoXLLM
    from ramda_ds.optim import RAMDA
    from ramda_ds.param_groups import build_param_groups

    m = txl_with_zeros()
    opt = RAMDA(build_param_groups(m, "group_lasso", lam=1e-2, exclude=["embed.*"],
                                   grouping={"*": "output"}), lr=1e-2, keep_structured=True)
    for _ in range(3):
        x = torch.randint(0, 50, (4, 7))
        m.loss(x[:, :-1], x[:, 1:])[0].backward()
        opt.step()
        opt.zero_grad()
    r = export_model(m, opt, tmp_path / "out", verbose=False)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(opt.state[p]["structured"].view_as(p))
    m2 = TransfoXLLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 50, (2, 18), generator=torch.Generator().manual_seed(3))
    assert r["params_after"] < r["params_before"]
    assert rel_diff(txl_logits(m, ids, 6), txl_logits(m2, ids, 6)) <= RTOL
