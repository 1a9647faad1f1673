"""Tests of knnlm_core.metrics (SPEC §3, §5, §6) against hand values and brute-force numpy loops.

Keys are seeded synthetic clusters stored as fp16 memmaps, like a run's keys.npy; key blocks
are shrunk so the streaming code crosses several block boundaries.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from knnlm_core import index as index_mod
from knnlm_core import metrics
from knnlm_core.metrics import (
    centroids,
    coefficient_of_variation,
    contamination_from_neighbors,
    exact_knn,
    per_type_mean_max,
    spread,
    token_freq,
)

faiss.omp_set_num_threads(1)

VOCAB = 12


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 7 rows, so every streaming loop runs over many (and a ragged last) block."""
    monkeypatch.setattr(metrics, "blocks", lambda keys, block=7: index_mod.blocks(keys, 7))


@pytest.fixture
def store(tmp_path):
    """(keys fp16 memmap (N, d), values (N,)): clustered keys, skewed type frequencies incl. 0 and 1."""
    rng = np.random.default_rng(0)
    n, d = 300, 8
    p = np.array([40, 20, 10, 10, 5, 5, 3, 3, 2, 1, 0, 1], dtype=np.float64)
    values = rng.choice(VOCAB, size=n, p=p / p.sum()).astype(np.int32)
    values[:2] = [9, 11]  # types 9 and 11 guaranteed to occur
    values[2:] = np.where(np.isin(values[2:], [9, 10, 11]), 0, values[2:])  # 9, 11: freq 1; 10: freq 0
    centers = rng.normal(0, 1.5, size=(VOCAB, d))  # overlapping clusters
    scale = rng.uniform(0.3, 2.0, size=VOCAB)
    keys = centers[values] + rng.normal(size=(n, d)) * scale[values, None]
    np.save(tmp_path / "keys.npy", keys.astype(np.float16))
    return np.load(tmp_path / "keys.npy", mmap_mode="r"), values


# ---------------------------------------------------------------- freq, centroids, spread, cv


def test_token_freq_hand():
    freq = token_freq(np.array([2, 0, 2, 2, 5]), 7)
    assert freq.dtype == np.int64
    np.testing.assert_array_equal(freq, [1, 0, 3, 0, 0, 1, 0])


def test_centroids_match_per_type_loop(store):
    keys, values = store
    mu = centroids(keys, values, VOCAB)
    k32 = np.asarray(keys, dtype=np.float32)
    assert mu.shape == (VOCAB, keys.shape[1]) and mu.dtype == np.float64
    for v in range(VOCAB):
        rows = k32[values == v]
        expected = rows.astype(np.float64).mean(axis=0) if len(rows) else np.zeros(keys.shape[1])
        np.testing.assert_allclose(mu[v], expected, rtol=1e-10, atol=1e-12)
    assert np.all(mu[10] == 0.0)  # unseen type


def test_spread_matches_direct_norm(store):
    keys, values = store
    mu = centroids(keys, values, VOCAB)
    r = spread(keys, values, mu)
    expected = np.linalg.norm(np.asarray(keys, dtype=np.float64) - mu[values], axis=1)  # L2, not squared
    np.testing.assert_allclose(r, expected, rtol=1e-5)
    assert r[0] == pytest.approx(0.0, abs=1e-6)  # type 9 has one entry: it is its own centroid


def test_cv_hand():
    # type 0: r = [1, 3] -> mean 2, population std 1 -> 0.5; type 1: r = [2, 2, 2] -> 0
    r = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 4.0])
    values = np.array([0, 0, 1, 1, 1, 2])
    cv = coefficient_of_variation(r, values, 4)
    assert cv[0] == pytest.approx(0.5)
    assert cv[1] == pytest.approx(0.0, abs=1e-7)
    assert np.isnan(cv[2])  # freq 1
    assert np.isnan(cv[3])  # freq 0


def test_cv_matches_per_type_loop(store):
    keys, values = store
    cv = coefficient_of_variation(spread(keys, values, centroids(keys, values, VOCAB)), values, VOCAB)
    k32 = np.asarray(keys, dtype=np.float32)
    for v in range(VOCAB):
        rows = k32[values == v].astype(np.float64)
        if len(rows) < 2:
            assert np.isnan(cv[v])
            continue
        r = np.linalg.norm(rows - rows.mean(axis=0), axis=1)
        assert cv[v] == pytest.approx(np.std(r) / np.mean(r), rel=1e-4)  # np.std: population (ddof=0)
    assert np.isnan(cv[[9, 10, 11]]).all()
    assert np.isfinite(cv[:9]).all()


def test_per_type_mean_max_hand():
    x = np.array([1.0, 5.0, 2.0, 7.0])
    values = np.array([0, 0, 2, 0])
    mean, mx = per_type_mean_max(x, values, 4)
    np.testing.assert_allclose(mean[[0, 2]], [13.0 / 3.0, 2.0])
    np.testing.assert_allclose(mx[[0, 2]], [7.0, 2.0])
    assert np.isnan(mean[[1, 3]]).all() and np.isnan(mx[[1, 3]]).all()


# ---------------------------------------------------------------- exact kNN


def brute_sq_dists(queries, keys):
    """(Q, N) squared L2 in float64."""
    q = np.asarray(queries, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    return ((q[:, None, :] - k[None, :, :]) ** 2).sum(axis=2)


@pytest.mark.parametrize("k", [1, 5, 20, 300])
def test_exact_knn_matches_brute_force(store, k):
    keys, _ = store
    rng = np.random.default_rng(1)
    queries = rng.normal(0, 4, size=(15, keys.shape[1])).astype(np.float32)
    seen = []
    ids = exact_knn(queries, keys, k, progress=seen.append)
    assert ids.shape == (15, k)
    assert sum(seen) == len(keys) and max(seen) == 7  # streamed in blocks of 7
    d = brute_sq_dists(queries, keys)  # (Q, N)
    for row in range(len(queries)):
        assert len(set(ids[row].tolist())) == k and ids[row].min() >= 0
        got = d[row, ids[row]]
        assert np.all(np.diff(got) >= -1e-4 * (1 + got[1:]))  # sorted nearest first
        want = np.sort(d[row])[:k]  # ties may reorder ids: compare the distance sets
        np.testing.assert_allclose(np.sort(got), want, rtol=1e-5, atol=1e-5)
    if k == len(keys):
        assert all(sorted(row) == list(range(len(keys))) for row in ids.tolist())


def test_exact_knn_finds_stored_points(store):
    keys, _ = store
    rows = np.array([0, 6, 7, 150, 299])
    ids = exact_knn(np.asarray(keys[rows], dtype=np.float32), keys, 1)
    np.testing.assert_array_equal(ids[:, 0], rows)


# ---------------------------------------------------------------- contamination


def contamination_brute(keys, values, vocab, cap=1024):
    """SPEC §5 by brute force: share of the m_v = min(freq, cap) entries nearest μ_v with value != v."""
    k = np.asarray(keys, dtype=np.float64)
    out = np.full(vocab, np.nan)
    for v in range(vocab):
        rows = values == v
        if not rows.any():
            continue
        mu = k[rows].mean(axis=0)
        m = min(int(rows.sum()), cap)
        nearest = np.argsort(((k - mu) ** 2).sum(axis=1), kind="stable")[:m]
        out[v] = np.mean(values[nearest] != v)
    return out


def contamination_pipeline(keys, values, vocab, cap=1024):
    """The library's path (as precompute composes it): centroids -> exact_knn -> contamination."""
    freq = token_freq(values, vocab)
    type_ids = np.flatnonzero(freq)
    m = np.minimum(freq[type_ids], cap)
    mu = centroids(keys, values, vocab)[type_ids].astype(np.float32)
    nbr = exact_knn(mu, keys, int(min(cap, len(keys))))
    out = np.full(vocab, np.nan)
    out[type_ids] = contamination_from_neighbors(type_ids, values[nbr], m)
    return out


def test_contamination_from_neighbors_hand():
    type_ids = np.array([4, 7])
    nbr_values = np.array([[4, 1, 4, 4, 2], [7, 7, 3, -1, -1]])
    m = np.array([4, 2])
    # type 4: first 4 are [4, 1, 4, 4] -> 1/4; type 7: first 2 are [7, 7] -> 0 (later slots ignored)
    np.testing.assert_allclose(contamination_from_neighbors(type_ids, nbr_values, m), [0.25, 0.0])
    np.testing.assert_allclose(contamination_from_neighbors(type_ids, nbr_values, np.array([5, 3])), [0.4, 1 / 3])


def test_contamination_tiny_hand_example():
    # 1-D keys. A: {0, 2} -> μ 1; nearest 2: 1.2 (B), then 0 or 2 (A, tied) -> 1/2.
    # B: {1.2, 8, 9} -> μ 6.0667; nearest 3: 8, 9 (B), 2 (A) -> 1/3.  C: {100} -> itself -> 0.
    keys = np.array([[0.0], [2.0], [1.2], [8.0], [9.0], [100.0]], dtype=np.float32)
    values = np.array([0, 0, 1, 1, 1, 2])
    expected = [0.5, 1 / 3, 0.0]
    np.testing.assert_allclose(contamination_pipeline(keys, values, 3), expected)
    np.testing.assert_allclose(contamination_brute(keys, values, 3), expected)


def test_contamination_matches_brute_force(store):
    keys, values = store
    got = contamination_pipeline(keys, values, VOCAB)
    want = contamination_brute(keys, values, VOCAB)
    np.testing.assert_allclose(got, want, equal_nan=True)
    assert np.isnan(got[10])
    assert got[9] == 0.0 and got[11] == 0.0  # a single entry is its own nearest neighbour
    assert np.any((got > 0) & (got < 1))


def test_contamination_caps_m_at_1024():
    # type 0 has 1100 entries: only the 1024 nearest its centroid count; the 5 type-1 entries sit on it
    rng = np.random.default_rng(2)
    keys = np.concatenate([rng.normal(0, 1, size=(1100, 4)), rng.normal(0, 0.01, size=(5, 4))]).astype(np.float32)
    values = np.r_[np.zeros(1100, dtype=np.int64), np.ones(5, dtype=np.int64)]
    got = contamination_pipeline(keys, values, 2)
    want = contamination_brute(keys, values, 2)
    np.testing.assert_allclose(got, want)
    assert got[0] == pytest.approx(5 / 1024)  # not 5 / 1100
    assert got[1] == 0.0
