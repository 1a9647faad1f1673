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

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from knnlm_core.index import search
from knnlm_core.knn import PAD, p_knn_from_weights, softmax_weights, target_stats
from precompute.runner import RunError, read_index

KNN_TOP = 10  # kNN top predictions stored per position
CHUNK_BYTES = 2 << 20  # gathered neighbour keys per step of neighbour_sq_dists (measured best at 1.5-3 MB)


def open_index(path, dim: int, mmap: bool = False):
    """A faiss index file, checked against the keys' dimension."""
    index = read_index(path, mmap)
    if index.d != dim:
        raise RunError(f"{path} has dimension {index.d} but the model's keys have {dim}: rerun with --overwrite "
                       f"(or delete {path.name}) to rebuild the index")
    return index


def neighbour_sq_dists(q: np.ndarray, keys, ids: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Exact ||q - k_j||² (Q, m) float32 of each query and its neighbours' stored keys; inf where id < 0.

    Each distinct key row is read and converted once; the difference is summed directly
    (no ||q||² + ||k||² - 2 q·k cancellation), `chunk` queries at a time, in place on one
    gathered (chunk, m, d) buffer (index_select + in-place ops: ~6x faster than indexing
    with a 2-D index and allocating the difference, same bits). The default chunk keeps the
    buffer near CHUNK_BYTES, in cache: 2.5-4x faster than 256 queries at k = 1024, same bits.
    """
    if ids.size == 0:
        return np.zeros(ids.shape, dtype=np.float32)
    safe = np.where(ids < 0, 0, ids)
    rows, inverse = np.unique(safe, return_inverse=True)  # sorted rows: a forward read of the key shards
    nbr_keys = torch.from_numpy(np.ascontiguousarray(keys[rows], dtype=np.float32))  # (u, d)
    inv = torch.from_numpy(inverse.reshape(-1))
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    m = ids.shape[1]
    chunk = chunk or max(1, CHUNK_BYTES // (m * qt.shape[1] * 4))
    out = torch.empty(ids.shape, dtype=torch.float32)
    for a in range(0, len(q), chunk):
        b = min(a + chunk, len(q))
        diff = torch.index_select(nbr_keys, 0, inv[a * m : b * m]).view(b - a, m, -1)  # (c, m, d)
        diff.sub_(qt[a:b, None, :])
        diff.mul_(diff)
        torch.sum(diff, -1, out=out[a:b])
    dists = out.numpy()
    dists[ids < 0] = np.inf
    return dists


def block_arrays(ids: np.ndarray, values: np.ndarray, dist_pq: np.ndarray, dist_exact: np.ndarray) -> dict:
    """A block shard's four arrays, missing neighbours normalised (value -1, distances +inf)."""
    missing = ids < 0
    return {"ids": ids.astype(np.int64), "values": np.where(missing, PAD, values[np.maximum(ids, 0)]).astype(np.int32),
            "dist_pq": np.where(missing, np.inf, dist_pq).astype(np.float32),
            "dist_exact": np.where(missing, np.inf, dist_exact).astype(np.float32)}


def search_rows(index, keys, values: np.ndarray, queries, lo: int, hi: int, k: int, batch: int,
                transform=None, progress=None) -> dict[str, np.ndarray]:
    """The index's k neighbours of queries [lo, hi) (whitened by `transform` first, if any): block arrays.

    The exact distances of batch i are computed in a worker thread while faiss searches batch i + 1.
    `keys` are in the index's space (a whitened view for a whitened index).
    """
    parts, pending = [], None

    def finish(q, dists, ids):
        return block_arrays(ids, values, dists, neighbour_sq_dists(q, keys, ids))

    with ThreadPoolExecutor(1) as worker:
        for a in range(lo, hi, batch):
            b = min(a + batch, hi)
            q = np.asarray(queries[a:b], dtype=np.float32)  # (B, d)
            if transform is not None:
                q = transform.apply(q)
            dists, ids = search(index, q, k)
            if pending is not None:
                parts.append(pending.result())
            pending = worker.submit(finish, q, dists, ids)
            if progress:
                progress(b - a)
        if pending is not None:
            parts.append(pending.result())
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def exact_rows(keys, values: np.ndarray, queries, lo: int, hi: int, k: int, device: str,
               query_block: int = 16384, progress=None) -> dict[str, np.ndarray]:
    """The exact k nearest keys of queries [lo, hi): block arrays (dist_pq NaN), ranked by the
    recomputed (cancellation-free) distances, ties in the brute force's order."""
    from precompute.exact import exact_knn_with_dists

    parts = []
    for a in range(lo, hi, query_block):
        b = min(a + query_block, hi)
        q = np.asarray(queries[a:b], dtype=np.float32)
        _, ids = exact_knn_with_dists(q, keys, k, device)
        dists = neighbour_sq_dists(q, keys, ids)
        order = np.argsort(dists, axis=1, kind="stable")
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


def position_metrics(block: dict[str, np.ndarray], targets: np.ndarray, tau: float,
                     source: str) -> dict[str, np.ndarray]:
    """Per-position kNN results (SPEC §2, §4) from one block shard's rows and their targets."""
    vals = block["values"]
    dists = block["dist_exact"] if source == "exact" else block["dist_pq"]
    target_rank, n_target = target_stats(vals, targets)
    weights, log_z = softmax_weights(dists, tau, vals)  # (B, k), (B,): computed once
    knn_top_ids, knn_top_p = top_tokens(weights, vals, KNN_TOP)
    return {"p_knn": p_knn_from_weights(weights, vals, targets), "target_rank": target_rank, "n_target": n_target,
            "n_found": (block["ids"] >= 0).sum(axis=1), "knn_top_ids": knn_top_ids, "knn_top_p": knn_top_p,
            "knn_log_z": log_z}
