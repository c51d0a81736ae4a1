"""Default regularization rules, name patterns and the structure metrics."""

import pytest
import torch
import torch.nn as nn

from ramda_ds.metrics import tensor_sparsity, weighted_group_sparsity
from ramda_ds.optim import RAMDA
from ramda_ds.param_groups import build_param_groups


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 6, 3)
        self.lstm = nn.LSTM(6, 4)
        self.mlp = nn.ModuleDict(dict(up_proj=nn.Linear(6, 12), down_proj=nn.Linear(12, 6)))
        self.o_proj = nn.Linear(8, 6, bias=False)


def names_by_rule(groups):
    return {(g["regularizer"], g.get("grouping")): set(g["param_names"]) for g in groups}


def test_default_rules_regularize_linear_conv_lstm_weights_only():
    groups = build_param_groups(Block(), "group_lasso", lam=1e-3)
    rules = names_by_rule(groups)
    assert rules[("group_lasso", "input")] == {
        "conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "o_proj.weight"}
    free = rules[(None, None)]
    assert {"embed.weight", "norm.weight", "norm.bias", "conv.bias", "lstm.bias_ih_l0"} <= free
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(Block().parameters()))


def test_include_exclude_and_grouping_patterns():
    groups = build_param_groups(Block(), "group_lasso", lam=1e-3,
                                include=["*.down_proj.weight", "o_proj.weight"],
                                grouping={"o_proj.weight": "head:4"}, lr=0.5)
    rules = names_by_rule(groups)
    assert rules[("group_lasso", "input")] == {"mlp.down_proj.weight"}
    assert rules[("group_lasso", "head:4")] == {"o_proj.weight"}
    assert all(g["lr"] == 0.5 for g in groups)
    groups = build_param_groups(Block(), "group_lasso", lam=1e-3, exclude=["lstm.*"])
    assert not any(n.startswith("lstm") for n in names_by_rule(groups)[("group_lasso", "input")])


@pytest.mark.parametrize("kwargs,msg", [(dict(include=["*.gate_proj.weight"]), "matches no"),
                                        (dict(exclude=["nothing*"]), "matches no"),
                                        (dict(grouping={"o_proj.weight": "head:5"}), "head size"),
                                        (dict(include=["norm.bias"]), "at least 2 dims")])
def test_bad_patterns_fail_with_the_name(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        build_param_groups(Block(), "group_lasso", lam=1e-3, **kwargs)


def test_weighted_group_sparsity_counts_group_sizes():
    a = nn.Parameter(torch.randn(4, 5))  # 5 groups of 4
    b = nn.Parameter(torch.randn(2, 3, 2))  # 3 groups of 4
    with torch.no_grad():
        a[:, :2] = 0
        b[:, 0] = 0
        a[0, 4] = 0  # a partly zero group is not a zero group
    opt = RAMDA([dict(params=[a, b], param_names=["a", "b"], regularizer="group_lasso", lam=1.0)])
    rows = {r.name: r for r in tensor_sparsity(opt)}
    assert (rows["a"].zero_groups, rows["a"].groups, rows["b"].zero_groups) == (2, 5, 1)
    assert weighted_group_sparsity(opt) == pytest.approx((2 * 4 + 1 * 4) / (5 * 4 + 3 * 4))
    with pytest.raises(ValueError, match="keep_structured"):
        weighted_group_sparsity(opt, structured=True)
