"""Tests for the RMOD worst-case weight solver (moalign.decoding.worst_case).

References used here are independent of the solver: scipy's SLSQP on the simplex (multi-start), scipy's
linprog for the lam -> inf limit, closed forms (G = 1, identical / dominating objectives, small lam), autograd
of a naive float64 formula for the gradient, and a literal transcription of the public reference code's
weight loop for ``method="reference"``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from scipy.special import logsumexp
from scipy.stats import chi2

from moalign.decoding.worst_case import (
    WeightSolution,
    rmod_objective,
    select_candidates,
    solve_worst_case_weights,
    tilted_means,
)
from moalign.errors import MoalignError

LAMS = (0.01, 0.1, 1.0, 5.0, 50.0)


def _np_objective(v: np.ndarray, w: np.ndarray, lam: float) -> float:
    return float(logsumexp(lam * v @ w) - math.log(v.shape[0]))


def _scipy_solve(v: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
    """Generic reference: SLSQP on the simplex from the centre and from near every vertex; best result."""
    k, g = v.shape

    def f(w: np.ndarray) -> float:
        return _np_objective(v, w, lam)

    def jac(w: np.ndarray) -> np.ndarray:
        s = lam * v @ w
        p = np.exp(s - logsumexp(s))
        return lam * p @ v

    starts = [np.full(g, 1.0 / g)] + [0.9 * np.eye(g)[i] + 0.1 / g for i in range(g)]
    best: tuple[float, np.ndarray] | None = None
    for x0 in starts:
        res = minimize(
            f,
            x0,
            jac=jac,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * g,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(g)}],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum()
        if best is None or f(w) < best[0]:
            best = (f(w), w)
    assert best is not None
    return best


def _random_instances(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = int(rng.integers(2, 17))
        g = int(rng.integers(1, 11))
        lam = LAMS[i % len(LAMS)]
        scale = float(rng.choice([0.3, 1.0, 3.0]))
        yield rng.normal(size=(k, g)) * scale + rng.normal(), lam


def _literal_reference(adv: torch.Tensor, lam: float, iters: int = 10, step: float = 1.0) -> torch.Tensor:
    """Transcription of the public reference code's weight loop for one prompt (bf16 values ``[K, G]``)."""
    num_group = adv.shape[1]
    logits = torch.zeros([num_group, 1], requires_grad=True)
    for it in range(iters):
        logits.retain_grad()
        w = torch.softmax(logits, dim=0).to(torch.bfloat16)
        loss = torch.exp(lam * adv.detach() @ w.to(adv.dtype)).mean()
        loss.backward()
        grad = torch.clamp(logits.grad, min=-10, max=10)
        logits = logits - (step / torch.sqrt(torch.tensor(it + 1))) * grad.view(num_group, 1)
    return torch.softmax(logits, dim=0).view(num_group).detach()


# ------------------------------------------------------------------------------------------ objective


def test_objective_matches_stable_numpy_and_survives_overflow():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 7, 4)) * 40.0  # lam * v up to ~6000: a naive exp overflows
    w = rng.dirichlet(np.ones(4), size=3)
    for lam in (0.1, 50.0):
        got = rmod_objective(torch.tensor(v), torch.tensor(w), lam)
        assert got.dtype == torch.float64 and got.shape == (3,)
        want = [_np_objective(v[i], w[i], lam) for i in range(3)]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-10)
        assert torch.isfinite(got).all()
    # unbatched input, [G] weights broadcast over prompts
    one = rmod_objective(torch.tensor(v[0]), torch.tensor(w[0]), 2.0)
    assert one.shape == () and float(one) == pytest.approx(_np_objective(v[0], w[0], 2.0), rel=1e-12)
    bcast = rmod_objective(torch.tensor(v), torch.tensor(w[0]), 2.0)
    np.testing.assert_allclose(bcast.numpy(), [_np_objective(v[i], w[0], 2.0) for i in range(3)], rtol=1e-12)


def test_tilted_means_are_gradient_over_lam():
    torch.manual_seed(1)
    v = torch.randn(4, 9, 5, dtype=torch.float64)
    w = torch.rand(4, 5, dtype=torch.float64)
    lam = 3.0
    wg = w.clone().requires_grad_(True)
    naive = torch.log(torch.exp(lam * torch.einsum("pkg,pg->pk", v, wg)).mean(dim=-1)).sum()
    (grad,) = torch.autograd.grad(naive, wg)
    torch.testing.assert_close(tilted_means(v, w, lam), grad / lam, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------- exact vs references


def test_exact_solver_matches_scipy_on_random_matrices():
    for idx, (v, lam) in enumerate(_random_instances(60, seed=2)):
        sol = solve_worst_case_weights(torch.tensor(v), lam)
        ref_obj, ref_w = _scipy_solve(v, lam)
        ours = float(sol.objective)
        assert bool(sol.converged), (idx, lam, v.shape)
        assert abs(ours - ref_obj) <= 1e-6, (idx, lam, v.shape, ours, ref_obj)
        # the certificate: no point of the simplex (in particular scipy's) is better than L(w) - gap
        assert ref_obj >= ours - float(sol.gap) - 1e-12
        w = sol.weights.numpy()
        assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-12
        assert ours == pytest.approx(_np_objective(v, w, lam), abs=1e-12)
        k, g = v.shape
        if k > g and lam >= 0.1:  # random values with K > G: strictly convex on the simplex, unique optimum
            np.testing.assert_allclose(w, ref_w, atol=2e-4, err_msg=f"instance {idx}, lam {lam}")


def test_large_lam_approaches_minimax_linear_program():
    rng = np.random.default_rng(3)
    for _ in range(5):
        k, g = 10, 4
        v = rng.normal(size=(k, g))
        # min_w max_k v_k.w on the simplex as an LP in (w, t): minimise t s.t. v w <= t
        lp = linprog(
            c=np.r_[np.zeros(g), 1.0],
            A_ub=np.c_[v, -np.ones(k)],
            b_ub=np.zeros(k),
            A_eq=np.r_[np.ones(g), 0.0][None, :],
            b_eq=[1.0],
            bounds=[(0, None)] * g + [(None, None)],
        )
        lam = 1e4
        sol = solve_worst_case_weights(torch.tensor(v), lam)
        assert bool(sol.converged)
        # max_k s_k - log K <= L <= max_k s_k: L / lam is within log(K) / lam of the LP value
        assert abs(float(sol.objective) / lam - lp.fun) <= math.log(k) / lam + 1e-9


# -------------------------------------------------------------------------------------- closed forms


def test_single_objective_puts_all_weight_on_it():
    v = torch.randn(3, 6, 1, dtype=torch.float64)
    sol = solve_worst_case_weights(v, 2.0)
    assert torch.equal(sol.weights, torch.ones(3, 1, dtype=torch.float64))
    want = torch.logsumexp(2.0 * v[..., 0], dim=-1) - math.log(6)
    torch.testing.assert_close(sol.objective, want, rtol=1e-13, atol=1e-13)
    assert torch.all(sol.gap == 0) and sol.converged.all()


def test_identical_objectives_give_the_single_objective_value():
    torch.manual_seed(4)
    col = torch.randn(2, 8, 1, dtype=torch.float64)
    v = col.expand(2, 8, 5).contiguous()
    lam = 1.5
    want = torch.logsumexp(lam * col[..., 0], dim=-1) - math.log(8)
    sol = solve_worst_case_weights(v, lam)
    torch.testing.assert_close(sol.objective, want, rtol=1e-12, atol=1e-12)
    for w in (
        torch.full((5,), 0.2, dtype=torch.float64),
        torch.tensor([0.7, 0.0, 0.1, 0.2, 0.0], dtype=torch.float64),
    ):
        torch.testing.assert_close(rmod_objective(v, w, lam), want, rtol=1e-12, atol=1e-12)


def test_dominated_objective_takes_all_weight():
    rng = np.random.default_rng(5)
    for lam in LAMS:
        v = rng.normal(size=(12, 4))
        g = int(rng.integers(4))
        v[:, g] = v.min(axis=1) - rng.uniform(0.01, 1.0, size=12)  # strictly below every other objective
        sol = solve_worst_case_weights(torch.tensor(v), lam)
        assert float(sol.weights[g]) > 1 - 1e-9, (lam, sol.weights)
        assert float(sol.objective) == pytest.approx(_np_objective(v, np.eye(4)[g], lam), abs=1e-12)


def test_small_lam_picks_the_lowest_mean_objective():
    rng = np.random.default_rng(6)
    for _ in range(10):
        v = rng.normal(size=(16, 6))
        means = v.mean(axis=0)
        order = np.sort(means)
        if order[1] - order[0] < 0.05:
            continue
        sol = solve_worst_case_weights(torch.tensor(v), 1e-5)
        assert int(sol.weights.argmax()) == int(means.argmin())
        assert float(sol.weights.max()) > 1 - 1e-9


def test_kkt_conditions_via_tilted_means():
    torch.manual_seed(7)
    for lam in LAMS:
        v = torch.randn(20, 16, 6, dtype=torch.float64)
        sol = solve_worst_case_weights(v, lam)
        m = tilted_means(v, sol.weights, lam)
        level = (m * sol.weights).sum(dim=-1, keepdim=True)
        pos = sol.weights > 1e-8
        tol = 1e-7
        # equal tilted means on the support, all others at least as large (the weight goes to the weakest)
        assert torch.all(torch.where(pos, (m - level).abs(), torch.zeros_like(m)) <= tol)
        assert torch.all(m >= level - tol)
        # the reported gap is lam * (m.w - min m)
        torch.testing.assert_close(
            sol.gap, lam * (level[:, 0] - m.amin(dim=-1)).clamp_min(0), atol=1e-12, rtol=0
        )
        assert sol.converged.all() and torch.all(sol.gap <= 1e-9 * sol.objective.abs().clamp_min(1.0))


def test_offset_invariance():
    torch.manual_seed(8)
    v = torch.randn(5, 10, 4, dtype=torch.float64)
    lam = 2.0
    base = solve_worst_case_weights(v, lam)
    shifted = solve_worst_case_weights(v + 1000.0, lam)
    torch.testing.assert_close(shifted.weights, base.weights, atol=1e-7, rtol=0)
    torch.testing.assert_close(shifted.objective, base.objective + lam * 1000.0, atol=1e-8, rtol=1e-13)


# --------------------------------------------------------------------------------- batching and masks


def test_batch_equals_per_row_and_per_row_lam():
    torch.manual_seed(9)
    v = torch.randn(6, 12, 5, dtype=torch.float64) * 2
    lams = torch.tensor([0.01, 0.1, 1.0, 5.0, 50.0, 2.0], dtype=torch.float64)
    batch = solve_worst_case_weights(v, lams)
    assert (
        isinstance(batch, WeightSolution) and batch.weights.shape == (6, 5) and batch.objective.shape == (6,)
    )
    for i in range(6):
        row = solve_worst_case_weights(v[i], float(lams[i]))
        assert row.weights.shape == (5,) and row.objective.shape == ()
        torch.testing.assert_close(batch.weights[i], row.weights, atol=1e-7, rtol=0)
        torch.testing.assert_close(batch.objective[i], row.objective, atol=1e-10, rtol=1e-12)
    same = solve_worst_case_weights(v, 5.0)
    torch.testing.assert_close(same.objective[3], batch.objective[3], atol=1e-10, rtol=1e-12)


def test_mask_equals_solving_the_submatrix():
    torch.manual_seed(10)
    v = torch.randn(3, 10, 4, dtype=torch.float64)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, [1, 4, 7]] = False
    mask[2, 3:] = False
    v_garbage = v.clone()
    v_garbage[~mask] = float("nan")  # masked values are ignored, even NaN
    lam = 3.0
    sol = solve_worst_case_weights(v_garbage, lam, mask=mask)
    for i in range(3):
        sub = v[i][mask[i]]
        ref = solve_worst_case_weights(sub, lam)
        torch.testing.assert_close(sol.weights[i], ref.weights, atol=1e-7, rtol=0)
        torch.testing.assert_close(sol.objective[i], ref.objective, atol=1e-10, rtol=1e-12)
        obj = rmod_objective(v_garbage[i], sol.weights[i], lam, mask=mask[i])
        assert float(obj) == pytest.approx(_np_objective(sub.numpy(), sol.weights[i].numpy(), lam), abs=1e-12)
    picks = select_candidates(v_garbage, sol.weights, lam, rule="argmax", mask=mask)
    assert mask[torch.arange(3), picks].all()
    g = torch.Generator().manual_seed(0)
    many = select_candidates(
        v_garbage.repeat(50, 1, 1),
        sol.weights.repeat(50, 1),
        lam,
        rule="sample",
        generator=g,
        mask=mask.repeat(50, 1),
    )
    assert mask.repeat(50, 1)[torch.arange(150), many].all()
    bad = mask.clone()
    bad[1] = False
    with pytest.raises(MoalignError, match="no valid candidate"):
        solve_worst_case_weights(v, lam, mask=bad)


def test_empty_batch_and_dtypes():
    empty = solve_worst_case_weights(torch.zeros(0, 4, 3), 1.0)
    assert empty.weights.shape == (0, 3) and empty.converged.shape == (0,)
    v = torch.randn(2, 8, 3)
    assert solve_worst_case_weights(v, 1.0).weights.dtype == torch.float32
    assert solve_worst_case_weights(v.double(), 1.0).weights.dtype == torch.float64
    bf = solve_worst_case_weights(v.bfloat16(), 1.0)
    assert bf.weights.dtype == torch.float32
    # the float32 result is the float64 optimum rounded, not a float32 computation
    exact64 = solve_worst_case_weights(v.double(), 1.0)
    torch.testing.assert_close(
        solve_worst_case_weights(v, 1.0).objective.double(), exact64.objective, atol=1e-6, rtol=0
    )


# ---------------------------------------------------------------------------------- reference method


def test_reference_method_matches_literal_transcription():
    torch.manual_seed(11)
    v = torch.randn(12, 16, 4).to(torch.bfloat16)
    for lam in (0.1, 1.0, 5.0):
        sol = solve_worst_case_weights(v, lam, method="reference")
        assert sol.method == "reference" and sol.iterations == 10
        for i in range(12):
            torch.testing.assert_close(sol.weights[i], _literal_reference(v[i], lam), atol=1e-2, rtol=0)


def test_exact_beats_reference_which_does_not_converge():
    torch.manual_seed(12)
    for lam in (0.1, 1.0, 5.0, 50.0):
        v = torch.randn(40, 12, 5, dtype=torch.float64)
        exact = solve_worst_case_weights(v, lam)
        ref = solve_worst_case_weights(v, lam, method="reference")
        assert torch.isfinite(ref.weights).all()  # also when the bf16 exponential overflows (lam = 50)
        diff = ref.objective - exact.objective
        assert torch.all(diff >= -1e-12)
        assert (diff > 1e-3 * lam).float().mean() >= 0.75, (lam, diff)
        assert ref.converged.float().mean() <= 0.1 and bool(exact.converged.all())
        assert torch.all(ref.gap >= ref.objective - exact.objective - 1e-12)  # its gap is still a certificate
    # lam = 0.1: the reference barely leaves uniform weights while the optimum sits on a vertex
    v = torch.randn(50, 12, 5, dtype=torch.float64)
    ref = solve_worst_case_weights(v, 0.1, method="reference")
    exact = solve_worst_case_weights(v, 0.1)
    assert (ref.weights - 0.2).abs().max() < 0.05
    assert exact.weights.amax(dim=-1).median() > 0.99


def test_reference_method_under_inference_mode():
    with torch.inference_mode():
        v = torch.randn(2, 8, 3)
        sol = solve_worst_case_weights(v, 1.0, method="reference")
    assert sol.weights.shape == (2, 3) and torch.isfinite(sol.weights).all()


# ---------------------------------------------------------------------------------------- selection


def test_argmax_rule():
    torch.manual_seed(13)
    v = torch.randn(7, 11, 3, dtype=torch.float64)
    w = torch.softmax(torch.randn(7, 3, dtype=torch.float64), dim=-1)
    got = select_candidates(v, w, rule="argmax")
    want = np.argmax(np.einsum("pkg,pg->pk", v.numpy(), w.numpy()), axis=1)
    assert got.dtype == torch.long and got.tolist() == want.tolist()
    assert int(select_candidates(v[0], w[0])) == int(want[0])


def test_sample_rule_reproducible_and_matches_softmax():
    torch.manual_seed(14)
    k, g, lam = 6, 3, 2.0
    v = torch.randn(k, g, dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    n = 20000
    vb = v.expand(n, k, g)
    a = select_candidates(vb, w, lam, rule="sample", generator=torch.Generator().manual_seed(123))
    b = select_candidates(vb, w, lam, rule="sample", generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    counts = torch.bincount(a, minlength=k).numpy().astype(float)
    probs = torch.softmax(lam * v @ w, dim=0).numpy()
    stat = float(((counts - n * probs) ** 2 / (n * probs)).sum())
    assert stat < chi2.ppf(0.999, df=k - 1), (counts / n, probs)


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"v": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, "NaN/infinite"),
        ({"v": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])}, "NaN/infinite"),
        ({"v": torch.ones(3)}, r"shape \[K, G\] or \[P, K, G\]"),
        ({"v": torch.ones(1, 2, 3, 4)}, r"shape \[K, G\] or \[P, K, G\]"),
        ({"v": torch.ones(0, 3)}, "at least one candidate"),
        ({"lam": 0.0}, "lam must be finite and > 0"),
        ({"lam": -1.0}, "lam must be finite and > 0"),
        ({"lam": float("nan")}, "lam must be finite and > 0"),
        ({"lam": float("inf")}, "lam must be finite and > 0"),
        ({"lam": True}, "lam must be"),
        ({"lam": torch.ones(5)}, r"lam must be a scalar or a \[P\]"),
        ({"mask": torch.ones(4, dtype=torch.bool)}, "mask must have shape"),
        ({"mask": torch.ones(2, 3)}, "mask must be a bool tensor"),
        ({"method": "adam"}, "method must be"),
        ({"tol": -1.0}, "tol must be"),
        ({"max_iter": -1}, "max_iter must be"),
    ],
)
def test_solver_input_validation(kwargs, match):
    args = {"v": torch.randn(2, 3), "lam": 1.0} | kwargs
    v, lam = args.pop("v"), args.pop("lam")
    with pytest.raises(MoalignError, match=match):
        solve_worst_case_weights(v, lam, **args)


def test_other_functions_validate_input():
    v = torch.randn(2, 4, 3)
    with pytest.raises(MoalignError, match="weights w must have shape"):
        rmod_objective(v, torch.ones(4), 1.0)
    with pytest.raises(MoalignError, match="NaN or infinite"):
        tilted_means(v, torch.tensor([0.5, float("nan"), 0.5]), 1.0)
    with pytest.raises(MoalignError, match="rule must be"):
        select_candidates(v, torch.ones(3), 1.0, rule="best")
    with pytest.raises(MoalignError, match="needs lam"):
        select_candidates(v, torch.ones(3), None, rule="sample")
    with pytest.raises(MoalignError, match="lam must be finite"):
        tilted_means(v, torch.ones(3), -2.0)
