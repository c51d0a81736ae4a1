"""The compression recipe's parts, proven on their math: the critical values are the screening
rule's thresholds, the selection keeps exactly the target, a frozen support holds removed units at
exactly zero and leaves the kept ones training as without them, and the recipe meets its target
in one run."""

import math

import pytest
import torch
import torch.nn as nn

from ramda_ds.compress.distill import distill_loss
from ramda_ds.compress.importance import keep_top, weight_scores
from ramda_ds.compress.recipe import TargetConfig, TargetRecipe, critical_values, unit_cost
from ramda_ds.compress.support import freeze_support, kept_groups
from ramda_ds.compress.target import keep_schedule, select
from ramda_ds.optim import RAMDA, ProxGen
from ramda_ds.param_groups import build_param_groups


class MLP(nn.Module):
    def __init__(self, d=6, h=12):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def batches(n, seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(d, d, generator=g)
    for _ in range(n):
        x = torch.randn(16, d, generator=g)
        yield x, x @ target


def groups_of(model, lam, target=False, **kw):
    groups = build_param_groups(model, "group_lasso", lam=max(lam, 1.0), include=["down.weight"], **kw)
    for g in groups:
        if g.get("regularizer") == "group_lasso":
            g["lam"] = lam
            g["target"] = target
    return groups


def train(model, opt, steps, after=None, seed=0):
    for t, (x, y) in enumerate(batches(steps, seed), 1):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if after:
            after(t)


# ---------------------------------------------------------------------------- target selection
def test_keep_schedule_is_cubic_from_one_to_the_target():
    assert keep_schedule(0, 0.3, 100) == 1.0
    assert keep_schedule(100, 0.3, 100) == keep_schedule(500, 0.3, 100) == 0.3
    assert keep_schedule(50, 0.3, 100) == pytest.approx(0.3 + 0.7 * 0.125)


def test_select_keeps_exactly_the_target_and_lambda_separates():
    torch.manual_seed(0)
    scores = {"a": torch.rand(40), "b": torch.rand(24) * 0.3}
    costs = {n: torch.ones(s.numel(), dtype=torch.float64) for n, s in scores.items()}
    lam, kept = select(scores, costs, 0.5)
    assert sum(int(k.sum()) for k in kept.values()) == 32  # exactly half of 64
    for n in scores:  # the screening rule at λ keeps exactly this set
        assert torch.equal(kept[n], scores[n] > lam)
    # global ranking: the low-score tensor loses more units than the other
    assert kept["b"].float().mean() < kept["a"].float().mean()
    # a floor keeps at least that fraction of every tensor
    _, kept = select(scores, costs, 0.5, floor=0.25)
    assert int(kept["b"].sum()) >= 6 and sum(int(k.sum()) for k in kept.values()) == 32
    # weighted by cost, with a fixed part: parameters kept = 0.6 of the total, within one unit
    costs = {"a": torch.full((40,), 3.0, dtype=torch.float64),
             "b": torch.full((24,), 5.0, dtype=torch.float64)}
    _, kept = select(scores, costs, 0.6, fixed=100.0)
    kept_cost = 100 + 3 * int(kept["a"].sum()) + 5 * int(kept["b"].sum())
    assert 0.6 * 340 - 5 <= kept_cost <= 0.6 * 340
    lam, kept = select(scores, {n: torch.ones(s.numel(), dtype=torch.float64)
                                for n, s in scores.items()}, 1.0)
    assert lam == 0.0 and all(k.all() for k in kept.values())


def test_unit_costs_count_the_parameters_a_unit_removes():
    assert unit_cost("model.layers.0.mlp.down_proj.weight", 128) == 384
    assert unit_cost("transformer.h.0.mlp.c_proj.weight", 64) == 129
    assert unit_cost("model.layers.0.self_attn.o_proj.weight", 128 * 32) == 2 * 128 * 32


# ---------------------------------------------------------------------------- critical values
@pytest.mark.parametrize("solver", ["pg", "exact"])
def test_critical_values_are_the_screening_thresholds(solver):
    """r_g is the λ at which Ŵ drops group g: just below it the solver keeps g, just above it
    g is exactly zero (the RAMDA subproblem solved at the same state)."""
    torch.manual_seed(0)
    model = MLP()
    opt = RAMDA(groups_of(model, 0.0, target=True), lr=0.05, solver=solver, keep_structured=True)
    train(model, opt, 5)
    r = critical_values(opt)["down.weight"]
    assert r.shape == (12,) and (r > 0).all()
    p = model.down.weight
    st = opt.state[p]
    for j in (0, 5, 11):
        for factor, nonzero in ((0.999, True), (1.001, False)):
            probe = _solve_at(opt, p, st, float(r[j]) * factor)
            assert (probe[:, j].abs().sum() > 0) == nonzero, (j, factor)


def _solve_at(opt, p, st, lam):
    """Ŵ of the subproblem at the current state with λ = lam (no state changes)."""
    from ramda_ds.cube_root import cube_root
    from ramda_ds.groups import SegmentGroups, layout_for
    from ramda_ds.solvers import Subproblem, solve_exact

    P = cube_root(st["grad_sq_sum"].reshape(-1).clone()).add_(opt.param_groups[1]["eps"])
    b = P * st["initial"].reshape(-1) - st["grad_sum"].reshape(-1)
    lay = layout_for(tuple(p.shape), "input", "down.weight")
    tau = float(st["alpha"]) * lam * lay.group_weight
    prob = Subproblem(SegmentGroups(lay), P, b, tau, torch.zeros_like(P))
    solve_exact([prob])
    return prob.z.view(p.shape)


# ---------------------------------------------------------------------------- frozen support
@pytest.mark.parametrize("opt_name", ["ramda", "proxgen"])
def test_frozen_support_holds_removed_units_at_zero_and_trains_the_rest(opt_name):
    """After the freeze the removed columns stay exactly zero; the kept entries follow the same
    optimizer run on the same model with the removed columns' gradients zeroed by hand."""
    torch.manual_seed(0)
    base = MLP()
    kept = {"down.weight": torch.tensor([True, False] * 6)}

    def make(model):
        groups = groups_of(model, 0.0)
        return RAMDA(groups, lr=0.05, keep_structured=True) if opt_name == "ramda" else \
            ProxGen(groups, lr=0.01)
    a = MLP()
    a.load_state_dict(base.state_dict())
    opt_a = make(a)
    freeze_support(opt_a, kept)
    train(a, opt_a, 20)
    assert a.down.weight[:, 1::2].abs().max() == 0 and a.down.weight[:, ::2].abs().min() > 0
    if opt_name == "ramda":
        assert opt_a.state[a.down.weight]["grad_sum"].view(6, 12)[:, 1::2].abs().max() == 0
    # the reference: the same start with the units zeroed, gradients masked before the step
    b = MLP()
    b.load_state_dict(base.state_dict())
    with torch.no_grad():
        b.down.weight[:, 1::2] = 0
    opt_b = make(b)
    mask = kept["down.weight"].float().expand(6, 12)
    for x, y in batches(20):
        ((b(x) - y) ** 2).mean().backward()
        b.down.weight.grad.mul_(mask)
        opt_b.step()
        opt_b.zero_grad()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_proxgen_at_lambda_zero_with_a_support_is_adamw_on_the_kept_units():
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    b.load_state_dict(a.state_dict())
    opt_a = ProxGen(groups_of(a, 0.0), lr=0.01, weight_decay=0.0)
    freeze_support(opt_a, {"down.weight": torch.tensor([True] * 8 + [False] * 4)})
    with torch.no_grad():
        b.down.weight[:, 8:] = 0
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.0)
    for x, y in batches(15):
        for m in (a, b):
            ((m(x) - y) ** 2).mean().backward()
        b.down.weight.grad[:, 8:] = 0
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the recipe
def test_recipe_meets_the_target_in_one_run_and_ships_w():
    torch.manual_seed(0)
    model = MLP(d=6, h=40)
    opt = RAMDA(groups_of(model, 0.0, target=True), lr=0.05, keep_structured=True)
    cfg = TargetConfig(target=0.3, ramp=20, stable=3, max_identify=40)
    recipe = TargetRecipe(opt, cfg)
    logs = []
    train(model, opt, 60, lambda t: logs.append(recipe.after_step(t)))
    assert 20 <= recipe.frozen_at <= 40
    stages = [r["stage"] for r in logs]
    assert stages.count("freeze") == 1 and stages[-1] == "recover"
    kept = kept_groups(opt)["down.weight"]
    assert int(kept.sum()) == 12  # round(0.3·40), exactly
    st = opt.state[model.down.weight]
    assert torch.equal(st["structured"].view(-1), model.down.weight.detach().view(-1))  # Ŵ := W: the shipped model
    assert opt.param_groups[1]["lam"] == 0.0 and opt.param_groups[1]["milestones"] == (recipe.frozen_at,)
    # identification: λ rose with the schedule
    lams = [r["lam"] for r in logs if r["stage"] == "identify"]
    assert lams[-1] > lams[1] > 0


def test_recipe_state_round_trip_continues_identically():
    """Stopping at any step and restoring optimizer + recipe state continues bit for bit (the
    run checkpoint carries the same two things)."""
    import copy

    def fresh():
        torch.manual_seed(0)
        model = MLP(d=6, h=20)
        opt = RAMDA(groups_of(model, 0.0, target=True), lr=0.05, keep_structured=True)
        return model, opt, TargetRecipe(opt, TargetConfig(target=0.5, ramp=8, stable=2, max_identify=14))

    m1, o1, r1 = fresh()
    train(m1, o1, 30, r1.after_step)
    for cut in (5, 12, 20):  # before, around and after the freeze
        m2, o2, r2 = fresh()
        it = list(batches(30))
        for t, (x, y) in enumerate(it[:cut], 1):
            ((m2(x) - y) ** 2).mean().backward()
            o2.step(), o2.zero_grad()
            r2.after_step(t)
        saved_model, saved_opt = copy.deepcopy(m2.state_dict()), copy.deepcopy(o2.state_dict())
        saved_recipe = copy.deepcopy(r2.state_dict())
        m3, o3, r3 = fresh()
        m3.load_state_dict(saved_model)
        o3.load_state_dict(saved_opt)
        r3.load_state_dict(saved_recipe)
        for t, (x, y) in enumerate(it[cut:], cut + 1):
            ((m3(x) - y) ** 2).mean().backward()
            o3.step(), o3.zero_grad()
            r3.after_step(t)
        for pa, pb in zip(m1.parameters(), m3.parameters()):
            assert torch.equal(pa, pb), cut
        assert r3.frozen_at == r1.frozen_at


def test_bad_target_settings_are_named():
    with pytest.raises(ValueError, match="target must be a fraction"):
        TargetConfig(target=1.5).check()
    with pytest.raises(ValueError, match="not before --steps"):
        TargetConfig(target=0.5, ramp=80, stable=10).check(steps=100)
    with pytest.raises(ValueError, match="target_floor"):
        TargetConfig(target=0.3, floor=0.5).check()


# ---------------------------------------------------------------------------- baselines, KD
def test_weight_scores_and_keep_top():
    model = MLP(d=4, h=10)
    with torch.no_grad():
        model.down.weight.copy_(torch.arange(10.0).expand(4, 10))
    s = weight_scores(model, {"down.weight": "input"})["down.weight"]
    assert torch.allclose(s, torch.arange(10.0, dtype=torch.float64) * 2)
    kept = keep_top({"down.weight": s}, 0.3)["down.weight"]
    assert kept.tolist() == [False] * 7 + [True] * 3
    assert int(keep_top({"down.weight": s}, allocation={"down.weight": 5})["down.weight"].sum()) == 5


def test_distill_loss_is_kl_plus_ce():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    y = torch.randint(0, 7, (2, 5))
    assert distill_loss(t, t, y).abs().item() < 1e-6  # KL(p‖p) = 0
    kl = (torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    assert distill_loss(s, t, None).item() == pytest.approx(kl.item(), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 7), y.reshape(-1))
    assert distill_loss(s, t, y, beta=0.25).item() == pytest.approx(0.25 * kl.item() + 0.75 * ce.item(),
                                                                    rel=1e-5)
    assert math.isfinite(distill_loss(s, t, y, temperature=2.0).item())


def test_adamw_recovery_is_adamw_on_the_kept_units():
    """recover_with="adamw": after the freeze, RAMDA's step is exactly AdamW (in its V, U
    buffers) on the kept units, the removed ones held at zero."""
    torch.manual_seed(0)
    model = MLP(d=6, h=10)
    opt = RAMDA(groups_of(model, 0.0, target=True), lr=0.01, keep_structured=True)
    recipe = TargetRecipe(opt, TargetConfig(target=0.5, ramp=3, stable=1, max_identify=5,
                                            recover_with="adamw", steps=30))
    data = list(batches(30))
    t = 0
    while recipe.frozen_at is None:
        x, y = data[t]
        ((model(x) - y) ** 2).mean().backward()
        opt.step(), opt.zero_grad()
        t += 1
        recipe.after_step(t)
    ref = MLP(d=6, h=10)
    ref.load_state_dict(model.state_dict())
    kept = kept_groups(opt)["down.weight"]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.0, eps=1e-8)
    for x, y in data[t:]:
        for m in (model, ref):
            ((m(x) - y) ** 2).mean().backward()
        ref.down.weight.grad[:, ~kept] = 0
        opt.step(), opt.zero_grad(), ref_opt.step(), ref_opt.zero_grad()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert model.down.weight[:, ~kept].abs().max() == 0


def test_divergence_watch_expects_the_identification_rise():
    """Removing units makes the training loss climb on purpose: while a size target identifies,
    a long rise is not a failure, but a loss far above the start still is."""
    from ramda_ds.training.loop import DivergenceWatch

    losses = [3.0 + 0.01 * t for t in range(80)]  # rises steadily for 8 windows
    plain, target = DivergenceWatch(2.0), DivergenceWatch(2.0)
    assert any(plain.update(t, x) for t, x in enumerate(losses, 1))
    assert not any(target.update(t, x, rise_expected=True) for t, x in enumerate(losses, 1))
    far = DivergenceWatch(2.0)
    assert any(far.update(t, 3.0 if t == 1 else 7.0, rise_expected=True) for t in range(1, 21))


def test_a_parameter_target_counts_what_each_unit_removes():
    """of="params": the kept fraction is of the model's parameters, a unit counting its cost
    (here |g| = 6 weights per unit of down.weight), met within one unit."""
    torch.manual_seed(0)
    model = MLP(d=6, h=40)
    total = sum(p.numel() for p in model.parameters())  # 6·40 + 40 + 40·6 + 6 = 526
    opt = RAMDA(groups_of(model, 0.0, target=True), lr=0.05, keep_structured=True)
    recipe = TargetRecipe(opt, TargetConfig(target=0.8, of="params", ramp=10, stable=2,
                                            max_identify=20, total_params=total))
    train(model, opt, 30, recipe.after_step)
    removed = 40 - int(kept_groups(opt)["down.weight"].sum())
    assert abs((total - 6 * removed) / total - 0.8) <= 6 / total
    assert recipe.kept_fraction == pytest.approx((total - 6 * removed) / total)
