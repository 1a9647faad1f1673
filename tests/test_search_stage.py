"""Tests of precompute/stages/search.py's helpers against numpy references.

`neighbour_sq_dists` against a direct float64 sum, `top_tokens` (torch) against
`knnlm_core.knn.top_tokens_from_weights` and a hand case, `search_range` (overlapped
batches) against `search_batch` on all queries at once.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from knnlm_core.config import RunConfig
from knnlm_core.keystore import ShardedKeys
from knnlm_core.knn import softmax_weights, top_tokens_from_weights
from precompute.stages.search import neighbour_sq_dists, search_batch, search_range, top_tokens

D = 16


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3000, 24)).astype(np.float16)
    values = rng.integers(0, 40, 3000).astype(np.int32)
    queries = rng.standard_normal((300, 24)).astype(np.float16)
    targets = rng.integers(0, 40, 300).astype(np.int64)
    index = faiss.index_factory(24, "IVF8,PQ8x4np")
    index.train(keys.astype(np.float32))
    index.add(keys.astype(np.float32))
    return keys, values, queries, targets, index


def test_neighbour_sq_dists_equal_direct_sum(data):
    keys, _, queries, _, _ = data
    ids = np.random.default_rng(1).integers(-1, len(keys), (50, 7))
    sharded = ShardedKeys([keys[:1000], keys[1000:2200], keys[2200:]])  # either key layout
    got = neighbour_sq_dists(queries[:50].astype(np.float32), sharded, ids, chunk=16)
    want = ((queries[:50, None, :].astype(np.float64) - keys[np.maximum(ids, 0)].astype(np.float64)) ** 2).sum(-1)
    want[ids < 0] = np.inf
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.isinf(got[ids < 0]).all()


def test_top_tokens_hand_case():
    nbr_values = np.array([[5, 3, 5, -1, 7], [2, 2, 2, 2, 2]])
    weights = np.array([[0.3, 0.25, 0.2, 0.0, 0.25], [0.1, 0.2, 0.3, 0.2, 0.2]])
    ids, probs = top_tokens(weights, nbr_values, 3)
    assert ids[0, 0] == 5 and np.isclose(probs[0, 0], 0.5)
    assert set(ids[0, 1:]) == {3, 7} and np.allclose(probs[0, 1:], 0.25)
    assert ids[1].tolist() == [2, -1, -1] and np.allclose(probs[1], [1.0, 0.0, 0.0])


def test_top_tokens_equal_numpy_reference():
    rng = np.random.default_rng(3)
    nbr_values = rng.integers(0, 30, (64, 128))
    nbr_values[rng.random(nbr_values.shape) < 0.05] = -1
    weights, _ = softmax_weights(rng.random((64, 128)) * 20, 3.0, nbr_values)
    got_ids, got_p = top_tokens(weights, nbr_values, 10)
    want_ids, want_p = top_tokens_from_weights(weights, nbr_values, 10)
    np.testing.assert_allclose(got_p, want_p, atol=1e-12)
    assert (got_ids == want_ids).all()


def test_search_range_overlapped_equals_one_batch(data):
    keys, values, queries, targets, index = data
    cfg = RunConfig(k=32, store_neighbors=8, search_batch=64, temperature=5.0)
    got = search_range(index, keys, values, queries, targets, cfg, 0, len(queries))
    want = search_batch(index, keys, values, queries.astype(np.float32), targets, cfg)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)


def test_neighbour_sq_dists_vs_brute_force(tmp_path):
    keys = np.random.default_rng(0).normal(size=(640, D)).astype(np.float32)
    np.save(tmp_path / "keys.npy", keys.astype(np.float16))
    mm = np.load(tmp_path / "keys.npy", mmap_mode="r")
    rng = np.random.default_rng(1)
    q = rng.normal(0, 3, size=(12, D)).astype(np.float32)
    ids = rng.integers(0, len(keys), size=(12, 9))
    ids[2, 5:] = -1
    ids[7, :] = -1
    ids[4, :] = 17  # duplicate neighbours
    out = neighbour_sq_dists(q, mm, ids)
    k64 = np.asarray(mm, dtype=np.float64)
    assert out.dtype == np.float32 and out.shape == (12, 9)
    for r in range(12):
        for j in range(9):
            if ids[r, j] < 0:
                assert np.isinf(out[r, j])
            else:
                assert out[r, j] == pytest.approx(((q[r] - k64[ids[r, j]]) ** 2).sum(), rel=1e-5)


def test_neighbour_sq_dists_many_queries_in_steps():
    # 32768 neighbours x 512 dims, many chunks of queries
    rng = np.random.default_rng(2)
    big = rng.normal(size=(40, 512)).astype(np.float32)
    q = rng.normal(size=(3, 512)).astype(np.float32)
    ids = rng.integers(-1, 40, size=(3, 32768))
    out = neighbour_sq_dists(q, big, ids)
    d = ((q.astype(np.float64)[:, None, :] - big[None, :, :]) ** 2).sum(axis=2)  # (3, 40)
    expected = np.where(ids < 0, np.inf, np.take_along_axis(d, np.maximum(ids, 0), axis=1))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
