"""precompute/torch_ivfpq.py (faiss IVFPQ search in torch over the index's own lists and codes) on CPU
torch, against faiss's CPU search and against an independent float64 numpy recomputation: the ADC
distance of an entry equals ||y − x̂||², x̂ its faiss `sa_decode` reconstruction, and the probed
lists are the nprobe nearest centroids.

Tolerance: distances agree rank by rank within RTOL · (||y||² + |d|). Each distance is a float32
sum of M + 2 terms (coarse distance, the entry's precomputed term, M table entries), each table
entry itself a float32 combination of dot products of length dsub; their magnitudes are bounded by
||y||² + ||c||² + |d| (up to a small factor), so the rounding is ≲ (M + dsub + 2) · 2^-24 ≈ 8e-7 of
that at PQ8 on d = 32; RTOL = 1e-5 leaves a ~12× margin (measured worst: 4.4e-7 against faiss). Id sets may differ only at the k-th
neighbour, between entries whose distances lie within that tolerance of it (ties)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from knnlm_core.index import search
from precompute.torch_ivfpq import (
    TorchIVFPQ,
    TorchIVFPQError,
    check_against_faiss,
    faiss_gpu_search,
    sort_rows,
)

N, D, NLIST = 20_000, 32, 64
RTOL = 1e-5  # see the module docstring


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """float32 keys around 200 Gaussian centres (fp16-rounded, as the datastore's keys)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, d), dtype=np.float32) * 3
    return (centres[rng.integers(0, 200, n)] + rng.standard_normal((n, d), dtype=np.float32)).astype(np.float16)


def build(factory: str, keys: np.ndarray) -> faiss.Index:
    """A trained, filled index of `factory`, with short k-means (5 iterations) so it builds in ~1 s."""
    index = faiss.index_factory(keys.shape[1], factory)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed, ivf.cp.niter, ivf.do_polysemous_training = 1, 5, False
    ivf.pq.cp.niter = 5
    if isinstance(index, faiss.IndexPreTransform):
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter, opq.niter_pq_0 = 2, 2  # OPQ's 50 rotations (after 40 PQ k-means rounds) cost seconds
    x = keys.astype(np.float32)
    index.train(x[:6000])
    index.add(x)
    return index


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """faiss and torch on one thread each (restored after): the k-means and the searches here are small, and
    on 2 busy cores OpenMP / torch thread pools cost more than they give (builds 5-10x slower)."""
    saved = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    yield
    faiss.omp_set_num_threads(saved[0])
    torch.set_num_threads(saved[1])


@pytest.fixture(scope="module")
def data(one_thread) -> dict:
    """Keys (N, D), queries (noisy copies of keys), the faiss IVF64,PQ8 index and its torch copy (CPU)."""
    keys = clustered(N, D, seed=0).astype(np.float32)
    rng = np.random.default_rng(1)
    queries = keys[rng.integers(0, N, 160)] + 0.3 * rng.standard_normal((160, D), dtype=np.float32)  # (Q, D)
    index = build(f"IVF{NLIST},PQ8", keys)
    return {"keys": keys, "queries": queries, "index": index, "torch": TorchIVFPQ.from_faiss(index, "cpu")}


def faiss_search(index, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss CPU search at nprobe, missing as (+inf, -1)."""
    faiss.extract_index_ivf(index).nprobe = nprobe
    return search(index, q, k)


def reference(index, keys: np.ndarray, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy IVFPQ search: entries of the nprobe nearest lists ranked by ||y − x̂||² (x̂ = sa_decode
    of the entry's sa_encode code, its list the code's first byte), padded with (+inf, -1)."""
    codes = index.sa_encode(keys)  # (N, 1 + M): list number (1 byte at 64 lists), then the PQ codes
    recon = index.sa_decode(codes).astype(np.float64)  # (N, D) x̂
    lists = codes[:, 0].astype(np.int64)
    centroids = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, NLIST).astype(np.float64)
    y = q.astype(np.float64)
    dists, ids = np.full((len(q), k), np.inf), np.full((len(q), k), -1)
    for r in range(len(q)):
        probed = np.argsort(((y[r] - centroids) ** 2).sum(1), kind="stable")[:nprobe]
        cand = np.flatnonzero(np.isin(lists, probed))
        d = ((recon[cand] - y[r]) ** 2).sum(1)
        order = np.lexsort((cand, d))[:k]
        dists[r, : len(order)], ids[r, : len(order)] = d[order], cand[order]
    return dists, ids


def assert_same_neighbours(want: tuple, got: tuple, scale: np.ndarray) -> int:
    """Rank-by-rank distances within RTOL · (scale + |d|); the same missing ranks; ids equal as sets except
    at the row's boundary (an id only one side has lies within the tolerance of the other's k-th distance).
    Returns the number of rows whose id sets differ."""
    (wd, wi), (gd, gi) = want, got
    assert gd.dtype == np.float32 and gi.dtype == np.int64 and gd.shape == wd.shape
    np.testing.assert_array_equal(np.isinf(gd), np.isinf(wd))
    np.testing.assert_array_equal(gi < 0, np.isinf(gd))
    both = np.isfinite(wd)
    tol = RTOL * (scale[:, None] + np.abs(wd))
    assert np.all(np.abs(gd[both] - wd[both]) <= tol[both])
    differ = 0
    for r in range(len(wi)):
        only_w, only_g = np.setdiff1d(wi[r], gi[r]), np.setdiff1d(gi[r], wi[r])
        if len(only_w) == 0:
            continue
        differ += 1
        last = np.flatnonzero(both[r])[-1]
        for ids, d, other_last in ((only_w, wd, gd[r, last]), (only_g, gd, wd[r, last])):
            at = np.isin(wi[r] if d is wd else gi[r], ids)
            assert np.all(d[r, at] >= other_last - tol[r, last]), f"row {r}: ids {ids} are not boundary ties"
    return differ


@pytest.mark.parametrize(("nprobe", "k"), [(1, 20), (8, 100), (NLIST, 50)])
def test_equals_faiss_and_numpy_reference(data, nprobe, k):
    q = data["queries"][:48] if nprobe == NLIST else data["queries"]  # nprobe = nlist scans all 20k entries
    scale = (q.astype(np.float64) ** 2).sum(1)
    got = data["torch"].search(q, k, nprobe)
    assert np.all(np.diff(got[0], axis=1)[np.isfinite(got[0][:, 1:])] >= 0)  # ascending
    rare = max(1, len(q) // 50)  # rows whose id sets differ (at a boundary tie): at most 2%
    assert assert_same_neighbours(faiss_search(data["index"], q, k, nprobe), got, scale) <= rare
    assert assert_same_neighbours(reference(data["index"], data["keys"], q, k, nprobe), got, scale) <= rare


def test_the_comparison_rejects_small_faults(data):
    """The test's own comparison fails on a distance moved by 5 tolerances and on one swapped top neighbour."""
    q = data["queries"][:16]
    scale = (q.astype(np.float64) ** 2).sum(1)
    d, i = data["torch"].search(q, 20, 8)
    moved = d.copy()
    moved[2, 10] += 5 * RTOL * (scale[2] + d[2, 10])
    with pytest.raises(AssertionError):
        assert_same_neighbours((d, i), (moved, i), scale)
    swapped = i.copy()
    swapped[4, 0] = next(j for j in range(N) if j not in i[4])  # a far entry in place of the nearest one
    with pytest.raises(AssertionError, match="boundary ties"):
        assert_same_neighbours((d, i), (d, swapped), scale)


def test_k_beyond_the_probed_lists_pads_like_faiss(data):
    q = data["queries"][:40]
    want = faiss_search(data["index"], q, 1000, 1)  # one list holds ~N / 64 = 312 entries
    got = data["torch"].search(q, 1000, 1)
    assert (got[1] < 0).any()  # padding happened
    assert_same_neighbours(want, got, (q.astype(np.float64) ** 2).sum(1))
    np.testing.assert_array_equal(np.sort(got[1], axis=1), np.sort(want[1], axis=1))  # all entries of the list


def test_direct_tables_and_opq_equal_faiss(data):
    q = data["queries"][:64]
    scale = (q.astype(np.float64) ** 2).sum(1)
    direct = TorchIVFPQ.from_faiss(data["index"], "cpu", precomputed=False)
    assert direct.table is None and data["torch"].table is not None  # faiss uses the precomputed form here
    assert_same_neighbours(faiss_search(data["index"], q, 30, 4), direct.search(q, 30, 4), scale)
    opq = build("OPQ8,IVF16,PQ8", data["keys"][:8000])
    assert_same_neighbours(faiss_search(opq, q, 30, 4), TorchIVFPQ.from_faiss(opq, "cpu").search(q, 30, 4), scale)


def test_small_batches_give_the_same_result(data):
    q = data["queries"][:50]
    t = data["torch"]
    assert t.batch_size(8, max_pairs=5000) < 5  # the bound forces several batches
    small = t.search(q, 40, 8, max_pairs=5000)
    whole = t.search(q, 40, 8)  # matmuls of other shapes: not bit-identical, equal within the tolerance
    assert_same_neighbours(whole, small, (q.astype(np.float64) ** 2).sum(1))


def test_check_against_faiss_passes_then_fails_on_corrupted_copies(data):
    q, index, t = data["queries"], data["index"], data["torch"]
    check_against_faiss(index, t, q, 50, 8, sample=64)
    bad_codebook = TorchIVFPQ(**{**vars(t), "pq": t.pq.clone(), "table": None, "term": None})  # direct form
    bad_codebook.pq[3, 17, 1] += 0.05  # ONE codebook entry moved by ~1% of its sub-vectors' spread
    bad_codes = TorchIVFPQ(**{**vars(t), "codes": torch.roll(t.codes, 1, dims=0), "term": None})  # shifted codes
    for bad in (bad_codebook, bad_codes):
        with pytest.raises(TorchIVFPQError, match="differs from faiss") as err:
            check_against_faiss(index, bad, q, 50, 8, sample=64)
        assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_unsupported_indexes_are_refused_in_one_line(data):
    for factory in ("IVF16,Flat", "IVF16,PQ8x4", "PQ8", "IVF16,PQ8"):  # refused before any array is read
        index = faiss.index_factory(D, factory)  # untrained: IVF16,PQ8 is refused for that alone
        with pytest.raises(TorchIVFPQError, match="faiss") as err:
            TorchIVFPQ.from_faiss(index, "cpu")
        assert "\n" not in str(err.value)
    with pytest.raises(TorchIVFPQError, match="shape"):
        data["torch"].search(data["queries"][:, :8], 5, 1)


def test_faiss_gpu_search_sorts_rows_and_checks_them(data):
    q = data["queries"][:32]
    faiss.extract_index_ivf(data["index"]).nprobe = 2
    want = search(data["index"], q, 400)  # some rows padded with (+inf, -1)
    got = faiss_gpu_search(data["index"], q, 400)  # any faiss index; faiss-gpu's rows are checked the same way
    np.testing.assert_array_equal(got[0], want[0])
    rng = np.random.default_rng(0)
    perm = np.argsort(rng.random(want[0].shape), axis=1)  # rows shuffled, as an unsorted faiss-gpu result
    d, i = sort_rows(np.take_along_axis(want[0], perm, 1), np.take_along_axis(want[1], perm, 1))
    np.testing.assert_array_equal(d, want[0])
    ties = np.lexsort((want[1], want[0]), axis=1)  # (distance, id) order of the original rows
    np.testing.assert_array_equal(i, np.take_along_axis(want[1], ties, 1))
    broken = want[0].copy()
    broken[3, 5] = np.nan
    with pytest.raises(TorchIVFPQError, match="not ascending"):
        sort_rows(broken, want[1])
    with pytest.raises(TorchIVFPQError, match="k <= 2048"):
        faiss_gpu_search(data["index"], q, 4096)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu(data):
    q = data["queries"]
    cuda = TorchIVFPQ.from_faiss(data["index"], "cuda")
    scale = (q.astype(np.float64) ** 2).sum(1)
    assert_same_neighbours(faiss_search(data["index"], q, 100, 8), cuda.search(q, 100, 8), scale)
    check_against_faiss(data["index"], cuda, q, 100, 8)
