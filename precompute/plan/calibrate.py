"""Rates of this machine (`Rates`) from a short real run of a small preset and a few timed calls.

The model, encoding, exact-stage and database rates come from the run's own stage seconds
divided by the plan's work for them; the IVF scan and the fixed per-query cost from the search
code timed at two nprobe values; flat search, key passes and neighbour scoring from direct
timings on the run's keys and neighbour block. GPU rates, storage reads and the suffix-array
rates are not measured here (the built-in ones are kept).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from knnlm_core.config import RunConfig, load_config, resolve_path
from precompute.plan.cost import Machine, Model, Rates, ivf, train_flop
from precompute.plan.facts import Facts, run_facts


def calibrate(work_dir: Path, config: str = "configs/ci-tiny.toml") -> Rates:
    """Rates of this machine from a short real run (local executor) of `config`, plus timed calls."""
    from tqdm import tqdm

    from precompute.pipeline import build_run
    from precompute.stages import stage

    # 10k evaluation tokens: enough that the LM head's rate, not start-up, is what eval_lm measures
    cfg = load_config(resolve_path(config), {"eval_limit_tokens": 10_000, "exact_search": "on"})
    run_dir = work_dir / "calibration"
    build_run(cfg, run_dir)
    stages = json.loads((run_dir / "stages.json").read_text())
    sec = {k: max(v["seconds"], 1e-3) for k, v in stages.items()}
    f = run_facts(cfg)
    model = Model(cfg, f, Rates(), Machine(0, cfg.threads, 1, "local"))
    cores, d = cfg.threads, f.shape.d
    nlist, _ = ivf(cfg)
    train = train_flop(cfg, f)
    train_s = max(stages["index"]["info"].get("index_train_seconds", 0.0), 1e-3)
    flat = time_flat(run_dir, min(f.types, 2048))
    key_rate = time_key_pass(run_dir, cfg.shard_size) / cores
    gather = time_gather(run_dir, cfg.k) / cores
    query_s, visit_rate = time_search(run_dir, cfg, f)
    # per core, less the terms the model counts apart (quantizer and LUT as flat search, the neighbour rows' pass)
    fixed = query_s * cores - 2 * d * (nlist + 256) / flat - cfg.k * 2 * d / gather
    exact_per_key = time_exact(run_dir, cfg.k) or 2 * d / Rates.exact_flops / cores
    # the exact stage's per-query rest (shortlist heap, certificate, the comparison with the block) from its seconds
    exact_fixed = (sec["exact"] / f.t - f.n * exact_per_key) * cores - cfg.k * 2 * d / gather  # core-seconds
    coarse = 2 * d * nlist * f.n  # the encode's coarse assignment: a flat search against nlist centroids
    pq = 2 * d * 256 * f.n
    tqdm.write(f"throughput of one worker ({cores} threads) in this run: extraction {f.n / sec['datastore']:,.0f} "
               f"keys/s, eval {f.t / sec['eval_lm']:,.0f} positions/s, encoding {f.n / max(sec['index'] - train_s, 1e-3):,.0f}"
               f" keys/s (+ {train_s:.0f} s training), search {f.t / sec['search']:,.0f} queries/s, exact "
               f"{f.t / sec['exact']:,.0f} queries/s")
    return Rates(
        cpu_flops=stage("datastore").work(model)[0].flop / sec["datastore"] / cores,
        cpu_head_flops=stage("eval_lm").work(model)[0].flop / sec["eval_lm"] / cores,
        encode_flops=pq / max(sec["index"] - train_s - coarse / (cores * flat), 1e-3) / cores,
        train_flops=train / train_s / cores,
        visits=visit_rate / cores, query_s=max(fixed, 1e-6), flat_flops=flat,
        exact_flops=2 * d / exact_per_key / cores,
        exact_query_s=max(exact_fixed, 1e-6),
        types_bytes=key_rate, gather_bytes=gather, score_elems=time_scores(run_dir, cfg),
        db_rows=model.database(True)[0].count / sec["database"],
    )


def time_search(run_dir: Path, cfg: RunConfig, f: Facts) -> tuple[float, float]:
    """(seconds per query on all cores at nprobe 1, IVF code visits per second on all cores): the search
    stage's own row function timed at two nprobe values over the same queries."""
    import numpy as np

    from knnlm_core.index import set_nprobe
    from knnlm_core.keystore import open_keys
    from precompute.runner import read_index
    from precompute.search import search_rows

    index = read_index(run_dir / "index.faiss")
    keys, values = open_keys(run_dir), np.load(run_dir / "values.npy")
    queries = np.load(run_dir / "queries.npy")[:2048]
    nlist, _ = ivf(cfg)
    points = []
    for nprobe in (1, max(2, nlist // 2)):
        set_nprobe(index, nprobe)
        t0 = time.time()
        search_rows(index, keys, values, queries, 0, len(queries), cfg.k, cfg.search_batch)
        points.append((nprobe * f.n / nlist, (time.time() - t0) / len(queries)))
    (v1, t1), (v2, t2) = points
    per_visit = max((t2 - t1) / (v2 - v1), 1e-12)
    return max(t1 - v1 * per_visit, 1e-6), 1 / per_visit


def time_exact(run_dir: Path, k: int, n_queries: int = 256) -> float | None:
    """Seconds per query and key on all cores of the exact stage's CPU brute force (precompute.exact, the
    run's k): the slope between timings over the run's keys and over four copies of them (a small run's
    keys alone are too few for the per-key cost to show); None when load noise hides the slope."""
    import numpy as np

    from knnlm_core.keystore import open_keys
    from precompute.exact import exact_knn_with_dists

    keys = np.asarray(open_keys(run_dir)[:], dtype=np.float32)  # as the stage holds keys that fit one block
    q = np.load(run_dir / "queries.npy")[:n_queries].astype(np.float32)
    points = []
    for copies in (1, 4):
        tiled = np.tile(keys, (copies, 1))
        t0 = time.time()
        exact_knn_with_dists(q, tiled, k)
        points.append((len(tiled), (time.time() - t0) / len(q)))
    (n1, t1), (n2, t2) = points
    return (t2 - t1) / (n2 - n1) if t2 > t1 else None


def time_gather(run_dir: Path, k: int, n_queries: int = 2048) -> float:
    """Key bytes/s on all cores of the exact distances of k neighbours per query (the search's
    precompute.search.neighbour_sq_dists), on the (eval, plain) block's own neighbours."""
    import numpy as np

    from knnlm_core import neighbours
    from knnlm_core.keystore import open_keys
    from precompute.search import neighbour_sq_dists

    keys = open_keys(run_dir)
    block = neighbours.open_block(neighbours.block_dir(run_dir, "eval", "plain"))
    rows = min(n_queries, block.shards[-1][1])
    ids = block.rows("ids", 0, rows)
    q = np.load(run_dir / "queries.npy")[:rows].astype(np.float32)
    t0 = time.time()
    neighbour_sq_dists(q, keys, ids)
    return ids.size * keys.shape[1] * 2 / (time.time() - t0)


def time_flat(run_dir: Path, n_queries: int) -> float:
    """Exact (flat) search FLOP/s per core: as many queries as a contamination group has, against every key."""
    import faiss
    import numpy as np

    from knnlm_core.keystore import open_keys
    from knnlm_core.metrics import exact_knn

    keys = open_keys(run_dir)
    q = np.asarray(keys[:n_queries], dtype=np.float32)
    t0 = time.time()
    exact_knn(q, keys, 16)
    return 2 * len(q) * len(keys) * keys.shape[1] / (time.time() - t0) / faiss.omp_get_max_threads()


def time_key_pass(run_dir: Path, shard_size: int) -> float:
    """Key bytes/s on all cores of one per-type pass (the centroid sums of the types stage) over the run's keys."""
    import numpy as np

    from knnlm_core.keystore import open_keys
    from precompute.stages.types import centroid_sums

    keys, values = open_keys(run_dir), np.load(run_dir / "values.npy")
    t0 = time.time()
    for lo in range(0, len(keys), shard_size):
        centroid_sums(np.asarray(keys[lo : lo + shard_size], dtype=np.float32), values[lo : lo + shard_size])
    return keys.shape[0] * keys.shape[1] * 2 / (time.time() - t0)


def time_scores(run_dir: Path, cfg: RunConfig) -> float:
    """Neighbour scores per second (one worker) of the mitigate stage's scoring, on the run's (eval, plain) block."""
    import numpy as np

    from knnlm_core import neighbours
    from precompute.stages.mitigate import ROWS, score_rows

    block = neighbours.open_block(neighbours.block_dir(run_dir, "eval", "plain"))
    targets = np.load(run_dir / "eval_ids.npy")[1:].astype(np.int64)
    rows = min(len(targets), ROWS)
    taus = np.array([1.0, 10.0, 100.0])
    t0 = time.time()
    score_rows(block, "dist_pq", 0, rows, targets, taus, None)
    return rows * cfg.k * len(taus) / (time.time() - t0)

