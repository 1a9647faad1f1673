"""FAISS index over the datastore keys (SPEC §2): validate, train, add, search, reconstruct.

Keys live on disk as an fp16 memmap; they are converted to float32 block by block, so
memory holds the index plus one block. faiss's padding (id -1, distance FLT_MAX) is
masked here: callers get value -1 and distance +inf for missing neighbours.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

try:
    import faiss
except ImportError:  # a torch-only machine (bench/device_check.py on a lent GPU): the torch codec and search import
    faiss = None
import numpy as np

from knnlm_core.factory import (
    MIN_POINTS_PER_CENTROID,
    SUPPORTED_FORMS,
    FactoryError,
    check_factory_dim,
    training_problem,
)

__all__ = ["MIN_POINTS_PER_CENTROID", "IndexConfigError", "check_factory"]


class IndexConfigError(FactoryError):
    """The index factory string does not fit the data (dimension, training size)."""


def ivf_nlist(factory: str) -> int | None:
    """Number of inverted lists of an `IVF<n>` factory string, None if not IVF."""
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else None


def check_factory(factory: str, dim: int, n_train: int) -> None:
    """Raise IndexConfigError when `factory` cannot be built on `n_train` keys of size `dim`."""
    try:  # parsed and checked here first: faiss aborts the process on some strings (IVF0,PQ8)
        check_factory_dim(factory, dim)
    except FactoryError as err:
        raise IndexConfigError(str(err)) from err
    if problem := training_problem(factory, n_train):
        raise IndexConfigError(problem)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as err:
        raise IndexConfigError(f"faiss cannot build '{factory}': {str(err).splitlines()[-1]}") from err
    try:
        index.sa_code_size()
    except RuntimeError as err:  # e.g. HNSW32: no standalone codec, so no encode-once build and no PQ error
        raise IndexConfigError(
            f"index '{factory}' has no standalone codec (faiss sa_encode), which the run needs to encode each key "
            f"once and to measure quantization error; use one of: {SUPPORTED_FORMS}"
        ) from err


def blocks(keys: np.ndarray, block: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 block) over the rows of a (memmapped) key matrix."""
    for start in range(0, len(keys), block):
        yield start, np.ascontiguousarray(keys[start : start + block], dtype=np.float32)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted random row indices (all rows if size is 0 or >= n): sorted reads a memmap faster."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def train_index(keys: np.ndarray, factory: str, train_size: int, seed: int) -> faiss.Index:
    """A trained, empty index of `factory` over a sample of `keys` (N, d)."""
    rows = sample_rows(len(keys), train_size, seed)
    check_factory(factory, keys.shape[1], len(rows))
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_L2)
    ivf = _ivf_or_none(index)
    if ivf is not None:
        ivf.cp.seed = seed  # reproducible k-means
        # Polysemous training only permutes PQ centroids (distances are unchanged) and costs
        # minutes at PQ64; we never use polysemous search, so skip it.
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
    sample = np.ascontiguousarray(keys[rows], dtype=np.float32)  # (n_train, d)
    index.train(sample)
    return index


def add_keys(index: faiss.Index, keys: np.ndarray, progress: Callable[[int], None] | None = None) -> None:
    """Add all keys to the index in float32 blocks (ids = row numbers)."""
    for _, block in blocks(keys):
        index.add(block)
        if progress:
            progress(len(block))


def encode_with_error(index: faiss.Index, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, code_size) uint8, ||x - x̂||² (n,) float64) of float32 rows x, x̂ decoded from the same codes."""
    codes = index.sa_encode(block)
    diff = block - index.sa_decode(codes)  # (n, d) float32
    return codes, np.einsum("ij,ij->i", diff, diff, dtype=np.float64)


def add_codes(index: faiss.Index, codes: np.ndarray, first_id: int) -> None:
    """Add sa_encode codes as entries first_id.. (same result as `index.add` of the vectors)."""
    ids = np.arange(first_id, first_id + len(codes), dtype=np.int64)
    if isinstance(index, faiss.IndexPreTransform):  # codes are the inner index's codes of transformed vectors
        inner = faiss.downcast_index(index.index)
        inner.add_sa_codes(codes, ids)
        index.ntotal = inner.ntotal
    else:
        index.add_sa_codes(codes, ids)


def _ivf_or_none(index: faiss.Index):
    """The IVF inside `index` as its concrete class (e.g. IndexIVFPQ, so its own fields are visible), or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set nprobe on the IVF inside `index` (no-op for non-IVF indexes)."""
    ivf = _ivf_or_none(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(dists (Q, k) float32 with +inf for missing, ids (Q, k) int64 with -1 for missing)."""
    dists, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    dists[ids < 0] = np.inf
    return dists, ids


def reconstruction_error(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """||x - x̂||² per row (float64), x̂ = sa_decode(sa_encode(x)) (centroid + decoded residual)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, d)
    x_hat = index.sa_decode(index.sa_encode(x))
    return np.sum((x.astype(np.float64) - x_hat) ** 2, axis=1)


@dataclass(frozen=True)
class IVFPQCodec:
    """The arrays of a trained IVFPQ index's standalone codec (faiss `sa_encode` / `sa_decode`), for
    encoders outside faiss (`precompute.encode`). A code = the list number (`coarse_bytes` bytes,
    little-endian) then the M sub-quantizer codes (`nbits` each, packed from the lowest bit up)."""

    transforms: tuple[tuple[np.ndarray, np.ndarray], ...]  # (A (d_out, d_in), b (d_out,)) applied in order: x A^T + b
    centroids: np.ndarray  # (nlist, d) float32 coarse centroids
    pq_centroids: np.ndarray  # (M, ksub, dsub) float32
    nbits: int  # bits per sub-quantizer code
    coarse_bytes: int  # bytes of the list number
    by_residual: bool  # PQ encodes x - centroid (True for every IVFPQ the factory builds)


def ivfpq_codec(index: faiss.Index) -> IVFPQCodec | None:
    """The codec of an L2 IndexIVFPQ (alone, or behind orthonormal linear transforms such as OPQ) with a
    flat coarse quantizer; None for any other index (encode those with faiss)."""
    transforms = []
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if not isinstance(vt, faiss.LinearTransform) or not vt.is_orthonormal:
                return None
            a = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
            b = faiss.vector_to_array(vt.b) if vt.have_bias else np.zeros(vt.d_out, dtype=np.float32)
            transforms.append((a, b))
        index = faiss.downcast_index(index.index)
    if not isinstance(index, faiss.IndexIVFPQ) or index.metric_type != faiss.METRIC_L2:
        return None
    quantizer = faiss.downcast_index(index.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.metric_type != faiss.METRIC_L2:
        return None
    pq = index.pq
    return IVFPQCodec(
        transforms=tuple(transforms),
        centroids=quantizer.reconstruct_n(0, index.nlist),
        pq_centroids=faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub),
        nbits=int(pq.nbits), coarse_bytes=int(index.coarse_code_size()), by_residual=bool(index.by_residual))
