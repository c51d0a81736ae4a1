"""Build param groups from a model with the paper's default rules.

Regularized by default: weights of ``nn.Linear`` (input-wise groups: columns), ``nn.Conv1d/2d/3d``
(input channels), ``nn.LSTM``/``nn.GRU`` ``weight_ih*``/``weight_hh*`` (columns). Never by default:
biases, normalization weights, embeddings. ``include`` / ``exclude`` are fnmatch patterns on the
parameter name (``"*.mlp.down_proj.weight"``); ``include`` replaces the default rule; ``grouping``
maps a pattern to a grouping rule (``{"*.o_proj.weight": "head:64"}``).
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch.nn as nn

from .groups import layout_for

_DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM, nn.GRU, nn.RNN)


def default_regularized_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, _DEFAULT_TYPES):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if len(_shape(p)) >= 2 and (pname == "weight" or pname.startswith("weight_")):
                names.add(f"{mod_name}.{pname}" if mod_name else pname)
    return names


def build_param_groups(model: nn.Module, regularizer: str = "group_lasso", lam: float = 0.0,
                       include: list[str] | None = None, exclude: list[str] | None = None,
                       grouping: dict[str, str] | None = None, **overrides) -> list[dict]:
    """Param groups: one unregularized group, one per grouping rule of regularized tensors.

    Each group carries ``param_names`` (kept by DeepSpeed) and ``param_shapes``, so sharded views can find every tensor's original name and shape. For FSDP1
    (``use_orig_params=True``, which flattens parameters in place) call it before wrapping. ``overrides`` go into every group (e.g. ``lr``).
    Raises ValueError if a pattern matches no parameter or a rule does not fit a shape.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    all_names = [n for n, _ in named]
    for label, pats in (("include", include), ("exclude", exclude), ("grouping", grouping)):
        for pat in pats or []:
            if not any(fnmatch(n, pat) for n in all_names):
                raise ValueError(f"{label} pattern {pat!r} matches no trainable parameter "
                                 f"(first names: {all_names[:5]})")
    default = default_regularized_names(model)
    free, reg = ([], []), {}
    for n, p in named:
        chosen = any(fnmatch(n, pat) for pat in include) if include else n in default
        if exclude and any(fnmatch(n, pat) for pat in exclude):
            chosen = False
        if not chosen or regularizer in (None, "none") or lam == 0:
            free[0].append(p), free[1].append(n)
            continue
        rule = "element" if regularizer == "l1" else "input"
        for pat, r in (grouping or {}).items():
            if fnmatch(n, pat):
                rule = r
        if regularizer == "group_lasso":
            layout_for(_shape(p), rule, n)  # validate now
        reg.setdefault(rule, ([], []))
        reg[rule][0].append(p), reg[rule][1].append(n)
    groups = []
    if free[0]:
        groups.append(dict(params=free[0], param_names=free[1],
                           param_shapes=[_shape(p) for p in free[0]], regularizer=None,
                           lam=0.0, **overrides))
    for rule, (ps, ns) in reg.items():
        groups.append(dict(params=ps, param_names=ns, param_shapes=[_shape(p) for p in ps],
                           regularizer=regularizer, lam=lam,
                           grouping="input" if rule == "element" else rule, **overrides))
    return groups


def _shape(p) -> tuple:
    """The original shape, also of a parameter already partitioned by ZeRO-3 ``zero.Init``."""
    return tuple(getattr(p, "ds_shape", p.shape))
