"""knnlm_core.whiten on synthetic keys with a known, strongly anisotropic covariance: the
whitened type-weighted (Zipfian) / entry moments are 0 and I, the transform equals a direct
numpy reference, streamed fits equal one-shot fits, and each check fails when corrupted."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from knnlm_core import whiten
from knnlm_core.keystore import SHARD_DIR, SHARD_LIST, open_keys, shard_name

D, V, N = 6, 40, 3000
EPS = 1e-10  # relative ε small enough that whitened moments are I to 1e-4


@pytest.fixture(scope="module")
def data():
    """fp16 keys (N, D) of V Zipf-distributed types: centroids ~ N(m, A Aᵀ) plus small noise."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(D, D)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])  # known covariance A Aᵀ
    centroids = 4.0 + rng.normal(size=(V, D)) @ a.T  # (V, D)
    p = 1.0 / np.arange(1, V + 1)
    values = rng.choice(V, size=N, p=p / p.sum()).astype(np.int32)  # (N,)
    values[:V] = np.arange(V)  # every type occurs
    keys = (centroids[values] + 0.3 * rng.normal(size=(N, D))).astype(np.float16)  # (N, D)
    queries = (centroids[rng.integers(0, V, 50)] + 0.3 * rng.normal(size=(50, D))).astype(np.float16)
    return keys, values, queries


def _type_moments(x: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct (non-streamed) type-weighted mean and covariance of rows x grouped by values."""
    types = np.unique(values)
    p = np.array([(values == v).mean() for v in types])
    mu_v = np.stack([x[values == v].astype(np.float64).mean(axis=0) for v in types])
    mu = p @ mu_v
    cov = sum(pi * np.outer(m - mu, m - mu) for pi, m in zip(p, mu_v))
    return mu, cov


def _reference(x: np.ndarray, mu: np.ndarray, cov: np.ndarray, eps: float) -> np.ndarray:
    """(x − μ) V S⁻¹ with C + εI = V S² Vᵀ, eigenvector signs fixed as the library documents."""
    s2, vecs = np.linalg.eigh(cov + eps * np.eye(len(cov)))
    for j in range(vecs.shape[1]):
        if vecs[np.argmax(np.abs(vecs[:, j])), j] < 0:
            vecs[:, j] = -vecs[:, j]
    return (x.astype(np.float64) - mu) @ vecs @ np.diag(1.0 / np.sqrt(s2))


def _check_zipfian_white(w: whiten.Whitening, keys, values) -> None:
    """Whitened keys have type-weighted mean 0 and type-weighted covariance I (up to ε)."""
    mu, cov = _type_moments(w.apply(keys, dtype=np.float64), values)
    np.testing.assert_allclose(mu, 0.0, atol=1e-6)
    np.testing.assert_allclose(cov, np.eye(D), atol=1e-4)


def _check_entries_white(w: whiten.Whitening, keys) -> None:
    x = w.apply(keys, dtype=np.float64)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.cov(x.T, bias=True), np.eye(D), atol=1e-4)


def test_zipfian_whitened_type_covariance_is_identity(data):
    keys, values, _ = data
    mu, cov = _type_moments(keys, values)
    assert np.abs(cov - np.eye(D)).max() > 1.0 and np.linalg.cond(cov) > 100  # far from white before
    w = whiten.fit_zipfian(keys, values, eps_rel=EPS)
    assert w.kind == "zipfian" and w.n_types == V and w.n_entries == N
    assert w.eps == pytest.approx(EPS * np.trace(cov) / D, rel=1e-9)
    _check_zipfian_white(w, keys, values)
    # with ε the whitened covariance is diag(s² / (s² + ε)) exactly
    default = whiten.fit_zipfian(keys, values)
    s2 = np.linalg.eigvalsh(cov)
    np.testing.assert_allclose(
        np.sort(np.diag(_type_moments(default.apply(keys, dtype=np.float64), values)[1])),
        np.sort(s2 / (s2 + default.eps)), rtol=1e-6,
    )
    # entry whitening does not white the type-weighted moments on these keys, and vice versa
    we = whiten.fit_entries(keys, eps_rel=EPS)
    _check_entries_white(we, keys)
    with pytest.raises(AssertionError):
        _check_zipfian_white(we, keys, values)
    with pytest.raises(AssertionError):
        _check_entries_white(w, keys)


def test_checks_catch_corruption(data):
    keys, values, _ = data
    w = whiten.fit_zipfian(keys, values, eps_rel=EPS)
    no_centering = dataclasses.replace(w, mean=np.zeros(D))  # mean subtraction skipped
    with pytest.raises(AssertionError):
        _check_zipfian_white(no_centering, keys, values)
    no_scaling = dataclasses.replace(w, matrix=w.matrix * np.linalg.norm(w.matrix, axis=0))  # V without S⁻¹
    with pytest.raises(AssertionError):
        _check_zipfian_white(no_scaling, keys, values)
    with pytest.raises(AssertionError):  # the reference comparison catches a transposed matrix
        np.testing.assert_allclose(
            dataclasses.replace(w, matrix=w.matrix.T).apply(keys, dtype=np.float64),
            _reference(keys, *_type_moments(keys, values), w.eps), rtol=1e-7, atol=1e-7,
        )


@pytest.mark.parametrize("kind", ["zipfian", "entries"])
def test_transform_equals_numpy_reference(data, kind):
    keys, values, queries = data
    w = whiten.fit(kind, keys, values)
    if kind == "zipfian":
        mu, cov = _type_moments(keys, values)
    else:
        x = keys.astype(np.float64)
        mu, cov = x.mean(axis=0), np.cov(x.T, bias=True)
    np.testing.assert_allclose(w.mean, mu, rtol=1e-10, atol=1e-10)
    for x in (keys, queries):
        np.testing.assert_allclose(w.apply(x, dtype=np.float64), _reference(x, mu, cov, w.eps), rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(w.apply(x), _reference(x, mu, cov, w.eps), rtol=1e-4, atol=1e-4)  # float32
    # sign-free form: M Mᵀ = (C + εI)⁻¹
    np.testing.assert_allclose(w.matrix @ w.matrix.T, np.linalg.inv(cov + w.eps * np.eye(D)), rtol=1e-7, atol=1e-9)


def test_queries_and_keys_get_the_same_transform(data):
    keys, values, queries = data
    w = whiten.fit_zipfian(keys, values)
    both = w.apply(np.concatenate([keys, queries]), block=97, dtype=np.float64)
    np.testing.assert_array_equal(both[N:], w.apply(queries, block=97, dtype=np.float64)[: len(queries)])
    # whitened squared L2 between a query and a key = Mahalanobis distance under C_Z + εI
    mu, cov = _type_moments(keys, values)
    prec = np.linalg.inv(cov + w.eps * np.eye(D))
    diff = queries[:5, None, :].astype(np.float64) - keys[None, :7, :].astype(np.float64)  # (5, 7, D)
    want = np.einsum("qkd,de,qke->qk", diff, prec, diff)
    got = ((both[N : N + 5, None, :] - both[None, :7, :]) ** 2).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-7)


@pytest.mark.parametrize("kind", ["zipfian", "entries"])
def test_streamed_fit_equals_one_shot(data, kind):
    keys, values, _ = data
    one = whiten.fit(kind, keys, values, block=N)
    for block in (1, 7, 256, 1000, N + 5):
        w = whiten.fit(kind, keys, values, block=block)
        np.testing.assert_allclose(w.mean, one.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(w.matrix, one.matrix, rtol=1e-9, atol=1e-9)
    with pytest.raises(AssertionError):  # a fit that drops one block differs
        np.testing.assert_allclose(whiten.fit(kind, keys[:-7], values[:-7]).matrix, one.matrix, rtol=1e-9, atol=1e-9)


def test_memmap_and_sharded_keys(data, tmp_path):
    keys, values, _ = data
    np.save(tmp_path / "keys.npy", keys)
    mm = np.load(tmp_path / "keys.npy", mmap_mode="r")
    shard_dir = tmp_path / "run" / SHARD_DIR
    shard_dir.mkdir(parents=True)
    sizes = [1000, 1500, 500]
    rows = np.cumsum([0] + sizes)
    for i, (lo, hi) in enumerate(zip(rows[:-1], rows[1:])):
        np.save(shard_dir / shard_name(i), keys[lo:hi])
    (shard_dir / SHARD_LIST).write_text(
        json.dumps({"dim": D, "shards": [{"file": shard_name(i), "rows": s} for i, s in enumerate(sizes)]})
    )
    sharded = open_keys(tmp_path / "run")
    assert sharded.shape == keys.shape
    ref = whiten.fit_zipfian(keys, values)
    for src in (mm, sharded):
        w = whiten.fit_zipfian(src, values, block=700)
        np.testing.assert_allclose(w.matrix, ref.matrix, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(w.apply(src, block=700), ref.apply(keys), rtol=1e-6, atol=1e-6)


def test_save_load_and_faiss_form(data, tmp_path):
    keys, values, queries = data
    w = whiten.fit_entries(keys)
    w.save(tmp_path / "w.npz")
    back = whiten.Whitening.load(tmp_path / "w.npz")
    assert back.kind == w.kind and back.eps == w.eps and back.n_entries == N
    np.testing.assert_array_equal(back.matrix, w.matrix)
    np.testing.assert_array_equal(back.mean, w.mean)
    a, b = w.linear_map()
    np.testing.assert_allclose(queries.astype(np.float32) @ a.T + b, w.apply(queries), rtol=1e-4, atol=1e-4)
    lt = w.to_faiss()
    np.testing.assert_allclose(lt.apply(queries.astype(np.float32)), w.apply(queries), rtol=1e-4, atol=1e-4)


def test_rejects_bad_input(data):
    keys, values, _ = data
    with pytest.raises(ValueError, match="unknown whitening"):
        whiten.fit("pca", keys, values)
    with pytest.raises(ValueError, match="positive definite"):
        whiten.whitening_matrix(-np.eye(3), 0.0)
