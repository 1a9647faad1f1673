"""knnlm_core.rescore.p_knn against a per-row float64 brute force written here (exp, shift by the row's
smallest kept distance): missing neighbours and unknown distances, k < K, IDF weights (some 0), tiny
and huge τ, distances far from 0 or negative, first neighbour not the nearest, blocks and threads,
memory-mapped input, the cache of target positions, bad arguments, and a hypothesis property."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knnlm_core import rescore
from knnlm_core.rescore import p_knn


def brute_force(values, dists, targets, k, tau, weights=None):
    """p_kNN(target) (T,): per row, the kept neighbours among the first k (value >= 0, finite distance,
    weight > 0) weigh exp(-(d - min d) / tau) · weight; 0 for a row that keeps none."""
    out = np.zeros(len(targets))
    for r in range(len(targets)):
        v, d = values[r, :k], dists[r, :k].astype(np.float64)
        a = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)[np.maximum(v, 0)]
        keep = (v >= 0) & np.isfinite(d) & (a > 0)
        if keep.any():
            w = np.exp(-(d[keep] - d[keep].min()) / tau) * a[keep]
            out[r] = math.fsum(w[v[keep] == targets[r]]) / math.fsum(w)
    return out


def neighbours(seed: int, t: int = 300, k: int = 40, vocab: int = 6):
    """(values, dists, targets) with missing neighbours (-1, inf), unknown distances (inf, value kept), a row
    without neighbours, rows near 0 / far from 0 / negative, and rows whose first neighbour is not the nearest."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, vocab, t)
    base = rng.choice([0.0, 30.0, 5e3, -200.0], size=(t, 1))
    dists = (base + np.sort(rng.exponential(rng.choice([0.01, 1.0, 50.0], size=(t, 1)), (t, k)), axis=1))
    dists[::7] = dists[::7, ::-1]  # the first neighbour is the farthest
    dists = dists.astype(np.float32)
    values = np.where(rng.random((t, k)) < 0.3, targets[:, None], rng.integers(0, vocab, (t, k))).astype(np.int32)
    missing = rng.random((t, k)) < 0.1
    values[missing], dists[missing] = -1, np.inf
    dists[rng.random((t, k)) < 0.05] = np.inf  # distance unknown (an exact distance not computed)
    dists[::11, 0] = np.inf  # the first neighbour missing
    values[5], dists[5] = -1, np.inf  # no neighbour at all
    return values, dists, targets


WEIGHTS = {"none": None, "positive": np.array([0.7, 1.0, 2.5, 9.0, 0.01, 3.0]),
           "with zeros": np.array([0.0, 1.0, 2.5, 0.0, 0.01, 3.0])}


@pytest.mark.parametrize("weights", WEIGHTS, ids=list(WEIGHTS))
def test_matches_brute_force(weights, monkeypatch):
    values, dists, targets = neighbours(0)
    monkeypatch.setattr(rescore, "ROWS", 16)  # many blocks, a short last one
    for k in (1, 7, 40):
        for tau in (1e-3, 0.5, 10.0, 1e4):
            ref = brute_force(values, dists, targets, k, tau, WEIGHTS[weights])
            for threads in (1, 3):
                got = p_knn(values, dists, targets, k, tau, WEIGHTS[weights], threads)
                np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-300, err_msg=f"k={k} tau={tau}")
    assert p_knn(values, dists, targets, 40, 1.0, WEIGHTS[weights])[5] == 0.0


def test_hand_computed_rows():
    """Rows whose weights exp(-d / τ) all underflow or overflow unshifted, and a nearest neighbour of
    weight 0 with the others 1000 τ away: p is still the softmax of the neighbours kept."""
    values = np.array([[0, 1, -1], [0, 1, 1], [2, 1, 0]], np.int32)
    dists = np.array([[1e4, 1e4 + 1, np.inf], [-1e3, -1e3 + 2, -1e3 + 2], [0.0, 1e3, 1e3]], np.float32)
    targets = np.array([0, 1, 0])
    got = p_knn(values, dists, targets, 3, 1.0, np.array([3.0, 1.0, 0.0]))
    np.testing.assert_allclose(got, [3 / (3 + math.exp(-1)), 2 * math.exp(-2) / (3 + 2 * math.exp(-2)), 0.75],
                               rtol=1e-14)


def test_memmap_input_equals_in_memory(tmp_path):
    values, dists, targets = neighbours(1, t=500)
    np.save(tmp_path / "values.npy", values)
    np.save(tmp_path / "dists.npy", dists)
    mv, md = (np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in ("values", "dists"))
    assert isinstance(mv, np.memmap) and isinstance(md, np.memmap)
    for k in (3, 40):
        got = p_knn(mv, md, targets, k, 2.0, WEIGHTS["positive"])
        np.testing.assert_array_equal(got, p_knn(values, dists, targets, k, 2.0, WEIGHTS["positive"]))
        np.testing.assert_allclose(got, brute_force(values, dists, targets, k, 2.0, WEIGHTS["positive"]),
                                   rtol=1e-12, atol=1e-300)


def test_target_positions_are_cached_per_array_pair():
    values, dists, targets = neighbours(2)
    first = p_knn(values, dists, targets, 40, 3.0)
    hits = rescore._hits(values, targets, 1)
    assert hits is rescore._hits(values, targets, 1)  # built once, reused for any k, τ, distances, weights
    np.testing.assert_array_equal(hits, np.flatnonzero(values == targets[:, None]))
    other = (targets + 1) % 6  # another targets array: its own positions, not the cached ones
    np.testing.assert_allclose(p_knn(values, dists, other, 40, 3.0), brute_force(values, dists, other, 40, 3.0),
                               rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(p_knn(values, dists, targets, 40, 3.0), first)
    for _ in range(rescore.KEPT_HITS + 2):
        p_knn(values, dists, targets.copy(), 1, 3.0)
    assert len(rescore._HITS) <= rescore.KEPT_HITS


def test_bad_arguments_are_value_errors():
    values, dists, targets = neighbours(3, t=10, k=4)
    for k in (0, 5):
        with pytest.raises(ValueError, match=r"k must be in 1\.\.4"):
            p_knn(values, dists, targets, k, 1.0)
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tau must be > 0"):
            p_knn(values, dists, targets, 2, tau)
    with pytest.raises(ValueError, match=r"must be \(T, K\)"):
        p_knn(values, dists[:, :3], targets, 2, 1.0)
    with pytest.raises(ValueError, match=r"must be \(T, K\)"):
        p_knn(values, dists, targets[:5], 2, 1.0)


distance = st.one_of(st.floats(-50.0, 1e4, width=32), st.just(float("inf")))


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(st.tuples(st.integers(-1, 3), distance), min_size=5, max_size=5), min_size=1, max_size=6),
    targets=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    k=st.integers(1, 5),
    tau=st.floats(1e-3, 1e3),
    weights=st.one_of(st.none(), st.lists(st.floats(0.0, 10.0), min_size=4, max_size=4)),
)
def test_property_equals_brute_force(rows, targets, k, tau, weights):
    values = np.array([[v for v, _ in row] for row in rows], np.int32)
    dists = np.array([[d for _, d in row] for row in rows], np.float32)
    dists[values < 0] = np.inf  # the storage contract: a missing neighbour has distance +inf
    t = np.array(targets[: len(rows)])
    w = None if weights is None else np.array(weights)
    got = p_knn(values, dists, t, k, tau, w)
    assert ((got >= 0) & (got <= 1 + 1e-15)).all()
    np.testing.assert_allclose(got, brute_force(values, dists, t, k, tau, w), rtol=1e-12, atol=1e-300)
