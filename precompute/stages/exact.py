"""Stage: exact search beside the index, to isolate what approximate search loses (SPEC §8).

For every evaluation query: the exact k nearest stored keys (brute force over key blocks:
torch on the GPU, faiss `IndexFlatL2` + `ResultHeap` on the CPU), and the index's own k
neighbours searched again (the search stage keeps only `store_neighbors` of them). From
both come recall@k, p_kNN under the three settings of §8 and the exact neighbours' target
rank. All distances that enter p_kNN are recomputed from the fp16 keys in float32 by the
difference (`neighbour_sq_dists`), as the search stage does, so the IVFPQ setting here is
bit-identical to the run's own p_kNN. Map over shards of queries; reduce to `exact.npz`.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from knnlm_core.config import RunConfig
from knnlm_core.index import search, set_nprobe
from knnlm_core.knn import p_knn_from_weights, recall_at, softmax_weights, target_stats
from knnlm_core.metrics import EXACT_BLOCK_BYTES
from precompute.exact import exact_knn_with_dists
from precompute.runner import Run, Shards, concat_shards, load_npy, save_npz, shard_ranges
from precompute.stages.search import neighbour_sq_dists, open_index

RECALL_KS = (16, 64, 1024)  # SPEC §8: recall@k for those <= the run's k
EXACT_QUERY_BLOCK = 16384  # queries per pass over the keys: bounds the (Q, k) heap to ~200 MB


def p_knn(dists: np.ndarray, nbr_values: np.ndarray, targets: np.ndarray, tau: float) -> np.ndarray:
    """p_kNN(target) (Q,) exactly as the search stage computes it (same weights, same sum order)."""
    weights, _ = softmax_weights(dists, tau, nbr_values)
    return p_knn_from_weights(weights, nbr_values, targets)


def sort_rows(dists: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows reordered by ascending distance (stable: ties keep the search's order)."""
    order = np.argsort(dists, axis=1, kind="stable")
    return np.take_along_axis(dists, order, axis=1), np.take_along_axis(ids, order, axis=1)


def compare_batch(index, keys, values: np.ndarray, q: np.ndarray, targets: np.ndarray, cfg: RunConfig,
                  exact_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query comparison of the index's neighbours with the exact ones for one batch (B, d)."""
    s = cfg.store_neighbors_effective
    dist_pq, ivf_ids = search(index, q, cfg.k)  # (B, k)
    ivf_values = np.where(ivf_ids >= 0, values[np.maximum(ivf_ids, 0)], -1)
    ivf_exact = neighbour_sq_dists(q, keys, ivf_ids)
    # Exact neighbours ranked by their recomputed (cancellation-free) distances.
    x_dist, x_ids = sort_rows(neighbour_sq_dists(q, keys, exact_ids), exact_ids)
    x_values = np.where(x_ids >= 0, values[np.maximum(x_ids, 0)], -1)
    x_rank, _ = target_stats(x_values, targets)
    out = {
        "p_knn_ivf_pq": p_knn(dist_pq, ivf_values, targets, cfg.temperature),
        "p_knn_ivf_exact": p_knn(ivf_exact, ivf_values, targets, cfg.temperature),
        "p_knn_exact": p_knn(x_dist, x_values, targets, cfg.temperature),
        "exact_target_rank": x_rank, "exact_nbr_ids": x_ids[:, :s], "exact_dist": x_dist[:, :s].astype(np.float32),
    }
    for k in RECALL_KS:
        out[f"recall_{k}"] = recall_at(ivf_ids, x_ids, k) if k <= cfg.k else np.full(len(q), np.nan)
    return out


def exact_range(index, keys, values: np.ndarray, queries, targets: np.ndarray, cfg: RunConfig, lo: int, hi: int,
                device: str, progress=None) -> dict[str, np.ndarray]:
    """The comparison for queries [lo, hi): one pass over the keys per block of queries."""
    parts = []
    for a in range(lo, hi, EXACT_QUERY_BLOCK):
        b = min(a + EXACT_QUERY_BLOCK, hi)
        q = np.asarray(queries[a:b], dtype=np.float32)  # (Q, d)
        _, exact_ids = exact_knn_with_dists(q, keys, cfg.k, device)
        for c in range(0, b - a, cfg.search_batch):
            e = min(c + cfg.search_batch, b - a)
            parts.append(compare_batch(index, keys, values, q[c:e], targets[a + c : a + e], cfg, exact_ids[c:e]))
        if progress:
            progress(b - a)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def resident_keys(keys):
    """The keys as one float32 array when they fit one exact-search block (converted once for the
    whole stage, not once per block of queries), else the fp16 store itself (streamed per pass)."""
    n, d = keys.shape
    if n * d * 4 > EXACT_BLOCK_BYTES:
        return keys
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 262144):
        out[a : a + 262144] = keys[a : a + 262144]
    return out


def stage_exact(run: Run, key: str) -> dict:
    cfg = run.cfg
    keys, values = run.keys(), run.values()
    index = open_index(run)
    set_nprobe(index, cfg.nprobe)
    queries = load_npy(run.path("queries.npy"), (run.info["n_eval"], run.info["dim"]), np.float16)
    targets = np.asarray(load_npy(run.path("eval_ids.npy")))[1:].astype(np.int64)
    ranges = shard_ranges(len(targets), cfg.shard_size)
    shards = Shards(run.path("exact.shards"), key, stage="exact")
    done = sum(hi - lo for i, (lo, hi) in enumerate(ranges) if shards.done(i))
    if done < len(targets) and run.info["device"] != "cuda":
        keys = resident_keys(keys)  # float32 values equal the fp16 ones: results are unchanged
    with tqdm(total=len(targets), initial=done, desc="exact search", unit="query", dynamic_ncols=True) as bar:
        for i in shards.todo(len(ranges)):
            shards.save(i, **exact_range(index, keys, values, queries, targets, cfg, *ranges[i],
                                         run.info["device"], bar.update))
    save_npz(run.path("exact.npz"), **concat_shards(shards, len(ranges)))
    shards.remove()
    return {"exact_search": True}
