"""Stage: exact search beside the index, to isolate what approximate search loses (SPEC §8).

Map (`exact_shard`) over shards of the evaluation queries, on the run's executor: the exact k
nearest stored keys of each query (`precompute.search.exact_rows`: faiss on the CPU, a bf16
shortlist + fp32 rerank on a GPU) become shard i of the block (eval, exact); the index's own k
neighbours are read from the (eval, plain) block, never searched again. From both come
recall@k, p_kNN under the three settings of §8 and the exact neighbours' target rank. Every
distance entering p_kNN is recomputed from the fp16 keys in float32 by the difference, so the
IVFPQ setting here is bit-identical to the run's own p_kNN. Reduce: `exact.npz`.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from knnlm_core import neighbours
from knnlm_core.knn import p_knn_from_weights, recall_at, softmax_weights, target_stats
from knnlm_core.store import RECALL_KS
from precompute.executor import Progress, ShardJob, executor_of
from precompute.runner import Run, concat_shards, save_npz, shard_ranges, stage_shards
from precompute.search import by_rows, exact_rows, resident_keys

BLOCK = f"{neighbours.ROOT}/eval-exact"
COMPARE = "exact.shards"


def p_knn(dists: np.ndarray, values: np.ndarray, targets: np.ndarray, tau: float) -> np.ndarray:
    """p_kNN(target) (Q,) exactly as the search stage computes it (same weights, same sum order)."""
    weights, _ = softmax_weights(dists, tau, values)
    return p_knn_from_weights(weights, values, targets)


def compare(ivf: dict[str, np.ndarray], exact: dict[str, np.ndarray], targets: np.ndarray, k: int,
            tau: float) -> dict[str, np.ndarray]:
    """Per-query comparison of the index's neighbours with the exact ones (rows of the two blocks)."""
    x_rank, _ = target_stats(exact["values"], targets)
    out = {
        "p_knn_ivf_pq": p_knn(ivf["dist_pq"], ivf["values"], targets, tau),
        "p_knn_ivf_exact": p_knn(ivf["dist_exact"], ivf["values"], targets, tau),
        "p_knn_exact": p_knn(exact["dist_exact"], exact["values"], targets, tau),
        "exact_target_rank": x_rank,
    }
    for r in RECALL_KS:
        out[f"recall_{r}"] = recall_at(ivf["ids"], exact["ids"], r) if r <= k else np.full(len(targets), np.nan)
    return out


def exact_inputs(run: Run) -> tuple:
    """(keys, lower bound) of the exact searches (this stage, and the types stage's contamination), held once
    per process: on a CPU the keys as float32 in memory when they fit (`resident_keys`) with their subspace
    bound (`precompute.exact_projection`; None where it would not pay), on a GPU the store itself."""
    def make():
        device = run.info["device"]
        keys = run.keys() if device == "cuda" else resident_keys(run.keys())
        if device == "cuda" or not isinstance(keys, np.ndarray):
            return keys, None
        from precompute.exact_projection import fit_lower_bound

        return keys, fit_lower_bound(keys)

    return run.cached(("exact inputs",), make)


def exact_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Exact top-k of shard i's queries (block shard) and their comparison with the index's (npz)."""
    cfg = run.cfg
    queries, targets = run.cached(("queries", "eval"), lambda: run.split("eval"))
    lo, hi = shard_ranges(len(targets), cfg.shard_size)[i]
    tag = stage_shards(run, "exact", job.key, BLOCK, suffix=".json")
    shards = stage_shards(run, "exact", job.key, COMPARE)
    if neighbours.shard_done(tag.folder, i, lo, hi, cfg.k) and shards.done(i):
        return hi - lo
    device = run.info["device"]
    keys, lower = exact_inputs(run)
    exact = exact_rows(keys, run.cached(("values",), run.values), queries, lo, hi, cfg.k, device, progress=progress,
                       lower=lower)
    neighbours.write_shard(tag.folder, i, lo, **exact)
    ivf = neighbours.open_block(run.path(f"{neighbours.ROOT}/eval-plain"))
    ivf_rows = {name: ivf.rows(name, lo, hi) for name in neighbours.COLUMNS}
    both = {**{("ivf", n): a for n, a in ivf_rows.items()}, **{("exact", n): a for n, a in exact.items()}}

    def compare_rows(rows: dict, t: np.ndarray) -> dict[str, np.ndarray]:
        return compare({n: rows[("ivf", n)] for n in ivf_rows}, {n: rows[("exact", n)] for n in exact}, t, cfg.k,
                       cfg.temperature)

    shards.save(i, **by_rows(compare_rows)(both, targets[lo:hi]))  # float64 temporaries a chunk at a time
    return hi - lo


def exact_job(run: Run, key: str) -> ShardJob:
    """The exact stage's map: on the GPU pool when the run computes on cuda (its torch shortlist and rerank
    run there; under Ray a CPU actor would silently do the GPU's work), else on CPU workers."""
    return ShardJob("exact", key, exact_shard, folder=BLOCK, kind="gpu" if run.info["device"] == "cuda" else "cpu")


def stage_exact(run: Run, key: str) -> dict:
    cfg = run.cfg
    n = run.info["n_eval"]
    ranges = shard_ranges(n, cfg.shard_size)
    tag = stage_shards(run, "exact", key, BLOCK, suffix=".json")
    shards = stage_shards(run, "exact", key, COMPARE)
    todo = [i for i, (lo, hi) in enumerate(ranges)
            if not (neighbours.shard_done(tag.folder, i, lo, hi, cfg.k) and shards.done(i))]
    with tqdm(total=n, initial=n - sum(ranges[i][1] - ranges[i][0] for i in todo), desc="exact search",
              unit="query", dynamic_ncols=True) as bar:
        executor_of(run).map(run, exact_job(run, key), todo, bar.update)
    run.memo.clear()
    neighbours.finish(tag.folder, ranges, cfg.k)
    save_npz(run.path("exact.npz"), **concat_shards(shards, len(ranges)))
    shards.remove()
    return {"exact_search": True}
