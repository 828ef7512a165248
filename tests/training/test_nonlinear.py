"""Tests of moalign.training.nonlinear (IAMA's non-linear GRPO rewards) against independent references.

References: hand-computed closed forms, brute-force enumeration of best-of-N draws, finite differences of the
exact objectives on a small categorical response space, exact binomial/multinomial expectations for the
estimator's bias, autograd of the aggregators, and the spec's one-dimensional toy with its closed-form optimum.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from moalign.errors import MoalignError
from moalign.training.nonlinear import (
    AggregatorSpec,
    CriterionSpec,
    aggregator_value,
    aggregator_weights,
    bon_first_variation,
    bon_value,
    first_variation,
    nonlinear_rewards,
    objective_value,
    parse_aggregator,
    parse_criteria,
    parse_criterion,
    tilt_ess,
    tilt_first_variation,
    tilt_value,
)

F64 = torch.float64

# a categorical response space with 6 responses; responses 1 and 2 tie (reward 0.5)
CAT_R = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.3, 0.7], dtype=F64)
CAT_PI = torch.tensor([0.10, 0.25, 0.15, 0.20, 0.18, 0.12], dtype=F64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


# ------------------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------------------


def bon_objective_bruteforce(r: np.ndarray, p: np.ndarray, n: int) -> float:
    """E[max of n iid draws] by enumerating every n-tuple of responses."""
    total = 0.0
    for tup in itertools.product(range(len(r)), repeat=n):
        total += math.prod(p[i] for i in tup) * max(r[i] for i in tup)
    return total


def bon_objective_orderstat(r: np.ndarray, p: np.ndarray, n: int) -> float:
    """E[max of n draws] = sum over distinct values v of v * (P(r <= v)^n - P(r < v)^n)."""
    out = 0.0
    for v in np.unique(r):
        out += v * (p[r <= v].sum() ** n - p[r < v].sum() ** n)
    return out


def tilt_objective(r: np.ndarray, p: np.ndarray, tau: float) -> float:
    e = p * np.exp(r / tau)
    return float((e * r).sum() / e.sum())


def directional_derivative(objective, p: np.ndarray, y: int, h: float = 1e-5) -> float:
    """Central difference of objective(pi) along delta_y - pi (stays on the simplex)."""
    d = -p.copy()
    d[y] += 1.0
    return (objective(p + h * d) - objective(p - h * d)) / (2 * h)


def compositions(n: int, k: int) -> torch.Tensor:
    """All vectors of k non-negative integers summing to n, as a float64 tensor [S, k] (k = 4 here)."""
    assert k == 4
    a = torch.arange(n + 1)
    x, y, z = torch.meshgrid(a, a, a, indexing="ij")
    keep = (x + y + z) <= n
    x, y, z = x[keep], y[keep], z[keep]
    return torch.stack([x, y, z, n - x - y - z], dim=-1).to(F64)


def multinomial_pmf(counts: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    n = counts.sum(-1)
    logp = torch.lgamma(n + 1) - torch.lgamma(counts + 1).sum(-1) + (counts * torch.log(p)).sum(-1)
    return torch.exp(logp)


# ------------------------------------------------------------------------------------------------------
# closed forms on hand-made inputs
# ------------------------------------------------------------------------------------------------------


def test_bon_closed_form_by_hand():
    # sorted 1, 2, 2, 3; levels 1/4, 2/4, 3/4; N = 3: r~ = 0, 1*3*(1/4)^2 (both 2s), + 1*3*(3/4)^2 for the 3
    r = torch.tensor([[3.0, 1.0, 2.0, 2.0]], dtype=F64)
    got = bon_first_variation(r, 3, estimator="plugin")
    want = torch.tensor([[30 / 16, 0.0, 3 / 16, 3 / 16]], dtype=F64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    # E max of 3 draws from {1, 2, 2, 3}: 3 * (1 - (3/4)^3) + 2 * ((3/4)^3 - (1/4)^3) + 1 * (1/4)^3
    torch.testing.assert_close(bon_value(r, 3, estimator="plugin"), torch.tensor([164 / 64], dtype=F64), rtol=0,
                               atol=1e-14)  # fmt: skip
    # N = 2 on [0, 1]: levels 1/2 -> r~ = [0, 1 * 2 * 1/2]
    torch.testing.assert_close(bon_first_variation(torch.tensor([0.0, 1.0]), 2, estimator="plugin"),
                               torch.tensor([0.0, 1.0]))  # fmt: skip
    # unbiased, by hand: y = 3, the 2-subsets of the others {1, 2, 2} all have max <= 3 -> 3 * 3 = 9; y = 1 and
    # y = 2: the maxima over the others' 2-subsets are 3, 3, 2 -> 3 * 8/3 = 8
    torch.testing.assert_close(bon_first_variation(r, 3), torch.tensor([[9.0, 8.0, 8.0, 8.0]], dtype=F64),
                               rtol=0, atol=1e-13)  # fmt: skip
    # the 3-subsets of {1, 2, 2, 3} have maxima 2, 3, 3, 3 -> 11/4
    torch.testing.assert_close(bon_value(r, 3), torch.tensor([11 / 4], dtype=F64), rtol=0, atol=1e-14)


def test_tilt_closed_form_by_hand():
    # r = [0, 1], tau = 1: Z = (1 + e)/2, A/Z = e/(1 + e), r~ = -+ 2e/(1 + e)^2
    e = math.e
    got = tilt_first_variation(torch.tensor([0.0, 1.0], dtype=F64), 1.0)
    c = 2 * e / (1 + e) ** 2
    torch.testing.assert_close(got, torch.tensor([-c, c], dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(
        tilt_value(torch.tensor([0.0, 1.0], dtype=F64), 1.0), torch.tensor(e / (1 + e), dtype=F64)
    )
    # tau = 0.5, three values: the spec's formula with plain means
    r = torch.tensor([0.2, -0.4, 1.1], dtype=F64)
    w = torch.exp(r / 0.5)
    z, a = w.mean(), (r * w).mean()
    torch.testing.assert_close(tilt_first_variation(r, 0.5), w * (r - a / z) / z, rtol=1e-13, atol=1e-14)


def test_values_match_bruteforce_enumeration():
    g = torch.Generator().manual_seed(3)
    r = torch.round(torch.rand(5, generator=g, dtype=F64) * 4) / 4  # ties likely
    p = torch.rand(5, generator=g, dtype=F64) + 0.05
    p = p / p.sum()
    for n in (1, 2, 3, 4):
        want_emp = bon_objective_bruteforce(r.numpy(), np.full(5, 0.2), n)
        assert bon_value(r, n, estimator="plugin").item() == pytest.approx(want_emp, abs=1e-13)
        want = bon_objective_bruteforce(r.numpy(), p.numpy(), n)
        assert bon_value(r, n, probs=p).item() == pytest.approx(want, abs=1e-13)
    for tau in (0.1, 1.0, 7.0):
        assert tilt_value(r, tau, probs=p).item() == pytest.approx(
            tilt_objective(r.numpy(), p.numpy(), tau), abs=1e-13
        )


def test_invariances_and_stability():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 7, generator=g, dtype=F64)
    perm = torch.randperm(7, generator=g)

    def centred(x):
        return x - x.mean(-1, keepdim=True)

    for fn in (lambda x: bon_first_variation(x, 4), lambda x: bon_first_variation(x, 4, estimator="plugin"),
               lambda x: tilt_first_variation(x, 0.3)):  # fmt: skip
        # permutation equivariant, shift invariant once centred (what GRPO uses)
        torch.testing.assert_close(fn(r[:, perm]), fn(r)[:, perm], rtol=0, atol=1e-13)
        torch.testing.assert_close(centred(fn(r + 123.0)), centred(fn(r)), rtol=0, atol=1e-10)
    # large r / tau does not overflow
    out = tilt_first_variation(torch.tensor([1000.0, 0.0, 999.0], dtype=F64), 0.01)
    assert torch.isfinite(out).all()
    assert abs(out.mean().item()) < 1e-9  # centred under the group
    # float32 in -> float32 out; integer in -> float64 out
    assert bon_first_variation(torch.tensor([1.0, 2.0]), 2).dtype == torch.float32
    assert tilt_first_variation(torch.tensor([1, 2]), 1.0).dtype == F64


# ------------------------------------------------------------------------------------------------------
# ties, probs path, N = 1
# ------------------------------------------------------------------------------------------------------


def test_ties_share_a_level_and_counts_equal_expanded_group():
    """probs = counts / M on the distinct values gives exactly the estimate of the expanded group (with ties)."""
    g = torch.Generator().manual_seed(1)
    support = torch.tensor([0.0, 0.3, 0.55, 1.0], dtype=F64)
    for _ in range(5):
        counts = torch.randint(0, 4, (4,), generator=g)
        counts[int(torch.randint(0, 4, (1,), generator=g))] += 1
        m = int(counts.sum())
        idx = torch.repeat_interleave(torch.arange(4), counts)
        idx = idx[torch.randperm(m, generator=g)]
        group = support[idx]
        for spec in (
            CriterionSpec("a", "bon", 3),
            CriterionSpec("a", "bon", 1),
            CriterionSpec("a", "tilt", 0.4),
        ):
            for est in ("unbiased", "plugin"):
                if spec.method == "bon" and spec.param > m:
                    continue
                fv = first_variation(group, spec, estimator=est)
                for k in range(4):  # tied completions get exactly the same value
                    members = fv[idx == k]
                    if len(members):
                        assert (members == members[0]).all()
            fv = first_variation(group, spec, estimator="plugin")
            via_probs = first_variation(support, spec, probs=counts.to(F64) / m)
            present = counts > 0
            got, want = fv[torch.argsort(idx)].unique_consecutive(), via_probs[present]
            if spec.param == 1:  # with probs, bon:1 is r - (smallest listed reward, even with no mass)
                want = want - want[0]
            torch.testing.assert_close(got, want)
            assert objective_value(group, spec, estimator="plugin").item() == pytest.approx(
                objective_value(support, spec, probs=counts.to(F64)).item(), abs=1e-13
            )


def test_n1_is_plain_grpo():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(4, 8, generator=g, dtype=F64)
    r[0, :3] = r[0, 3]  # ties
    out = bon_first_variation(r, 1, estimator="plugin")
    torch.testing.assert_close(out, r - r.min(-1, keepdim=True).values, rtol=0, atol=1e-12)
    torch.testing.assert_close(bon_first_variation(r, 1), r, rtol=0, atol=1e-12)  # unbiased: N E[r(y)] = r(y)
    centred = out - out.mean(-1, keepdim=True)
    torch.testing.assert_close(centred, r - r.mean(-1, keepdim=True), rtol=0, atol=1e-12)
    # combined: two bon:1 criteria with a weighted sum = GRPO on the weighted reward after centring
    rr = torch.randn(4, 8, 2, generator=g, dtype=F64)
    res = nonlinear_rewards(rr, "a:bon:1,b:bon:1", AggregatorSpec("sum", (0.3, 0.7)))
    lin = rr[..., 0] * 0.3 + rr[..., 1] * 0.7
    torch.testing.assert_close(
        res.rewards - res.rewards.mean(-1, keepdim=True), lin - lin.mean(-1, keepdim=True), rtol=0, atol=1e-12
    )


def test_bon_monotone_in_own_reward():
    g = torch.Generator().manual_seed(4)
    for n in (1, 2, 4, 8):
        for _ in range(20):
            r = torch.round(torch.randn(8, generator=g, dtype=F64) * 2) / 2  # many ties
            base = bon_first_variation(r, n)
            for k in range(8):
                for up in (0.25, 0.5, 3.0, float(r.max() - r[k])):  # the last one ties with / becomes the max
                    r2 = r.clone()
                    r2[k] += up
                    assert bon_first_variation(r2, n)[k] >= base[k] - 1e-12, (n, r.tolist(), k, up)
    # the combined reward (weighted sum of bon criteria) too
    rr = torch.round(torch.randn(1, 8, 2, generator=g, dtype=F64) * 2) / 2
    base = nonlinear_rewards(rr, "a:bon:4,b:bon:2").rewards
    for k in range(8):
        r2 = rr.clone()
        r2[0, k, 1] += 0.5
        assert nonlinear_rewards(r2, "a:bon:4,b:bon:2").rewards[0, k] >= base[0, k] - 1e-12


def test_tilt_not_monotone_as_documented():
    # the exact first variation e^{r/tau}(r - A/Z)/Z decreases in r below A/Z - tau (docstring says so)
    low = tilt_first_variation(torch.tensor([-3.0, 5.0, 5.0, 5.0], dtype=F64), 1.0)[0]
    higher = tilt_first_variation(torch.tensor([-2.0, 5.0, 5.0, 5.0], dtype=F64), 1.0)[0]
    assert higher < low


# ------------------------------------------------------------------------------------------------------
# first variation vs finite differences on a categorical response space
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,param",
    [
        ("bon", 1),
        ("bon", 2),
        ("bon", 3),
        ("bon", 4),
        ("bon", 8),
        ("tilt", 0.25),
        ("tilt", 1.0),
        ("tilt", 4.0),
    ],
)
def test_first_variation_matches_finite_differences(method, param):
    r, p = CAT_R.numpy(), CAT_PI.numpy()
    if method == "bon":
        n = int(param)
        ref = bon_objective_bruteforce if n <= 4 else bon_objective_orderstat

        def objective(q):
            return ref(r, q, n)
    else:

        def objective(q):
            return tilt_objective(r, q, param)

    fd = np.array([directional_derivative(objective, p, y) for y in range(6)])
    spec = CriterionSpec("c", method, param)

    # exact probabilities: the first variation up to a constant, i.e. after centring under pi
    exact = first_variation(CAT_R, spec, probs=CAT_PI)
    exact_c = (exact - (CAT_PI * exact).sum()).numpy()
    # the objectives are polynomials / smooth ratios in pi: central differences with h = 1e-5 are ~1e-9 accurate
    np.testing.assert_allclose(exact_c, fd, rtol=0, atol=1e-7)
    assert fd[1] == pytest.approx(fd[2], abs=1e-7)  # the tied responses

    # group estimator from one large group (M = 20000), centred by the group mean
    g = torch.Generator().manual_seed(11)
    m = 20000
    idx = torch.multinomial(CAT_PI, m, replacement=True, generator=g)
    est = first_variation(CAT_R[idx], spec)
    est_c = est - est.mean()
    per_y = np.array([est_c[idx == y][0].item() for y in range(6)])
    # one group's error is O(M^-1/2): over 200 seeds the largest per-response error (over the 6 responses) has
    # RMS <= 0.010 and maximum 0.028 (bon:8; <= 0.022 for the others); 0.05 = 5 x RMS is safe for any seed and
    # still catches an O(1) error, e.g. a tie rule that gives tied rewards their average CDF level (~0.08)
    tol = 0.05
    np.testing.assert_allclose(per_y, fd, rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------------------
# estimator error O(1/M), computed exactly (multinomial enumeration, no Monte-Carlo noise)
# ------------------------------------------------------------------------------------------------------

BIAS_R = torch.tensor([0.0, 0.3, 0.55, 1.0], dtype=F64)
BIAS_PI = torch.tensor([0.3, 0.2, 0.35, 0.15], dtype=F64)
BIAS_MS = (8, 16, 32, 64, 128)


def expected_estimate(spec: CriterionSpec, m: int) -> torch.Tensor:
    """E[r~(y) | y is one of the group] for each response y: the other M-1 completions are multinomial."""
    counts = compositions(m - 1, 4)
    w = multinomial_pmf(counts, BIAS_PI)
    out = torch.empty(4, dtype=F64)
    for y in range(4):
        c = counts.clone()
        c[:, y] += 1
        # the group estimator depends on the group only through its empirical distribution (previous test)
        vals = first_variation(BIAS_R.expand(len(c), 4), spec, probs=c / m)[:, y]
        out[y] = (w * vals).sum()
    return out


@pytest.mark.parametrize("spec", [CriterionSpec("c", "bon", 4), CriterionSpec("c", "tilt", 0.5)], ids=str)
def test_estimator_error_is_order_one_over_m(spec):
    exact = first_variation(BIAS_R, spec, probs=BIAS_PI)
    errs = np.array([(expected_estimate(spec, m) - exact).abs().max().item() for m in BIAS_MS])
    slope = np.polyfit(np.log(BIAS_MS), np.log(errs), 1)[0]
    # exact expectations, so the slope differs from -1 only through the O(1/M^2) terms (observed within 0.03
    # for M = 8..128); |slope + 1| < 0.1 separates O(1/M) from O(M^-1/2) (-0.5) and an O(1) bias (~0)
    assert abs(slope + 1) < 0.1, (errs, slope)
    if spec.method == "bon":
        # the leading constant from binomial moments (bon_first_variation's docstring):
        # M * bias(y) -> sum over gaps below r(y) of gap * n (n-1) C^(n-2) ((n-2)(1-C)/2 - C)
        n = int(spec.param)
        cdf = torch.cumsum(BIAS_PI, 0)[:-1]
        gaps = BIAS_R[1:] - BIAS_R[:-1]
        terms = gaps * n * (n - 1) * cdf ** (n - 2) * ((n - 2) * (1 - cdf) / 2 - cdf)
        const = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(terms, 0)])
        bias128 = expected_estimate(spec, 128) - exact
        # the next-order terms are O(1/M): at M = 128 they move M * bias by <= 0.011 here (0.4% at the top
        # response, 0.005 absolute in the middle); wrong CDF levels such as (j + 1)/(M + 1) change it by O(1)
        torch.testing.assert_close(128 * bias128, const, rtol=0.03, atol=0.01)


# ------------------------------------------------------------------------------------------------------
# aggregators
# ------------------------------------------------------------------------------------------------------


def smooth_min_reference(values: torch.Tensor, w: torch.Tensor, gamma: float) -> torch.Tensor:
    return -torch.log((w * torch.exp(-gamma * values)).sum()) / gamma


def test_aggregator_weights():
    v = torch.tensor([0.7, 0.2, 0.5], dtype=F64)
    torch.testing.assert_close(
        aggregator_weights(v, AggregatorSpec("sum")), torch.full((3,), 1 / 3, dtype=F64)
    )
    torch.testing.assert_close(
        aggregator_weights(v, AggregatorSpec("sum", (1.0, 2.0, 0.5))),
        torch.tensor([1.0, 2.0, 0.5], dtype=F64),
    )
    torch.testing.assert_close(
        aggregator_weights(v, AggregatorSpec("min")), torch.tensor([0.0, 1.0, 0.0], dtype=F64)
    )
    tied = torch.tensor([0.2, 0.9, 0.2, 0.2], dtype=F64)
    torch.testing.assert_close(
        aggregator_weights(tied, AggregatorSpec("min")), torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3], dtype=F64)
    )
    assert aggregator_value(v, AggregatorSpec("min")).item() == pytest.approx(0.2)
    assert aggregator_value(v, AggregatorSpec("sum", (1.0, 2.0, 0.5))).item() == pytest.approx(1.35)
    # smooth-min: weights = autograd gradient of -(1/gamma) log sum w e^{-gamma R}; value likewise
    for w, gamma in (((1.0, 1.0, 1.0), 2.0), ((0.2, 0.5, 0.3), 7.0), ((1.0, 0.0, 3.0), 0.5)):
        wt = torch.tensor(w, dtype=F64)
        x = v.clone().requires_grad_(True)
        ref = smooth_min_reference(x, wt, gamma)
        (grad,) = torch.autograd.grad(ref, x)
        spec = AggregatorSpec("smooth-min", w, gamma)
        torch.testing.assert_close(aggregator_weights(v, spec), grad)
        assert aggregator_value(v, spec).item() == pytest.approx(ref.item())
    # gamma -> inf recovers min (uniform weights)
    torch.testing.assert_close(
        aggregator_weights(v, AggregatorSpec("smooth-min", gamma=1e4)),
        aggregator_weights(v, AggregatorSpec("min")),
    )


def test_combined_reward_min_and_smooth_min():
    """The aggregator acts on the batch-mean objective values of the inference-time method."""
    g = torch.Generator().manual_seed(5)
    # prompt 0: criterion b lower; prompt 1: a much lower -> batch means make a the minimum
    a = torch.tensor([[0.9, 0.8, 1.0, 0.7], [-2.0, -1.0, -1.5, -3.0]], dtype=F64)
    b = torch.tensor([[0.1, 0.3, 0.2, 0.0], [0.5, 0.4, 0.6, 0.3]], dtype=F64)
    rr = torch.stack([a, b], dim=-1)
    crit = [CriterionSpec("a", "bon", 2), CriterionSpec("b", "tilt", 0.5)]
    va = np.mean([bon_objective_bruteforce(a[i].numpy(), np.full(4, 0.25), 2) for i in range(2)])
    vb = np.mean([tilt_objective(b[i].numpy(), np.full(4, 0.25), 0.5) for i in range(2)])
    assert va < vb
    res = nonlinear_rewards(rr, crit, "min", estimator="plugin")
    torch.testing.assert_close(res.values, torch.tensor([va, vb], dtype=F64))
    torch.testing.assert_close(res.weights, torch.tensor([1.0, 0.0], dtype=F64))
    torch.testing.assert_close(res.rewards, bon_first_variation(a, 2, estimator="plugin"))
    assert res.aggregate == pytest.approx(va)

    gamma = 3.0
    res = nonlinear_rewards(rr, crit, f"smooth-min:{gamma}:1,2", estimator="plugin")
    x = torch.tensor([va, vb], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_min_reference(x, torch.tensor([1.0, 2.0], dtype=F64), gamma), x)
    torch.testing.assert_close(res.weights, grad)
    torch.testing.assert_close(
        res.rewards,
        grad[0] * bon_first_variation(a, 2, estimator="plugin") + grad[1] * tilt_first_variation(b, 0.5),
    )
    # stats a trainer logs
    s = res.stats
    assert s["a/reward_mean"] == pytest.approx(a.mean().item())
    assert s["b/reward_mean"] == pytest.approx(b.mean().item())
    assert s["a/transformed_mean"] == pytest.approx(
        bon_first_variation(a, 2, estimator="plugin").mean().item()
    )
    assert s["b/transformed_mean"] == pytest.approx(0.0, abs=1e-12)  # tilting's estimate is group-centred
    assert s["a/weight"] == pytest.approx(grad[0].item()) and s["b/weight"] == pytest.approx(grad[1].item())
    assert s["a/value"] == pytest.approx(va) and s["aggregate"] == pytest.approx(res.aggregate)
    assert s["transformed_mean"] == pytest.approx(res.rewards.mean().item())
    # float32 rewards in -> float32 out
    out32 = nonlinear_rewards(torch.randn(2, 4, 2, generator=g), crit, "sum")
    assert out32.rewards.dtype == torch.float32 and out32.rewards.shape == (2, 4)


# ------------------------------------------------------------------------------------------------------
# parsing and bad input
# ------------------------------------------------------------------------------------------------------


def test_parse_criteria_and_aggregator():
    assert parse_criterion("helpful:bon:4") == CriterionSpec("helpful", "bon", 4)
    assert parse_criterion(" harmless : tilt : 0.5 ") == CriterionSpec("harmless", "tilt", 0.5)
    assert parse_criteria("helpful:bon:4,harmless:tilt:0.5") == [
        CriterionSpec("helpful", "bon", 4),
        CriterionSpec("harmless", "tilt", 0.5),
    ]
    assert str(parse_criterion("helpful:bon:4")) == "helpful:bon:4"
    assert parse_aggregator("sum") == AggregatorSpec("sum")
    assert parse_aggregator("sum:0.3,0.7") == AggregatorSpec("sum", (0.3, 0.7))
    assert parse_aggregator("min") == AggregatorSpec("min")
    assert parse_aggregator("smooth-min:5") == AggregatorSpec("smooth-min", None, 5.0)
    assert parse_aggregator("smooth-min:5:1,3") == AggregatorSpec("smooth-min", (1.0, 3.0), 5.0)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("helpful:bonn:4", "bonn"),
        ("helpful:bon:0", "'0'"),
        ("helpful:bon:2.5", "'2.5'"),
        ("helpful:bon:x", "'x'"),
        ("harmless:tilt:0", "'0'"),
        ("harmless:tilt:-1", "'-1'"),
        ("harmless:tilt:nan", "'nan'"),
        ("harmless:tilt:inf", "'inf'"),
        ("harmless:tilt", "NAME:METHOD:PARAM"),
        (":bon:4", "NAME:METHOD:PARAM"),
        ("a:bon:4:5", "NAME:METHOD:PARAM"),
    ],
)
def test_parse_criterion_errors(text, needle):
    with pytest.raises(MoalignError) as e:
        parse_criterion(text)
    msg = str(e.value)
    assert needle in msg and text in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text,needle",
    [
        ("max", "'max'"),
        ("min:3", "no parameters"),
        ("smooth-min", "gamma"),
        ("smooth-min:0", "gamma"),
        ("smooth-min:x", "'x'"),
        ("sum:a,b", "'a,b'"),
        ("sum:-1,2", "weights"),
        ("sum:0,0", "weights"),
    ],
)
def test_parse_aggregator_errors(text, needle):
    with pytest.raises(MoalignError) as e:
        parse_aggregator(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_input_errors():
    ok = torch.zeros(2, 4, 2)
    cases = [
        (lambda: parse_criteria("a:bon:2,a:tilt:1"), "'a'"),
        (lambda: CriterionSpec("a", "bon", 0), "N >= 1"),
        (lambda: CriterionSpec("a", "tilt", float("nan")), "tau"),
        (lambda: AggregatorSpec("min", (1.0, 1.0)), "no weights"),
        (lambda: AggregatorSpec("sum", gamma=2.0), "gamma"),
        (lambda: bon_first_variation(torch.tensor([1.0, float("nan")]), 2), "NaN"),
        (lambda: tilt_first_variation(torch.tensor([1.0, float("inf")]), 1.0), "infinite"),
        (lambda: bon_first_variation(torch.tensor(1.0), 2), "shape"),
        (lambda: bon_first_variation(torch.tensor([1.0, 2.0]), 0), "N >= 1"),
        (lambda: tilt_first_variation(torch.tensor([1.0, 2.0]), 0.0), "tau"),
        (lambda: bon_first_variation(torch.tensor([1.0, 2.0]), 2, probs=torch.tensor([0.5])), "probs"),
        (lambda: bon_first_variation(torch.tensor([1.0, 2.0]), 2, probs=torch.tensor([-1.0, 2.0])), "probs"),
        (lambda: nonlinear_rewards(torch.zeros(2, 4), "a:bon:2"), "[B, M, C]"),
        (lambda: nonlinear_rewards(ok, "a:bon:2"), "2 criterion columns but 1"),
        (lambda: nonlinear_rewards(ok, "a:bon:2,b:bon:2", "sum:1,2,3"), "3 weights but there are 2"),
        (lambda: nonlinear_rewards(ok, "a:bon:2,b:bon:2", probs=torch.ones(2, 3)), "probs"),
        (lambda: nonlinear_rewards(ok, "a:bon:2,b:nope:2"), "'nope'"),
    ]
    bad = ok.clone()
    bad[1, 2, 1] = float("nan")
    cases.append((lambda: nonlinear_rewards(bad, "a:bon:2,b:tilt:1"), "criterion 'b'"))
    for fn, needle in cases:
        with pytest.raises(MoalignError) as e:
            fn()
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------------------
# the spec's one-dimensional toy: non-linear mirror descent reaches the closed-form IAMA optimum
# ------------------------------------------------------------------------------------------------------

TOY_K = 201
TOY_Y = torch.linspace(0, 1, TOY_K, dtype=F64)
TOY_R = torch.stack([1 - TOY_Y**2, 1 - (1 - TOY_Y) ** 2], dim=-1)[None]  # [1, K, 2]
TOY_ETA, TOY_STEPS = 4.0, 2000


def mirror_descent(step_reward) -> torch.Tensor:
    """pi <- pi * exp(eta * first variation), renormalised, from the uniform policy on the grid."""
    pi = torch.full((1, TOY_K), 1.0 / TOY_K, dtype=F64)
    for _ in range(TOY_STEPS):
        d = step_reward(pi)
        pi = pi * torch.exp(TOY_ETA * (d - d.max()))
        pi = pi / pi.sum()
    return pi[0]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_toy_iama_optimum(n):
    crit = [CriterionSpec("r1", "bon", n), CriterionSpec("r2", "bon", n)]
    agg = AggregatorSpec("sum", (0.5, 0.5))
    pi = mirror_descent(lambda p: nonlinear_rewards(TOY_R, crit, agg, probs=p).rewards)
    cdf = torch.cumsum(pi, 0)
    a = 1.0 / (n - 1)
    # a grid point carries the mass of its cell, so compare the CDF at cell upper edges y + h/2; the grid
    # problem's own optimum (solved offline with L-BFGS) matches F(y + h/2) to < 1e-5, so discretisation adds
    # nothing visible at these tolerances
    h = 1.0 / (TOY_K - 1)
    edge = torch.clamp(TOY_Y + h / 2, max=1.0)
    closed = edge**a / (edge**a + (1 - edge) ** a)
    err = (cdf - closed).abs()
    # what remains is optimisation error after eta * steps = 8000: mirror descent is slow only in moving mass
    # among the few grid points next to an endpoint (the objective hardly depends on it: only through all N
    # draws landing there; the sup error there is still ~0.15 for N = 8), so the sup error is taken on
    # y in [0.05, 0.95] (observed 2e-5, 5e-4, 0.0053 for N = 2, 4, 8; the wrong exponent a = 1/N gives 0.15
    # and 0.05 for N = 2, 4) and the whole grid enters through the Wasserstein-1 distance int |CDF - F| dy
    # (observed <= 0.0036)
    inner = (TOY_Y >= 0.05) & (TOY_Y <= 0.95)
    assert err[inner].max() < 0.01, err[inner].max()
    assert err[:-1].sum() * h < 0.008
    ends = pi[TOY_Y < 0.1].sum() + pi[TOY_Y > 0.9].sum()
    middle = pi[(TOY_Y >= 0.4) & (TOY_Y <= 0.6)].sum()
    if n == 2:  # uniform
        assert abs(ends.item() - 0.2) < 0.01 and abs(middle.item() - 0.2) < 0.01
    else:  # bimodal: mass piles up at both ends
        assert ends > 0.5 and middle < 0.1


def test_toy_linear_objective_concentrates_at_half():
    # the linear objective E[(r1 + r2)/2]: its first variation is the reward itself (bon:1 gives the same up
    # to a constant, which the normalisation removes)
    lin = TOY_R.mean(-1)
    diff = nonlinear_rewards(TOY_R, "r1:bon:1,r2:bon:1").rewards - lin
    assert (diff.max() - diff.min()).item() < 1e-12
    pi = mirror_descent(lambda p: nonlinear_rewards(TOY_R, "r1:bon:1,r2:bon:1").rewards)
    # closed form of the iterate: pi ∝ exp(-eta * steps * (y - 1/2)^2), sd = 1/sqrt(2 * 8000) = 0.008
    assert int(pi.argmax()) == TOY_K // 2
    assert pi[(TOY_Y - 0.5).abs() <= 0.025].sum() > 0.99
    assert (pi * (TOY_Y - 0.5).abs()).sum() < 0.01


# ------------------------------------------------------------------------------------------------------
# the unbiased best-of-N estimator (the default)
# ------------------------------------------------------------------------------------------------------


def test_unbiased_estimators_equal_the_mean_over_subsets_by_brute_force():
    """The O(M log M) formulas against the definitions, enumerated: the first variation at y is N times the
    mean over the (N-1)-subsets of the other M-1 rewards of max(r(y), subset max); the value is the mean over
    the N-subsets of their max."""
    from itertools import combinations

    g = torch.Generator().manual_seed(7)
    for m in (1, 2, 5, 7):
        r = torch.round(torch.rand(m, generator=g, dtype=F64) * 5) / 5  # ties likely
        for n in range(1, m + 1):
            fv = bon_first_variation(r, n)
            for y in range(m):
                others = [float(r[j]) for j in range(m) if j != y]
                subsets = list(combinations(others, n - 1))
                want = n * np.mean([max([float(r[y]), *s]) for s in subsets])
                assert float(fv[y]) == pytest.approx(want, abs=1e-12)
            want_v = np.mean([max(s) for s in combinations(r.tolist(), n)])
            assert float(bon_value(r, n)) == pytest.approx(want_v, abs=1e-12)


def _exact_fv(support, probs, n, ry):
    """N E[max(ry, max of N-1 draws)] under a finite distribution (the first variation up to -N R)."""
    cdf = np.cumsum(probs)
    below = np.array([max(ry, v) for v in support])
    p_max = np.diff(np.concatenate([[0.0], cdf ** (n - 1)]))  # P(max of N-1 draws = support[j])
    return n * float((p_max * below).sum()) if n > 1 else n * ry


@pytest.mark.parametrize("n, m", [(4, 8), (8, 8), (2, 4)])
def test_unbiased_first_variation_and_value_by_monte_carlo(n, m):
    """Groups of M draws from a known distribution: the mean of the unbiased estimates over many groups lies
    within its 99.9% normal interval of the exact first variation (at a completion whose reward is fixed, the
    others drawn from the distribution) and of the exact value; the plug-in value's mean does not (the test
    can tell a biased estimator)."""
    support = np.array([0.0, 0.2, 0.45, 0.7, 1.0])
    probs = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    G = 20000
    rng = torch.Generator().manual_seed(11)
    draws = torch.multinomial(torch.tensor(probs).expand(G, -1), m - 1, replacement=True, generator=rng)
    others = torch.tensor(support)[draws]  # [G, M-1]
    z = 3.29  # 99.9%
    for ry in (0.2, 0.7):
        group = torch.cat([torch.full((G, 1), ry, dtype=F64), others], dim=1)  # y first, the rest from pi
        exact = _exact_fv(support, probs, n, ry)
        est = bon_first_variation(group, n)[:, 0].numpy()
        mean, se = est.mean(), est.std(ddof=1) / np.sqrt(G)
        assert abs(mean - exact) < z * se + 1e-12, (ry, mean, exact, se)
    # the value: mean over groups of the unbiased estimate vs E[max of N draws]
    groups = torch.tensor(support)[torch.multinomial(torch.tensor(probs).expand(G, -1), m, replacement=True,
                                                     generator=rng)]  # fmt: skip
    cdf = np.cumsum(probs)
    exact_v = float((np.diff(np.concatenate([[0.0], cdf**n])) * support).sum())
    for est_name, ok in (("unbiased", True), ("plugin", n == 1)):
        v = bon_value(groups, n, estimator=est_name).numpy()
        mean, se = v.mean(), v.std(ddof=1) / np.sqrt(G)
        assert (abs(mean - exact_v) < z * se) == ok, (est_name, mean, exact_v, se)


def test_best_of_n_with_more_draws_than_the_group_is_refused():
    r = torch.randn(2, 4, dtype=F64)
    with pytest.raises(MoalignError, match="best-of-8 needs at least 8 completions per group"):
        bon_first_variation(r, 8)
    with pytest.raises(MoalignError, match="best-of-8 needs at least 8"):
        nonlinear_rewards(r[..., None], "a:bon:8")
    with pytest.raises(MoalignError, match="estimator must be one of"):
        bon_value(r, 2, estimator="exact")
    assert torch.isfinite(bon_first_variation(r, 8, estimator="plugin")).all()  # the plug-in still runs


def test_tilt_effective_sample_size():
    r = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0]], dtype=F64)
    ess = tilt_ess(r, 1.0)
    assert float(ess[0]) == pytest.approx(4.0)  # equal weights: every completion counts
    assert 1.0 <= float(ess[1]) < 1.001  # one completion carries the weight
    w = torch.exp(torch.tensor([0.3, -0.2, 0.9], dtype=F64) / 0.5)
    assert float(tilt_ess(torch.tensor([0.3, -0.2, 0.9], dtype=F64), 0.5)) == pytest.approx(
        float(w.sum() ** 2 / (w**2).sum())
    )
    # uniform rewards, M = 8, tau = 0.1: the estimate rests on about one completion
    g = torch.Generator().manual_seed(0)
    u = torch.rand(2000, 8, generator=g, dtype=F64)
    assert float(tilt_ess(u, 0.1).median()) < 2.5
    stats = nonlinear_rewards(u[:4, :, None], "a:tilt:0.1").stats
    assert stats["a/ess_min"] <= stats["a/ess_mean"] < 8


def test_min_aggregator_batched_ties_and_tolerance():
    """``min`` weights per row of a batch of objective values: 1/k on the k criteria tied at the row's lowest
    value, ties judged with a relative tolerance of 1e-9 (absolute below |R| = 1)."""
    from moalign.training.nonlinear import aggregator_weights, parse_aggregator

    spec = parse_aggregator("min")
    v = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 1.0]])
    torch.testing.assert_close(
        aggregator_weights(v, spec), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    )
    # relative at large values: 5e-7 apart at 1000 is a tie (tolerance 1e-6)
    assert aggregator_weights(torch.tensor([1000.0, 1000.0 + 5e-7], dtype=torch.float64), spec).tolist() == [
        0.5,
        0.5,
    ]
    # absolute below 1: 1.5e-9 apart at 0.5 is not a tie (tolerance 1e-9)
    assert aggregator_weights(torch.tensor([0.5, 0.5 + 1.5e-9], dtype=torch.float64), spec).tolist() == [
        1.0,
        0.0,
    ]


def test_tilt_functions_name_themselves_in_errors():
    from moalign.training.nonlinear import tilt_ess, tilt_value

    r = torch.tensor([[0.1, 0.5, 0.9]])
    with pytest.raises(MoalignError, match=r"^tilt_ess: tilting needs a finite temperature tau > 0, got 0"):
        tilt_ess(r, 0)
    with pytest.raises(
        MoalignError, match=r"^tilt_value: tilting needs a finite temperature tau > 0, got -1"
    ):
        tilt_value(r, -1)


def test_transform_outputs_keep_the_input_dtype_and_inputs_are_named():
    from moalign.training.nonlinear import tilt_first_variation, tilt_value

    r = torch.tensor([[0.1, 0.5, 0.9, 0.2]], dtype=torch.float32)
    assert tilt_first_variation(r, 0.5).dtype == torch.float32 and tilt_value(r, 0.5).dtype == torch.float32
    assert tilt_first_variation(r.double(), 0.5).dtype == torch.float64
    with pytest.raises(MoalignError, match=r"^tilt_first_variation: tilting needs a finite temperature"):
        tilt_first_variation(r, float("inf"))
    with pytest.raises(MoalignError, match=r"^aggregator must be an AggregatorSpec or a string, got int$"):
        nonlinear_rewards(torch.zeros(1, 4, 1), ["a:bon:2"], 3)
    with pytest.raises(MoalignError, match=r"^rewards must be a torch tensor \[B, M, C\], got list$"):
        nonlinear_rewards([[[0.0]]], ["a:bon:2"], "sum")


def test_nonlinear_rewards_checks_shapes_and_uses_probs_for_values():
    ok = torch.rand(2, 4, 1)
    for bad, msg in [
        (torch.rand(2, 0, 1), r"^rewards must have shape \[B, M, C\] with B, M >= 1, got \(2, 0, 1\)$"),
        (torch.rand(0, 4, 1), r"^rewards must have shape \[B, M, C\] with B, M >= 1, got \(0, 4, 1\)$"),
        (torch.rand(2, 4), r"^rewards must have shape \[B, M, C\] with B, M >= 1, got \(2, 4\)$"),
        (torch.rand(2, 4, 2), r"^rewards have 2 criterion columns but 1 criteria were given$"),
    ]:
        with pytest.raises(MoalignError, match=msg):
            nonlinear_rewards(bad, ["a:bon:2"], "sum")
    with pytest.raises(
        MoalignError, match=r"^probs must be a tensor of shape \(2, 4\) \[B, M\], got \(2, 3\)$"
    ):
        nonlinear_rewards(ok, ["a:bon:2"], "sum", probs=torch.full((2, 3), 1 / 3))
    with pytest.raises(MoalignError, match=r"^probs must be a tensor of shape \(2, 4\) \[B, M\], got list$"):
        nonlinear_rewards(ok, ["a:bon:2"], "sum", probs=[[0.25] * 4] * 2)
    # with probs the objective value is the exact one on that finite space: best-of-1 = the mean under probs
    r = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]], dtype=torch.float32)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float32)
    res = nonlinear_rewards(r, ["a:bon:1"], "sum", probs=p)
    assert res.values.dtype == torch.float64
    assert float(res.values[0]) == pytest.approx(0.2 + 0.6 + 1.2, rel=1e-6)


def test_best_of_n_functions_name_themselves_and_keep_the_dtype():
    from moalign.training.nonlinear import bon_first_variation, bon_value

    r = torch.tensor([[0.1, 0.5, 0.9, 0.2]], dtype=torch.float32)
    for fn in (bon_first_variation, bon_value):
        name = fn.__name__
        with pytest.raises(MoalignError, match=rf"^{name}: best-of-N needs an integer N >= 1, got 0$"):
            fn(r, 0)
        with pytest.raises(MoalignError, match=rf"^{name}: best-of-8 needs at least 8 completions per group"):
            fn(r, 8)
        for est in ("unbiased", "plugin"):
            assert fn(r, 2, estimator=est).dtype == torch.float32
    # a group of one completion is a valid group for best-of-1
    res = nonlinear_rewards(torch.rand(2, 1, 1), ["a:bon:1"], "sum")
    assert res.rewards.shape == (2, 1)
