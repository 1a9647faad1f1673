"""Tests of knnlm_core.knn (SPEC §2, §4): p_kNN, interpolation, target rank, recall.

Every formula is checked on a hand-computed case and against a per-row Python reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from knnlm_core.knn import (
    PAD,
    first_match_rank,
    interpolate,
    log_weights,
    p_knn_of,
    target_stats,
)

TAU = 10.0
LN2 = math.log(2.0)


def ref_p_knn(dists, nbr_values, target, tau):
    """p_kNN(target) of one query, straight from SPEC §2 (float64 sums, shift by the min distance)."""
    live = [(float(d), int(v)) for d, v in zip(dists, nbr_values, strict=True) if v != PAD]
    if not live:
        return 0.0
    d0 = min(d for d, _ in live)
    w = [(math.exp(-(d - d0) / tau), v) for d, v in live]
    return sum(x for x, v in w if v == target) / sum(x for x, _ in w)


def random_case(seed: int, q: int = 40, k: int = 32, vocab: int = 12, pad_share: float = 0.15):
    """Seeded (dists, nbr_values, targets): sorted distances, repeated values, trailing -1 padding."""
    rng = np.random.default_rng(seed)
    dists = np.sort(rng.uniform(0.0, 60.0, size=(q, k)), axis=1).astype(np.float32)  # (Q, k)
    nbr_values = rng.integers(0, vocab, size=(q, k))  # (Q, k)
    n_pad = rng.binomial(k, pad_share, size=q)
    for row, p in enumerate(n_pad):
        if p:
            nbr_values[row, k - p :] = PAD
            dists[row, k - p :] = np.inf
    targets = rng.integers(0, vocab + 3, size=q)  # some targets never retrieved
    return dists, nbr_values, targets


# ---------------------------------------------------------------- p_kNN


def test_p_knn_hand_case():
    # weights exp(0)=1, exp(0)=1, exp(-ln2)=0.5 -> total 2.5
    dists = np.array([[0.0, 0.0, 10.0 * LN2]])
    values = np.array([[5, 7, 5]])
    assert p_knn_of(dists, values, np.array([5]), TAU)[0] == pytest.approx(1.5 / 2.5)
    assert p_knn_of(dists, values, np.array([7]), TAU)[0] == pytest.approx(1.0 / 2.5)


def test_p_knn_ties_share_weight_equally():
    dists = np.full((1, 4), 3.7)
    values = np.array([[1, 2, 3, 4]])
    for t in (1, 2, 3, 4):
        assert p_knn_of(dists, values, np.array([t]), TAU)[0] == pytest.approx(0.25)


def test_p_knn_duplicate_neighbours_sum():
    dists = np.array([[1.0, 1.0, 1.0, 1.0]])
    values = np.array([[3, 3, 3, 4]])
    assert p_knn_of(dists, values, np.array([3]), TAU)[0] == pytest.approx(0.75)
    # duplicates at different distances: 1 + e^-1 over 1 + e^-1 + e^-2 (tau = 1)
    dists = np.array([[0.0, 1.0, 2.0]])
    values = np.array([[9, 9, 8]])
    e = math.exp
    assert p_knn_of(dists, values, np.array([9]), 1.0)[0] == pytest.approx((1 + e(-1)) / (1 + e(-1) + e(-2)))


def test_p_knn_absent_target_is_zero():
    dists = np.array([[0.0, 1.0, 2.0]])
    values = np.array([[1, 2, 3]])
    assert p_knn_of(dists, values, np.array([99]), TAU)[0] == 0.0


def test_p_knn_padded_neighbours_carry_no_weight():
    # two real neighbours with weights 1 and 0.5; the padded ones are ignored whatever their distance
    values = np.array([[5, 6, PAD, PAD], [5, 6, PAD, PAD]])
    dists = np.array([[0.0, 10.0 * LN2, np.inf, np.inf], [0.0, 10.0 * LN2, 0.0, 0.0]])
    p = p_knn_of(dists, values, np.array([5, 5]), TAU)
    np.testing.assert_allclose(p, [2.0 / 3.0, 2.0 / 3.0])
    # a padded slot never matches, even a (nonsensical) target equal to PAD
    assert p_knn_of(dists[:1], values[:1], np.array([PAD]), TAU)[0] == 0.0


def test_p_knn_all_padded_row_is_zero_not_nan():
    dists = np.array([[np.inf, np.inf], [0.0, 1.0]])
    values = np.array([[PAD, PAD], [3, 4]])
    with np.errstate(all="raise"):
        p = p_knn_of(dists, values, np.array([3, 3]), TAU)
        lw = log_weights(dists, TAU, values)
    assert p[0] == 0.0
    assert np.all(lw[0] == -np.inf)  # docstring: -inf on missing neighbours, not NaN
    assert np.exp(lw[1]).sum() == pytest.approx(1.0)


def test_p_knn_is_stable_for_large_distances():
    # naive exp(-d / tau) underflows to 0 / 0 here; log-sum-exp gives the exact 2/3
    dists = np.array([[1e6, 1e6 + 10.0 * LN2]])
    values = np.array([[1, 2]])
    with np.errstate(all="raise"):
        p = p_knn_of(dists, values, np.array([1]), TAU)
    assert p[0] == pytest.approx(2.0 / 3.0)


@pytest.mark.parametrize("tau", [1.0, 10.0, 100.0])
def test_p_knn_matches_reference(tau):
    dists, values, targets = random_case(seed=1)
    p = p_knn_of(dists, values, targets, tau)
    expected = [ref_p_knn(d, v, t, tau) for d, v, t in zip(dists, values, targets, strict=True)]
    np.testing.assert_allclose(p, expected, rtol=1e-9, atol=1e-12)
    assert np.any(p == 0.0) and np.any(p > 0.0)  # the data covers both cases


def test_log_weights_normalised_and_ordered():
    dists, values, _ = random_case(seed=2)
    w = np.exp(log_weights(dists, TAU, values))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(w[values == PAD] == 0.0)
    for row in range(len(w)):  # distances ascend, so live weights descend
        live = w[row][values[row] != PAD]
        assert np.all(np.diff(live) <= 0.0)


def test_p_knn_sums_to_one_over_retrieved_types():
    dists, values, _ = random_case(seed=3, vocab=5)
    for row in range(len(values)):
        types = np.unique(values[row][values[row] != PAD])
        total = p_knn_of(np.repeat(dists[row : row + 1], len(types), 0),
                         np.repeat(values[row : row + 1], len(types), 0), types, TAU).sum()
        assert total == pytest.approx(1.0)


# ---------------------------------------------------------------- interpolation, nll, gain


def test_interpolate_hand_values():
    p_lm = np.array([0.2, 0.5, 0.0])
    p_knn = np.array([0.6, 0.0, 1.0])
    np.testing.assert_allclose(interpolate(p_lm, p_knn, 0.25), [0.3, 0.375, 0.25])
    np.testing.assert_allclose(interpolate(p_lm, p_knn, 0.0), p_lm)
    np.testing.assert_allclose(interpolate(p_lm, p_knn, 1.0), p_knn)


def test_interpolate_per_query_lambda():
    p_lm = np.array([0.2, 0.2])
    p_knn = np.array([0.6, 0.6])
    np.testing.assert_allclose(interpolate(p_lm, p_knn, np.array([0.5, 0.1])), [0.4, 0.24])


def test_nll_and_gain_sign():
    # gain = ln p_kNNLM - ln p_LM = nll_LM - nll_kNNLM: positive exactly when p_kNN > p_LM
    p_lm = np.array([0.1, 0.4, 0.3])
    p_knn = np.array([0.5, 0.0, 0.3])
    p = interpolate(p_lm, p_knn, 0.25)  # [0.2, 0.3, 0.3]
    nll_lm, nll_knnlm = -np.log(p_lm), -np.log(p)
    gain = nll_lm - nll_knnlm
    np.testing.assert_allclose(gain, [math.log(2.0), math.log(0.75), 0.0], atol=1e-12)
    assert gain[0] > 0 > gain[1]
    np.testing.assert_allclose(nll_knnlm, [-math.log(0.2), -math.log(0.3), -math.log(0.3)])


# ---------------------------------------------------------------- hits, ranks, n_target


HAND_VALUES = np.array([
    [7, 1, 2, 3],  # target 7 at rank 1
    [1, 2, 7, 7],  # rank 3, twice
    [1, 2, 3, 4],  # absent
    [1, 7, PAD, PAD],  # rank 2 with padding
    [PAD, PAD, PAD, PAD],  # no neighbour at all
])
HAND_TARGETS = np.array([7, 7, 7, 7, 7])


def test_first_match_rank_hand():
    match = HAND_VALUES == HAND_TARGETS[:, None]
    rank = first_match_rank(match)
    assert rank.dtype == np.int32
    np.testing.assert_array_equal(rank, [1, 3, 0, 2, 0])


def test_target_stats_hand():
    rank, n_target = target_stats(HAND_VALUES, HAND_TARGETS)
    np.testing.assert_array_equal(rank, [1, 3, 0, 2, 0])
    np.testing.assert_array_equal(n_target, [1, 2, 0, 1, 0])
    k = HAND_VALUES.shape[1]
    np.testing.assert_allclose(1.0 - n_target / k, [0.75, 0.5, 1.0, 0.75, 1.0])  # non-target share


def test_rank_and_count_match_reference():
    _, values, targets = random_case(seed=4, k=64, vocab=20)
    rank, n_target = target_stats(values, targets)
    for row, (v, t) in enumerate(zip(values.tolist(), targets.tolist(), strict=True)):
        assert rank[row] == next((i + 1 for i, x in enumerate(v) if x == t), 0)
        assert n_target[row] == v.count(t)
    assert np.any(rank == 0) and np.any(rank == 1)
