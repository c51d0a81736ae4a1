"""Export entry points: a run checkpoint directory or a live model + optimizer → a Hugging Face
checkpoint directory with the zero units removed (``config.json``, ``model.safetensors``, the
tokenizer when the run had one, ``pruning.json``; ``modeling_ramda_pruned.py`` for per_layer).

Both sources reduce to ``export_weights(weights, config, out, ...)``: the whole tensors by
parameter name and the model's config. Before anything is written, the pruned model's logits are
compared with the dense model's carrying the same weights (fp32, sample batch); the directory is
written under a temporary name and renamed at the end, so a refusal leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import prune as P

from . import txl
from .common import (RTOL, TOKENIZER_FILES, ExportError, check_shapes,  # noqa: F401 (re-exported)
                     copy_tokenizer, format_report, write_atomically)

TEMPLATE = Path(__file__).with_name("modeling_ramda_pruned.py")
PER_LAYER_CLASSES = {"llama": ("RamdaPrunedLlamaConfig", "RamdaPrunedLlamaForCausalLM"),
                     "gpt2": ("RamdaPrunedGPT2Config", "RamdaPrunedGPT2LMHeadModel")}
# families whose export is their own (a model of this project, not a transformers one): each has
# ``matches(config)`` and ``export(tensors, out, config, **options)``
OWN_FAMILIES = (txl.TXL,)


# ---------------------------------------------------------------------------- sources
TRAINER_META = "ramda_ds_trainer.json"  # written by ramda_ds.hf.RamdaTrainer in checkpoint-N/


def find_checkpoint(path) -> tuple[str, Path]:
    """(kind, directory): ``run`` — a run checkpoint (manifest.json), found also through a
    checkpoints root or a run's output_dir (``latest``); ``trainer`` — a Hugging Face Trainer
    checkpoint written by RamdaTrainer (``checkpoint-N/`` with ``ramda_ds_trainer.json``), also
    the newest one under a Trainer output_dir."""
    from ..checkpoint import CheckpointError
    from ..run_format import LATEST, MANIFEST, read_latest

    p = Path(path)
    try:
        for root in (p, p / "checkpoints"):
            if (root / LATEST).exists():
                return "run", root / read_latest(root)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if (p / MANIFEST).exists():
        return "run", p
    if (p / TRAINER_META).exists():
        return "trainer", p
    steps = sorted((int(c.name.split("-")[1]), c) for c in p.glob("checkpoint-*")
                   if c.name.split("-")[1].isdigit() and (c / TRAINER_META).exists())
    if steps:
        return "trainer", steps[-1][1]
    raise ExportError(f"{p} is not a checkpoint: no manifest.json or checkpoints/latest (a "
                      f"ramda_ds run), no {TRAINER_META} or checkpoint-N/{TRAINER_META} (a RamdaTrainer "
                      "run)")


def read_checkpoint(path, weights: str = "structured"):
    """(whole tensors by name, source info, checkpoint dir) of a run checkpoint or a RamdaTrainer
    checkpoint written by any number of ranks; ``weights``: ``structured`` (RAMDA's Ŵ) or ``W``
    (the master weights). ``info``: step, world_size, optimizer, base_model (recorded, or None),
    run_dir (where a run's metrics.jsonl and tokenizer are, or None)."""
    kind, ckpt = find_checkpoint(path)
    info, files = (read_run(ckpt) if kind == "run" else read_trainer(ckpt))
    from ..checkpoint import CheckpointError, full_state

    try:
        state = full_state(files)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return pick(state, weights, info["optimizer"]), info, ckpt


def read_run(ckpt: Path) -> tuple[dict, list[Path]]:
    """A run checkpoint, verified as a resume verifies it (manifest hash and fields, sha256 of
    every file: :func:`ramda_ds.run_format.read_verified_manifest`)."""
    from ..checkpoint import CheckpointError
    from ..run_format import read_verified_manifest

    try:
        m = read_verified_manifest(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    run_dir = ckpt.parent.parent
    info = dict(kind="run", checkpoint=str(ckpt), step=m["step"], world_size=m["world_size"],
                optimizer=m["fingerprint"]["optimizer"], run_dir=run_dir,
                base_model=setup_field(run_dir, "model"),
                model_config=setup_field(run_dir, "model_config"))
    return info, [ckpt / "weights" / f"rank{r}.safetensors" for r in range(m["world_size"])]


def read_trainer(ckpt: Path) -> tuple[dict, list[Path]]:
    """A RamdaTrainer ``checkpoint-N``: ``ramda_ds_trainer.json`` (optimizer, step, world size,
    base model) and the state in ``ramda_ds_optim/rank{r}.safetensors``, complete when rank 0
    wrote its ``COMPLETE`` marker (:func:`ramda_ds.checkpoint.save_optimizer_state`)."""
    from ..checkpoint import MARKER

    try:
        meta = json.loads((ckpt / TRAINER_META).read_text())
        state_dir = ckpt / meta.get("state_dir", "ramda_ds_optim")
        marker = state_dir / MARKER
        if not marker.exists():
            raise ExportError(f"{state_dir} has no {MARKER} marker: the save of {ckpt} was "
                              "interrupted (or it holds no ramda_ds optimizer state)")
        world = json.loads(marker.read_text())["world_size"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"cannot read the RamdaTrainer checkpoint {ckpt}: {e}") from None
    if meta.get("world_size") != world or not isinstance(world, int) or world < 1:
        raise ExportError(f"{ckpt}: {TRAINER_META} says world size {meta.get('world_size')!r}, "
                          f"{marker} says {world!r}: the checkpoint is inconsistent")
    info = dict(kind="trainer", checkpoint=str(ckpt), step=meta.get("step"), world_size=world,
                optimizer=meta.get("optimizer", "the run's optimizer"), run_dir=None,
                base_model=meta.get("base_model") or None, model_config=None)
    return info, [state_dir / f"rank{r}.safetensors" for r in range(world)]


def pick(state: dict, weights: str, optimizer: str) -> dict:
    """``{name: tensor}``: Ŵ (state ``structured``) or W (``param``) of every parameter."""
    if weights not in ("structured", "W"):
        raise ExportError(f"weights must be 'structured' (RAMDA's Ŵ) or 'W', got {weights!r}")
    key = "structured" if weights == "structured" else "param"
    missing = [n for n, st in state.items() if key not in st]
    if missing:
        raise ExportError(
            f"the checkpoint has no structured point Ŵ (state 'structured') for {missing[0]}: the "
            f"run used {optimizer}, which does not keep one (only RAMDA with keep_structured=True "
            "does, as launch/finetune_llm.py builds it). Export its weights W with --weights W "
            "(exactly sparse for ProxGen/ProxSGD/RMDA, and for RAMDA once its c has reached 1).")
    return {n: st[key] for n, st in state.items()}


def setup_field(run_dir: Path, key: str):
    """``key`` of the last setup/resume row of a run's metrics.jsonl (e.g. the ``model`` it
    loaded), or None."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        return None
    value = None
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("event") in ("setup", "resume") and row.get(key):
            value = row[key]
    return value


def export_run(checkpoint, out, *, layout="per_layer", multiple_of=1, weights="structured",
               base_model=None, verbose=True, allow_diverged=False) -> dict:
    """Export a run checkpoint or a RamdaTrainer checkpoint (any world size, any backend). The
    base model directory (for the config, tokenizer, tied and frozen tensors) is the one the run
    recorded unless given. A run the training loop stopped as diverged is refused unless
    ``allow_diverged`` (then recorded as ``source.run_diverged``). Prints which checkpoint it
    reads. Returns the report also written to ``out/pruning.json``."""
    out = Path(out)
    if out.exists():
        raise ExportError(f"output directory {out} exists; choose a new one (nothing was written)")
    kind, found = find_checkpoint(checkpoint)
    run_dir = found.parent.parent if kind == "run" else None
    bad = run_diverged(run_dir)
    if bad and not allow_diverged:
        raise ExportError(f"the run in {run_dir} diverged at step {bad.get('step')} "
                          f"({bad.get('reason', 'see metrics.jsonl')}); its checkpoints come from "
                          "a failing run. Rerun with a lower --lr, or pass --allow_diverged to "
                          f"export {found.name} anyway (nothing was written)")
    tensors, info, ckpt = read_checkpoint(checkpoint, weights)
    if verbose:
        print(f"exporting {ckpt} ({info['kind']} checkpoint, step {info['step']}, "
              f"{info['world_size']} rank(s), {info['optimizer']})" +
              (f"; WARNING: the run diverged at step {bad.get('step')}" if bad else ""), flush=True)
    source = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()
              if k not in ("run_dir", "model_config", "base_model")}
    if bad:
        source["run_diverged"] = dict(step=bad.get("step"), reason=bad.get("reason"))
    own = own_family(base_model, info["model_config"])
    if own is not None:  # e.g. the project's Transformer-XL (launch/train_lm.py records its config)
        fam, cfg = own
        if base_model:
            source["base_model"] = str(base_model)
        return fam.export(tensors, out, cfg, layout=layout, multiple_of=multiple_of,
                          weights=weights, source=source, run_dir=info["run_dir"], verbose=verbose)
    base = base_model or info["base_model"]
    if not base:
        where = (f"the setup row of {info['run_dir'] / 'metrics.jsonl'}" if info["kind"] == "run"
                 else ckpt / TRAINER_META)
        raise ExportError(f"cannot tell which base model {ckpt} was trained from (no 'model' in "
                          f"{where}); pass --base_model DIR")
    if not (Path(base) / "config.json").exists():
        raise ExportError(f"base model {base} (recorded by the run) is not a local HF checkpoint "
                          "directory with config.json; pass --base_model DIR")
    source["base_model"] = str(base)
    return export_weights(tensors, out, base_model=base, layout=layout, multiple_of=multiple_of,
                          weights=weights, source=source, run_dir=info["run_dir"],
                          verbose=verbose)


def own_family(base_model, recorded_config):
    """``(family, config)`` when the model is one of :data:`OWN_FAMILIES` — read from
    ``base_model/config.json`` when a base model is given, else the config the run recorded —
    or None (a transformers model)."""
    cfg = recorded_config
    if base_model:
        try:
            cfg = json.loads((Path(base_model) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
    for fam in OWN_FAMILIES if cfg else ():
        if fam.matches(cfg):
            return fam, cfg
    return None


def txl_config(base_model) -> dict | None:
    """The config of a saved ``TransfoXLLM`` directory, or None (not one)."""
    own = own_family(base_model, None)
    return own[1] if own is not None and own[0] is txl.TXL else None


def export_model(model, optimizer, out, *, layout="per_layer", multiple_of=1,
                 weights="structured", base_model=None, verbose=True) -> dict | None:
    """Export a live (possibly sharded) model and its ramda_ds optimizer. Every rank must call it
    (the state is all-gathered); rank 0 writes and returns the report, other ranks None."""
    from ..optim.base import find_structured
    from ..sharding.gather import gather_full_state

    opt = find_structured(optimizer)
    if opt is None:
        raise ExportError(f"{type(optimizer).__name__} is not a ramda_ds optimizer: no group "
                          "structure to export")
    state = gather_full_state(opt)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    inner = model
    for attr in ("module", "_orig_mod"):  # DDP / DeepSpeed engine / compiled
        while hasattr(inner, attr) and not hasattr(inner, "config"):
            inner = getattr(inner, attr)
    if not hasattr(inner, "config"):
        raise ExportError(f"{type(model).__name__} has no HF config: export needs a "
                          "transformers PreTrainedModel")
    tensors = pick(state, weights, type(opt).__name__)
    for fam in OWN_FAMILIES:
        if fam.matches(inner.config):
            return fam.export(tensors, Path(out), inner.config, layout=layout,
                              multiple_of=multiple_of, weights=weights,
                              source=dict(optimizer=type(opt).__name__, live=True),
                              verbose=verbose)
    return export_weights(tensors, Path(out), config=inner.config, base_model=base_model,
                          layout=layout, multiple_of=multiple_of, weights=weights,
                          source=dict(optimizer=type(opt).__name__, live=True), verbose=verbose)


# ---------------------------------------------------------------------------- the export
def dense_model(tensors: dict, config=None, base_model=None):
    """The dense HF model carrying ``tensors`` (fp32); parameters the optimizer did not hold
    (frozen ones) come from ``base_model``. Refuses a checkpoint of another model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if base_model is not None:
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    else:
        config = config if config is not None else AutoConfig.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = dict(model.named_parameters())
    foreign = sorted(set(tensors) - set(params))
    if foreign:
        raise ExportError(f"the checkpoint is of a different model than {type(model).__name__} "
                          f"from {base_model or 'the given config'}: it holds {foreign[:3]}, which "
                          f"this model does not have (its parameters: {list(params)[:3]} ...)")
    check_shapes(tensors, params)
    absent = sorted(set(params) - set(tensors))
    if absent and base_model is None:
        raise ExportError(f"the optimizer holds no value for {absent[:3]} and no base model was "
                          "given to take them from; pass base_model")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    model.eval()
    return model, absent


def pruned_config(cfg, fam, sizes: list[dict], layout: str):
    """The config of the pruned model: the stock class with one width (uniform), or the per-layer
    class of the modeling template with ``layer_sizes`` and ``auto_map``."""
    d = cfg.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        d.pop(k, None)
    s = fam.sizes(cfg)
    if fam is P.LLAMA:
        d["head_dim"] = s["head_dim"]
    if layout == "uniform":
        s0 = sizes[0]
        if any(x != s0 for x in sizes):
            raise ExportError(f"uniform layout produced unequal layers: {sizes}")
        if fam is P.GPT2:
            d["n_inner"] = s0["intermediate_size"]
        else:
            d.update(s0)
        return type(cfg)(**d)
    from . import modeling_ramda_pruned as M

    cfg_cls, model_cls = PER_LAYER_CLASSES[fam.name]
    auto_map = {"AutoConfig": f"modeling_ramda_pruned.{cfg_cls}",
                "AutoModelForCausalLM": f"modeling_ramda_pruned.{model_cls}"}
    d.update(layer_sizes=sizes, auto_map=auto_map)
    return getattr(M, cfg_cls)(**d)


def build_pruned(config, sd: dict, layout: str, fam):
    from transformers import AutoModelForCausalLM

    from . import modeling_ramda_pruned as M

    if layout == "uniform":
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = getattr(M, PER_LAYER_CLASSES[fam.name][1])(config).float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and
            getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ExportError(f"pruned state does not fit the pruned model: missing "
                          f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


def sample_batch(cfg, n=2, length=24, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (n, length), generator=g)


def logits_rel_diff(a_model, b_model, x) -> float:
    with torch.no_grad():
        a, b = a_model(input_ids=x).logits.double(), b_model(input_ids=x).logits.double()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def export_weights(tensors: dict, out: Path, *, config=None, base_model=None, layout="per_layer",
                   multiple_of=1, weights="structured", source=None, run_dir=None,
                   verbose=True) -> dict:
    """Prune, check, write. See the module docstring."""
    out = Path(out)
    if out.exists():
        raise ExportError(f"output directory {out} exists; choose a new one (nothing was written)")
    if layout not in ("per_layer", "uniform"):
        raise ExportError(f"layout must be per_layer or uniform, got {layout!r}")
    dense, from_base = dense_model(tensors, config, base_model)
    cfg = dense.config
    try:
        fam = P.family_of(cfg)
        sd = {k: v.detach() for k, v in dense.state_dict().items()}
        zeros = P.zero_units(fam, sd, cfg)
        keeps = P.plan(fam, cfg, zeros, layout, multiple_of)
        new_sd, sizes = P.prune(fam, sd, cfg, keeps)
    except P.PruneError as e:
        raise ExportError(str(e)) from None
    new_cfg = pruned_config(cfg, fam, sizes, layout)
    pruned = build_pruned(new_cfg, new_sd, layout, fam)
    rel = logits_rel_diff(dense, pruned, sample_batch(cfg))
    if not rel <= RTOL:
        raise ExportError(f"the pruned model's logits differ from the dense model's by {rel:.2e} "
                          f"(relative, > {RTOL:g}): refusing to write {out}")
    report = make_report(fam, cfg, sd, pruned, keeps, zeros, sizes, layout, multiple_of, weights,
                         rel, source, from_base)
    if verbose:
        print(format_report(report), flush=True)

    def write(tmp: Path):
        pruned.save_pretrained(tmp)
        if layout == "per_layer":
            shutil.copy(TEMPLATE, tmp / TEMPLATE.name)
        report["tokenizer"] = copy_tokenizer(base_model, run_dir, tmp)
        (tmp / "pruning.json").write_text(json.dumps(report, indent=1))
    write_atomically(out, write)
    return report


def run_diverged(run_dir) -> dict | None:
    """The ``"diverged": true`` row of a run's metrics.jsonl (the training loop stopped it), or
    None."""
    metrics = Path(run_dir) / "metrics.jsonl" if run_dir else None
    if metrics is None or not metrics.exists():
        return None
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("diverged"):
            return row
    return None


def make_report(fam, cfg, sd, pruned, keeps, zeros, sizes, layout, multiple_of, weights, rel,
                source, from_base) -> dict:
    s = fam.sizes(cfg)
    before = P.parameter_counts(fam, sd)
    after = P.parameter_counts(fam, {k: v for k, v in pruned.state_dict().items()})
    layers = []
    for i, (k, z, sz) in enumerate(zip(keeps, zeros, sizes)):
        layers.append(dict(layer=i, ffn=[sz["intermediate_size"], s["ffn"]], ffn_live=k.live_ffn,
                           heads=[sz["num_attention_heads"], s["heads"]], heads_live=k.live_heads,
                           kv_heads=[sz["num_key_value_heads"], s["kv"]],
                           folded_ffn_units=len(k.extra.get("folded", [])),
                           params=[after["layers"][i], before["layers"][i]]))
    return dict(weights="structured point Ŵ (RAMDA)" if weights == "structured" else "W",
                layout=layout, multiple_of=multiple_of, model_type=cfg.model_type,
                params_before=before["total"], params_after=after["total"],
                kept_fraction=round(after["total"] / before["total"], 6),
                logits_max_rel_diff=rel, layers=layers, source=source or {},
                taken_from_base_model=from_base)
