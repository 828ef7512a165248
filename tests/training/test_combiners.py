"""Tests of moalign.training.combiners against independent float64 / scipy references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from moalign.errors import MoalignError
from moalign.training.combiners import (
    Combiner,
    CombineResult,
    GroupDROCombiner,
    apply_weights,
    available_combiners,
    combine_stats,
    get_combiner,
    gram_matrix,
    min_norm_weights,
)

KINDS = ["full", "rank-deficient", "rank-one", "zero-grad", "duplicate", "positive"]
ALL = ["groupdro", "linear", "mgda", "mgda-decoupled", "mgda-normalized", "pcgrad"]


# ------------------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------------------


def scipy_min_norm_value(gram: np.ndarray) -> float:
    """min over the simplex of a^T G a with scipy's SLSQP, best of several starts."""
    k = gram.shape[0]
    best = math.inf
    for x0 in [np.full(k, 1.0 / k), *np.eye(k)]:
        res = minimize(
            lambda a: a @ gram @ a,
            x0,
            jac=lambda a: 2.0 * gram @ a,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * k,
            constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones(k)}],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        a = np.clip(res.x, 0.0, None)
        a /= a.sum()
        best = min(best, float(a @ gram @ a))
    return best


def flat64(grad: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in grad])


def random_grads(
    k: int, shapes=((3, 4), (5,), (2, 2, 2)), seed: int = 0, scales=None
) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for i in range(k):
        s = 1.0 if scales is None else scales[i]
        grads.append([s * torch.randn(*sh, generator=gen) for sh in shapes])
    return grads


def make_gram(kind: str, k: int, rng: np.random.Generator) -> np.ndarray:
    d = int(rng.integers(k + 1, k + 6))
    a = rng.standard_normal((k, d)) * np.exp(rng.normal(size=(k, 1)))
    if kind == "rank-deficient":
        r = int(rng.integers(1, k))
        a = rng.standard_normal((k, r)) @ rng.standard_normal((r, d))
    elif kind == "rank-one":
        a = rng.standard_normal((k, 1)) @ rng.standard_normal((1, d))
    elif kind == "zero-grad":
        a[int(rng.integers(k))] = 0.0
    elif kind == "duplicate":
        a[1] = a[0]
    elif kind == "positive":  # all pairwise cosines > 0: the optimum is often interior or on a face
        a = np.abs(a)
    return a @ a.T


# ------------------------------------------------------------------------------------------------------
# min-norm solver
# ------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("method", ["active-set", "frank-wolfe"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", range(2, 9))
def test_min_norm_matches_scipy(k, kind, method):
    rng = np.random.default_rng(1000 * k + KINDS.index(kind))
    for _ in range(3):
        gram = make_gram(kind, k, rng)
        alpha = min_norm_weights(torch.from_numpy(gram), method=method).numpy()
        assert alpha.shape == (k,)
        assert alpha.min() >= 0.0
        assert alpha.sum() == pytest.approx(1.0, abs=1e-12)
        scale = gram.diagonal().max()
        value = float(alpha @ gram @ alpha)
        assert value == pytest.approx(scipy_min_norm_value(gram), abs=1e-6 * scale)
        # independent optimality certificate (KKT): (G a)_i >= a^T G a for every i
        assert (gram @ alpha).min() >= value - 1e-7 * scale
        if kind == "zero-grad":
            assert value <= 1e-12 * scale


def test_active_set_is_exact_on_its_own():
    """The default solver is an exact QP: the active-set phase alone meets the optimality certificate
    (Frank-Wolfe polishing is only a fallback), and the public function emits no convergence warning."""
    import warnings

    from moalign.training.combiners.min_norm import _active_set

    rng = np.random.default_rng(99)
    for i in range(60):
        k = 3 + i % 6
        gram = make_gram(KINDS[i % len(KINDS)], k, rng)
        g = gram / gram.diagonal().max()
        x = _active_set(g, 1e-10, 50 * k + 50)
        gap = 2.0 * (x @ g @ x - (g @ x).min())
        assert gap <= 1e-9
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            min_norm_weights(gram)


def test_min_norm_k2_closed_form_cases():
    # orthogonal, equal norms -> (1/2, 1/2)
    a = min_norm_weights(torch.tensor([[4.0, 0.0], [0.0, 4.0]]))
    assert torch.allclose(a, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-15)
    # g2 = 3 g1 -> all weight on the smaller gradient g1 (and the reverse order)
    g1 = np.array([1.0, -2.0, 0.5])
    for grads, expected in [([g1, 3 * g1], [1.0, 0.0]), ([3 * g1, g1], [0.0, 1.0])]:
        m = np.stack(grads)
        a = min_norm_weights(m @ m.T).numpy()
        np.testing.assert_allclose(a, expected, atol=1e-15)
    # opposite gradients of equal norm: the origin is in the hull
    m = np.stack([g1, -g1])
    a = min_norm_weights(m @ m.T).numpy()
    np.testing.assert_allclose(a, [0.5, 0.5], atol=1e-12)
    # general case: gamma = <g2 - g1, g2> / ||g1 - g2||^2, clipped
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = rng.standard_normal((2, 4))
        gamma = np.clip((y - x) @ y / ((x - y) @ (x - y)), 0.0, 1.0)
        m = np.stack([x, y])
        np.testing.assert_allclose(min_norm_weights(m @ m.T).numpy(), [gamma, 1 - gamma], atol=1e-12)


def test_min_norm_trivial_cases():
    assert min_norm_weights(torch.tensor([[2.5]])).tolist() == [1.0]
    a = min_norm_weights(torch.zeros(4, 4))
    assert torch.allclose(a, torch.full((4,), 0.25, dtype=torch.float64))
    # identical gradients: any convex combination is optimal, result stays on the simplex
    a = min_norm_weights(torch.ones(3, 3))
    assert float(a.sum()) == pytest.approx(1.0) and float(a.min()) >= 0


def test_min_norm_is_scale_invariant_and_permutation_equivariant():
    rng = np.random.default_rng(5)
    m = rng.standard_normal((5, 7))
    gram = m @ m.T
    a = min_norm_weights(gram).numpy()
    np.testing.assert_allclose(min_norm_weights(1e-6 * gram).numpy(), a, atol=1e-8)
    perm = rng.permutation(5)
    ap = min_norm_weights(gram[np.ix_(perm, perm)]).numpy()
    np.testing.assert_allclose(ap, a[perm], atol=1e-8)


def test_min_norm_rejects_bad_options():
    with pytest.raises(MoalignError, match="method"):
        min_norm_weights(np.eye(3), method="newton")
    with pytest.raises(MoalignError, match="tol"):
        min_norm_weights(np.eye(3), tol=0.0)


# ------------------------------------------------------------------------------------------------------
# Gram matrix and weighted sum
# ------------------------------------------------------------------------------------------------------


def test_gram_matrix_matches_float64_reference():
    grads = random_grads(4, seed=1, scales=[1.0, 1e-3, 50.0, 2.0])
    flat = np.stack([flat64(g) for g in grads])
    ref = flat @ flat.T
    gram = gram_matrix(grads)
    assert gram.dtype == torch.float64 and gram.shape == (4, 4)
    np.testing.assert_allclose(gram.numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    # list of flat tensors, and small chunks within a parameter, give the same matrix
    flat_list = [torch.cat([t.reshape(-1) for t in g]) for g in grads]
    np.testing.assert_allclose(gram_matrix(flat_list).numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(gram_matrix(grads, chunk_size=5).numpy(), ref, rtol=1e-12)
    # mixed precision inputs are accumulated in float64
    half = [[t.to(torch.bfloat16) for t in g] for g in grads]
    flat_h = np.stack([flat64(g) for g in half])
    np.testing.assert_allclose(gram_matrix(half).numpy(), flat_h @ flat_h.T, rtol=1e-12)


def test_gram_matrix_none_entries_are_zeros():
    grads = random_grads(3, seed=2)
    with_none = [list(g) for g in grads]
    with_none[1][0] = None
    zeros = [list(g) for g in grads]
    zeros[1][0] = torch.zeros_like(grads[1][0])
    np.testing.assert_allclose(gram_matrix(with_none).numpy(), gram_matrix(zeros).numpy(), rtol=1e-14)
    d = apply_weights([0.2, 0.3, 0.5], with_none)
    d0 = apply_weights([0.2, 0.3, 0.5], zeros)
    assert all(torch.equal(a, b) for a, b in zip(d, d0))
    # a parameter nobody touches stays None in the direction
    for g in with_none:
        g.append(None)
    assert apply_weights([0.2, 0.3, 0.5], with_none)[-1] is None


def test_apply_weights_matches_float64_reference():
    grads = random_grads(3, seed=4)
    alpha = np.array([0.1, -0.4, 2.5])
    d = apply_weights(torch.from_numpy(alpha), grads)
    assert [t.shape for t in d] == [t.shape for t in grads[0]]
    assert all(t.dtype == torch.float32 for t in d)
    ref = sum(a * flat64(g) for a, g in zip(alpha, grads))
    np.testing.assert_allclose(flat64(d), ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# combiners
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_direction_is_alpha_weighted_sum_and_stats_are_consistent(name):
    grads = random_grads(4, seed=7, scales=[1.0, 0.2, 3.0, 1.0])
    losses = torch.tensor([0.7, 0.3, 1.2, 0.9])
    res = get_combiner(name).combine(losses, grads)
    assert isinstance(res, CombineResult)
    alpha = res.alpha.numpy()
    assert res.alpha.dtype == torch.float64 and alpha.shape == (4,)
    flat = np.stack([flat64(g) for g in grads])
    d_ref = alpha @ flat
    np.testing.assert_allclose(flat64(res.direction), d_ref, rtol=1e-5, atol=1e-6 * np.abs(d_ref).max())
    s = res.stats
    json.dumps(s)  # JSON-able
    assert s["combiner"] == name
    np.testing.assert_allclose(s["alpha"], alpha)
    np.testing.assert_allclose(s["losses"], losses.double().numpy())
    np.testing.assert_allclose(s["grad_norms"], np.linalg.norm(flat, axis=1), rtol=1e-10)
    inner = flat @ d_ref
    np.testing.assert_allclose(s["inner"], inner, rtol=1e-9, atol=1e-12)
    assert s["min_inner"] == pytest.approx(inner.min(), rel=1e-9, abs=1e-12)
    assert s["common_descent"] == bool((inner > 0).all())
    assert s["direction_norm"] == pytest.approx(np.linalg.norm(d_ref), rel=1e-9)
    n = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(s["cosines"], (flat @ flat.T) / np.outer(n, n), atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_weights_from_gram_equal_combine(name):
    """The trainer may accumulate the Gram matrix itself and call weights()."""
    grads = random_grads(3, seed=8)
    losses = [0.4, 0.8, 0.6]
    a = get_combiner(name).combine(losses, grads).alpha
    b = get_combiner(name).weights(losses, gram_matrix(grads))
    assert torch.allclose(a, b, atol=1e-12)


def test_mgda_is_common_descent():
    for seed in range(10):
        grads = random_grads(5, seed=seed, shapes=((4,), (3,)))  # 7-dim, 5 objectives: d != 0 usually
        res = get_combiner("mgda").combine(torch.ones(5), grads)
        flat = np.stack([flat64(g) for g in grads])
        d = flat64(res.direction)
        d_ref = res.alpha.numpy() @ flat
        np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)
        tol = 1e-6 * (flat**2).sum(1).max()
        assert (flat @ d_ref >= d_ref @ d_ref - tol).all()
        assert res.alpha.sum().item() == pytest.approx(1.0)
        assert res.stats["common_descent"] == bool(d_ref @ d_ref > tol)


def test_mgda_decoupled_is_min_norm_of_loss_scaled_gram():
    grads = random_grads(4, seed=11, scales=[1.0, 0.1, 2.0, 0.5])
    losses = torch.tensor([0.2, 1.5, 0.7, 3.0], dtype=torch.float64)
    gram = gram_matrix(grads)
    res = get_combiner("mgda-decoupled").combine(losses, grads)
    expected = min_norm_weights(gram / torch.outer(losses, losses))
    assert torch.allclose(res.alpha, expected, atol=1e-12)
    # equals plain MGDA's alpha on g_k / l_k ...
    scaled = [[t / float(lo) for t in g] for g, lo in zip(grads, losses)]
    mgda_scaled = get_combiner("mgda").combine(torch.ones(4), scaled)
    assert torch.allclose(res.alpha, mgda_scaled.alpha, atol=1e-6)
    # ... but applied to the RAW gradients
    d_ref = res.alpha.numpy() @ np.stack([flat64(g) for g in grads])
    np.testing.assert_allclose(flat64(res.direction), d_ref, rtol=1e-5, atol=1e-6)
    # and differs from plain MGDA when the losses differ
    assert not torch.allclose(res.alpha, get_combiner("mgda").combine(losses, grads).alpha, atol=1e-3)
    # equal losses: identical to MGDA
    same = get_combiner("mgda-decoupled").combine(torch.full((4,), 0.7), grads).alpha
    assert torch.allclose(same, get_combiner("mgda").combine(losses, grads).alpha, atol=1e-9)


def test_mgda_decoupled_upweights_lagging_objective():
    # two orthogonal gradients of equal norm: MGDA gives 1/2 each; decoupled favours the larger loss
    grads = [[torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]]
    a = get_combiner("mgda-decoupled").combine([0.5, 2.0], grads).alpha
    # closed form: alpha_k ∝ l_k^2 for orthogonal equal-norm gradients
    assert torch.allclose(a, torch.tensor([0.25 / 4.25, 4.0 / 4.25], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("bad", [[0.5, 0.0, 1.0], [0.5, -1.0, 1.0]])
def test_mgda_decoupled_rejects_nonpositive_losses(bad):
    with pytest.raises(MoalignError, match="positive"):
        get_combiner("mgda-decoupled").combine(bad, random_grads(3))


def test_mgda_normalized_invariant_to_rescaling():
    grads = random_grads(4, seed=12)
    comb = get_combiner("mgda-normalized")
    base = comb.combine(torch.ones(4), grads)
    for k, c in [(0, 7.3), (2, 1e-3), (3, 250.0)]:
        scaled = [list(g) for g in grads]
        scaled[k] = [c * t for t in grads[k]]
        res = comb.combine(torch.ones(4), scaled)
        np.testing.assert_allclose(flat64(res.direction), flat64(base.direction), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.stats["simplex_weights"], base.stats["simplex_weights"], atol=1e-9)
        assert res.alpha[k].item() == pytest.approx(base.alpha[k].item() / c, rel=1e-6)
    # the simplex weights are the min-norm weights of the cosine matrix
    np.testing.assert_allclose(
        base.stats["simplex_weights"], min_norm_weights(np.array(base.stats["cosines"])).numpy(), atol=1e-9
    )
    # apply_to="raw" applies those same simplex weights to the raw gradients
    raw = get_combiner("mgda-normalized", apply_to="raw").combine(torch.ones(4), grads)
    np.testing.assert_allclose(raw.alpha.numpy(), base.stats["simplex_weights"], atol=1e-12)


def test_mgda_normalized_zero_gradient():
    grads = [[torch.tensor([1.0, 0.0])], [torch.zeros(2)], [torch.tensor([0.0, 2.0])]]
    res = get_combiner("mgda-normalized").combine(torch.ones(3), grads)
    assert torch.isfinite(res.alpha).all()
    assert res.alpha[1].item() == 0.0
    assert float(res.direction[0].abs().max()) == 0.0  # zero gradient -> Pareto stationary
    assert res.stats["common_descent"] is False


def pcgrad_reference(flat: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """Yu et al. 2020, Algorithm 1, on explicit float64 vectors."""
    out = []
    for i, order in enumerate(orders):
        h = flat[i].copy()
        for j in order:
            ip = h @ flat[j]
            if ip < 0:
                h = h - ip / (flat[j] @ flat[j]) * flat[j]
        out.append(h)
    return np.sum(out, axis=0)


def test_pcgrad_two_conflicting_gradients():
    g1 = np.array([1.0, 0.0, 0.5])
    g2 = np.array([-0.8, 1.0, 0.0])
    assert g1 @ g2 < 0
    grads = [[torch.tensor(g1)], [torch.tensor(g2)]]
    res = get_combiner("pcgrad").combine([1.0, 1.0], grads)
    d = flat64(res.direction)
    # hand-written reference: each gradient projected on the other's normal plane, then summed
    h1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    h2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    np.testing.assert_allclose(d, h1 + h2, rtol=1e-12)
    assert d @ g1 >= -1e-12 and d @ g2 >= -1e-12
    assert res.stats["n_projections"] == 2
    # effective coefficients reproduce the direction
    np.testing.assert_allclose(res.alpha.numpy() @ np.stack([g1, g2]), d, rtol=1e-12)


def test_pcgrad_no_conflict_is_plain_sum():
    grads = [[torch.tensor([1.0, 0.2])], [torch.tensor([0.5, 1.0])], [torch.tensor([0.1, 0.1])]]
    res = get_combiner("pcgrad").combine(torch.ones(3), grads)
    assert torch.allclose(res.alpha, torch.ones(3, dtype=torch.float64))
    assert res.stats["n_projections"] == 0
    mean = get_combiner("pcgrad", reduction="mean").combine(torch.ones(3), grads)
    assert torch.allclose(mean.alpha, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_pcgrad_many_objectives_matches_reference_and_is_seeded():
    rng = np.random.default_rng(21)
    flat = rng.standard_normal((5, 6))
    grads = [[torch.from_numpy(f[:4].copy()), torch.from_numpy(f[4:].copy())] for f in flat]
    comb = get_combiner("pcgrad", seed=3)
    seen_orders = set()
    for _ in range(4):
        res = comb.combine(torch.ones(5), grads)
        orders = res.stats["pcgrad_orders"]
        for i, o in enumerate(orders):
            assert sorted(o) == [j for j in range(5) if j != i]
        seen_orders.add(json.dumps(orders))
        ref = pcgrad_reference(flat, orders)
        np.testing.assert_allclose(flat64(res.direction), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res.alpha.numpy() @ flat, ref, rtol=1e-10, atol=1e-12)
    assert len(seen_orders) > 1  # the order is random across steps
    # same seed -> same sequence; reset() restarts it; state_dict round trip
    other = get_combiner("pcgrad", seed=3)
    first = other.combine(torch.ones(5), grads).stats["pcgrad_orders"]
    comb.reset()
    assert comb.combine(torch.ones(5), grads).stats["pcgrad_orders"] == first
    state = comb.state_dict()
    nxt = comb.combine(torch.ones(5), grads).stats["pcgrad_orders"]
    other.load_state_dict(state)
    assert other.combine(torch.ones(5), grads).stats["pcgrad_orders"] == nxt


def test_groupdro_upweights_larger_loss_over_steps():
    comb = get_combiner("groupdro", eta=0.5)
    losses_seq = [torch.tensor([0.2, 1.0, 0.6]), torch.tensor([0.3, 0.9, 0.5]), torch.tensor([0.1, 1.1, 0.7])]
    grads = random_grads(3, seed=13)
    prev = None
    for t, lo in enumerate(losses_seq, 1):
        res = comb.combine(lo, grads)
        a = res.alpha
        assert float(a.sum()) == pytest.approx(1.0)
        assert a.argmax().item() == 1 and a.argmin().item() == 0
        if prev is not None:
            assert a[1] > prev[1] and a[0] < prev[0]
        prev = a
        # closed form: q ∝ exp(eta * cumulative loss)
        cum = torch.stack(losses_seq[:t]).double().sum(0)
        assert torch.allclose(a, torch.softmax(0.5 * cum, 0), atol=1e-12)
    # checkpointing and reset
    state = comb.state_dict()
    json.dumps(state)
    fresh = GroupDROCombiner(eta=0.5)
    fresh.load_state_dict(state)
    lo = torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(fresh.weights(lo), comb.weights(lo), atol=1e-12)
    comb.reset()
    assert torch.allclose(comb.weights(torch.zeros(3)), torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(MoalignError, match="objectives"):
        comb.weights(torch.zeros(4))


def test_linear_weights():
    grads = random_grads(3, seed=14)
    assert torch.allclose(
        get_combiner("linear").combine([1, 2, 3], grads).alpha, torch.full((3,), 1 / 3, dtype=torch.float64)
    )
    res = get_combiner("linear", weights=[1.0, 3.0, 0.0]).combine([1, 2, 3], grads)
    assert torch.allclose(res.alpha, torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    # weights() without a Gram matrix works for linear / groupdro
    assert get_combiner("linear").weights([0.1, 0.2]).tolist() == [0.5, 0.5]
    for bad in ([1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(MoalignError, match="weight"):
            get_combiner("linear", weights=bad)
    with pytest.raises(MoalignError, match="objectives"):
        get_combiner("linear", weights=[1.0, 1.0]).combine([1, 2, 3], grads)


def test_single_objective():
    grads = random_grads(1, seed=15)
    for name in ALL:
        res = get_combiner(name).combine([0.5], grads)
        assert res.alpha.tolist() == [1.0] or name == "mgda-normalized"
        if name != "mgda-normalized":
            np.testing.assert_allclose(flat64(res.direction), flat64(grads[0]), rtol=1e-6)


def test_decoupled_common_descent_flag_can_be_false():
    # the decoupled direction favours the high-loss objective and may increase the other one
    g1, g2 = np.array([1.0, 0.0]), np.array([-0.9, 0.05])
    grads = [[torch.tensor(g1)], [torch.tensor(g2)]]
    res = get_combiner("mgda-decoupled").combine([0.01, 5.0], grads)
    d = res.alpha.numpy() @ np.stack([g1, g2])
    assert res.stats["common_descent"] == bool(d @ g1 > 0 and d @ g2 > 0)
    assert res.stats["common_descent"] is False
    assert get_combiner("mgda").combine([0.01, 5.0], grads).stats["min_inner"] >= 0


def test_combine_stats_without_gram():
    s = combine_stats(None, [0.5, 0.5], [1.0, 2.0], name="linear")
    assert s == {"combiner": "linear", "alpha": [0.5, 0.5], "losses": [1.0, 2.0]}


# ------------------------------------------------------------------------------------------------------
# registry and validation
# ------------------------------------------------------------------------------------------------------


def test_registry():
    assert available_combiners() == ALL
    for name in ALL:
        c = get_combiner(name)
        assert isinstance(c, Combiner) and c.name == name
        json.dumps(c.describe())
    assert get_combiner("MGDA_Decoupled").name == "mgda-decoupled"
    assert get_combiner("mgda-normalised").name == "mgda-normalized"
    with pytest.raises(MoalignError, match="unknown combiner .cagrad.; choose from groupdro, linear, mgda"):
        get_combiner("cagrad")
    with pytest.raises(MoalignError, match="bad arguments"):
        get_combiner("mgda", eta=0.1)
    with pytest.raises(MoalignError):
        get_combiner("groupdro", eta=-1.0)
    with pytest.raises(MoalignError):
        get_combiner("pcgrad", reduction="max")


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise(name):
    comb = get_combiner(name)
    grads = random_grads(3, seed=16)
    ok = [0.5, 0.6, 0.7]
    nan_grad = [list(g) for g in grads]
    nan_grad[2][1] = nan_grad[2][1].clone()
    nan_grad[2][1][0] = float("nan")
    inf_grad = [list(g) for g in grads]
    inf_grad[0][0] = torch.full_like(grads[0][0], float("inf"))
    with pytest.raises(MoalignError, match="objective 2, parameter 1"):
        comb.combine(ok, nan_grad)
    with pytest.raises(MoalignError, match="objective 0, parameter 0"):
        comb.combine(ok, inf_grad)
    with pytest.raises(MoalignError, match="not finite"):
        comb.combine([0.5, float("nan"), 0.7], grads)
    with pytest.raises(MoalignError, match="not finite"):
        comb.combine([0.5, float("inf"), 0.7], grads)
    with pytest.raises(MoalignError, match="3 objectives"):
        comb.combine([0.5, 0.6], grads)
    with pytest.raises(MoalignError, match="K >= 1"):
        comb.combine([], [])
    shape = [list(g) for g in grads]
    shape[1][0] = torch.zeros(4, 3)
    with pytest.raises(MoalignError, match="shape"):
        comb.combine(ok, shape)
    count = [list(g) for g in grads]
    count[2] = count[2][:2]
    with pytest.raises(MoalignError, match="parameter tensors"):
        comb.combine(ok, count)
    with pytest.raises(MoalignError):
        comb.combine(ok, torch.zeros(3, 5))
    with pytest.raises(MoalignError):
        comb.weights(ok, np.ones((3, 2)))


# ------------------------------------------------------------------------------------------------------
# the contract around the numbers: solver pieces, messages that name the problem, records, round trips
# (written against the survivors of a mutation run; each asserts documented behaviour)
# ------------------------------------------------------------------------------------------------------


def test_solve_face_is_the_closed_form_minimiser():
    """On a positive-definite face, min x^T G x s.t. sum x = 1 is x = G^-1 1 / (1^T G^-1 1)."""
    from moalign.training.combiners.min_norm import _solve_face

    rng = np.random.default_rng(31)
    for n in (2, 3, 5):
        m = rng.standard_normal((n, n + 2)) * np.exp(rng.normal(size=(n, 1)))
        g = m @ m.T
        ref = np.linalg.solve(g, np.ones(n))
        ref /= ref.sum()
        np.testing.assert_allclose(_solve_face(g, np.arange(n)), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(_solve_face(np.eye(3), np.array([1])), [1.0])


def test_active_set_alone_stays_on_the_simplex():
    from moalign.training.combiners.min_norm import _active_set

    rng = np.random.default_rng(32)
    for i in range(60):
        k = 3 + i % 6
        gram = make_gram(KINDS[i % len(KINDS)], k, rng)
        x = _active_set(gram / gram.diagonal().max(), 1e-10, 50 * k + 50)
        assert x.min() >= 0.0 and x.sum() == pytest.approx(1.0, abs=1e-12)


def _plain_frank_wolfe_gap(g: np.ndarray, x: np.ndarray, iters: int) -> float:
    """Frank-Wolfe without away steps (the independent reference the away steps are meant to beat)."""
    for _ in range(iters):
        grad = g @ x
        s = int(np.argmin(grad))
        d = -x.copy()
        d[s] += 1.0
        curv = float(d @ g @ d)
        t = 1.0 if curv <= 0 else min(1.0, max(0.0, -float(d @ grad) / curv))
        x = x + t * d
    grad = g @ x
    return 2.0 * float(x @ grad - grad.min())


def test_frank_wolfe_away_steps_converge_linearly_and_report_the_true_gap():
    """With the optimum on a face of the simplex, plain Frank-Wolfe zig-zags (O(1/t)); with away steps the
    gap falls below 1e-10 within 3,000 iterations on every problem here, while plain Frank-Wolfe misses it on
    many. The returned gap is the duality gap at the returned x, also when the budget runs out."""
    from moalign.training.combiners.min_norm import _frank_wolfe

    rng = np.random.default_rng(33)
    slow_plain = 0
    for i in range(24):
        k = 4 + i % 5
        gram = make_gram("full" if i % 2 else "positive", k, rng)
        g = gram / gram.diagonal().max()
        for budget in (20, 3000):
            x, gap = _frank_wolfe(g, np.full(k, 1.0 / k), 1e-10, budget)
            assert x.min() >= 0.0 and x.sum() == pytest.approx(1.0, abs=1e-12)
            grad = g @ x
            assert gap == pytest.approx(2.0 * float(x @ grad - grad.min()), rel=1e-9, abs=1e-15)
        assert gap <= 1e-10
        assert float(x @ g @ x) == pytest.approx(scipy_min_norm_value(g), abs=1e-8)
        slow_plain += _plain_frank_wolfe_gap(g, np.full(k, 1.0 / k), 3000) > 1e-10
    assert slow_plain >= 6  # the problems are ones where away steps matter


def test_min_norm_options_and_dispatch(monkeypatch):
    import moalign.training.combiners.min_norm as mn

    gram = make_gram("full", 6, np.random.default_rng(34))
    for bad in (0, -3, 1.5, "10"):
        with pytest.raises(MoalignError, match=r"max_iter must be a positive integer, got"):
            min_norm_weights(gram, max_iter=bad)
    for bad in (float("inf"), float("nan"), -1e-3, "1e-8"):
        with pytest.raises(MoalignError, match=r"tol must be a positive number, got"):
            min_norm_weights(gram, tol=bad)
    # float64 for every K, the trivial K = 1 included
    for k in (1, 2, 3):
        assert min_norm_weights(np.eye(k)).dtype == torch.float64
    # identical gradients, K = 2: the documented tie-break is the midpoint
    assert min_norm_weights(np.ones((2, 2))).tolist() == [0.5, 0.5]
    # method picks the solver; max_iter reaches it
    calls = []
    real = mn._active_set
    monkeypatch.setattr(mn, "_active_set", lambda g, tol, it: calls.append(it) or real(g, tol, it))
    min_norm_weights(gram, method="frank-wolfe")
    assert calls == []
    min_norm_weights(gram, method="active-set", max_iter=500)
    assert calls == [500]
    # a Frank-Wolfe budget too small to certify the tolerance warns, naming the gap and the budget
    with pytest.warns(RuntimeWarning, match=r"duality gap .* above tol .* after 1 iterations"):
        min_norm_weights(gram, method="frank-wolfe", max_iter=1)


def test_combiner_settings_are_validated_and_recorded():
    assert get_combiner("mgda").describe() == {
        "name": "mgda", "type": "MGDACombiner", "tol": 1e-10, "method": "active-set"
    }  # fmt: skip
    assert get_combiner("mgda-decoupled", tol=1e-8, method="frank-wolfe").describe() == {
        "name": "mgda-decoupled", "type": "MGDADecoupledCombiner", "tol": 1e-8, "method": "frank-wolfe"
    }  # fmt: skip
    assert get_combiner("mgda-normalized", tol=1e-7, method="frank-wolfe", apply_to="raw").describe() == {
        "name": "mgda-normalized", "type": "MGDANormalizedCombiner", "tol": 1e-7, "method": "frank-wolfe",
        "apply_to": "raw",
    }  # fmt: skip
    assert get_combiner("groupdro").describe() == {
        "name": "groupdro",
        "type": "GroupDROCombiner",
        "eta": 0.01,
    }
    assert get_combiner("pcgrad").describe() == {
        "name": "pcgrad", "type": "PCGradCombiner", "seed": 0, "reduction": "sum"
    }  # fmt: skip
    assert get_combiner("linear").describe() == {"name": "linear", "type": "LinearCombiner", "weights": None}
    assert get_combiner("linear", weights=[1, 3]).describe()["weights"] == [0.25, 0.75]
    for name in ("mgda", "mgda-decoupled", "mgda-normalized"):
        with pytest.raises(MoalignError, match="tol must be a positive number"):
            get_combiner(name, tol=0.0)
        with pytest.raises(MoalignError, match="unknown min-norm method 'newton'; known: active-set"):
            get_combiner(name, method="newton")
    with pytest.raises(MoalignError, match="apply_to must be 'normalized' or 'raw', got 'unit'"):
        get_combiner("mgda-normalized", apply_to="unit")
    assert get_combiner("groupdro", eta=0).eta == 0.0  # eta = 0 (uniform weights) is allowed
    with pytest.raises(MoalignError, match=r"groupdro: eta must be a finite number >= 0, got -1"):
        get_combiner("groupdro", eta=-1)
    with pytest.raises(MoalignError, match=r"reduction must be 'sum' or 'mean', got 'max'"):
        get_combiner("pcgrad", reduction="max")
    with pytest.raises(MoalignError, match=r"pcgrad: seed must be an integer, got 1.5"):
        get_combiner("pcgrad", seed=1.5)
    with pytest.raises(MoalignError, match=r"linear combiner weight of objective 1 is not finite"):
        get_combiner("linear", weights=[1.0, float("nan")])
    with pytest.raises(MoalignError, match=r"linear combiner weights must be a 1-D vector"):
        get_combiner("linear", weights=[[1.0, 2.0]])
    with pytest.raises(MoalignError, match=r"linear combiner weights must be >= 0"):
        get_combiner("linear", weights=[1.0, -2.0])
    with pytest.raises(MoalignError, match=r"^linear combiner weights must not all be zero$"):
        get_combiner("linear", weights=[0.0, 0.0])


def test_weights_inputs_name_the_problem():
    lin, mgda, dec = get_combiner("linear"), get_combiner("mgda"), get_combiner("mgda-decoupled")
    gram = np.eye(3)
    # linear needs neither losses nor a Gram matrix to be given both ways: the size comes from either
    assert lin.weights(None, gram).tolist() == [1 / 3] * 3
    with pytest.raises(MoalignError, match="combiner 'linear': give the losses or the Gram matrix"):
        lin.weights(None, None)
    with pytest.raises(MoalignError, match="combiner 'mgda' needs the Gram matrix of the gradients"):
        mgda.weights([1.0, 2.0])
    with pytest.raises(MoalignError, match="combiner 'mgda-decoupled' needs the per-objective losses"):
        dec.weights(None, gram)
    with pytest.raises(MoalignError, match="got 2 losses for 3 objectives"):
        mgda.weights([1.0, 2.0], gram)
    with pytest.raises(MoalignError, match=r"objective 2 has loss -1.0"):
        dec.weights([0.5, 2.0, -1.0], gram)
    with pytest.raises(MoalignError, match=r"objective 0 has loss 0.0"):
        dec.weights([0.0, 2.0, 3.0], gram)
    with pytest.raises(MoalignError, match=r"^losses must be a vector of numbers, got"):
        mgda.weights(["a", "b", "c"], gram)
    with pytest.raises(
        MoalignError, match=r"^losses must be a 1-D vector with one value per objective, got shape \(1, 3\)"
    ):
        mgda.weights([[1.0, 2.0, 3.0]], gram)
    with pytest.raises(MoalignError, match=r"^need at least one objective \(K >= 1\), got no losses"):
        lin.weights([])
    with pytest.raises(MoalignError, match=r"^loss of objective 1 is not finite \(nan\)"):
        lin.weights([1.0, float("nan")])
    # a scalar loss is one objective; every input becomes a float64 vector
    assert lin.weights(2.5).tolist() == [1.0]
    from moalign.training.combiners.weighting import _check_losses

    assert _check_losses(torch.tensor([1, 2], dtype=torch.int32)).dtype == torch.float64
    assert _check_losses([1, 2]).dtype == torch.float64
    assert _check_losses(np.float32(3.0)).tolist() == [3.0]


def test_apply_weights_skips_zero_weights_without_stopping():
    grads = random_grads(3, seed=35)
    d = apply_weights([0.5, 0.0, 2.0], grads)
    ref = 0.5 * flat64(grads[0]) + 2.0 * flat64(grads[2])
    np.testing.assert_allclose(flat64(d), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(MoalignError, match=r"^got 2 weights for 3 objectives$"):
        apply_weights([0.5, 0.5], grads)
    with pytest.raises(MoalignError, match=r"^weight of objective 1 is not finite"):
        apply_weights([0.5, float("inf"), 0.5], grads)


def test_combine_stats_edge_cases():
    # small gradients (norms below 1) and a zero gradient: norms, cosines 0 for the zero gradient
    gram = np.array([[0.25, 0.1, 0.0], [0.1, 0.16, 0.0], [0.0, 0.0, 0.0]])
    s = combine_stats(gram, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(s["grad_norms"], [0.5, 0.4, 0.0], rtol=1e-12)
    np.testing.assert_allclose(s["cosines"], [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]], rtol=1e-12)
    # round-off may put |G_ij| a hair above ||g_i|| ||g_j||: cosines stay within [-1, 1]; a squared norm a
    # hair below zero is a zero norm, not NaN
    for sign in (1.0, -1.0):
        s = combine_stats(np.array([[2.0, sign * 2.0000000001], [sign * 2.0000000001, 2.0]]), [0.5, 0.5])
        assert s["cosines"][0][1] == sign * 1.0
    s = combine_stats(np.array([[1.0, 0.0], [0.0, -1e-10]]), [0.5, 0.5])
    assert s["grad_norms"] == [1.0, 0.0] and s["cosines"][1] == [0.0, 0.0]
    with pytest.raises(MoalignError, match=r"^got 2 losses for 3 objectives$"):
        combine_stats(np.eye(3), [0.2, 0.3, 0.5], [1.0, 2.0])
    with pytest.raises(MoalignError, match=r"^Gram matrix is 2 x 2 but there are 3 objectives$"):
        combine_stats(np.eye(2), [0.2, 0.3, 0.5])
    with pytest.raises(MoalignError, match=r"^weights must be a vector of numbers"):
        combine_stats(None, ["x"])
    with pytest.raises(MoalignError, match=r"^weight of objective 0 is not finite"):
        combine_stats(None, [float("nan")])


def test_mgda_normalized_raw_coefficients_are_simplex_weights_over_norms():
    # orthogonal gradients with norms 2 and 3: unit vectors are orthonormal, w = (1/2, 1/2), alpha = w / norm
    res = get_combiner("mgda-normalized").weights_and_stats(None, np.diag([4.0, 9.0]))
    np.testing.assert_allclose(res[0].numpy(), [0.25, 1 / 6], rtol=1e-12)
    assert res[1]["simplex_weights"] == pytest.approx([0.5, 0.5], abs=1e-12)


def test_groupdro_state_round_trip_and_records():
    comb = GroupDROCombiner(eta=1.0)
    assert comb.state_dict() == {"log_q": None}
    alpha, stats = comb.weights_and_stats([1.0, 0.0])
    assert alpha.dtype == torch.float64
    np.testing.assert_allclose(stats["log_q"], np.log(alpha.numpy()), rtol=1e-12)
    # a loaded state is normalised, whatever constant it was saved with
    fresh = GroupDROCombiner(eta=0.0)
    fresh.load_state_dict({"log_q": [0.0, math.log(3.0)]})
    np.testing.assert_allclose(fresh.weights([5.0, 1.0]).numpy(), [0.25, 0.75], rtol=1e-12)
    fresh.load_state_dict({"log_q": None})
    assert fresh.weights([5.0, 1.0, 2.0]).tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(MoalignError, match=r"^log_q entry of objective 1 is not finite"):
        fresh.load_state_dict({"log_q": [0.0, float("nan")]})
    with pytest.raises(MoalignError, match=r"^log_q entries must be a 1-D vector"):
        fresh.load_state_dict({"log_q": [[0.0, 1.0]]})


def test_pcgrad_state_round_trip_and_projection_rule():
    rng = np.random.default_rng(36)
    gram = make_gram("full", 6, rng)
    comb = get_combiner("pcgrad", seed=4)
    comb.weights(None, gram)
    state = comb.state_dict()
    assert set(state) == {"rng_state"}
    nxt = comb.weights_and_stats(None, gram)[1]["pcgrad_orders"]
    other = get_combiner("pcgrad", seed=99)  # a different seed: only the loaded state can make them agree
    other.load_state_dict(state)
    assert other.weights_and_stats(None, gram)[1]["pcgrad_orders"] == nxt
    other.load_state_dict({})  # nothing to restore: the generator goes on
    # orthogonal gradients: no projection at all; conflicting gradients with norms below 1 are projected
    assert get_combiner("pcgrad").weights_and_stats(None, np.eye(3))[1]["n_projections"] == 0
    small = np.array([[0.04, -0.03], [-0.03, 0.09]])
    alpha, stats = get_combiner("pcgrad").weights_and_stats(None, small)
    assert stats["n_projections"] == 2
    # h1 = g1 - (<g1,g2>/|g2|^2) g2, h2 = g2 - (<g2,g1>/|g1|^2) g1
    np.testing.assert_allclose(alpha.numpy(), [1 + 0.03 / 0.04, 1 + 0.03 / 0.09], rtol=1e-12)


def test_registering_and_building_a_new_combiner():
    from moalign.training.combiners import register_combiner
    from moalign.training.combiners.base import COMBINERS, combiner_from_settings

    class Half(Combiner):
        name = "half-test"
        needs_gram = False

        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def _weights(self, losses, gram):
            return torch.full((losses.numel(),), 0.5, dtype=torch.float64), {}

    for bad in ("", "  ", 3):
        with pytest.raises(MoalignError, match="combiner name must be a non-empty string"):
            register_combiner(bad, Half)
    register_combiner("half-test", Half, aliases=("halves-test",))
    try:
        assert isinstance(get_combiner("halves-test"), Half)
        # a factory taking **kwargs receives every set value; unset (None) ones are left out
        built = combiner_from_settings("half-test", {"eta": 0.5, "weights": None, "custom": 3})
        assert built.kwargs == {"eta": 0.5, "custom": 3}
        assert combiner_from_settings("groupdro", {"eta": 0.5, "seed": 3, "weights": None}).eta == 0.5
    finally:
        COMBINERS.unregister("half-test")
    with pytest.raises(MoalignError, match=r"^combiner name must be a string, got 3$"):
        get_combiner(3)


def test_gram_matrix_structure_chunks_and_overflow():
    grads = random_grads(3, shapes=((7,), (2, 3)), seed=37)
    ref = gram_matrix(grads)
    for chunk in (1, 3):  # slices within a parameter add up to the same inner products
        torch.testing.assert_close(gram_matrix(grads, chunk_size=chunk), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(MoalignError, match=r"^chunk_size must be >= 1, got 0$"):
        gram_matrix(grads, chunk_size=0)
    # a parameter no objective has a gradient for is skipped, and the ones after it still count
    holes = [[None, *g] for g in grads]
    torch.testing.assert_close(gram_matrix(holes), ref, rtol=1e-12, atol=1e-12)
    # finite gradients whose squared norm overflows float64 name the objective
    big = [[torch.ones(4, dtype=torch.float64)], [torch.full((4,), 1e200, dtype=torch.float64)]]
    with pytest.raises(
        MoalignError, match=r"^gradient of objective 1 is too large: its squared norm overflows"
    ):
        gram_matrix(big)
    with pytest.raises(
        MoalignError, match=r"^grads must be a sequence with one entry per objective \(a list"
    ):
        gram_matrix(torch.zeros(2, 3))
    with pytest.raises(
        MoalignError, match=r"^grads must be a sequence with one entry per objective, got <class 'int'>"
    ):
        gram_matrix(3)
    with pytest.raises(
        MoalignError, match=r"^need at least one objective \(K >= 1\), got an empty list of gradients"
    ):
        gram_matrix([])


def test_gram_and_gradient_checks_name_the_problem():
    cases = [
        ("x", r"^Gram matrix must be a K x K matrix of numbers, got <class 'str'>$"),
        (np.zeros((2, 3)), r"^Gram matrix must be square K x K, got shape \(2, 3\)$"),
        (np.zeros((0, 0)), r"^need at least one objective \(K >= 1\), got an empty Gram matrix$"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), r"^Gram matrix has non-finite entries \(NaN/inf\)"),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), r"^Gram matrix is not symmetric$"),
        (np.array([[-1.0, 0.0], [0.0, 1.0]]), r"^Gram matrix has a negative diagonal entry \(squared norm\)"),
        (np.array([[1.0, 2.0], [2.0, 1.0]]), r"^Gram matrix is not positive semidefinite$"),
    ]
    for gram, msg in cases:
        with pytest.raises(MoalignError, match=msg):
            min_norm_weights(gram)
    # the tolerances are relative to the largest entry: round-off at a large scale is accepted
    s = 1e4
    min_norm_weights(np.array([[s, 1.0], [1.0 + 1e-3, s]]))  # asymmetry 1e-7 of the scale
    min_norm_weights(np.array([[s, 0.0, 0.0], [0.0, s, 0.0], [0.0, 0.0, -1e-5]]))  # squared norm -1e-9 of it
    m = np.array([[s, s], [s, s - 1e-3]])  # smallest eigenvalue about -5e-4: -5e-8 of the scale
    min_norm_weights(m)
    grads = random_grads(2, seed=38)
    bad = [
        ([grads[0], None], r"^gradient of objective 1 must be a tensor or a list of tensors, got None$"),
        ([grads[0], 3], r"^gradient of objective 1 must be a tensor or a list of tensors, got <class 'int'>$"),
        ([grads[0], [1, *grads[1][1:]]], r"^gradient of objective 1, parameter 0: expected a tensor, got <class 'int'>$"),
        ([[], []], r"^gradient of objective 0 has no parameters$"),
        ([[torch.zeros(2)], [torch.zeros(3)]], r"^parameter 0: gradient of objective 1 has shape \(3,\) but objective 0 has shape \(2,\)$"),
        ([[None, torch.zeros(2)], [torch.zeros(1), torch.zeros(3)]], r"^parameter 1: gradient of objective 1 has shape \(3,\) but objective 0"),
        ([[torch.zeros(2)], [torch.zeros(2, dtype=torch.int64)]], r"^parameter 0: gradient of objective 1 is not a real floating tensor$"),
        ([[torch.zeros(2, dtype=torch.complex64)], [torch.zeros(2)]], r"^parameter 0: gradient of objective 0 is not a real floating tensor$"),
    ]  # fmt: skip
    for g, msg in bad:
        with pytest.raises(MoalignError, match=msg):
            gram_matrix(g)
    # a None first entry for a parameter: the shape check starts at the first objective that has one
    with pytest.raises(
        MoalignError, match=r"^parameter 0: gradient of objective 2 has shape \(3,\) but objective 1"
    ):
        gram_matrix([[None], [torch.zeros(2)], [torch.zeros(3)]])


def test_apply_weights_keeps_parameters_after_one_nobody_has():
    grads = [[torch.ones(2), None, torch.ones(3)], [torch.ones(2), None, 2 * torch.ones(3)]]
    d = apply_weights([0.5, 0.5], grads)
    assert len(d) == 3 and d[1] is None
    assert d[2].tolist() == [1.5, 1.5, 1.5]


def test_min_norm_combiners_pass_their_settings_to_the_solver(monkeypatch):
    import moalign.training.combiners.min_norm as mn

    seen = []
    real = mn.min_norm_weights
    monkeypatch.setattr(mn, "min_norm_weights", lambda g, **kw: seen.append(kw) or real(g, **kw))
    for name in ("mgda", "mgda-decoupled", "mgda-normalized"):
        get_combiner(name, tol=1e-6, method="frank-wolfe").weights([1.0, 2.0], np.eye(2))
    assert seen == [{"tol": 1e-6, "method": "frank-wolfe"}] * 3


def test_missing_weights_and_single_tensor_gradients_are_named():
    with pytest.raises(MoalignError, match=r"^this combiner needs the per-objective weights, got None$"):
        apply_weights(None, random_grads(2, seed=39))
    with pytest.raises(MoalignError, match=r"one flat tensor each\), not a single tensor$"):
        gram_matrix(torch.zeros(2, 3))
