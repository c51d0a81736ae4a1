"""The optimizers: MADGRAD/AdamW equivalences, restarts, state_dict, validation, sparsity."""

import copy
import math

import madgrad
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ramda_ds.metrics import weighted_group_sparsity
from ramda_ds.optim import RAMDA, RMDA, ProxGen, ProxSGD
from ramda_ds.param_groups import build_param_groups


def small_model():
    return nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def batches(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def max_diff(m1, m2):
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


OPTIMIZERS = {
    "RAMDA": lambda gs: RAMDA(gs, lr=0.05, momentum=0.1),
    "RAMDA-exact": lambda gs: RAMDA(gs, lr=0.05, momentum=0.1, solver="exact"),
    "RMDA": lambda gs: RMDA(gs, lr=0.1, momentum=0.1),
    "ProxSGD": lambda gs: ProxSGD(gs, lr=0.1, momentum=0.1),
    "ProxGen": lambda gs: ProxGen(gs, lr=0.01),
}


@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_ramda_without_regularizer_is_madgrad(momentum):
    torch.manual_seed(1)
    m1 = small_model()
    m2 = copy.deepcopy(m1)
    lr, eps = 0.02, 1e-6
    o1 = RAMDA(m1.parameters(), lr=lr, momentum=momentum, eps=eps)
    # madgrad adds eps to lr, and its momentum is 1 − c; momentum 0 is its no-x0 variant
    o2 = madgrad.MADGRAD(m2.parameters(), lr=lr - eps, momentum=1 - momentum, eps=eps)
    data = batches(30)
    train(m1, o1, data)
    train(m2, o2, data)
    assert max_diff(m1, m2) < 2e-6
    assert max_diff(m1, small_model()) > 0.01  # it did train


def test_ramda_with_zero_lambda_groups_and_exact_solver_is_madgrad():
    torch.manual_seed(1)
    m1 = small_model()
    m2 = copy.deepcopy(m1)
    groups = build_param_groups(m1, "group_lasso", lam=1e-9)
    for g in groups:
        g["lam"] = 0.0  # regularized code path, zero threshold (PG would only be approximate)
    o1 = RAMDA(groups, lr=0.02, momentum=0.1, eps=1e-6, solver="exact")
    o2 = madgrad.MADGRAD(m2.parameters(), lr=0.02 - 1e-6, momentum=0.9, eps=1e-6)
    data = batches(20)
    train(m1, o1, data)
    train(m2, o2, data)
    assert max_diff(m1, m2) < 2e-6


def test_proxgen_without_regularizer_is_adamw():
    torch.manual_seed(2)
    m1 = small_model()
    m2 = copy.deepcopy(m1)
    o1 = ProxGen(m1.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.8, 0.99))
    o2 = torch.optim.AdamW(m2.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.8, 0.99))
    data = batches(30)
    train(m1, o1, data)
    train(m2, o2, data)
    assert max_diff(m1, m2) < 1e-6


def test_restart_schedule_resets_state_and_ramps_c():
    torch.manual_seed(3)
    model = small_model()
    opt = RAMDA(build_param_groups(model, "group_lasso", lam=1e-3), lr=0.05, momentum=0.25,
                eps=1e-5, milestones=(3, 6), gamma=0.5, keep_structured=True)
    data = batches(12)
    train(model, opt, data[:3])
    for g in opt.param_groups:
        assert g["lr"] == 0.05 and g["eps"] == 1e-5  # the decay is applied, not stored
        for p in g["params"]:
            st = opt.state[p]
            assert st["step"] == 3 and st["alpha"] == 0
            assert st["grad_sum"].abs().max() == 0 and st["grad_sq_sum"].abs().max() == 0
            assert torch.equal(st["initial"], p.detach().view(-1))
    # the next step is t = 1 of stage 1 with lr·γ, ε·γ: s = 0.025, α = 0.025, U = s·G², P = ∛U + 5e-6
    x, y = data[3]
    p = opt.param_groups[1]["params"][0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = p.grad.detach().view(-1).clone()
    opt.step()
    st = opt.state[p]
    assert st["alpha"].item() == pytest.approx(0.025)
    torch.testing.assert_close(st["grad_sq_sum"], 0.025 * g * g)
    train(model, opt, data[4:6])
    cs = []  # the final stage: c = min(0.25·√i, 1)
    for x, y in data[6:12]:
        before = [p.detach().clone() for p in model.parameters()]
        train(model, opt, [(x, y)])
        p = opt.param_groups[1]["params"][0]
        stage = sum(opt.state[p]["step"].item() > m for m in (3, 6))
        cs.append(opt._c(opt.param_groups[1], stage, int(opt.state[p]["step"].item()) - 6))
        w_hat = opt.state[p]["structured"].view_as(p)
        old = before[[q is p for q in model.parameters()].index(True)]
        torch.testing.assert_close(p.detach(), (1 - cs[-1]) * old + cs[-1] * w_hat)
    assert cs == pytest.approx([0.25, 0.25 * math.sqrt(2), 0.25 * math.sqrt(3), 0.5,
                                0.25 * math.sqrt(5), 0.25 * math.sqrt(6)])
    train(model, opt, batches(12, seed=1))  # c reaches 1: W is the sparse Ŵ exactly
    assert weighted_group_sparsity(opt) == weighted_group_sparsity(opt, structured=True)
    for p in opt.param_groups[1]["params"]:
        assert torch.equal(p.detach().view(-1), opt.state[p]["structured"])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_mid_run_continues_identically(name, tmp_path):
    torch.manual_seed(4)
    m1 = small_model()
    make = OPTIMIZERS[name]
    o1 = make(build_param_groups(m1, "group_lasso", lam=3e-3, milestones=(8,)))
    data = batches(14)
    train(m1, o1, data[:5])
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, tmp_path / "ckpt.pt")
    train(m1, o1, data[5:])

    m2 = small_model()
    o2 = make(build_param_groups(m2, "group_lasso", lam=3e-3, milestones=(8,)))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    train(m2, o2, data[5:])
    assert max_diff(m1, m2) == 0
    p1 = list(o1.state.values())[0]
    assert p1["step"] == 14  # went through the restart at step 8


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_lr_step_changes_nothing(name):
    model = small_model()
    opt = OPTIMIZERS[name](build_param_groups(model, "group_lasso", lam=1e-3))
    train(model, opt, batches(3))
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = opt.state_dict()
    for k, v in before[0].items():
        assert torch.equal(v, model.state_dict()[k])
    for k, st in before[1]["state"].items():
        for sk, sv in st.items():
            assert torch.equal(torch.as_tensor(sv), torch.as_tensor(after["state"][k][sk]))
    assert all(torch.equal(after["state"][k]["step"], st["step"]) for k, st in before[1]["state"].items())


@pytest.mark.parametrize("kwargs,msg", [
    (dict(lr=-1.0), "lr must be"), (dict(lr=float("nan")), "lr must be"),
    (dict(momentum=0.0), "momentum"), (dict(momentum=1.5), "momentum"),
    (dict(eps=0.0), "eps must be"), (dict(lam=-1e-3, regularizer="group_lasso"), "lam must be"),
    (dict(regularizer="group_lass"), "unknown regularizer"), (dict(solver="newton"), "solver"),
    (dict(max_iters=0), "max_iters"), (dict(rtol=-1.0), "rtol"), (dict(milestones=(5, 3)), "milestones"),
    (dict(gamma=0.0), "gamma"), (dict(inexact_eps0=-1.0), "inexact_eps0"),
    (dict(regularizer="group_lasso", lam=1e-3, grouping="head:7"), "head size"),
])
def test_bad_hyperparameters_raise_clear_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        RAMDA([nn.Parameter(torch.randn(4, 6))], **kwargs)


def test_bad_proxgen_betas_and_1d_group_lasso():
    with pytest.raises(ValueError, match="betas"):
        ProxGen([nn.Parameter(torch.randn(3))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="at least 2 dims"):
        RAMDA([dict(params=[nn.Parameter(torch.randn(3))], param_names=["fc.bias"])],
              regularizer="group_lasso", lam=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_and_leaves_everything_unchanged(bad):
    model = small_model()
    opt = RAMDA(build_param_groups(model, "group_lasso", lam=1e-3))
    train(model, opt, batches(2))
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    x, y = batches(1, seed=5)[0]
    F.cross_entropy(model(x), y).backward()
    list(model.parameters())[2].grad[0, 0] = bad
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    for k, v in before[0].items():
        assert torch.equal(v, model.state_dict()[k])
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())


def test_solver_stats_are_reported_per_parameter_name():
    model = small_model()
    opt = RAMDA(build_param_groups(model, "group_lasso", lam=1e-3))
    train(model, opt, batches(2))
    assert set(opt.last_stats) == {"0.weight", "2.weight", "4.weight"}
    st = opt.last_stats["2.weight"]
    assert st.iterations >= 2 and st.active_groups + st.screened_groups == 16


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_logistic_regression_finds_the_relevant_features(name):
    """Group lasso on a linear classifier whose labels depend on 8 of 40 features."""
    g = torch.Generator().manual_seed(0)
    n, d, k = 3000, 40, 4
    X = torch.randn(n, d, generator=g)
    W_true = torch.zeros(k, d)
    W_true[:, :8] = torch.randn(k, 8, generator=g) * 2
    y = (X @ W_true.T).argmax(1)
    Xtr, ytr, Xte, yte = X[:2500], y[:2500], X[2500:], y[2500:]

    def fit(make_opt, lam):
        torch.manual_seed(0)
        model = nn.Linear(d, k)
        opt = make_opt(build_param_groups(model, "group_lasso", lam=lam, milestones=(300,)))
        for _ in range(400):
            idx = torch.randint(0, 2500, (128,))
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        acc = (model(Xte).argmax(1) == yte).float().mean().item()
        kept = model.weight.detach().norm(dim=0) > 0
        return acc, kept, opt

    dense_acc, dense_kept, _ = fit(OPTIMIZERS[name], 0.0)
    acc, kept, opt = fit(OPTIMIZERS[name], 1e-2)
    assert dense_kept.all()
    assert kept[:8].all()
    if name.startswith(("RAMDA", "RMDA")):  # dual averaging identifies the structure exactly
        assert not kept[8:].any()
        assert weighted_group_sparsity(opt) == pytest.approx(32 / 40)
    else:  # ProxSGD / ProxGen: no such guarantee, but most noise columns go
        assert weighted_group_sparsity(opt) >= 0.7
    assert acc >= dense_acc - 0.02 and acc > 0.85


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_lr_step_on_a_fresh_optimizer_creates_state_and_changes_nothing(name):
    """What DCP's get_optimizer_state_dict and accelerate's load_state do to a new optimizer."""
    model = small_model()
    opt = OPTIMIZERS[name](build_param_groups(model, "group_lasso", lam=1e-3))
    before = copy.deepcopy(model.state_dict())
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert len(opt.state) == len(list(model.parameters()))
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k])
    assert all(st["step"] == 0 for st in opt.state.values())
    for g, lr in zip(opt.param_groups, lrs):  # and training from there is a normal first step
        g["lr"] = lr
    fresh = small_model()
    fresh.load_state_dict(before)
    o2 = OPTIMIZERS[name](build_param_groups(fresh, "group_lasso", lam=1e-3))
    data = batches(3)
    train(model, opt, data)
    train(fresh, o2, data)
    assert max_diff(model, fresh) == 0


def test_proxgen_counts_steps_per_parameter_like_adamw():
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    o1, o2 = ProxGen([a, b], lr=1e-2), torch.optim.AdamW([a2, b2], lr=1e-2, weight_decay=0.0)
    for i in range(6):
        for x, y, o in ((a, b, o1), (a2, b2, o2)):
            o.zero_grad()
            loss = x.square().sum() + (y.sin().sum() if i >= 3 else 0)  # b gets grads from step 4
            loss.backward()
            o.step()
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_channels_last_and_float64_parameters_match_the_plain_layout(name):
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3)
    ref = copy.deepcopy(conv)
    conv = conv.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    start = ref.weight.detach().clone()
    o1 = OPTIMIZERS[name](build_param_groups(conv, "group_lasso", lam=1e-2))
    o2 = OPTIMIZERS[name](build_param_groups(ref, "group_lasso", lam=1e-2))
    for _ in range(4):  # identical gradients, stored in each parameter's own memory format
        g = torch.randn_like(ref.weight)
        conv.weight.grad = g.contiguous(memory_format=torch.channels_last)
        ref.weight.grad = g.clone()
        o1.step()
        o2.step()
    assert conv.weight.grad.stride() != ref.weight.grad.stride()
    torch.testing.assert_close(conv.weight, ref.weight, rtol=0, atol=0)
    assert not torch.equal(ref.weight, start)
    w64 = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    opt = OPTIMIZERS[name]([dict(params=[w64], regularizer="group_lasso", lam=1e-3)])
    w64.grad = torch.randn_like(w64)
    opt.step()
    assert all(v.dtype == torch.float64 for v in opt.state[w64].values() if v.numel() > 1)


@pytest.mark.parametrize("name", ["RAMDA", "ProxGen"])
def test_bf16_parameters_keep_fp32_state_through_a_state_dict_round_trip(name, tmp_path):
    torch.manual_seed(6)
    m1 = nn.Linear(6, 4).to(torch.bfloat16)
    o1 = OPTIMIZERS[name](build_param_groups(m1, "group_lasso", lam=1e-3))
    x = torch.randn(8, 6, dtype=torch.bfloat16)
    for _ in range(3):
        o1.zero_grad()
        m1(x).float().square().mean().backward()
        o1.step()
    torch.save({"m": m1.state_dict(), "o": o1.state_dict()}, tmp_path / "c.pt")
    m2 = nn.Linear(6, 4).to(torch.bfloat16)
    o2 = OPTIMIZERS[name](build_param_groups(m2, "group_lasso", lam=1e-3))
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    m2.load_state_dict(ck["m"])
    o2.load_state_dict(ck["o"])
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        for k, v in o1.state[p1].items():
            assert o2.state[p2][k].dtype == v.dtype and torch.equal(o2.state[p2][k], v), k
    assert any(v.dtype == torch.float32 and v.dim() for v in o2.state[m2.weight].values())
    for m, o in ((m1, o1), (m2, o2)):
        o.zero_grad()
        m(x).float().square().mean().backward()
        o.step()
    assert torch.equal(m1.weight, m2.weight)


# ---------------------------------------------------------------- review fixes (issue 8)
def test_add_param_group_validates_solver_settings_before_any_step():
    opt = RAMDA([nn.Parameter(torch.randn(4, 6))], lr=0.1)
    with pytest.raises(ValueError, match="max_iters must be an int >= 1"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.randn(3, 3))], max_iters=-5))
    assert len(opt.param_groups) == 1  # the bad group was not kept


def test_state_dict_param_groups_hold_no_private_keys():
    model = small_model()
    opt = RAMDA(build_param_groups(model, "group_lasso", lam=1e-3))
    train(model, opt, batches(2))
    for g in opt.state_dict()["param_groups"]:
        assert not [k for k in g if k.startswith("_")], g.keys()


def test_unnamed_params_get_names_and_shapes_once():
    a, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(3, 2))
    opt = RAMDA([dict(params=[a]), dict(params=[b], lam=1e-3, regularizer="group_lasso")])
    assert [g["param_names"] for g in opt.param_groups] == [["param_groups[0][0]"], ["param_groups[1][0]"]]
    assert opt.param_groups[1]["param_shapes"] == [(3, 2)]
    named = RAMDA([("fc.weight", a)])
    assert named.param_groups[0]["param_names"] == ["fc.weight"]


def _eps0_run(params, eps0, steps, uses_b, opt_cls=RAMDA, **kw):
    """Steps with gradients of sum(A x)² (+ B's only from step ``uses_b`` on)."""
    opt = opt_cls([dict(params=params, param_names=[f"p{i}" for i in range(len(params))])],
                  regularizer="group_lasso", lam=2e-2, inexact_eps0=eps0, **kw)
    g = torch.Generator().manual_seed(1)
    stats = []
    for t in range(1, steps + 1):
        opt.zero_grad()
        x = torch.randn(8, 6, generator=g)
        loss = (x @ params[0].T).pow(2).sum()
        if len(params) > 1 and t >= uses_b:
            loss = loss + (x @ params[1].T).sin().sum()
        loss.backward()
        opt.step()
        stats.append(dict(opt.last_stats))
    return stats


def test_inexact_tolerance_uses_each_tensors_own_stage_step():
    """ε_t = ε0/t with t the tensor's own step: A (stepped 6 times) and B (gradients from step 4
    on, so 3 steps) in one group solve exactly as each does alone."""
    torch.manual_seed(0)
    A0, B0 = torch.randn(5, 6), torch.randn(5, 6)
    both = [nn.Parameter(A0.clone()), nn.Parameter(B0.clone())]
    s_both = _eps0_run(both, 0.3, 6, uses_b=4, lr=0.1)
    alone = [nn.Parameter(A0.clone())]
    s_alone = _eps0_run(alone, 0.3, 6, uses_b=99, lr=0.1)
    assert [s["p0"].iterations for s in s_both] == [s["p0"].iterations for s in s_alone]
    assert torch.equal(both[0].detach(), alone[0].detach())
    for t, s in enumerate(s_both, start=1):
        st = s["p0"]
        assert st.iterations == 100 or st.residual <= 0.3 / t


def test_proxgen_inexact_tolerance_decays_as_eps0_over_t():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 6))]
    for t, s in enumerate(_eps0_run(params, 0.5, 8, uses_b=99, opt_cls=ProxGen, lr=0.05), start=1):
        st = s["p0"]
        assert st.iterations == 100 or st.residual <= 0.5 / t, (t, st)


def _subproblem_of(opt, p):
    """RAMDA's subproblem of the last step: P = ∛U + ε, b = P∘W0 − V, τ = α·λ."""
    st, g = opt.state[p], opt.param_groups[0]
    P = st["grad_sq_sum"].double().pow(1 / 3) + g["eps"]
    P, b = (t.view(p.shape) for t in (P, P * st["initial"].double() - st["grad_sum"].double()))
    return P, b, st["alpha"].item() * g["lam"]


def test_l1_through_ramda_is_the_closed_form_soft_threshold():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5))
    opt = RAMDA([dict(params=[w], param_names=["w"])], lr=0.1, regularizer="l1", lam=0.5,
                keep_structured=True)
    for _ in range(3):
        opt.zero_grad()
        (w.sum() ** 2 + (w * torch.randn(6, 5)).sum()).backward()
        opt.step()
    P, b, tau = _subproblem_of(opt, w)
    expect = torch.sign(b) * (b.abs() - tau).clamp_min(0) / P  # argmin ½Pz² − bz + τ|z|
    got = opt.state[w]["structured"].view(6, 5).double()
    assert torch.allclose(got, expect.float().double(), rtol=1e-5, atol=1e-7)
    assert (got == 0).any() and (got != 0).any()


def test_nuclear_norm_through_ramda_reaches_the_subproblem_optimum():
    """Ŵ minimizes Q(Z) = ½ΣP Z² − Σ b Z + τ‖Z‖_*: no random perturbation lowers Q, and the
    singular-value threshold cut the rank."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    opt = RAMDA([dict(params=[w], param_names=["w"])], lr=0.2, regularizer="nuclear", lam=1.5,
                keep_structured=True, rtol=1e-12, max_iters=3000)
    for _ in range(3):
        opt.zero_grad()
        (w @ torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    P, b, tau = _subproblem_of(opt, w)

    def Q(z):
        return (0.5 * P * z * z - b * z).sum() + tau * torch.linalg.matrix_norm(z, ord="nuc")
    z = opt.state[w]["structured"].view(6, 4).double()
    sv = torch.linalg.svdvals(z)
    assert opt.last_stats["w"].active_groups == 3 and sv[-1] < 1e-6 * sv[0]  # rank 4 → 3
    q = Q(z)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        assert Q(z + 1e-3 * torch.randn(6, 4, generator=g, dtype=torch.float64)) >= q - 1e-9
    assert q <= Q(torch.zeros_like(z)) and q <= Q(w.detach().double())


def test_c_is_the_averaging_weight_and_torch_style_momentum_is_refused():
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    runs = {}
    for kw in (dict(c=0.2), dict(momentum=0.2)):
        w = nn.Parameter(w0.clone())
        opt = RAMDA([w], lr=0.1, **kw)
        w.grad = torch.ones_like(w)
        opt.step()
        runs[next(iter(kw))] = w.detach().clone()
        assert opt.param_groups[0]["c"] == 0.2 and "momentum" not in opt.param_groups[0]
    assert torch.equal(runs["c"], runs["momentum"])
    with pytest.raises(ValueError, match=r"pass c=0\.1"):
        RAMDA([nn.Parameter(w0.clone())], momentum=0.9)
    with pytest.raises(ValueError, match="not both"):
        RMDA([nn.Parameter(w0.clone())], c=0.1, momentum=0.1)
    RAMDA([nn.Parameter(w0.clone())], c=0.9)  # the paper's c may be large when asked for by name
    with pytest.raises(ValueError, match="momentum=0.95 looks like"):
        ProxSGD([dict(params=[nn.Parameter(w0.clone())], momentum=0.95)])
