"""precompute/encode.py (IVFPQ codes and PQ error in torch) against faiss's own `sa_encode` /
`sa_decode`, on CPU torch: byte layout, codes (equal except float near-ties, each one checked to
be a near-tie in float64), PQ errors, and the index stage built with the torch encoder."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from knnlm_core.index import encode_with_error, ivfpq_codec, train_index
from precompute.encode import TorchIVFPQEncoder, pack_codes
from precompute.runner import Shards
from precompute.stages import index as index_stage

FACTORIES = [  # (factory, dim): 1- and 2-byte list numbers, 4 / 6 / 8-bit codes, direct and BLAS PQ distances, OPQ
    ("IVF8,PQ8x4", 32),
    ("IVF16,PQ4", 16),  # sub-vectors of 4: faiss's direct loop
    ("IVF32,PQ8", 256),  # sub-vectors of 32: faiss's BLAS tables
    ("IVF300,PQ4x6", 48),  # 300 lists: 2-byte list numbers
    ("OPQ4,IVF8,PQ4x4", 32),
]
MAX_DIFFERING = 1e-3  # share of codes that may differ from faiss's (near-ties only)


def keys_like(n: int, d: int, seed: int) -> np.ndarray:
    """float32 copies of fp16 keys around 50 centres (the run stores fp16 keys)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d)) * 3
    return (centres[rng.integers(0, 50, n)] + rng.normal(size=(n, d))).astype(np.float16).astype(np.float32)


def unpack(codes: np.ndarray, coarse_bytes: int, m: int, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """(list numbers (n,), sub-quantizer codes (n, M)) from sa_encode bytes, written out independently."""
    lists = sum(codes[:, i].astype(np.int64) << (8 * i) for i in range(coarse_bytes))
    bits = np.unpackbits(codes[:, coarse_bytes:], axis=1, bitorder="little")[:, : m * nbits].reshape(-1, m, nbits)
    return lists, (bits.astype(np.int64) << np.arange(nbits)).sum(2)


def transformed(index, x: np.ndarray) -> tuple[np.ndarray, faiss.IndexIVFPQ]:
    """x after the index's pre-transforms (faiss's own), and the IVFPQ inside."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
        return x, faiss.downcast_index(index.index)
    return x, index


@pytest.fixture(scope="module")
def trained() -> dict:
    """factory -> (keys (6000, dim), index trained on 2,000 of them): each trained once, on fewer keys
    than the run's check asks for (faiss only warns; the codes are what is tested)."""
    out = {}
    for factory, dim in FACTORIES:
        x = keys_like(6000, dim, seed=dim)
        index = faiss.index_factory(dim, factory)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed, ivf.do_polysemous_training = 1, False  # as train_index: polysemous training costs minutes
        if isinstance(index, faiss.IndexPreTransform):
            faiss.downcast_VectorTransform(index.chain.at(0)).niter = 4  # OPQ's 50 rotations: a minute here
        index.train(x[:2000])
        out[factory] = x, index
    return out


def near_tie(y: np.ndarray, ivf, got: tuple, want: tuple) -> bool:
    """Whether two codes of one vector y are within float32 rounding of each other: the two lists' centroid
    distances, or (same list) the sub-vectors' distances to the two PQ centroids, in float64."""
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float64)
    y = y.astype(np.float64)
    tol = 8 * len(y) * 2.0 ** -24  # float32 sums of len(y) terms, with slack
    if got[0] != want[0]:
        d = [((y - centroids[lst]) ** 2).sum() for lst in (got[0], want[0])]
        return abs(d[0] - d[1]) <= tol * (y @ y + max(centroids[lst] @ centroids[lst] for lst in (got[0], want[0])))
    pq = faiss.vector_to_array(ivf.pq.centroids).reshape(ivf.pq.M, ivf.pq.ksub, ivf.pq.dsub).astype(np.float64)
    r = (y - centroids[got[0]]).reshape(ivf.pq.M, ivf.pq.dsub)
    for m in np.flatnonzero(got[1] != want[1]):
        a, b = pq[m, got[1][m]], pq[m, want[1][m]]
        if abs(((r[m] - a) ** 2).sum() - ((r[m] - b) ** 2).sum()) > tol * (r[m] @ r[m] + max(a @ a, b @ b)):
            return False
    return True


@pytest.mark.parametrize("factory,dim", FACTORIES)
def test_torch_codes_equal_faiss_except_near_ties(trained, factory, dim):
    x, index = trained[factory]
    want_codes, want_err = encode_with_error(index, x)
    codec = ivfpq_codec(index)
    got_codes, got_err = TorchIVFPQEncoder(codec, "cpu").encode_with_error(x)
    assert got_codes.dtype == np.uint8 and got_codes.shape == want_codes.shape == (len(x), index.sa_code_size())
    differ = np.flatnonzero((got_codes != want_codes).any(axis=1))
    print(f"{factory}: {len(differ)} of {len(x)} codes differ from faiss's ({len(differ) / len(x):.2e})")
    assert len(differ) / len(x) < MAX_DIFFERING
    y, ivf = transformed(index, x)
    m, nbits = codec.pq_centroids.shape[0], codec.nbits
    got, want = unpack(got_codes, codec.coarse_bytes, m, nbits), unpack(want_codes, codec.coarse_bytes, m, nbits)
    for i in differ:
        assert near_tie(y[i], ivf, (got[0][i], got[1][i]), (want[0][i], want[1][i])), f"row {i}: not a near-tie"
    same = np.setdiff1d(np.arange(len(x)), differ)
    rtol = 1e-5 if codec.transforms else 1e-12  # through a rotation: float32 rounding of x̂ in two matmul orders
    np.testing.assert_allclose(got_err[same], want_err[same], rtol=rtol)
    # The torch codes decode (by faiss) to the error the encoder reported.
    np.testing.assert_allclose(got_err, ((x - index.sa_decode(got_codes)).astype(np.float64) ** 2).sum(1), rtol=rtol)


@pytest.mark.parametrize("factory,dim", FACTORIES)
def test_pack_codes_is_faiss_layout(trained, factory, dim):
    x, index = trained[factory]
    codec = ivfpq_codec(index)
    codes = index.sa_encode(x)
    lists, sub_codes = unpack(codes, codec.coarse_bytes, codec.pq_centroids.shape[0], codec.nbits)
    assert lists.max() < len(codec.centroids) and sub_codes.max() < 2 ** codec.nbits
    np.testing.assert_array_equal(pack_codes(lists, sub_codes, codec), codes)


def test_only_ivfpq_has_a_torch_codec():
    x = keys_like(2000, 16, seed=4)
    for factory in ("IVF8,Flat", "IVF8,SQ8", "PQ4x4", "Flat"):
        index = train_index(x, factory, 0, seed=1)
        assert ivfpq_codec(index) is None
        assert index_stage.encoder_name(index, "cuda") == "faiss"
    ivfpq = train_index(x, "IVF8,PQ4x4", 0, seed=1)
    assert index_stage.encoder_name(ivfpq, "cuda") == "torch-cuda"
    assert index_stage.encoder_name(ivfpq, "cpu") == "faiss"


def list_entries(index) -> dict[int, tuple[int, bytes]]:
    """id -> (list number, code bytes) of every entry of a filled IVF index."""
    invlists = faiss.extract_index_ivf(index).invlists
    entries = {}
    for lst in range(invlists.nlist):
        n = invlists.list_size(lst)
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * invlists.code_size).reshape(n, -1)
        entries.update({int(i): (lst, c.tobytes()) for i, c in zip(ids, codes)})
    return entries


def test_index_stage_with_torch_encoder_equals_faiss(tmp_path, monkeypatch):
    keys = keys_like(5000, 32, seed=5).astype(np.float16)
    faiss_index, faiss_err, _ = index_stage.build_index(keys, "IVF16,PQ8x4", 0, 0, 1500, Shards(tmp_path / "a", "k"))
    monkeypatch.setattr(index_stage, "TORCH_ENCODER_DEVICES", ("cuda", "cpu"))
    assert index_stage.encoder_name(faiss_index, "cpu") == "torch-cpu"
    torch_index, torch_err, _ = index_stage.build_index(keys, "IVF16,PQ8x4", 0, 0, 1500, Shards(tmp_path / "b", "k"),
                                                        device="cpu")
    got, want = list_entries(torch_index), list_entries(faiss_index)
    assert sorted(got) == sorted(want) == list(range(len(keys)))  # every key once, ids = row numbers
    differ = [i for i in got if got[i] != want[i]]
    assert len(differ) / len(keys) < MAX_DIFFERING
    same = np.setdiff1d(np.arange(len(keys)), differ)
    np.testing.assert_allclose(torch_err[same], faiss_err[same], rtol=1e-12)


def test_near_tie_check_rejects_a_wrong_code(trained):
    x, index = trained["IVF32,PQ8"]
    y, ivf = transformed(index, x[:50])
    lists, sub_codes = unpack(index.sa_encode(x[:50]), 1, ivf.pq.M, 8)
    pq = faiss.vector_to_array(ivf.pq.centroids).reshape(ivf.pq.M, ivf.pq.ksub, ivf.pq.dsub)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    for i in range(50):
        r = y[i] - centroids[lists[i]]
        far = np.argmax(((r[: ivf.pq.dsub] - pq[0]) ** 2).sum(1))  # sub-quantizer 0's farthest centroid
        wrong = sub_codes[i].copy()
        wrong[0] = far
        assert not near_tie(y[i], ivf, (lists[i], wrong), (lists[i], sub_codes[i]))
        other = np.argsort(((y[i] - centroids) ** 2).sum(1))[-1]  # the farthest list
        assert not near_tie(y[i], ivf, (other, sub_codes[i]), (lists[i], sub_codes[i]))
        assert near_tie(y[i], ivf, (lists[i], sub_codes[i]), (lists[i], sub_codes[i]))
    midpoint = (centroids[0] + centroids[1]) / 2  # equidistant from two lists, up to rounding
    assert near_tie(midpoint, ivf, (0, sub_codes[0]), (1, sub_codes[0]))
