"""Stage: per-token-type datastore metrics (SPEC §5): cv, contamination, PQ error.

Three maps, each over fixed-size shards with its own resumable shard folder:
1. centroid partial sums per key range (types present, their key sums) -> reduce μ_v;
2. spread r_i = ||k_i - μ_{v_i}|| per key range -> reduce cv;
3. contamination per group of types: types are grouped by m_v = min(freq, 1024) rounded
   up to a power of two, so each type's exact search asks for about m_v neighbours, not
   1024. The search runs on the GPU when the run has one (chunked matmul + top-k), with
   faiss's exact search on the CPU otherwise; or with the index when configured (recorded).
"""

from __future__ import annotations

import shutil

import numpy as np
from tqdm import tqdm

from knnlm_core.index import search, set_nprobe
from knnlm_core.metrics import coefficient_of_variation, contamination_from_neighbors, per_type_mean_max, token_freq
from precompute.exact import exact_knn
from precompute.runner import Run, Shards, load_npz, save_npz, shard_ranges
from precompute.stages.search import open_index

CONTAMINATION_MAX = 1024  # SPEC §5: m_v = min(freq(v), 1024)
TYPES_PER_SHARD = 4096


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


def stage_types(run: Run, key: str) -> dict:
    cfg = run.cfg
    keys, values = run.keys(), run.values()
    v = run.info["vocab_size"]
    freq = token_freq(values, v)
    ranges = shard_ranges(len(keys), cfg.shard_size)
    block = lambda lo, hi: np.ascontiguousarray(keys[lo:hi], dtype=np.float32)  # noqa: E731

    sums_sh = Shards(run.path("types.shards") / "sums", key, stage="types")
    for i in tqdm(list(sums_sh.todo(len(ranges))), desc="types: centroids", unit="shard", dynamic_ncols=True):
        lo, hi = ranges[i]
        types, sums = centroid_sums(block(lo, hi), values[lo:hi])
        sums_sh.save(i, types=types, sums=sums)
    mu = np.zeros((v, keys.shape[1]), dtype=np.float64)  # (V, d) μ_v
    for i in range(len(ranges)):
        part = sums_sh.load(i)
        mu[part["types"]] += part["sums"]
    mu /= np.maximum(freq, 1)[:, None]

    spread_sh = Shards(run.path("types.shards") / "spread", key, stage="types")
    for i in tqdm(list(spread_sh.todo(len(ranges))), desc="types: spread", unit="shard", dynamic_ncols=True):
        lo, hi = ranges[i]
        diff = block(lo, hi) - mu[values[lo:hi]].astype(np.float32)
        spread_sh.save(i, r=np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64)))
    r = np.concatenate([spread_sh.load(i)["r"] for i in range(len(ranges))])
    cv = coefficient_of_variation(r, values, v)

    pq = load_npz(run.path("pq.npz"))
    pq_mean, pq_max = per_type_mean_max(pq["entry_pq_error"], values, v)
    contamination = np.full(v, np.nan)
    groups = contamination_groups(freq)
    cont_sh = Shards(run.path("types.shards") / "contamination", key, stage="types")
    index = None
    if cfg.contamination_search == "index":
        index = open_index(run)
        set_nprobe(index, cfg.nprobe)
    for i in tqdm(list(cont_sh.todo(len(groups))), desc=f"contamination ({cfg.contamination_search})",
                  unit="group", dynamic_ncols=True):
        k, types = groups[i]
        mu_q = mu[types].astype(np.float32)  # (J, d)
        kk = min(k, len(keys))
        if index is None:
            nbr = exact_knn(mu_q, keys, kk, run.info["device"])
        else:
            nbr = np.concatenate([search(index, mu_q[a : a + 1024], kk)[1] for a in range(0, len(mu_q), 1024)])
        nbr_values = np.where(nbr >= 0, values[np.maximum(nbr, 0)], -1)
        m = np.minimum(freq[types], CONTAMINATION_MAX)
        cont_sh.save(i, types=types, contamination=contamination_from_neighbors(types, nbr_values, m))
    for i in range(len(groups)):
        part = cont_sh.load(i)
        contamination[part["types"]] = part["contamination"]
    save_npz(run.path("types.npz"), freq=freq, cv=cv, contamination=contamination, pq_mean=pq_mean, pq_max=pq_max)
    shutil.rmtree(run.path("types.shards"), ignore_errors=True)
    return {"contamination_mode": cfg.contamination_search}
