"""Benchmark: query rate of the precompute pipeline's search stage vs one raw faiss search.

* pipeline -- the search stage's own per-shard work: `precompute.search.search_rows` on every
  batch of `search_batch` queries (fp16 -> fp32 queries, faiss search, values gather, exact
  distances of all k neighbours: the neighbour block) and `position_metrics` + query PQ error
  on the result (p_kNN, target rank / count, kNN top-10), exactly the code `search_shard`
  runs; only its saves are not timed.
* baseline -- ONE `index.search(queries, k)` call over all queries (float32, same k, same
  nprobe): the floor that any search stage pays.

Each side is warmed up once, then timed twice, interleaved, and the best time is reported
as queries/second. The goal is pipeline / baseline >= 0.9x (post-processing costs <= ~10 %).

Data: by default synthetic, seeded keys (N = 200k, d = 192, drawn around 4,096 Gaussian
centres and rounded to float16 like the datastore's keys), Zipf-distributed values, and
queries that are noisy copies of random keys; index IVF1024,PQ64 trained on 40,960 keys
with shortened k-means (see build_index; builds in under a minute on 2 cores). With
--run-dir, a built run's keys.npy, values.npy, queries.npy (memmapped) and index.faiss are
used instead; k, nprobe, temperature, distance_source, store_neighbors and search_batch
then default to the run's run_config.json. --breakdown adds one instrumented pass that
times each step of the pipeline's batch loop separately.

    python bench/search.py
    python bench/search.py --n 50000 --queries 1024
    python bench/search.py --run-dir data/runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import BenchParser, DefaultsHelp, count, factory, size  # noqa: E402
from knnlm_core.config import RunConfig, resolve_path  # noqa: E402
from knnlm_core.index import add_keys, check_factory, reconstruction_error, sample_rows, search, set_nprobe  # noqa: E402
from knnlm_core.keystore import open_keys  # noqa: E402
from knnlm_core.knn import p_knn_from_weights, softmax_weights, target_stats  # noqa: E402
from precompute.search import (  # noqa: E402
    KNN_TOP,
    neighbour_sq_dists,
    position_metrics,
    resident_keys,
    search_rows,
    top_tokens,
)

DEFAULTS = RunConfig()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp
    )
    p.add_argument(
        "--run-dir", default="", help="use a built run's keys/values/queries/index instead of synthetic data"
    )
    p.add_argument("--k", type=count, default=None, help=f"neighbours per query (default: run's, else {DEFAULTS.k})")
    p.add_argument(
        "--nprobe", type=int, default=None, help=f"IVF lists probed (default: run's, else {DEFAULTS.nprobe})"
    )
    p.add_argument("--queries", type=count, default=4096, help="number of queries (first Q of the run's queries)")
    p.add_argument("--threads", type=count, default=2, help="faiss OpenMP threads")
    p.add_argument("--temperature", type=float, default=None, help=f"default: run's, else {DEFAULTS.temperature}")
    p.add_argument(
        "--distance-source",
        choices=["pq", "exact"],
        default=None,
        help=f"default: run's, else {DEFAULTS.distance_source}",
    )
    p.add_argument("--store-neighbors", type=size, default=None, help=f"default: run's, else {DEFAULTS.store_neighbors}")
    p.add_argument("--search-batch", type=count, default=None, help=f"default: run's, else {DEFAULTS.search_batch}")
    p.add_argument("--repeats", type=count, default=2, help="timed runs per side (best is reported)")
    p.add_argument("--breakdown", action="store_true", help="also time each step of the pipeline loop (one extra pass)")
    syn = p.add_argument_group("synthetic data (without --run-dir)")
    syn.add_argument("--n", type=count, default=200_000, help="datastore keys")
    syn.add_argument("--dim", type=count, default=192, help="key dimension")
    syn.add_argument("--factory", type=factory, default="IVF1024,PQ64", help="faiss index factory")
    syn.add_argument("--train-size", type=size, default=40960, help="keys sampled to train the index")
    syn.add_argument("--vocab", type=size, default=50257, help="value (token id) range")
    syn.add_argument("--seed", type=size, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def build_index(keys: np.ndarray, factory: str, train_size: int, seed: int):
    """A trained, empty index like knnlm_core.index.train_index builds, with cheaper training.

    Search speed depends on the list sizes, k and nprobe, not on codebook quality, so the
    k-means runs are shortened to keep the build well under a minute on 2 busy cores:
    10 iterations (faiss default 25) for the coarse quantizer and the PQ codebooks, PQ
    codebooks on 40 points per centroid (10,240), and no polysemous training (it only
    reorders codes; the pipeline's factory does it but polysemous_ht = 0 leaves search unchanged).
    With d = 192, PQ64 has 3-dimensional sub-vectors, which faiss k-means handles slowly:
    full PQ training alone takes ~100 s on 40k keys here.
    """
    rows = sample_rows(len(keys), train_size, seed)
    check_factory(factory, keys.shape[1], len(rows))
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_L2)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        ivf.cp.seed, ivf.cp.niter = seed, 10
    for holder in (index, ivf):
        if hasattr(holder, "pq"):
            holder.pq.cp.niter, holder.pq.cp.max_points_per_centroid = 10, 40
        if hasattr(holder, "do_polysemous_training"):
            holder.do_polysemous_training = False
    index.train(np.ascontiguousarray(keys[rows], dtype=np.float32))  # (n_train, d)
    return index


def synthetic(args: argparse.Namespace, n_queries: int):
    """(keys fp16 (N, d), values int32 (N,), queries fp16 (Q, d), targets int64 (Q,), index, description)."""
    rng = np.random.default_rng(args.seed)
    n, d = args.n, args.dim
    n_centres = 4096
    centres = rng.standard_normal((n_centres, d), dtype=np.float32) * 3.0
    which = rng.integers(0, n_centres, n)
    keys = (centres[which] + rng.standard_normal((n, d), dtype=np.float32)).astype(np.float16)  # (N, d)
    values = np.minimum(rng.zipf(1.2, n) - 1, args.vocab - 1).astype(np.int32)  # (N,) Zipf-like token ids
    src = rng.integers(0, n, n_queries)
    queries = keys[src].astype(np.float32) + 0.5 * rng.standard_normal((n_queries, d), dtype=np.float32)
    queries = queries.astype(np.float16)  # (Q, d), stored fp16 like queries.npy
    targets = values[src].astype(np.int64)  # the source key's value: plenty of hits
    t0 = time.perf_counter()
    index = build_index(keys, args.factory, args.train_size, args.seed)
    t_train = time.perf_counter() - t0
    add_keys(index, keys)
    print(f"built {args.factory} on synthetic N={n:,}, d={d}: train {t_train:.1f} s, "
          f"total {time.perf_counter() - t0:.1f} s", flush=True)
    return resident_keys(keys), values, queries, targets, index, f"synthetic N={n:,} d={d} {args.factory}"


def from_run(run_dir: Path, n_queries: int):
    """The same arrays from a built run (npy memmapped as the stage opens them)."""
    from precompute.runner import load_npy, read_index

    keys = resident_keys(open_keys(run_dir))  # as the stage holds them: float32 in memory when they fit
    values = np.asarray(load_npy(run_dir / "values.npy", dtype=np.int32))
    queries = load_npy(run_dir / "queries.npy", dtype=np.float16)[:n_queries]
    eval_ids = run_dir / "eval_ids.npy"
    if eval_ids.exists():
        targets = np.asarray(load_npy(eval_ids))[1:].astype(np.int64)[: len(queries)]
    else:
        targets = np.random.default_rng(0).choice(values, len(queries)).astype(np.int64)
    index = read_index(run_dir / "index.faiss")
    return keys, values, queries, targets, index, f"run {run_dir} (N={len(keys):,}, d={keys.shape[1]})"


def pipeline_search(index, keys, values, queries, targets, k, s, tau, batch, source) -> dict[str, np.ndarray]:
    """The search stage's own per-shard work (precompute.stages.search.search_shard) over all queries."""
    block = search_rows(index, keys, values, queries, 0, len(targets), k, batch)
    return {**block, **position_metrics(block, targets, tau, source),
            "query_pq_error": reconstruction_error(index, np.asarray(queries, dtype=np.float32))}


def breakdown(index, keys, values, queries, targets, k, s, tau, batch, source) -> dict[str, float]:
    """Diagnostic: seconds spent in each step of search_batch (same functions, timed one by one, no overlap)."""
    t = len(targets)
    secs: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        result = fn(*args)
        secs[name] = secs.get(name, 0.0) + time.perf_counter() - t0
        return result

    def gather(ids):
        return np.where(ids >= 0, values[np.maximum(ids, 0)], -1)

    def found_and_slices(ids, dists):
        return (ids >= 0).sum(axis=1), ids[:, :s].copy(), dists[:, :s].copy()

    for lo in range(0, t, batch):
        sl = slice(lo, min(lo + batch, t))
        q = timed("fp16->fp32 queries", np.asarray, queries[sl], np.float32)
        dists, ids = timed("search (faiss + mask)", search, index, q, k)
        nbr_values = timed("values gather", gather, ids)
        exact = timed("neighbour_sq_dists (all k)", neighbour_sq_dists, q, keys, ids)
        used = exact if source == "exact" else dists
        timed("target_stats", target_stats, nbr_values, targets[sl])
        weights, _ = timed("softmax_weights", softmax_weights, used, tau, nbr_values)
        timed("p_knn_from_weights", p_knn_from_weights, weights, nbr_values, targets[sl])
        timed("top_tokens", top_tokens, weights, nbr_values, KNN_TOP)
        timed("n_found + slices", found_and_slices, ids, dists)
        timed("query PQ error", reconstruction_error, index, q)
    return secs


def raw_search(index, queries, k):
    """ONE faiss search call over all queries."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    run_cfg: dict = {}
    if args.run_dir:
        run_dir = resolve_path(args.run_dir)
        if not (run_dir / "index.faiss").exists():
            sys.exit(f"error: {run_dir} has no index.faiss (build the run first)")
        if (run_dir / "run_config.json").exists():
            run_cfg = json.loads((run_dir / "run_config.json").read_text())
        keys, values, queries, targets, index, desc = from_run(run_dir, args.queries)
    else:
        keys, values, queries, targets, index, desc = synthetic(args, args.queries)

    def pick(name: str, cfg_name: str | None = None):
        value = getattr(args, name)
        return value if value is not None else run_cfg.get(cfg_name or name, getattr(DEFAULTS, name))

    k, nprobe, tau = pick("k"), pick("nprobe"), pick("temperature")
    source, batch = pick("distance_source"), pick("search_batch")
    s = min(pick("store_neighbors"), k)  # store_neighbors_effective
    set_nprobe(index, nprobe)
    n_q = len(queries)
    print(
        f"data: {desc}; Q={n_q:,} queries, k={k}, nprobe={nprobe}, threads={args.threads}; pipeline: "
        f"search_batch {batch}, store_neighbors {s}, distance_source {source}, tau {tau}",
        flush=True,
    )

    def run_pipeline():
        return pipeline_search(index, keys, values, queries, targets, k, s, tau, batch, source)

    def run_raw():
        return raw_search(index, queries, k)

    warm = slice(0, min(n_q, batch))  # warm-up: one batch each (also pages in memmaps / index lists)
    pipeline_search(index, keys, values, queries[warm], targets[warm], k, s, tau, batch, source)
    raw_search(index, queries[warm], k)

    best = {"pipeline": float("inf"), "raw": float("inf")}
    for rep in range(args.repeats):
        for name, fn in (("pipeline", run_pipeline), ("raw", run_raw)):
            t0 = time.perf_counter()
            result = fn()
            dt = time.perf_counter() - t0
            best[name] = min(best[name], dt)
            print(f"  run {rep + 1} {name:8s}: {dt:7.2f} s  {n_q / dt:10,.0f} queries/s", flush=True)
            if name == "pipeline":
                hit = float(np.mean(result["target_rank"] > 0))
                found = float(np.mean(result["n_found"]))
    if args.breakdown:
        secs = breakdown(index, keys, values, queries, targets, k, s, tau, batch, source)
        total = sum(secs.values())
        print("breakdown of one pipeline pass:")
        for name, sec in secs.items():
            print(f"  {name:22s} {sec:7.3f} s  {sec / total:6.1%}")
    rate_p, rate_r = n_q / best["pipeline"], n_q / best["raw"]
    print(f"(sanity: target among the k neighbours for {hit:.1%} of queries; mean neighbours found {found:,.0f})")
    print(f"pipeline (stage_search per-batch work): {rate_p:10,.0f} queries/s")
    print(f"raw faiss (one index.search call):      {rate_r:10,.0f} queries/s")
    print(f"ratio: {rate_p / rate_r:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()
