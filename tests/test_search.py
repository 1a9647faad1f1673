"""Tests of precompute/search.py (every search of the pipeline) against numpy references.

`neighbour_sq_dists` against a direct float64 sum, `top_tokens` (torch) against a per-row
Python reference and hand cases, `search_rows` (overlapped batches) against one
`index.search` of all queries plus numpy distances, `exact_rows` against a float64
brute force, `position_metrics` against the knn functions.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
from test_knn import LN2, random_case, ref_p_knn

from knnlm_core.keystore import ShardedKeys
from knnlm_core.knn import PAD, p_knn_of, softmax_weights, target_stats
from knnlm_core.whiten import fit as fit_whitening
from precompute.search import (
    exact_rows,
    neighbour_sq_dists,
    position_metrics,
    resident_keys,
    search_rows,
    top_tokens,
)

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
    got = neighbour_sq_dists(queries[:50].astype(np.float32), sharded, ids)
    want = ((queries[:50, None, :].astype(np.float64) - keys[np.maximum(ids, 0)].astype(np.float64)) ** 2).sum(-1)
    want[ids < 0] = np.inf
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.isinf(got[ids < 0]).all()


TAU = 10.0


def weights_of(dists, values):
    return softmax_weights(dists, TAU, values)[0]


def ref_top_tokens(dists, values, tau, top):
    """Per-row reference: dict of summed weights per token, sorted by probability (ties by id)."""
    ids = np.full((len(values), top), PAD, dtype=np.int64)
    probs = np.zeros((len(values), top))
    for row in range(len(values)):
        totals: dict[int, float] = {}
        for t in set(values[row].tolist()) - {PAD}:
            totals[t] = ref_p_knn(dists[row], values[row], t, tau)
        ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:top]
        for j, (t, p) in enumerate(ranked):
            ids[row, j], probs[row, j] = t, p
    return ids, probs


def test_top_tokens_hand_case():
    dists = np.array([[0.0, 0.0, 10.0 * LN2, np.inf], [0.0, 5.0, 5.0, 5.0]])
    values = np.array([[5, 7, 5, PAD], [2, 4, 4, 4]])
    ids, probs = top_tokens(weights_of(dists, values), values, 3)
    np.testing.assert_array_equal(ids, [[5, 7, PAD], [4, 2, PAD]])
    w = math.exp(-0.5)
    np.testing.assert_allclose(probs, [[0.6, 0.4, 0.0], [3 * w / (1 + 3 * w), 1 / (1 + 3 * w), 0.0]])


@pytest.mark.parametrize("top", [1, 3, 10, 40])
def test_top_tokens_match_reference(top):
    dists, values, _ = random_case(seed=5, q=30, k=24, vocab=15)
    ids, probs = top_tokens(weights_of(dists, values), values, top)
    ref_ids, ref_probs = ref_top_tokens(dists, values, TAU, top)
    assert ids.shape == probs.shape == (len(values), top)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ids, ref_ids)  # continuous distances: no probability ties
    assert np.all(np.diff(probs, axis=1) <= 1e-15)  # descending per row


def test_top_tokens_all_padded_row():
    dists = np.array([[np.inf, np.inf], [1.0, 2.0]])
    values = np.array([[PAD, PAD], [3, 3]])
    ids, probs = top_tokens(weights_of(dists, values), values, 2)
    np.testing.assert_array_equal(ids, [[PAD, PAD], [3, PAD]])
    np.testing.assert_allclose(probs, [[0.0, 0.0], [1.0, 0.0]])


def direct_block(index, keys, values, q, k):
    """The block arrays of queries q from one index.search and numpy distances (missing: -1 / inf)."""
    dist, ids = index.search(q, k)
    miss = ids < 0
    exact = ((q[:, None, :].astype(np.float64) - np.asarray(keys[np.maximum(ids, 0)], np.float64)) ** 2).sum(-1)
    return {"ids": ids, "values": np.where(miss, -1, values[np.maximum(ids, 0)]),
            "dist_pq": np.where(miss, np.inf, dist), "dist_exact": np.where(miss, np.inf, exact)}


def test_search_rows_equal_one_direct_search(data):
    keys, values, queries, _, index = data
    faiss.extract_index_ivf(index).nprobe = 1  # one list of ~375 keys: rows find fewer than k, missing neighbours
    got = search_rows(index, keys, values, queries, 10, 250, 450, 32)
    want = direct_block(index, keys, values, queries[10:250].astype(np.float32), 450)
    assert (want["ids"] < 0).any()
    for name in ("ids", "values", "dist_pq"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(got["dist_exact"], want["dist_exact"], rtol=1e-5)
    assert got["ids"].dtype == np.int64 and got["values"].dtype == np.int32


def test_search_rows_of_a_whitened_index(data):
    keys, values, queries, _, _ = data
    w = fit_whitening("entries", keys, values, 1e-6)
    wk = w.apply(keys)
    index = faiss.index_factory(24, "Flat")
    index.add(wk)

    class View:  # the keys as the whitened index sees them
        shape = keys.shape

        def __getitem__(self, rows):
            return w.apply(np.asarray(keys[rows]))

    got = search_rows(index, View(), values, queries, 0, 50, 16, 20, transform=w)
    want = direct_block(index, wk, values, w.apply(queries[:50]), 16)
    np.testing.assert_array_equal(got["ids"], want["ids"])
    np.testing.assert_allclose(got["dist_exact"], want["dist_exact"], rtol=1e-4, atol=1e-4)


def test_exact_rows_equal_a_float64_brute_force(data):
    keys, values, queries, _, _ = data
    got = exact_rows(keys, values, queries, 0, 40, 32, "cpu", query_block=16)
    d = ((queries[:40, None, :].astype(np.float64) - keys[None, :, :].astype(np.float64)) ** 2).sum(-1)
    want = np.sort(d, axis=1)[:, :32]
    np.testing.assert_allclose(got["dist_exact"], want, rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(d, got["ids"], 1), want, rtol=1e-5)  # the right entries
    assert np.isnan(got["dist_pq"]).all() and (got["values"] == values[got["ids"]]).all()


def test_position_metrics_equal_the_knn_functions(data):
    keys, values, queries, targets, index = data
    block = search_rows(index, keys, values, queries, 0, 100, 32, 100)
    for source, col in (("pq", "dist_pq"), ("exact", "dist_exact")):
        got = position_metrics(block, targets[:100], 5.0, source)
        np.testing.assert_allclose(got["p_knn"], p_knn_of(block[col], block["values"], targets[:100], 5.0),
                                   rtol=1e-12)
        rank, n_target = target_stats(block["values"], targets[:100])
        assert (got["target_rank"] == rank).all() and (got["n_target"] == n_target).all()


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


def test_resident_keys_whitened_once_equal_whitening_each_gathered_row(data):
    """Keys whitened once as a block (resident_keys) vs each gathered row whitened on its own: the same
    float32 GEMM of the same rows in other groupings, so distances agree to float32 GEMM rounding
    (rtol 1e-5); the resident path reads rows in place, the view path converts each distinct row."""
    keys, values, queries, _, _ = data
    w = fit_whitening("entries", keys, values, 1e-6)
    resident = resident_keys(keys, w)
    view = resident_keys(keys, w, budget=0)  # over budget: the whitened view, rows whitened as read
    assert isinstance(resident, np.ndarray) and not isinstance(view, np.ndarray)
    q = w.apply(queries[:40])
    ids = np.random.default_rng(3).integers(-1, len(keys), (40, 64))
    a, b = neighbour_sq_dists(q, resident, ids), neighbour_sq_dists(q, view, ids)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    want = ((q[:, None, :].astype(np.float64) - w.apply(keys, dtype=np.float64)[np.maximum(ids, 0)]) ** 2).sum(-1)
    np.testing.assert_allclose(a[ids >= 0], want[ids >= 0], rtol=1e-4)
    assert np.isinf(a[ids < 0]).all() and np.isinf(b[ids < 0]).all()
    bad = resident.copy()
    bad[ids[0, 0]] += 1.0  # a key whitened wrongly is seen
    assert not np.allclose(neighbour_sq_dists(q, bad, ids), b, rtol=1e-5)


def test_exact_rows_distances_are_the_search_routine(data):
    """The exact search's distances are `neighbour_sq_dists` of its own ids, bit for bit (one routine,
    computed once), ascending by (distance, id)."""
    keys, values, queries, _, _ = data
    k32 = resident_keys(keys)
    got = exact_rows(k32, values, queries, 0, 60, 40, "cpu", query_block=32)
    q = queries[:60].astype(np.float32)
    np.testing.assert_array_equal(got["dist_exact"], neighbour_sq_dists(q, k32, got["ids"]))
    d, i = got["dist_exact"], got["ids"]
    assert ((d[:, 1:] > d[:, :-1]) | ((d[:, 1:] == d[:, :-1]) & (i[:, 1:] > i[:, :-1]))).all()


def test_search_rows_with_the_torch_ivfpq_searcher_equal_faiss(data):
    """The GPU path's search (precompute.torch_ivfpq, here on CPU torch: its CI twin) plugged into the search
    loop gives faiss's block: same ids but for near-ties, distances within float32 rounding, exact distances
    of the same neighbours bit for bit."""
    from precompute.torch_ivfpq import TorchIVFPQ

    keys, values, queries, _, _ = data
    index = faiss.index_factory(24, "IVF8,PQ6")
    index.train(keys.astype(np.float32))
    index.add(keys.astype(np.float32))
    faiss.extract_index_ivf(index).nprobe = 3
    tindex = TorchIVFPQ.from_faiss(index, "cpu")
    want = search_rows(index, keys, values, queries, 0, 120, 40, 50)
    got = search_rows(index, keys, values, queries, 0, 120, 40, 50, searcher=lambda q, k: tindex.search(q, k, 3))
    same = (got["ids"] == want["ids"]).mean()
    assert same > 0.98, same
    np.testing.assert_allclose(got["dist_pq"], want["dist_pq"], rtol=1e-5, atol=1e-5)
    rows = (got["ids"] == want["ids"]).all(1)
    for name in ("values", "dist_exact"):
        np.testing.assert_array_equal(got[name][rows], want[name][rows])
    bad = search_rows(index, keys, values, queries, 0, 120, 40, 50, searcher=lambda q, k: tindex.search(q, k, 1))
    assert (bad["ids"] != want["ids"]).mean() > 0.05  # a searcher that probes other lists is seen


def test_search_map_runs_on_the_gpu_pool_on_cuda():
    from types import SimpleNamespace

    from precompute.stages.search import search_kind

    assert search_kind(SimpleNamespace(info={"device": "cuda"})) == "gpu"
    assert search_kind(SimpleNamespace(info={"device": "cpu"})) == "cpu"
