"""precompute.exact_projection: the subspace lower bound gives the exact search's answer, bit for bit.

Reference: `precompute.exact.faiss_knn` (faiss's brute force shortlist, reranked and certified) and a
float64 brute force. Broken on purpose: a basis that is not orthonormal (L is then no lower bound)
and a certificate that always passes both give wrong neighbours, which these tests see.
"""

from __future__ import annotations

import numpy as np
import pytest

from precompute import exact_projection as xp
from precompute.exact import faiss_knn


def anisotropic(n: int, d: int, seed: int) -> np.ndarray:
    """fp16-representable keys with a decaying spectrum and a large common offset (like GPT-2 keys)."""
    rng = np.random.default_rng(seed)
    scales = 4.0 * 0.88 ** np.arange(d)
    rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = (rng.standard_normal((n, d)) * scales) @ rot + 3.0
    return x.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    keys = anisotropic(6000, 64, 0)
    queries = anisotropic(120, 64, 1)
    lower = xp.fit_lower_bound(keys, dims=16, sample=4000)
    assert lower is not None and lower.share > xp.MIN_SHARE
    return keys, queries, lower


def test_bound_is_below_every_distance(data):
    keys, queries, lower = data
    f_q, f_k = lower.features(queries[:20]).astype(np.float64), lower.key_features.astype(np.float64)
    bound = ((f_q[:, None, :] - f_k[None, :, :]) ** 2).sum(-1)
    exact = ((queries[:20, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    assert (bound <= exact * (1 + 1e-5) + 1e-4).all()
    assert np.median(bound / exact) > 0.8  # tight on anisotropic keys: why the path pays


@pytest.mark.parametrize("k", [1, 37, 300])
def test_equals_the_faiss_path_bit_for_bit(data, k):
    keys, queries, lower = data
    stats = {}
    got_d, got_i = xp.projection_knn(queries, keys, k, lower, shortlist=k + 8, stats=stats)
    want_d, want_i = faiss_knn(queries, keys, k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)
    d64 = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(got_d, np.sort(d64, axis=1)[:, :k], rtol=1e-5, atol=1e-5)
    assert stats["requeried"] > 0 or k == 1  # a shortlist of k + 8 fails some certificates: the retry ran


def test_more_neighbours_than_keys_are_padded(data):
    keys, queries, lower = data
    small = keys[:200]
    low = xp.fit_lower_bound(small, dims=16)
    got_d, got_i = xp.projection_knn(queries[:5], small, 250, low)
    assert (got_i[:, 200:] == -1).all() and np.isinf(got_d[:, 200:]).all()
    want_d, want_i = faiss_knn(queries[:5], small, 250)
    np.testing.assert_array_equal(got_i, want_i)


def test_isotropic_keys_take_the_plain_path():
    keys = np.random.default_rng(2).standard_normal((3000, 64)).astype(np.float32)
    assert xp.fit_lower_bound(keys, dims=16) is None


def test_a_basis_that_is_no_lower_bound_is_seen(data):
    keys, queries, lower = data
    stretched = xp.LowerBound(lower.mean, lower.basis * 1.5, lower.dims,
                              xp.features(keys, lower.mean, lower.basis * 1.5, lower.dims), lower.b_max * 1.5,
                              lower.share)
    got_d, got_i = xp.projection_knn(queries, keys, 50, stretched, shortlist=60)
    want_d, want_i = faiss_knn(queries, keys, 50)
    assert not np.array_equal(got_i, want_i)


def test_a_certificate_that_always_passes_is_seen(data, monkeypatch):
    keys, queries, lower = data
    real = xp.certified_search

    def trusting(q, n, k, margin, one_pass, progress=None, stats=None):
        def always(rows, s, prog):
            r, ids, _ = one_pass(rows, s, prog)
            return r, ids, np.ones(len(rows), dtype=bool)
        return real(q, n, k, margin, always, progress, stats)

    monkeypatch.setattr(xp, "certified_search", trusting)
    _, got_i = xp.projection_knn(queries, keys, 300, lower, shortlist=302)
    _, want_i = faiss_knn(queries, keys, 300)
    assert not np.array_equal(got_i, want_i)
