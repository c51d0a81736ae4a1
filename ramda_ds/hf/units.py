"""Prunable units of Hugging Face causal LMs, as param-group rules (shared by ``launch/finetune_llm.py``
and :class:`ramda_ds.hf.RamdaTrainer`).

One group = one unit an export can remove whole:

* FFN neuron j: input column j of ``mlp.down_proj.weight`` (Llama, Qwen, Mistral: ``[d, ffn]``),
  row j of GPT-2's transposed ``mlp.c_proj.weight`` (``Conv1D``, ``[ffn, d]``);
* attention head h: the ``head_dim`` input columns ``h·D .. h·D+D−1`` of ``self_attn.o_proj.weight``.
"""

from __future__ import annotations

from fnmatch import fnmatch

UNITS = ("ffn", "heads")


def blocks_of(model) -> list:
    """The transformer blocks of a Llama-family (``model.layers``) or GPT-2 (``transformer.h``)
    model: what FSDP2 shards one by one."""
    return getattr(getattr(model, "model", None), "layers", None) or \
        getattr(getattr(model, "transformer", None), "h", [])


def parse_groups(text: str) -> dict[str, str]:
    """``"PATTERN=RULE;..."`` → ``{PATTERN: RULE}`` (RULE: input | output | head:D | ...)."""
    out = {}
    for item in text.split(";"):
        if item.strip():
            if "=" not in item:
                raise ValueError(f"group rule {item!r} is not PATTERN=RULE")
            pat, rule = item.split("=", 1)
            out[pat.strip()] = rule.strip()
    return out


def unit_patterns(model, units: str = "ffn,heads", groups: str | dict = "",
                  warn=None) -> dict[str, str]:
    """``{pattern: grouping rule}`` of the prunable units of ``model``.

    ``units``: comma-separated subset of ``ffn``, ``heads``; ``groups`` (``"PATTERN=RULE;..."`` or a
    dict) replaces them. ValueError if a pattern matches no parameter or no unit is found.
    ``warn(text)`` is told of a requested unit kind the model has none of (GPT-2's heads).
    """
    names = [n for n, _ in model.named_parameters()]
    if groups:
        rules = parse_groups(groups) if isinstance(groups, str) else dict(groups)
    else:
        chosen = [u.strip() for u in units.split(",") if u.strip()]
        if not chosen or not set(chosen) <= set(UNITS):
            raise ValueError(f"units must be ffn and/or heads, got {units!r}")
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        candidates = {"ffn": {"*.mlp.down_proj.weight": "input", "*.mlp.c_proj.weight": "output"},
                      "heads": {"*.self_attn.o_proj.weight": f"head:{head_dim}"}}
        rules = {pat: rule for unit in chosen for pat, rule in candidates[unit].items()
                 if any(fnmatch(n, pat) for n in names)}
        for unit in chosen:
            if warn and rules and not any(p in rules for p in candidates[unit]):
                warn(f"warning: --units {unit}: {type(model).__name__} has no "
                     f"{' / '.join(candidates[unit])} (GPT-2's attn.c_proj has no per-head rule "
                     f"yet): {unit} not regularized; pass --groups to choose tensors")
        if not rules:
            raise ValueError("found no prunable units (mlp.down_proj / mlp.c_proj / "
                             f"self_attn.o_proj) in {type(model).__name__}; pass --groups")
    for pat in rules:
        if not any(fnmatch(n, pat) for n in names):
            raise ValueError(f"group pattern {pat!r} matches no parameter of "
                             f"{type(model).__name__} (e.g. {names[-1]!r})")
    return rules


def unit_param_groups(model, lam: float, units: str = "ffn,heads", groups: str | dict = "",
                      **overrides) -> list[dict]:
    """Param groups: the prunable units group-lasso regularized with ``lam``, everything else free."""
    from ..param_groups import build_param_groups

    rules = unit_patterns(model, units, groups)
    return build_param_groups(model, "group_lasso", lam=lam, include=list(rules), grouping=rules,
                              **overrides)
