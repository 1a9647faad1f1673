"""Benchmark: exact-search throughput of the exact stage (SPEC §8) vs one `faiss.IndexFlatL2`.

* stage -- `precompute.exact.exact_knn_with_dists` as the exact stage calls it: keys that
  fit 2 GiB in float32 are converted once per stage (`resident_keys`, timed separately and
  also reported amortised over the benchmark's queries); larger key sets are streamed in
  2 GiB float32 blocks whose per-block top-k are merged in a `faiss.ResultHeap`.
* flat -- ONE `faiss.IndexFlatL2` holding every key in float32 (built before timing, so the
  conversion is not timed), searched once for the same queries and k: the floor of any
  brute-force search on this machine, but it needs N x d x 4 bytes of RAM.
* stage -- the whole per-query work of the exact stage (`exact_range`: the exact search plus
  the index search again, exact distances of both neighbour lists, three p_kNN, recall@k).

Each side is warmed up once, then timed twice interleaved; the best time is reported as
queries/second with the ratio streamed / flat (goal >= 0.9x). With --device cuda the
streamed search runs in torch on the GPU and is compared with the CPU figure of the same run.

    python bench/exact.py --run-dir /work/runs/wt2-final --queries 2000
    python bench/exact.py --n 500000   # synthetic keys
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import BenchParser, DefaultsHelp, count  # noqa: E402


def best_of(fn, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def load(args):
    """(keys (N, d) fp16 array-like, queries (Q, d) float32, run dir or None)."""
    if args.run_dir:
        from knnlm_core.keystore import open_keys

        run = Path(args.run_dir)
        keys = open_keys(run)
        queries = np.load(run / "queries.npy", mmap_mode="r")
        rows = np.random.default_rng(0).choice(len(queries), min(args.queries, len(queries)), replace=False)
        return keys, np.asarray(queries[np.sort(rows)], dtype=np.float32), run
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4096, args.dim)).astype(np.float32) * 4
    keys = (centres[rng.integers(0, 4096, args.n)] + rng.normal(size=(args.n, args.dim))).astype(np.float16)
    queries = keys[rng.integers(0, args.n, args.queries)].astype(np.float32) + rng.normal(size=(args.queries, args.dim))
    return keys, queries.astype(np.float32), None


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelp)
    parser.add_argument("--run-dir", help="a built run: its keys and a sample of its queries")
    parser.add_argument("--n", type=count, default=500_000, help="synthetic keys (without --run-dir)")
    parser.add_argument("--dim", type=count, default=192)
    parser.add_argument("--queries", type=count, default=2000)
    parser.add_argument("--k", type=count, default=1024)
    parser.add_argument("--threads", type=count, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--stage", action="store_true", help="also time the whole exact stage per query (--run-dir)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    from precompute.exact import exact_knn_with_dists

    keys, q, run = load(args)
    n, d = keys.shape
    print(f"keys {n:,} x {d} fp16, {len(q):,} queries, k = {args.k}, {args.threads} threads")
    flat = faiss.IndexFlatL2(d)
    for start in range(0, n, 262144):
        flat.add(np.ascontiguousarray(keys[start : start + 262144], dtype=np.float32))
    from precompute.stages.exact import resident_keys

    t0 = time.perf_counter()
    resident = resident_keys(keys)  # what the exact stage does once per stage when the keys fit 2 GiB
    t_convert = time.perf_counter() - t0
    streamed = lambda: exact_knn_with_dists(q, resident, args.k, "cpu")  # noqa: E731
    reference = lambda: flat.search(q, args.k)  # noqa: E731
    small = q[: max(1, len(q) // 20)]
    exact_knn_with_dists(small, keys, args.k, "cpu"), flat.search(small, args.k)  # warm-up
    t_flat, t_streamed = best_of(reference), best_of(streamed)
    d_s, i_s = streamed()
    d_f, i_f = reference()
    same = float((np.sort(i_s, 1) == np.sort(i_f, 1)).mean())
    print(f"flat (IndexFlatL2, all keys fp32 in RAM): {len(q) / t_flat:8.1f} queries/s")
    print(f"exact stage's search                    : {len(q) / t_streamed:8.1f} queries/s   "
          f"ratio {t_flat / t_streamed:.2f}x  (same neighbour sets: {same:.4%})")
    print(f"  + its one-off fp16 -> fp32 conversion ({t_convert:.1f} s, once per stage): over these {len(q):,} "
          f"queries {len(q) / (t_streamed + t_convert):.1f} queries/s, ratio {t_flat / (t_streamed + t_convert):.2f}x")
    if args.device == "cuda":
        import torch

        gpu = lambda: exact_knn_with_dists(q, keys, args.k, "cuda")  # noqa: E731
        gpu()
        torch.cuda.synchronize()
        t_gpu = best_of(gpu)
        print(f"streamed on {torch.cuda.get_device_name()}: {len(q) / t_gpu:8.1f} queries/s   "
              f"{t_streamed / t_gpu:.1f}x the CPU streamed figure")
    if args.stage and run is not None:
        import json

        from knnlm_core.config import load_config
        from knnlm_core.index import set_nprobe
        from precompute.runner import read_index
        from precompute.stages.exact import exact_range

        cfg = load_config(None, {k: v for k, v in json.loads((run / "run_config.json").read_text()).items()
                                 if k not in ("lam",)})
        index = read_index(run / "index.faiss")
        set_nprobe(index, cfg.nprobe)
        values = np.load(run / "values.npy", mmap_mode="r")
        targets = np.load(run / "eval_ids.npy")[1:].astype(np.int64)
        qs = np.load(run / "queries.npy", mmap_mode="r")
        m = len(q)
        t0 = time.perf_counter()
        exact_range(index, keys, np.asarray(values), qs, targets, cfg, 0, m, "cpu")
        t_stage = time.perf_counter() - t0
        print(f"whole exact stage (search + comparison) : {m / t_stage:8.1f} queries/s   "
              f"{t_stage / t_streamed:.2f}x the streamed search alone")


if __name__ == "__main__":
    main()
