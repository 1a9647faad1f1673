"""Every search of the pipeline in one place (SPEC §2, §4, §7, §8).

- `search_rows`: the index's k neighbours of a range of queries, in batches, with the exact
  distances of all k neighbours recomputed from the stored fp16 keys: one neighbour-block shard
  (`knnlm_core.neighbours`). The only loop over query batches that searches an index.
- `exact_rows`: the exact k nearest keys of a range of queries (brute force,
  `precompute.exact`: faiss on the CPU, a bf16 shortlist + fp32 rerank on a GPU), as a block
  shard with the same distance definition.
- `neighbour_sq_dists`: ||q - k_j||² of each query and given neighbours, by the difference.
- `position_metrics`: everything per position that comes from a block's rows (p_kNN, the
  target's rank, the kNN top tokens, log Z).
"""

from __future__ import annotations

import numpy as np
import torch

from knnlm_core.knn import PAD, p_knn_from_weights, softmax_weights, target_stats
from precompute.runner import RunError, read_index

KNN_TOP = 10  # kNN top predictions stored per position
RESIDENT_KEY_BYTES = 2 << 30  # float32 keys held in memory per worker for the exact distances (2.8M keys at d 192)
RESIDENT_BLOCK = 262144  # keys converted (whitened) at a time into the resident array


def open_index(path, dim: int, mmap: bool = False):
    """A faiss index file, checked against the keys' dimension."""
    index = read_index(path, mmap)
    if index.d != dim:
        raise RunError(f"{path} has dimension {index.d} but the model's keys have {dim}: rerun with --overwrite "
                       f"(or delete {path.name}) to rebuild the index")
    return index


def resident_keys(keys, transform=None, budget: int = RESIDENT_KEY_BYTES):
    """The keys (whitened by `transform`, if any) as one float32 (N, d) array in memory when they fit
    `budget`, converted (and whitened) once per process instead of once per gathered neighbour;
    else the store itself (a whitened view of it), read per batch. Whitening a whole block at a
    time rounds like whitening the gathered rows to within float32 GEMM rounding (tests/test_search.py)."""
    from knnlm_core.whiten import WhitenedKeys

    n, d = keys.shape
    if n * d * 4 > budget:
        return keys if transform is None else WhitenedKeys(keys, transform)
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, RESIDENT_BLOCK):
        rows = keys[a : a + RESIDENT_BLOCK]
        out[a : a + len(rows)] = rows if transform is None else transform.apply(rows)
    return out


def neighbour_sq_dists(q: np.ndarray, keys, ids: np.ndarray) -> np.ndarray:
    """Exact ||q - k_j||² (Q, m) float32 of each query and its neighbours' keys; inf where id < 0.

    The one distance routine of the pipeline (the exact search's rerank is the same call,
    `precompute.exact.pair_sq_dists_np`): faiss's `pairwise_indexed_L2sqr`, a SIMD sum of the
    squared difference per pair (no ||q||² + ||k||² - 2 q·k cancellation), single pass, no
    temporary of the differences. Resident float32 keys (`resident_keys`) are read in place;
    any other store (fp16 memmap, sharded, whitened view) once per distinct row, in row order.
    """
    from precompute.exact import pair_sq_dists_np

    if ids.size == 0:
        return np.zeros(ids.shape, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if type(keys) is np.ndarray and keys.dtype == np.float32 and keys.flags.c_contiguous:
        table, rows = keys, ids.reshape(-1)  # -1 (missing) gives +inf in pairwise_indexed_L2sqr
    else:
        uniq, inverse = np.unique(np.where(ids < 0, 0, ids), return_inverse=True)  # sorted: a forward read
        table = np.ascontiguousarray(keys[uniq], dtype=np.float32)  # (u, d)
        rows = np.where(ids.reshape(-1) < 0, -1, inverse.reshape(-1))
    pair_query = np.repeat(np.arange(len(q), dtype=np.int64), ids.shape[1])
    return pair_sq_dists_np(np.ascontiguousarray(q, dtype=np.float32), pair_query, table, rows).reshape(ids.shape)


def block_arrays(ids: np.ndarray, values: np.ndarray, dist_pq: np.ndarray, dist_exact: np.ndarray) -> dict:
    """A block shard's four arrays, missing neighbours normalised (value -1, distances +inf)."""
    missing = ids < 0
    return {"ids": ids.astype(np.int64), "values": np.where(missing, PAD, values[np.maximum(ids, 0)]).astype(np.int32),
            "dist_pq": np.where(missing, np.inf, dist_pq).astype(np.float32),
            "dist_exact": np.where(missing, np.inf, dist_exact).astype(np.float32)}


def search_into(index, q: np.ndarray, k: int, dists: np.ndarray, ids: np.ndarray) -> None:
    """`knnlm_core.index.search` written straight into (B, k) slices of a shard's arrays (no copies)."""
    index.search(q, k, D=dists, I=ids)
    dists[ids < 0] = np.inf


def search_rows(index, keys, values: np.ndarray, queries, lo: int, hi: int, k: int, batch: int,
                transform=None, progress=None, searcher=None) -> dict[str, np.ndarray]:
    """The index's k neighbours of queries [lo, hi) (whitened by `transform` first, if any): block arrays.

    `keys` are in the index's space (resident float32 keys, `resident_keys`, or a whitened view).
    The search and the exact distances run one after the other, each on every core: overlapping
    them in a second thread put two OpenMP teams on the same cores (measured 0.58x one raw
    `index.search`; bench/search.py). Each batch is written in place into the shard's arrays.
    """
    n = hi - lo
    out = {"ids": np.empty((n, k), np.int64), "values": np.empty((n, k), np.int32),
           "dist_pq": np.empty((n, k), np.float32), "dist_exact": np.empty((n, k), np.float32)}
    for a in range(lo, hi, batch):
        b = min(a + batch, hi)
        rows = slice(a - lo, b - lo)
        q = np.asarray(queries[a:b], dtype=np.float32)  # (B, d)
        if transform is not None:
            q = transform.apply(q)
        dists, ids = out["dist_pq"][rows], out["ids"][rows]
        if searcher is None:
            search_into(index, q, k, dists, ids)  # missing neighbours: id -1, distance +inf
        else:
            dists[:], ids[:] = searcher(q, k)
        out["dist_exact"][rows] = neighbour_sq_dists(q, keys, ids)  # +inf where id < 0
        np.take(values, ids, out=out["values"][rows], mode="wrap")  # id -1 reads the last value: reset below
        missing = ids < 0
        if missing.any():
            out["values"][rows][missing] = PAD
        if progress:
            progress(b - a)
    return out


def exact_rows(keys, values: np.ndarray, queries, lo: int, hi: int, k: int, device: str,
               query_block: int = 16384, progress=None, lower=None) -> dict[str, np.ndarray]:
    """The exact k nearest keys of queries [lo, hi): block arrays (dist_pq NaN), ascending by (distance, id).

    On a CPU the certified search's distances are `neighbour_sq_dists`'s own (one routine, computed
    once); the GPU path sums in torch, so there they are recomputed on the CPU and the rows re-sorted,
    keeping the distances of every block bit-identical across devices. `lower`: the subspace bound of
    resident keys (`precompute.exact_projection`), 4,096 queries at a time (its shortlists are 4k wide).
    """
    if lower is not None:
        query_block = min(query_block, 4096)
    from precompute.exact import exact_knn_with_dists

    parts = []
    for a in range(lo, hi, query_block):
        b = min(a + query_block, hi)
        q = np.asarray(queries[a:b], dtype=np.float32)
        dists, ids = exact_knn_with_dists(q, keys, k, device, lower=lower)
        if device != "cpu":
            dists = neighbour_sq_dists(q, keys, ids)
            order = np.argsort(dists, axis=1, kind="stable")  # ids ascending within a tie already
            ids, dists = np.take_along_axis(ids, order, 1), np.take_along_axis(dists, order, 1)
        parts.append(block_arrays(ids, values, np.full(ids.shape, np.nan, np.float32), dists))
        if progress:
            progress(b - a)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def top_tokens(weights: np.ndarray, nbr_values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top` tokens of largest summed weight per query: (ids (Q, top) int64, probs (Q, top) float64).

    Same result as knnlm_core.knn.top_tokens_from_weights (padding: token -1, probability 0),
    computed per row in torch: sort by token, sum runs of equal tokens, top-k of the sums.
    """
    vals = torch.from_numpy(nbr_values.astype(np.int64))
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64))
    sorted_vals, order = torch.sort(vals, dim=1)
    sorted_w = w.gather(1, order)
    new_run = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_run[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    run_id = torch.cumsum(new_run, dim=1) - 1  # (Q, k) index of each neighbour's run of equal tokens
    sums = torch.zeros_like(sorted_w).scatter_add_(1, run_id, sorted_w)
    run_vals = torch.full_like(sorted_vals, PAD).scatter_(1, run_id, sorted_vals)
    sums[run_vals == PAD] = -1.0  # missing neighbours and unused runs never rank
    best, where = torch.topk(sums, min(top, sums.shape[1]), dim=1)
    ids = run_vals.gather(1, where)
    ids[best < 0] = PAD
    probs = best.clamp(min=0.0)
    if ids.shape[1] < top:
        pad = top - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=PAD)
        probs = torch.nn.functional.pad(probs, (0, pad), value=0.0)
    return ids.numpy(), probs.numpy()


METRIC_ROWS = 16384  # positions scored at a time: float64 (rows, k) temporaries of ~130 MB, not a shard's ~1 GB each


def by_rows(fn, rows: int = METRIC_ROWS):
    """`fn(block, targets, *args)` applied to `rows` positions at a time, the per-position results concatenated:
    the same values (every result is per row), a peak memory of one chunk's float64 temporaries."""
    def apply(block: dict[str, np.ndarray], targets: np.ndarray, *args) -> dict[str, np.ndarray]:
        parts = [fn({name: a[lo : lo + rows] for name, a in block.items()}, targets[lo : lo + rows], *args)
                 for lo in range(0, len(targets), rows)] or [fn(block, targets, *args)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return apply


def position_metrics(block: dict[str, np.ndarray], targets: np.ndarray, tau: float,
                     source: str) -> dict[str, np.ndarray]:
    """Per-position kNN results (SPEC §2, §4) from one block shard's rows and their targets (`by_rows`)."""
    return by_rows(chunk_metrics)(block, targets, tau, source)


def chunk_metrics(block: dict[str, np.ndarray], targets: np.ndarray, tau: float,
                  source: str) -> dict[str, np.ndarray]:
    """`position_metrics` of one chunk of rows."""
    vals = block["values"]
    dists = block["dist_exact"] if source == "exact" else block["dist_pq"]
    target_rank, n_target = target_stats(vals, targets)
    weights, log_z = softmax_weights(dists, tau, vals)  # (B, k), (B,): computed once
    knn_top_ids, knn_top_p = top_tokens(weights, vals, KNN_TOP)
    return {"p_knn": p_knn_from_weights(weights, vals, targets), "target_rank": target_rank, "n_target": n_target,
            "n_found": (block["ids"] >= 0).sum(axis=1), "knn_top_ids": knn_top_ids, "knn_top_p": knn_top_p,
            "knn_log_z": log_z}
