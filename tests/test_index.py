"""Tests of knnlm_core.index (SPEC §2, §4): factory checks, training, search masking, PQ error.

Small seeded synthetic keys (39 x nlist training points and more), one faiss thread.
Factories carry the `np` suffix (no polysemous code reordering: same codebooks and distances,
training in milliseconds instead of a second).
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from knnlm_core.index import (
    MIN_POINTS_PER_CENTROID,
    IndexConfigError,
    add_codes,
    add_keys,
    blocks,
    check_factory,
    encode_with_error,
    ivf_nlist,
    reconstruction_error,
    sample_rows,
    search,
    set_nprobe,
    train_index,
)

faiss.omp_set_num_threads(1)

D = 8


def make_keys(n: int = 640, seed: int = 0) -> np.ndarray:
    """(n, D) float32 keys around 4 seeded centres."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(4, D))
    return (centers[rng.integers(0, 4, size=n)] + rng.normal(size=(n, D))).astype(np.float32)


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return make_keys()


@pytest.fixture(scope="module")
def ivfpq(keys):
    index = train_index(keys, "IVF4,PQ4x4np", 0, seed=0)
    add_keys(index, keys)
    return index


@pytest.fixture(scope="module")
def flatpq(keys):
    index = train_index(keys, "PQ4x4np", 0, seed=0)
    add_keys(index, keys)
    return index


# ---------------------------------------------------------------- factory checks


def test_ivf_nlist():
    assert ivf_nlist("IVF4096,PQ64") == 4096
    assert ivf_nlist("OPQ16,IVF256,PQ16") == 256
    assert ivf_nlist("PQ64") is None
    assert ivf_nlist("Flat") is None


def test_check_factory_accepts_valid():
    check_factory("IVF4,PQ4x4", D, 4 * MIN_POINTS_PER_CENTROID)
    check_factory("PQ4x4", D, 10)
    check_factory("Flat", D, 1)


def test_check_factory_pq_not_dividing_dim():
    with pytest.raises(IndexConfigError, match="not divisible") as err:
        check_factory("IVF4096,PQ60", 1600, 10**6)
    assert "PQ64" in str(err.value)  # the largest listed divisor of 1600 is suggested
    with pytest.raises(IndexConfigError, match="divisible"):
        check_factory("PQ3", D, 1000)


def test_check_factory_too_few_training_points():
    assert MIN_POINTS_PER_CENTROID == 39
    check_factory("IVF4,PQ4x4", D, 156)  # exactly 39 x 4
    with pytest.raises(IndexConfigError, match="156") as err:
        check_factory("IVF4,PQ4x4", D, 155)
    assert "IVF2" in str(err.value)  # 155 // 39 = 3 -> largest power of two 2
    with pytest.raises(IndexConfigError, match="IVF16"):
        check_factory("IVF4096,PQ64", 1600, 1000)  # 1000 // 39 = 25 -> 16


def test_check_factory_unparseable():
    with pytest.raises(IndexConfigError, match="not a form"):
        check_factory("NotAnIndex12", D, 1000)
    assert issubclass(IndexConfigError, ValueError)


# ---------------------------------------------------------------- helpers


def test_blocks_cover_rows_in_float32(keys):
    parts = list(blocks(keys.astype(np.float16), 100))
    assert [s for s, _ in parts] == list(range(0, 640, 100))
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for _, b in parts)
    np.testing.assert_array_equal(np.concatenate([b for _, b in parts]), keys.astype(np.float16).astype(np.float32))


def test_sample_rows():
    rows = sample_rows(1000, 100, seed=3)
    assert len(rows) == 100 == len(np.unique(rows))
    assert np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < 1000
    np.testing.assert_array_equal(rows, sample_rows(1000, 100, seed=3))
    np.testing.assert_array_equal(sample_rows(50, 0, seed=0), np.arange(50))
    np.testing.assert_array_equal(sample_rows(50, 80, seed=0), np.arange(50))


# ---------------------------------------------------------------- training


def test_train_index_is_trained_empty_and_reproducible(keys):
    a = train_index(keys, "IVF4,PQ4x4np", 0, seed=5)
    b = train_index(keys, "IVF4,PQ4x4np", 0, seed=5)
    assert a.is_trained and a.ntotal == 0 and a.d == D
    np.testing.assert_array_equal(a.sa_encode(keys[:50]), b.sa_encode(keys[:50]))


def test_train_index_checks_the_sample_size(keys):
    with pytest.raises(IndexConfigError, match="training keys"):
        train_index(keys, "IVF4,PQ4x4", 100, seed=0)  # 100 < 39 x 4
    index = train_index(keys, "IVF4,PQ4x4np", 200, seed=0)  # a sample is enough
    assert index.is_trained


def test_add_keys_in_blocks(keys, ivfpq):
    assert ivfpq.ntotal == len(keys)
    seen = []
    index = train_index(keys, "PQ4x4np", 0, seed=0)
    add_keys(index, np.concatenate([keys] * 110), progress=seen.append)  # > one 65536-row block
    assert sum(seen) == index.ntotal == 640 * 110 and len(seen) == 2


# ---------------------------------------------------------------- search and nprobe


def test_set_nprobe(ivfpq, flatpq):
    set_nprobe(ivfpq, 3)
    assert faiss.extract_index_ivf(ivfpq).nprobe == 3
    set_nprobe(flatpq, 3)  # no IVF: no-op, no error
    set_nprobe(ivfpq, 1)


def test_search_masks_padding(ivfpq, keys):
    set_nprobe(ivfpq, 1)  # one list holds fewer than k entries: faiss pads with id -1
    dists, ids = search(ivfpq, keys[:20].astype(np.float64), 400)
    assert dists.shape == ids.shape == (20, 400) and ids.dtype == np.int64 and dists.dtype == np.float32
    missing = ids < 0
    assert missing.any() and (~missing).any()
    assert np.all(ids[missing] == -1)
    assert np.all(np.isinf(dists[missing]))
    assert np.all(np.isfinite(dists[~missing]))
    assert np.all(dists[~missing] < np.finfo(np.float32).max)
    # padding sits after every real neighbour, and distances ascend
    first_missing = np.where(missing.any(axis=1), missing.argmax(axis=1), 400)
    assert all(missing[r, first_missing[r]:].all() for r in range(20))
    assert all(np.all(np.diff(dists[r, : first_missing[r]]) >= 0) for r in range(20))


def test_search_all_lists_no_padding(ivfpq, keys):
    set_nprobe(ivfpq, 4)  # every list visited: all 640 entries reachable
    dists, ids = search(ivfpq, keys[:5], 100)
    assert np.all(ids >= 0) and np.isfinite(dists).all()
    set_nprobe(ivfpq, 1)


def test_search_k_above_ntotal(flatpq, keys):
    dists, ids = search(flatpq, keys[:3], len(keys) + 10)
    np.testing.assert_array_equal(ids[:, -10:], -1)
    assert np.isinf(dists[:, -10:]).all() and np.isfinite(dists[:, :-10]).all()


def test_search_pq_distances_are_to_reconstructions(flatpq, keys):
    # flat PQ search (asymmetric): d = ||q - decode(code_i)||²
    q = keys[:4] + 0.1
    dists, ids = search(flatpq, q, 10)
    recon = flatpq.sa_decode(flatpq.sa_encode(keys))  # (N, D)
    expected = ((q[:, None, :].astype(np.float64) - recon[ids]) ** 2).sum(axis=2)
    np.testing.assert_allclose(dists, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- reconstruction error


def test_reconstruction_error_matches_sa_codec(ivfpq, keys):
    x = keys[:50]
    err = reconstruction_error(ivfpq, x.astype(np.float16))
    x32 = x.astype(np.float16).astype(np.float32)
    x_hat = ivfpq.sa_decode(ivfpq.sa_encode(x32))
    expected = ((x32.astype(np.float64) - x_hat) ** 2).sum(axis=1)
    assert err.dtype == np.float64 and err.shape == (50,)
    np.testing.assert_allclose(err, expected, rtol=1e-6)
    assert np.all(err > 0)


def test_reconstruction_error_is_centroid_plus_residual(ivfpq, keys):
    # independent reference: coarse centroid + PQ-decoded residual (SPEC §4)
    x = keys[:50]
    ivf = faiss.downcast_index(faiss.extract_index_ivf(ivfpq))
    _, lists = ivf.quantizer.search(x, 1)
    centroid = ivf.quantizer.reconstruct_n(0, ivf.nlist)[lists[:, 0]]  # (50, D)
    residual = x - centroid
    decoded = ivf.pq.decode(ivf.pq.compute_codes(residual))
    expected = ((x.astype(np.float64) - (centroid + decoded)) ** 2).sum(axis=1)
    np.testing.assert_allclose(reconstruction_error(ivfpq, x), expected, rtol=1e-4, atol=1e-5)


def test_reconstruction_error_flat_pq_matches_reconstruct(flatpq, keys):
    err = reconstruction_error(flatpq, keys[:30])
    recon = np.stack([flatpq.reconstruct(i) for i in range(30)])  # stored codes decode the same way
    np.testing.assert_allclose(err, ((keys[:30].astype(np.float64) - recon) ** 2).sum(axis=1), rtol=1e-6)


def test_reconstruction_error_zero_for_flat(keys):
    index = train_index(keys, "Flat", 0, seed=0)
    np.testing.assert_allclose(reconstruction_error(index, keys[:10]), 0.0, atol=1e-10)


def test_train_index_skips_polysemous_training(keys):
    index = train_index(keys, "IVF4,PQ4x4", 0, seed=0)
    assert faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training is False


@pytest.mark.parametrize("factory", ["IVF4,PQ4x4np", "IVF4,Flat", "Flat", "PQ4x4np", "OPQ4,IVF4,PQ4x4np"])
def test_add_codes_equals_add_and_error_equals_reconstruction(keys, factory):
    trained = train_index(keys, factory, 0, seed=0)
    plain, ours = faiss.clone_index(trained), faiss.clone_index(trained)
    x = np.asarray(keys, dtype=np.float32)
    plain.add(x)
    errors = []
    for lo in range(0, len(x), 700):  # shards, as the index stage encodes them
        codes, err = encode_with_error(ours, x[lo : lo + 700])
        add_codes(ours, codes, lo)
        errors.append(err)
    assert faiss.serialize_index(ours).tobytes() == faiss.serialize_index(plain).tobytes()
    np.testing.assert_allclose(np.concatenate(errors), reconstruction_error(plain, x), rtol=1e-6, atol=1e-9)


def test_check_factory_refuses_a_factory_without_codec():
    with pytest.raises(IndexConfigError, match="no standalone codec") as err:
        check_factory("HNSW32", D, 10_000)
    assert "IVF<nlist>,PQ<m>" in str(err.value)
