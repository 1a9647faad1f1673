"""Per-token-type datastore metrics (SPEC §3, §5) and summary correlations (SPEC §6).

All key statistics stream over the fp16 key memmap in float32 blocks: memory holds
O(V x d) sums and O(N) integer / float arrays, never the keys themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse

from knnlm_core.index import blocks


def token_freq(values: np.ndarray, vocab_size: int) -> np.ndarray:
    """freq(v) (V,) int64: number of datastore entries whose value is v."""
    return np.bincount(values, minlength=vocab_size).astype(np.int64)


def _one_hot(values: np.ndarray, vocab_size: int) -> scipy.sparse.csr_matrix:
    """(V, n) sparse indicator of each entry's value: sums per type become one sparse product."""
    n = len(values)
    return scipy.sparse.csr_matrix((np.ones(n), (values, np.arange(n))), shape=(vocab_size, n))


def centroids(keys: np.ndarray, values: np.ndarray, vocab_size: int) -> np.ndarray:
    """μ_v (V, d) float64: mean key of each type (zeros for types with no entry)."""
    sums = np.zeros((vocab_size, keys.shape[1]), dtype=np.float64)
    for start, block in blocks(keys):
        sums += _one_hot(values[start : start + len(block)], vocab_size) @ block.astype(np.float64)
    counts = np.bincount(values, minlength=vocab_size)
    return sums / np.maximum(counts, 1)[:, None]


def spread(keys: np.ndarray, values: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """r_i = ||k_i - μ_{v_i}||₂ (N,) float64, computed in float32 per block."""
    out = np.empty(len(keys), dtype=np.float64)
    for start, block in blocks(keys):
        diff = block - mu[values[start : start + len(block)]].astype(np.float32)
        out[start : start + len(block)] = np.sqrt(np.sum(diff * diff, axis=1, dtype=np.float64))
    return out


def coefficient_of_variation(r: np.ndarray, values: np.ndarray, vocab_size: int) -> np.ndarray:
    """cv (V,): population std of r / mean of r per type; NaN when freq < 2 or mean r is 0."""
    n = np.bincount(values, minlength=vocab_size).astype(np.float64)
    s1 = np.bincount(values, weights=r, minlength=vocab_size)
    s2 = np.bincount(values, weights=r * r, minlength=vocab_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = np.maximum(s2 / n - mean * mean, 0.0)
        cv = np.sqrt(var) / mean
    cv[(n < 2) | ~(mean > 0)] = np.nan
    return cv


def per_type_mean_max(x: np.ndarray, values: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, max) of x per type (V,), NaN for types with no entry."""
    n = np.bincount(values, minlength=vocab_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(values, weights=x, minlength=vocab_size) / n
    mx = np.full(vocab_size, -np.inf)
    np.maximum.at(mx, values, x)
    mean[n == 0] = np.nan
    mx[n == 0] = np.nan
    return mean, mx


def contamination_from_neighbors(type_ids: np.ndarray, nbr_values: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Share of the first m[j] neighbours of centroid j whose value != type_ids[j] (J,)."""
    ranks = np.arange(nbr_values.shape[1])[None, :]  # (1, K)
    considered = ranks < m[:, None]  # (J, K)
    foreign = (nbr_values != type_ids[:, None]) & considered
    return foreign.sum(axis=1) / m


def exact_knn(
    queries: np.ndarray, keys: np.ndarray, k: int, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """Ids (Q, k) of the exact k nearest keys (squared L2) of each query, streaming key blocks.

    Blocks of 262,144 keys: contamination calls this beside the types stage's other arrays,
    whose peak RSS was measured with blocks of that size.
    """
    return exact_knn_with_dists(queries, keys, k, progress, block_bytes=262144 * 4 * keys.shape[1])[1]


EXACT_BLOCK_BYTES = 2 << 30  # float32 key block of the exact search: 2 GiB (2.8M keys at d = 192)


def exact_knn_with_dists(
    queries: np.ndarray, keys: np.ndarray, k: int, progress: Callable[[int], None] | None = None,
    block_bytes: int = EXACT_BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances (Q, k) float32 ascending, ids (Q, k) int64) of the exact k nearest keys.

    Each key block (fp16 -> fp32) is searched by `faiss.knn` (IndexFlatL2's brute force
    without copying the block into an index) and merged into a `faiss.ResultHeap`: keys are
    streamed once per call and never held whole in float32.
    The distances are faiss's (||q||² + ||k||² - 2 q·k); recompute them from the keys where
    full precision matters. Blocks are as large as `block_bytes` allows: every block restarts
    the per-query top-k selection with a loose threshold, so many small blocks cost several
    times the heap work of one search over all keys (measured 0.52x IndexFlatL2 with blocks
    of 262,144 keys on 2.45M keys, k = 1024).
    """
    import faiss

    heap = faiss.ResultHeap(len(queries), k)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    rows = max(65536, int(block_bytes) // (4 * keys.shape[1]))
    for start, block in blocks(keys, rows):
        dists, ids = faiss.knn(q, block, min(k, len(block)))
        ids = np.where(ids < 0, -1, ids + start)
        if dists.shape[1] < k:  # a final block smaller than k: pad so the heap sees (Q, k)
            pad = k - dists.shape[1]
            dists = np.pad(dists, ((0, 0), (0, pad)), constant_values=np.finfo(np.float32).max)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(dists, ids)
        if progress:
            progress(len(block))
    heap.finalize()
    return heap.D, heap.I


