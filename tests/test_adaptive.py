"""knnlm_core.adaptive: λ per equal-population feature bin fitted on a validation split and
applied unchanged to another split; grid minimisers checked by brute force; no evaluation
value can enter the fit (signature and mutation tests); the oracle stays labelled."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from knnlm_core import adaptive


def _split(seed: int, t: int = 2000):
    """Synthetic split: near neighbours (small distance) make p_kNN good, far ones bad."""
    rng = np.random.default_rng(seed)
    dist = rng.gamma(2.0, 5.0, t)  # (T,) nearest neighbour distance
    p_lm = rng.uniform(0.01, 0.3, t)
    good = rng.uniform(size=t) < np.exp(-dist / 10.0)
    p_knn = np.where(good, rng.uniform(0.5, 1.0, t), rng.uniform(0.0, 0.02, t))
    return dist, p_lm, p_knn


def _brute_force(p_lm, p_knn, grid):
    """The grid value with the smallest mean NLL, by a loop over the grid."""
    best, best_nll = None, np.inf
    for lam in grid:
        with np.errstate(divide="ignore"):
            nll = np.mean(-np.log(lam * p_knn + (1 - lam) * p_lm))
        if nll < best_nll:
            best, best_nll = lam, nll
    return best


def test_hand_case_equals_grid_minimiser():
    # 6 validation positions, 3 equal-population distance bins of 2 positions each
    dist = np.array([0.5, 9.0, 0.1, 4.0, 5.0, 8.0])
    p_lm = np.array([0.1, 0.2, 0.1, 0.3, 0.3, 0.4])
    p_knn = np.array([0.9, 0.0, 0.8, 0.3, 0.1, 0.05])
    grid = adaptive.default_grid()
    assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 101
    fitted = adaptive.fit(dist, p_lm, p_knn, "nn_distance", n_bins=3, grid=grid)
    groups = [[0, 2], [3, 4], [1, 5]]  # near, middle, far
    np.testing.assert_array_equal(fitted.bin_of(dist), [0, 2, 0, 1, 1, 2])
    for b, members in enumerate(groups):
        assert fitted.lam[b] == _brute_force(p_lm[members], p_knn[members], grid)
    assert fitted.lam[0] == 1.0 and fitted.lam[2] == 0.0  # the endpoints are reachable
    assert fitted.n_fit.tolist() == [2, 2, 2] and fitted.feature == "nn_distance"


def test_fit_on_validation_apply_to_evaluation():
    v_dist, v_lm, v_knn = _split(0)
    e_dist, e_lm, e_knn = _split(1, 3000)
    fitted = adaptive.fit(v_dist, v_lm, v_knn, "nn_distance", n_bins=5)
    np.testing.assert_allclose(fitted.edges, np.quantile(v_dist, [0.2, 0.4, 0.6, 0.8]))
    assert np.all(np.abs(fitted.n_fit - 400) <= 1)  # equal population on validation
    bins = fitted.bin_of(v_dist)
    for b in range(5):
        assert fitted.lam[b] == _brute_force(v_lm[bins == b], v_knn[bins == b], fitted.grid)
    assert np.all(np.diff(fitted.lam) <= 0)  # nearer neighbours earn more λ on this data
    lam = fitted.apply(e_dist)
    assert lam.shape == e_dist.shape
    np.testing.assert_array_equal(lam, fitted.lam[np.searchsorted(fitted.edges, e_dist, side="right")])
    # outside the validation range: the end bins
    out = fitted.apply(np.array([-1e9, v_dist.min() - 1, v_dist.max() + 1, 1e9]))
    np.testing.assert_array_equal(out, fitted.lam[[0, 0, -1, -1]])
    # on the evaluation split the adaptive λ beats the single λ fitted on validation
    single = adaptive.fit(v_dist, v_lm, v_knn, "nn_distance", n_bins=1).lam[0]
    nll = lambda lam_: np.mean(-np.log(lam_ * e_knn + (1 - lam_) * e_lm))  # noqa: E731
    assert nll(lam) < nll(single)


def test_no_evaluation_value_enters_the_fit():
    params = set(inspect.signature(adaptive.fit).parameters)
    assert params == {"valid_feature", "valid_p_lm", "valid_p_knn", "feature", "n_bins", "grid"}
    assert list(inspect.signature(adaptive.AdaptiveLambda.apply).parameters) == ["self", "feature"]
    v_dist, v_lm, v_knn = _split(0)
    e_dist, e_lm, e_knn = _split(1)
    fitted = adaptive.fit(v_dist, v_lm, v_knn, "nn_distance", n_bins=4)
    snapshot = {f: np.array(getattr(fitted, f)) for f in ("edges", "lam", "grid", "n_fit")}
    lam_before = fitted.apply(e_dist)
    # change every evaluation value arbitrarily: the fitted object cannot change
    rng = np.random.default_rng(7)
    e_dist[:] = rng.uniform(-100, 100, len(e_dist))
    e_lm[:], e_knn[:] = rng.uniform(size=len(e_lm)), rng.uniform(size=len(e_knn))
    fitted.apply(e_dist)
    for f, arr in snapshot.items():
        np.testing.assert_array_equal(getattr(fitted, f), arr)
        assert not getattr(fitted, f).flags.writeable
    # and refitting on the same validation data gives the same object whatever the evaluation data
    again = adaptive.fit(v_dist, v_lm, v_knn, "nn_distance", n_bins=4)
    for f in snapshot:
        np.testing.assert_array_equal(getattr(again, f), snapshot[f])
    assert not np.array_equal(fitted.apply(e_dist), lam_before)  # λ follows only the evaluation *feature*
    # the check above would catch a fit that read evaluation data: a leaky variant differs
    leaky = adaptive.fit(np.r_[v_dist, e_dist], np.r_[v_lm, e_lm], np.r_[v_knn, e_knn], "nn_distance", n_bins=4)
    assert not np.array_equal(leaky.edges, snapshot["edges"])


def test_tied_feature_bins_fall_back_to_the_single_best_lambda():
    v_dist, v_lm, v_knn = _split(3, 400)
    v_dist = np.round(v_dist / 50.0)  # mostly zeros: tied quantile edges, empty bins
    fitted = adaptive.fit(v_dist, v_lm, v_knn, "nn_distance", n_bins=8)
    single = adaptive.fit(v_dist, v_lm, v_knn, "nn_distance", n_bins=1).lam[0]
    assert np.all(np.isfinite(fitted.lam)) and np.any(fitted.n_fit == 0)
    assert np.all(fitted.lam[fitted.n_fit == 0] == single)


def test_oracle_by_frequency_bin():
    dist, p_lm, p_knn = _split(2)
    freq_bin = np.random.default_rng(0).integers(-1, 5, len(dist)).astype(np.int16)
    oracle = adaptive.oracle_by_bin(freq_bin, p_lm, p_knn)
    assert adaptive.ORACLE_LABEL == "oracle (upper bound)"
    assert sorted(oracle) == list(range(-1, 5))
    for b, lam in oracle.items():
        m = freq_bin == b
        assert lam == _brute_force(p_lm[m], p_knn[m], adaptive.default_grid())


def test_features():
    d = np.array([[3.0, 1.0, np.inf], [np.nan, 2.0, 5.0]])
    np.testing.assert_array_equal(adaptive.nn_distance(d), [1.0, 2.0])
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(adaptive.lm_entropy(logits), -(p * np.log(p)).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(adaptive.lm_entropy(np.zeros((1, 8))), [np.log(8)])


def test_rejects_bad_input():
    with pytest.raises(AssertionError):
        adaptive.fit(np.array([1.0, np.nan]), np.ones(2), np.ones(2), "nn_distance")
    with pytest.raises(AssertionError):
        adaptive.fit(np.ones(3), np.ones(2), np.ones(2), "nn_distance")


def test_pure_numpy_modules():
    """adaptive, whiten and whatif (imported by the app) import neither torch nor streamlit."""
    import subprocess
    import sys

    code = ("import sys; import knnlm_core.adaptive, knnlm_core.whiten, knnlm_core.whatif; "
            "bad = [m for m in ('streamlit', 'torch', 'faiss') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
