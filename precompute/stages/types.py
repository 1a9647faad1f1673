"""Stage: per-token-type datastore metrics (SPEC §5): cv, contamination, PQ error.

Three maps, each over fixed-size shards with its own resumable shard folder:
1. centroid partial sums per key range (types present, their key sums) -> reduce μ_v;
2. spread r_i = ||k_i - μ_{v_i}|| per key range -> reduce cv;
3. contamination per group of types: types are grouped by m_v = min(freq, 1024) rounded
   up to a power of two, so each type's exact search asks for about m_v neighbours, not
   1024. The search runs on the GPU when the run has one (chunked matmul + top-k), with
   faiss's exact search on the CPU otherwise; or with the index when configured (recorded).
The maps are top-level functions (`sums_shard`, `spread_shard`, `contamination_shard`) that
the executor runs here or on Ray workers; the reduces run here.
"""

from __future__ import annotations

import shutil

import numpy as np
from tqdm import tqdm

from knnlm_core.index import search, set_nprobe
from knnlm_core.metrics import coefficient_of_variation, contamination_from_neighbors, per_type_mean_max, token_freq
from precompute import runner
from precompute.exact import exact_knn_with_dists
from precompute.executor import Progress, ShardJob, executor_of
from precompute.runner import Run, Shards, load_npz, save_npy, save_npz, shard_ranges, stage_shards
from precompute.search import open_index
from precompute.stages.exact import exact_inputs

CONTAMINATION_MAX = 1024  # SPEC §5: m_v = min(freq(v), 1024)
TYPES_PER_SHARD = 4096
MU_FILE = "types.shards/mu.npy"  # μ_v for Ray workers (written only when the executor is not in-process)


def centroid_sums(block: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(types present (u,), float64 key sums (u, d)) of one float32 block of keys and their values."""
    types, inverse = np.unique(values, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by type: segment sums with reduceat
    starts = np.searchsorted(inverse[order], np.arange(len(types)))
    return types, np.add.reduceat(block[order].astype(np.float64), starts, axis=0)


def contamination_groups(freq: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(k, type ids) groups: types with freq >= 1 bucketed by m_v rounded up to a power of two."""
    type_ids = np.flatnonzero(freq)
    m = np.minimum(freq[type_ids], CONTAMINATION_MAX)
    cap = 2 ** np.ceil(np.log2(m)).astype(np.int64)  # (J,) 1, 2, 4, ..., 1024
    groups = []
    for k in np.unique(cap):
        members = type_ids[cap == k]
        groups += [(int(k), members[lo:hi]) for lo, hi in shard_ranges(len(members), TYPES_PER_SHARD)]
    return groups


def types_inputs(run: Run) -> dict:
    """What every per-type shard reads: keys, values, vocabulary size, freq, key ranges, contamination groups."""
    keys, values, v = run.keys(), run.values(), run.info["vocab_size"]
    freq = token_freq(values, v)
    return {"keys": keys, "values": values, "v": v, "freq": freq,
            "ranges": shard_ranges(len(keys), run.cfg.shard_size), "groups": contamination_groups(freq)}


def key_block(keys, lo: int, hi: int) -> np.ndarray:
    return np.ascontiguousarray(keys[lo:hi], dtype=np.float32)  # (n_i, d)


def sums_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Map 1: types present in key range i and their float64 key sums."""
    t = run.cached(("types", job.key), lambda: types_inputs(run))
    shards = stage_shards(run, "types", job.key, job.folder)
    if not shards.done(i):  # a retried task whose first attempt had finished counts once
        lo, hi = t["ranges"][i]
        types, sums = centroid_sums(key_block(t["keys"], lo, hi), t["values"][lo:hi])
        shards.save(i, types=types, sums=sums)
    if progress:
        progress(1)
    return 1


def centroids(run: Run, key: str) -> np.ndarray:
    """μ_v (V, d) float64: the driver's reduce in this process, its saved copy in a Ray worker."""
    return run.cached(("mu", key), lambda: np.load(run.path(MU_FILE)))


def spread_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Map 2: r_i = ||k_i - μ_{v_i}|| over key range i."""
    t = run.cached(("types", job.key), lambda: types_inputs(run))
    shards = stage_shards(run, "types", job.key, job.folder)
    if not shards.done(i):
        lo, hi = t["ranges"][i]
        diff = key_block(t["keys"], lo, hi) - centroids(run, job.key)[t["values"][lo:hi]].astype(np.float32)
        shards.save(i, r=np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64)))
    if progress:
        progress(1)
    return 1


def contamination_index(run: Run, key: str):
    """The index for contamination_search = "index" (memory-mapped in a Ray worker), nprobe set."""
    def make():
        index = open_index(run.path("index.faiss"), run.info["dim"], mmap=runner.IN_WORKER)
        set_nprobe(index, run.cfg.nprobe)
        return index
    return run.cached(("index", key), make)


def contamination_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Map 3: contamination of group i's types from their m_v nearest keys (exact, or the index)."""
    t = run.cached(("types", job.key), lambda: types_inputs(run))
    shards = stage_shards(run, "types", job.key, job.folder)
    if not shards.done(i):
        k, types = t["groups"][i]
        keys, values, freq = t["keys"], t["values"], t["freq"]
        mu_q = centroids(run, job.key)[types].astype(np.float32)  # (J, d)
        kk = min(k, len(keys))
        if run.cfg.contamination_search == "exact":
            exact_keys, lower = exact_inputs(run)
            nbr = exact_knn_with_dists(mu_q, exact_keys, kk, run.info["device"], lower=lower)[1]
        else:
            index = contamination_index(run, job.key)
            nbr = np.concatenate([search(index, mu_q[a : a + 1024], kk)[1] for a in range(0, len(mu_q), 1024)])
        nbr_values = np.where(nbr >= 0, values[np.maximum(nbr, 0)], -1)
        m = np.minimum(freq[types], CONTAMINATION_MAX)
        shards.save(i, types=types, contamination=contamination_from_neighbors(types, nbr_values, m))
    if progress:
        progress(1)
    return 1


def run_map(run: Run, job: ShardJob, n: int, desc: str) -> Shards:
    """Run one of the stage's maps over the shards 0..n-1 not done yet; returns its shard folder."""
    shards = stage_shards(run, "types", job.key, job.folder)
    todo = list(shards.todo(n))
    with tqdm(total=len(todo), desc=desc, unit="shard", dynamic_ncols=True) as bar:
        executor_of(run).map(run, job, todo, bar.update)
    return shards


def stage_types(run: Run, key: str) -> dict:
    cfg = run.cfg
    t = run.cached(("types", key), lambda: types_inputs(run))
    v, values, ranges, groups = t["v"], t["values"], t["ranges"], t["groups"]
    executor = executor_of(run)

    sums_sh = run_map(run, ShardJob("types", key, sums_shard, folder="types.shards/sums"), len(ranges),
                      "types: centroids")
    mu = np.zeros((v, t["keys"].shape[1]), dtype=np.float64)  # (V, d) μ_v
    for i in range(len(ranges)):
        part = sums_sh.load(i)
        mu[part["types"]] += part["sums"]
    mu /= np.maximum(t["freq"], 1)[:, None]
    run.memo[("mu", key)] = mu
    if not executor.in_process:  # Ray workers read μ from the shared run directory, not the object store
        save_npy(run.path(MU_FILE), mu)

    spread_sh = run_map(run, ShardJob("types", key, spread_shard, folder="types.shards/spread"), len(ranges),
                        "types: spread")
    r = np.concatenate([spread_sh.load(i)["r"] for i in range(len(ranges))])
    cv = coefficient_of_variation(r, values, v)

    pq = load_npz(run.path("pq.npz"))
    pq_mean, pq_max = per_type_mean_max(pq["entry_pq_error"], values, v)
    contamination = np.full(v, np.nan)
    if cfg.contamination_search == "index":
        contamination_index(run, key)  # opened (and nprobe set) before the map, as the in-process shards use it
    # exact search on the GPU when the run has one: the GPU actors on a cluster
    kind = "gpu" if cfg.contamination_search == "exact" and run.info["device"] == "cuda" else "cpu"
    cont_sh = run_map(run, ShardJob("types", key, contamination_shard, kind=kind, folder="types.shards/contamination"),
                      len(groups), f"contamination ({cfg.contamination_search})")
    for i in range(len(groups)):
        part = cont_sh.load(i)
        contamination[part["types"]] = part["contamination"]
    save_npz(run.path("types.npz"), freq=t["freq"], cv=cv, contamination=contamination, pq_mean=pq_mean, pq_max=pq_max)
    run.memo.clear()
    shutil.rmtree(run.path("types.shards"), ignore_errors=True)
    return {"contamination_mode": cfg.contamination_search}
