"""precompute/exact.py's two exact paths against independent references (SPEC §8).

The torch path (low-precision shortlist + float32 rerank + certificate: the GPU code, run here
on CPU torch) and the faiss path (CPU) against a float64 numpy brute force, against a float32
brute force by the difference over every key (bit for bit, ties by id), and against each other.
The error bound the certificate rests on is checked pair by pair, and the certificate is shown
to be what makes the result exact: with the bound replaced by zero the shortlist misses
neighbours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precompute import exact
from precompute.exact import (
    Shortlist,
    exact_knn,
    exact_knn_with_dists,
    faiss_knn,
    lowp_error,
    pair_sq_dists,
    shortlist_knn,
)


def clustered(n: int, d: int, nq: int, seed: int, offset: float = 0.0, scale: float = 1.0):
    """(fp16 keys (n, d), float32 queries (nq, d)): keys around 20 centres, queries near keys; a shared
    `offset` on the first dimensions mimics GPT-2's large constant components."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d)) * 3
    keys = centres[rng.integers(0, 20, n)] + rng.normal(size=(n, d))
    keys[:, :3] += offset
    keys = (keys * scale).astype(np.float16)
    queries = keys[rng.integers(0, n, nq)].astype(np.float64) + rng.normal(size=(nq, d)) * scale * 0.5
    return keys, queries.astype(np.float32)


def float64_distances(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return ((q[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)  # (Q, N)


def assert_exact(dists: np.ndarray, ids: np.ndarray, q: np.ndarray, keys: np.ndarray, k: int) -> None:
    """The k nearest by float64, up to swaps of keys whose distances agree to float32 rounding."""
    ref = float64_distances(q, keys)
    kk = min(k, len(keys))
    want = np.sort(ref, axis=1)[:, :kk]
    got = np.take_along_axis(ref, ids[:, :kk], axis=1)
    rtol = 4 * (keys.shape[1] + 2) * 2.0 ** -24  # float32 sum of d squares, by the difference
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-30)  # each rank holds a key at the true distance
    np.testing.assert_allclose(dists[:, :kk], got, rtol=rtol, atol=1e-30)  # and reports that distance
    assert all(len(set(row)) == kk for row in ids[:, :kk])
    assert (np.diff(dists[:, :kk], axis=1) >= 0).all()
    order = np.argsort(ref, axis=1, kind="stable")[:, :kk]
    gap = np.minimum(np.diff(want, axis=1, prepend=-np.inf), np.diff(want, axis=1, append=np.inf))
    clear = gap > rtol * want  # ranks whose key is not within rounding of a neighbour's: ids must match exactly
    np.testing.assert_array_equal(ids[:, :kk][clear], order[clear])
    if k > kk:
        assert (ids[:, kk:] == -1).all() and np.isinf(dists[:, kk:]).all()


def float32_brute_force(q: np.ndarray, keys: np.ndarray, k: int):
    """Every key's r by `pair_sq_dists` (float32, by the difference), top-k by (r, id)."""
    n = len(keys)
    r = pair_sq_dists(torch.from_numpy(q), torch.arange(len(q)).repeat_interleave(n),
                      torch.from_numpy(keys.astype(np.float32)), torch.arange(n).repeat(len(q))).view(len(q), n).numpy()
    ids = np.broadcast_to(np.arange(n), r.shape)
    order = np.lexsort((ids, r), axis=1)[:, :k]
    return np.take_along_axis(r, order, 1), order


SHAPES = [  # (keys, dim, queries, k, key block, query block)
    (3000, 16, 37, 20, 700, 10),
    (2000, 48, 25, 300, 512, 25),
    (900, 8, 9, 900, 256, 4),  # k = every key
    (1500, 32, 12, 1, 1000, 7),
    (600, 24, 5, 650, 200, 5),  # k > keys: padded
]


@pytest.mark.parametrize("low_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_torch_path_equals_float64_brute_force(shape, low_dtype):
    n, d, nq, k, key_block, query_block = shape
    keys, q = clustered(n, d, nq, seed=n + d, offset=30.0)
    dists, ids = shortlist_knn(q, keys, k, "cpu", key_block=key_block, query_block=query_block, low_dtype=low_dtype)
    assert dists.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (nq, k)
    assert_exact(dists, ids, q, keys, k)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_both_paths_equal_float32_brute_force_bit_for_bit(shape):
    n, d, nq, k, key_block, query_block = shape
    keys, q = clustered(n, d, nq, seed=7 * n + d)
    kk = min(k, n)
    want_d, want_i = float32_brute_force(q, keys, kk)
    torch_d, torch_i = shortlist_knn(q, keys, k, "cpu", key_block=key_block, query_block=query_block)
    faiss_d, faiss_i = faiss_knn(q, keys, k, block_bytes=4 * d * key_block)
    resident = faiss_knn(q, keys.astype(np.float32), k, block_bytes=4 * d * key_block)  # float32 keys read in place
    for got_d, got_i in ((torch_d, torch_i), (faiss_d, faiss_i), resident):
        np.testing.assert_array_equal(got_i[:, :kk], want_i)
        np.testing.assert_array_equal(got_d[:, :kk], want_d)
    np.testing.assert_array_equal(torch_i, faiss_i)  # the CPU path and the torch path: identical
    np.testing.assert_array_equal(torch_d, faiss_d)


def test_torch_rerank_the_gpu_runs(monkeypatch):
    """The GPU's r (torch elementwise ops) run here on CPU tensors: float32 sums by the difference,
    and the whole torch path with it still the float64 brute force's answer."""
    keys, q = clustered(2000, 40, 15, seed=9, offset=20.0)
    n = len(keys)
    pairs = torch.arange(len(q)).repeat_interleave(n), torch.arange(n).repeat(len(q))
    r = exact.torch_pair_sq_dists(torch.from_numpy(q), pairs[0], torch.from_numpy(keys).float(), pairs[1])
    np.testing.assert_allclose(r.view(len(q), n).numpy(), float64_distances(q, keys), rtol=4 * 42 * 2.0 ** -24)
    monkeypatch.setattr(exact, "pair_sq_dists", exact.torch_pair_sq_dists)
    monkeypatch.setattr(exact, "PAIR_CHUNK", 1000)
    dists, ids = shortlist_knn(q, keys, 100, "cpu", key_block=300, query_block=6)
    assert_exact(dists, ids, q, keys, 100)


def test_public_functions_on_cpu():
    keys, q = clustered(2500, 20, 30, seed=5, offset=10.0)
    dists, ids = exact_knn_with_dists(q, keys, 64)
    assert_exact(dists, ids, q, keys, 64)
    np.testing.assert_array_equal(exact_knn(q, keys, 64), ids)
    np.testing.assert_array_equal(exact.exact_knn_torch(q, keys, 64, "cpu", block=600), ids)


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("low_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 60.0])  # 60: fp16 products overflow without the scaling
def test_low_precision_error_within_bound(low_dtype, scale, centred):
    keys, q = clustered(1500, 200, 40, seed=11, offset=25.0, scale=scale)
    qt = torch.from_numpy(q)
    centre = qt.double().mean(0).float() if centred else torch.zeros(200)
    q_hat, k_hat = qt - centre, torch.from_numpy(keys).float() - centre
    shortlist = Shortlist(qt, q_hat, 4, low_dtype)
    approx = shortlist.approx_dists(0, len(q), *shortlist.low_keys(k_hat)).double() + shortlist.q_sq.double()[:, None]
    assert torch.isfinite(approx).all()
    err = (approx - torch.from_numpy(float64_distances(q, keys))).abs()
    a, b = q_hat.double().norm(dim=1)[:, None], k_hat.double().norm(dim=1)[None, :]
    bound = lowp_error(200, low_dtype, shortlist.q_scale, shortlist.k_scale, shortlist.dq[:, None], shortlist.rho)(a, b)
    assert (err <= bound).all()
    unit = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[low_dtype]
    assert (bound <= 16 * unit * a * b + 1e-6 * (a + b) ** 2).all()  # and not vacuous: a few units of the dtype
    if not centred and low_dtype == "float16" and scale == 1.0:
        # fp16 keys enter exactly; the queries' rounding is what was measured
        assert shortlist.rho == 0 and torch.allclose(shortlist.dq, (torch.from_numpy(q).half().float() - qt).double().norm(dim=1))


def test_centre_only_when_the_mean_dominates():
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.normal(size=(100, 32)).astype(np.float32))
    assert (exact.centre_of(q) == 0).all()  # zero-mean data: fp16 inputs stay exact
    shifted = q + 10
    np.testing.assert_allclose(exact.centre_of(shifted).numpy(), shifted.double().mean(0).numpy(), rtol=1e-6)


def test_certificate_is_what_makes_it_exact(monkeypatch):
    keys, q = clustered(4000, 32, 20, seed=1)
    want_d, want_i = float32_brute_force(q, keys, 50)
    stats = {}
    dists, ids = shortlist_knn(q, keys, 50, "cpu", margin=0, key_block=1000, low_dtype="bfloat16", stats=stats)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(dists, want_d)
    assert stats["extra_passes"] >= 1  # the first shortlist was not enough, and the certificate said so

    monkeypatch.setattr(exact, "certified", lambda t, r_k, *_: torch.ones(len(t), dtype=torch.bool))  # no check
    _, blind = shortlist_knn(q, keys, 50, "cpu", margin=0, key_block=1000, low_dtype="bfloat16")
    assert (blind != want_i).any(axis=1).sum() >= 5  # neighbours missed: the certificate is what catches them


def test_faiss_path_certifies_or_searches_again():
    keys, q = clustered(4000, 32, 20, seed=4)
    want_d, want_i = float32_brute_force(q, keys, 50)
    stats = {}
    dists, ids = faiss_knn(q, keys, 50, margin=0, stats=stats)  # no room past k: nothing can be proven
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(dists, want_d)
    assert stats["extra_passes"] >= 1
