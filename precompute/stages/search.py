"""Stage: batched kNN search of every evaluation query and its per-position metrics (SPEC §2, §4).

Map (`search_shard`) over shards of queries (each searched in batches of `search_batch`;
on Ray workers the index is memory-mapped); reduce concatenates the shards into
`search.npz`. The faiss search dominates; everything after it (values, exact distances,
p_kNN, top tokens, query PQ error) runs in a worker thread on batch i while faiss searches
batch i + 1, with the heavy parts vectorised in torch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from knnlm_core.config import RunConfig
from knnlm_core.index import reconstruction_error, search, set_nprobe
from knnlm_core.knn import PAD, p_knn_from_weights, softmax_weights, target_stats
from precompute import runner
from precompute.executor import Progress, ShardJob, executor_of
from precompute.runner import Run, RunError, concat_shards, load_npy, read_index, save_npz, shard_ranges, stage_shards

KNN_TOP = 10  # kNN top predictions stored per position


def open_index(run: Run, mmap: bool = False):
    index = read_index(run.path("index.faiss"), mmap)
    if index.d != run.info["dim"]:
        raise RunError(f"index.faiss in {run.run_dir} has dimension {index.d} but the model's keys have "
                       f"{run.info['dim']}: rerun with --overwrite (or delete index.faiss) to rebuild the index")
    return index


def neighbour_sq_dists(q: np.ndarray, keys, ids: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Exact ||q - k_j||² (Q, m) float32 of each query and its neighbours' stored keys; inf where id < 0.

    Each distinct key row is read and converted once; the difference is summed directly
    (no ||q||² + ||k||² - 2 q·k cancellation), `chunk` queries at a time, in place on one
    gathered (chunk, m, d) buffer (index_select + in-place ops: ~6x faster than indexing
    with a 2-D index and allocating the difference, same bits).
    """
    if ids.size == 0:  # no neighbour asked for (store_neighbors = 0)
        return np.zeros(ids.shape, dtype=np.float32)
    safe = np.where(ids < 0, 0, ids)
    rows, inverse = np.unique(safe, return_inverse=True)  # sorted rows: a forward read of the key shards
    nbr_keys = torch.from_numpy(np.ascontiguousarray(keys[rows])).float()  # (u, d)
    inv = torch.from_numpy(inverse.reshape(-1))
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    m = ids.shape[1]
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


def search_batch(index, keys, values: np.ndarray, q: np.ndarray, targets: np.ndarray,
                 cfg: RunConfig) -> dict[str, np.ndarray]:
    """All per-position retrieval results of one batch of queries q (B, d) float32 (SPEC §2, §4)."""
    dists, ids = search(index, q, cfg.k)  # (B, k)
    return after_search(index, keys, values, q, targets, cfg, dists, ids)


def after_search(index, keys, values: np.ndarray, q: np.ndarray, targets: np.ndarray, cfg: RunConfig,
                 dists: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Everything computed from one batch's neighbours (B, k): p_kNN, ranks, stored neighbours, tops."""
    s = cfg.store_neighbors_effective
    nbr_values = np.where(ids >= 0, values[np.maximum(ids, 0)], -1)  # (B, k), -1 = missing
    exact = neighbour_sq_dists(q, keys, ids if cfg.distance_source == "exact" else ids[:, :s])
    used = exact if cfg.distance_source == "exact" else dists
    target_rank, n_target = target_stats(nbr_values, targets)
    weights, log_z = softmax_weights(used, cfg.temperature, nbr_values)  # (B, k), (B,): computed once
    knn_top_ids, knn_top_p = top_tokens(weights, nbr_values, KNN_TOP)
    return {
        "p_knn": p_knn_from_weights(weights, nbr_values, targets), "target_rank": target_rank,
        "n_target": n_target, "n_found": (ids >= 0).sum(axis=1), "nbr_ids": ids[:, :s], "dist_pq": dists[:, :s],
        "dist_exact": exact[:, :s], "knn_top_ids": knn_top_ids, "knn_top_p": knn_top_p,
        "query_pq_error": reconstruction_error(index, q), "knn_log_z": log_z,
    }


def search_range(index, keys, values: np.ndarray, queries: np.ndarray, targets: np.ndarray, cfg: RunConfig,
                 lo: int, hi: int, progress=None) -> dict[str, np.ndarray]:
    """Queries [lo, hi) searched in batches of cfg.search_batch, concatenated (one shard's work).

    The post-processing of batch i runs in a worker thread while faiss searches batch i + 1.
    """
    parts, pending = [], None
    with ThreadPoolExecutor(1) as worker:
        for a in range(lo, hi, cfg.search_batch):
            b = min(a + cfg.search_batch, hi)
            q = np.asarray(queries[a:b], dtype=np.float32)  # (B, d)
            dists, ids = search(index, q, cfg.k)
            if pending is not None:
                parts.append(pending.result())
            pending = worker.submit(after_search, index, keys, values, q, targets[a:b], cfg, dists, ids)
            if progress:
                progress(b - a)
        if pending is not None:
            parts.append(pending.result())
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def search_inputs(run: Run, mmap: bool) -> dict:
    """What every search shard reads: index (nprobe set; memory-mapped in workers), keys, values, queries, targets."""
    index = open_index(run, mmap)
    set_nprobe(index, run.cfg.nprobe)
    return {"index": index, "keys": run.keys(), "values": run.values(),
            "queries": load_npy(run.path("queries.npy"), (run.info["n_eval"], run.info["dim"]), np.float16),
            "targets": np.asarray(load_npy(run.path("eval_ids.npy")))[1:].astype(np.int64)}


def search_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Search shard i's queries and save their per-position results (atomic); returns its query count."""
    inputs = run.cached(("search", job.key), lambda: search_inputs(run, mmap=runner.IN_WORKER))
    lo, hi = shard_ranges(len(inputs["targets"]), run.cfg.shard_size)[i]
    shards = stage_shards(run, "search", job.key, "search.shards")
    if shards.done(i):  # a retried task whose first attempt had finished counts once
        return hi - lo
    shards.save(i, **search_range(inputs["index"], inputs["keys"], inputs["values"], inputs["queries"],
                                  inputs["targets"], run.cfg, lo, hi, progress))
    return hi - lo


def stage_search(run: Run, key: str) -> dict:
    inputs = run.cached(("search", key), lambda: search_inputs(run, mmap=False))
    ranges = shard_ranges(len(inputs["targets"]), run.cfg.shard_size)
    shards = stage_shards(run, "search", key, "search.shards")
    with tqdm(total=len(inputs["targets"]), desc="search", unit="query", dynamic_ncols=True) as bar:
        executor_of(run).map(run, ShardJob("search", key, search_shard), shards.todo(len(ranges)), bar.update)
    run.memo.clear()
    save_npz(run.path("search.npz"), **concat_shards(shards, len(ranges)))
    shards.remove()
    return {}
