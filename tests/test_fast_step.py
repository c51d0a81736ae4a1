"""The fast step's pieces: position-independent cube root, chunked elementwise stage, warm-started
exact solver — each against the plain computation it replaces."""

import pytest
import torch

import ramda_ds.stages as stages
from ramda_ds.cube_root import cube_root
from ramda_ds.groups import SegmentGroups, layout_for
from ramda_ds.optim import RAMDA
from ramda_ds.param_groups import build_param_groups
from ramda_ds.solvers import Subproblem, solve_exact


def wide_range(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g) * 10.0 ** torch.randint(-37, 38, (n,), generator=g).float()
    x[::97] = 0.0
    return x


def ulps(a, b):
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def test_cube_root_is_within_one_ulp_and_exact_at_zero():
    x = wide_range(200_000)
    y, ref = cube_root(x), x.double().pow(1 / 3).float()
    normal = x >= torch.finfo(torch.float32).tiny
    assert ulps(y, ref)[normal].max() <= 1
    assert (ulps(y, ref)[normal] == 0).float().mean() > 0.85  # mostly correctly rounded
    assert torch.equal(y[x == 0], x[x == 0])
    sub = torch.tensor([1e-40, 1e-45, 1.1e-38])
    out = cube_root(sub)
    assert (out > 0).all() and (out < 1e-12).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_cube_root_of_a_slice_is_the_slice_of_the_cube_root(threads):
    """What sharded == unsharded needs: an element's bits do not depend on where it sits."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = wide_range(100_003, seed=1)
        full = cube_root(x)
        for lo, hi in [(1, 100_003), (3, 40_000), (32_767, 70_001), (12_345, 12_350)]:
            assert torch.equal(cube_root(x[lo:hi]), full[lo:hi]), (lo, hi)
    finally:
        torch.set_num_threads(old)


def test_chunked_stage_equals_the_whole_tensor_ops(monkeypatch):
    monkeypatch.setattr(stages, "_STAGE_CHUNK", 1000)  # many chunks and a ragged tail
    g = torch.Generator().manual_seed(2)
    n = 4321
    grad, V, U, W0 = (torch.randn(n, generator=g) for _ in range(4))
    U = U.abs()
    V2, U2 = V.clone(), U.clone()
    s, eps = 0.37, 1e-6
    P, b, const = stages.dual_averaging_stage(grad, V, U, W0, s, eps, want_const=True)
    V2.add_(grad, alpha=s)
    U2.addcmul_(grad, grad, value=s)
    P2 = cube_root(U2).add_(eps)
    for got, want in [(V, V2), (U, U2), (P, P2), (b, P2 * W0 - V2),
                      (const, (0.5 * P2 * W0 - V2).mul_(W0))]:
        assert torch.equal(got, want)
    assert stages.dual_averaging_stage(grad, V, U, W0, s, eps, want_const=False)[2] is None


def test_warm_started_exact_solver_finds_the_same_root_in_fewer_passes():
    g = torch.Generator().manual_seed(3)
    lay = layout_for((64, 48), "input")
    P = torch.rand(lay.numel, generator=g) * 3 + 0.05
    b = torch.randn(lay.numel, generator=g)
    tau = b.view(64, 48).norm(dim=0).median().item()

    def solve(P, b, mu=None):
        z = torch.empty_like(b)
        prob = Subproblem(SegmentGroups(lay), P, b, tau, z, root_at=mu)
        [st] = solve_exact([prob])
        return z, prob.root_at, st.iterations

    _, mu, _ = solve(P, b)
    P2, b2 = P * 1.01 + 0.001, b + 0.01 * torch.randn(lay.numel, generator=g)  # the next step
    cold, mu_cold, it_cold = solve(P2, b2)
    warm, mu_warm, it_warm = solve(P2, b2, mu)
    assert it_warm < it_cold
    torch.testing.assert_close(warm, cold, rtol=1e-5, atol=1e-6)  # both within the solver tol
    torch.testing.assert_close(mu_warm, mu_cold, rtol=0, atol=1e-4)
    _, _, it_same = solve(P2, b2, mu_cold)  # starting at the root: converged at the first pass
    assert it_same == 1


def test_warm_start_through_the_optimizer_stays_on_the_cold_trajectory():
    def run(warm):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Tanh(), torch.nn.Linear(40, 5))
        opt = RAMDA(build_param_groups(model, "group_lasso", lam=3e-3), lr=0.05, solver="exact",
                    warm_start=warm, keep_structured=True)
        gen = torch.Generator().manual_seed(1)
        passes = 0
        for _ in range(15):
            x = torch.randn(32, 30, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), x[:, :5].sin()).backward()  # 25 useless inputs
            opt.step()
            passes += sum(s.iterations for s in opt.last_stats.values())
        return model, passes, opt.state[model[0].weight]["structured"].view(40, 30)

    (cold, n_cold, hat_cold), (warm, n_warm, hat_warm) = run(False), run(True)
    assert n_warm < n_cold
    for a, b in zip(cold.parameters(), warm.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    zero = (hat_cold == 0).all(dim=0)
    assert zero.any() and not zero.all()  # Ŵ has zero and nonzero groups,
    assert torch.equal(zero, (hat_warm == 0).all(dim=0))  # the same ones


def test_warm_start_must_be_a_bool():
    with pytest.raises(ValueError, match="warm_start"):
        RAMDA([torch.nn.Parameter(torch.zeros(2, 2))], solver="exact", warm_start="yes")


def test_group_dot_equals_the_float64_sum_of_products_on_every_cut():
    lay = layout_for((13, 17, 3), "input")
    g = torch.Generator().manual_seed(4)
    x, y, z = (torch.randn(lay.numel, generator=g) for _ in range(3))
    want = (x.double() * y.double() * z.double()).view(13, 17, 3).sum(dim=(0, 2))
    for lo, hi in [(0, lay.numel), (5, 400), (51, 52), (100, lay.numel)]:
        seg = SegmentGroups(lay, lo, hi)
        got = seg.dot(x[lo:hi], y[lo:hi], z[lo:hi])
        part = (x[lo:hi].double() * y[lo:hi].double() * z[lo:hi].double())
        ref = torch.zeros(17, dtype=torch.float64)
        idx = (torch.arange(lo, hi) // 3) % 17
        ref.index_add_(0, idx, part)
        torch.testing.assert_close(got, ref[seg.group_lo:seg.group_lo + seg.num_groups],
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(SegmentGroups(lay).dot(x, y, z), want, rtol=1e-12, atol=1e-12)
