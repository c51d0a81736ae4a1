"""The subproblem solvers against the optimality conditions of the subproblem."""


import pytest
import torch

from ramda_ds.groups import SegmentGroups, layout_for
from ramda_ds.solvers import (Subproblem, singular_value_threshold, solve_exact, solve_l1,
                              solve_nuclear_pg, solve_pg)

F64 = torch.float64


def random_problem(shape=(9, 14), rule="input", tau=None, dtype=F64, spread=3.0):
    """A subproblem whose τ (default: the median group norm of b) zeroes about half the groups."""
    lay = layout_for(shape, rule)
    P = torch.rand(lay.numel, dtype=dtype) * spread + 0.05
    W0 = torch.randn(lay.numel, dtype=dtype)
    V = torch.randn(lay.numel, dtype=dtype) * 2
    b = P * W0 - V
    if tau is None:
        tau = b.view(lay.rows, lay.groups, lay.inner).norm(dim=(0, 2)).median().item() * 1.01
    const = (0.5 * P * W0 - V).mul(W0)
    return lay, dict(P=P, b=b, W0=W0, V=V, tau=tau, const=const)


def make(lay, d, z=None):
    z = d["W0"].clone() if z is None else z
    return Subproblem(SegmentGroups(lay), d["P"], d["b"], d["tau"], z, d["const"])


def objective(lay, d, z, only_unscreened=False):
    """Q(z); with only_unscreened, summed over the groups with ‖b_g‖ > τ (the solver's Q)."""
    R, C, K = lay.rows, lay.groups, lay.inner
    P, b, c = (d[k].view(R, C, K) for k in ("P", "b", "const"))
    Z = z.view(R, C, K)
    per_group = ((0.5 * P * Z - b) * Z + c).sum(dim=(0, 2)) + d["tau"] * Z.norm(dim=(0, 2))
    if only_unscreened:
        per_group = per_group[b.norm(dim=(0, 2)) > d["tau"]]
    return per_group.sum().item()


def kkt_residual(lay, d, z):
    """Min-norm subgradient of Q at z, per group (0 at the exact minimizer)."""
    R, C, K = lay.rows, lay.groups, lay.inner
    Z, P, b = (t.view(R, C, K) for t in (z, d["P"], d["b"]))
    n = Z.norm(dim=(0, 2), keepdim=True)
    grad = P * Z - b
    nonzero = (grad + d["tau"] * Z / n.clamp_min(1e-300)).norm(dim=(0, 2))
    zero = (b.norm(dim=(0, 2)) - d["tau"]).clamp_min(0)
    return torch.where(n.view(-1) > 0, nonzero, zero)


@pytest.mark.parametrize("shape,rule", [((9, 14), "input"), ((6, 4, 3), "input"),
                                        ((8, 12), "head:3"), ((5, 7), "output")])
def test_exact_solver_satisfies_kkt(shape, rule):
    lay, d = random_problem(shape, rule)
    z = d["W0"].clone()
    solve_exact([make(lay, d, z)])
    res = kkt_residual(lay, d, z)
    assert res.max() < 1e-10
    zero = z.view(lay.rows, lay.groups, lay.inner).abs().amax(dim=(0, 2)) == 0
    assert 0 < zero.sum() < lay.groups  # the test problem exercises both kinds of group


def test_pg_reaches_the_exact_solution_and_stats_are_consistent():
    lay, d = random_problem()
    z_pg, z_ex = d["W0"].clone(), d["W0"].clone()
    [st] = solve_pg([make(lay, d, z_pg)], max_iters=5000, rtol=0.0, residual_tol=1e-11)
    solve_exact([make(lay, d, z_ex)])
    torch.testing.assert_close(z_pg, z_ex, atol=1e-9, rtol=1e-9)
    assert st.objective == pytest.approx(objective(lay, d, z_pg, only_unscreened=True), rel=1e-12)
    assert st.objective != pytest.approx(objective(lay, d, z_pg), rel=1e-3)
    assert st.residual <= 1e-11
    assert st.active_groups + st.screened_groups == lay.groups


def test_pg_reported_residual_bounds_the_true_subgradient_and_decreases_q():
    lay, d = random_problem(spread=10.0)
    w = d["W0"] + 0.1 * torch.randn_like(d["W0"])
    z = w.clone()
    [st] = solve_pg([make(lay, d, z)], max_iters=3, rtol=0.0)
    assert st.iterations == 3
    assert kkt_residual(lay, d, z).norm() <= st.residual * (1 + 1e-9)
    assert objective(lay, d, z) <= objective(lay, d, w)  # second half of condition (7)
    [st2] = solve_pg([make(lay, d, z.clone())], max_iters=1000, residual_tol=1e-3)
    assert st2.residual <= 1e-3 and st2.iterations > 1


def test_pg_early_stop_rule_needs_two_iterations_and_tolerance():
    lay, d = random_problem()
    [loose] = solve_pg([make(lay, d)], rtol=1e-1)
    [tight] = solve_pg([make(lay, d)], rtol=1e-14, max_iters=10000)
    assert loose.iterations >= 2
    assert tight.iterations > loose.iterations
    [capped] = solve_pg([make(lay, d)], rtol=0.0, max_iters=7)
    assert capped.iterations == 7


def test_screening_is_exact_near_the_threshold():
    """Groups with ‖b_g‖ just below τ are zero, just above are nonzero, whatever PG does."""
    lay = layout_for((5, 40), "input")
    P = torch.rand(lay.numel, dtype=F64) + 0.5
    b = torch.randn(lay.numel, dtype=F64).view(5, 40)
    tau = 1.0
    scale = torch.linspace(0.99, 1.01, 40, dtype=F64)  # half the groups below τ, half above
    b = (b / b.norm(dim=0) * tau * scale).reshape(-1)
    d = dict(P=P, b=b, W0=torch.zeros_like(b), tau=tau, const=torch.zeros_like(b))
    z_pg, z_ex = torch.randn_like(b), torch.zeros_like(b)
    solve_pg([make(lay, d, z_pg)], max_iters=3)  # few iterations: zeros come from screening
    solve_exact([make(lay, d, z_ex)])
    for z in (z_pg, z_ex):
        nonzero = z.view(5, 40).norm(dim=0) > 0
        assert torch.equal(nonzero, scale > 1)


def test_batched_solve_equals_one_at_a_time():
    problems = [random_problem(s, r) for s, r in [((9, 14), "input"), ((6, 4, 3), "input"),
                                                   ((3, 3), "element")]]
    together = [d["W0"].clone() for _, d in problems]
    solve_pg([make(lay, d, z) for (lay, d), z in zip(problems, together)])
    for (lay, d), z in zip(problems, together):
        alone = d["W0"].clone()
        solve_pg([make(lay, d, alone)])
        assert torch.equal(alone, z)


def test_l1_closed_form_equals_pg_with_one_element_groups():
    lay, d = random_problem((6, 7), "element")
    z_cf, z_pg = torch.empty_like(d["b"]), d["W0"].clone()
    solve_l1(make(lay, d, z_cf))
    solve_pg([make(lay, d, z_pg)], max_iters=10000, rtol=0.0, residual_tol=1e-12)
    torch.testing.assert_close(z_cf, z_pg, atol=1e-10, rtol=0)
    assert (z_cf == 0).any() and (z_cf != 0).any()


def test_nuclear_pg_with_constant_preconditioner_is_singular_value_thresholding():
    shape, p = (6, 4), 2.5
    b = torch.randn(shape, dtype=F64) * 3
    tau = torch.linalg.svdvals(b)[1:3].mean().item()  # keeps the top 2 singular values
    P = torch.full((24,), p, dtype=F64)
    z = torch.zeros(24, dtype=F64)
    st = solve_nuclear_pg(Subproblem(None, P, b.view(-1), tau, z), shape)
    expected = singular_value_threshold(b / p, tau / p)
    torch.testing.assert_close(z.view(shape), expected)
    assert st.active_groups == 2 and st.screened_groups == 2  # rank 4 -> 2


def test_exact_solver_fp32_is_accurate_and_fast():
    lay, d = random_problem((64, 32), dtype=torch.float32)
    d["b"] = d["b"].float()
    z = d["W0"].clone().float()
    [st] = solve_exact([make(lay, d, z)])
    assert st.iterations <= 8
    assert kkt_residual(lay, {k: (v.double() if torch.is_tensor(v) else v) for k, v in d.items()},
                        z.double()).max() < 1e-4 * d["b"].abs().max()
