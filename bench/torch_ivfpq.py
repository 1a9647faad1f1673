"""Benchmark: the torch IVFPQ search (`precompute.torch_ivfpq.TorchIVFPQ`) against faiss's own `index.search`
on the same index, queries, k and nprobe.

* faiss -- ONE `index.search(queries, k)` over all queries on the CPU (`--threads` OpenMP threads);
* torch -- `TorchIVFPQ.search` over the same queries on `--device` (cpu: the CI twin; cuda: the GPU path
  of the search stage without faiss-gpu), the index's lists and codebooks copied once beforehand
  (`from_faiss`, timed apart as "load").
Each side is warmed up on one batch, then timed `--repeats` times interleaved; the best time is
reported as queries/s and the ratio torch / faiss. The results are compared with
`check_against_faiss` on 256 queries (id overlap and distances) before timing.

Data: synthetic, as bench/search.py: seeded keys around 4,096 Gaussian centres rounded to fp16,
queries noisy copies of random keys, the index trained with shortened k-means
(`bench.search.build_index`).

    python bench/torch_ivfpq.py                                   # 200k x 192, IVF1024,PQ64, CPU torch
    python bench/torch_ivfpq.py --n 50000 --queries 1024
    python bench/torch_ivfpq.py --n 1000000 --dim 768 --factory IVF4096,PQ64 --device cuda
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import BenchParser, count, factory, size  # noqa: E402
from bench.search import build_index  # noqa: E402
from knnlm_core.index import add_keys, set_nprobe  # noqa: E402
from precompute.torch_ivfpq import TorchIVFPQ, check_against_faiss  # noqa: E402


def parse_args(argv: list[str] | None = None):
    p = BenchParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=count, default=200_000, help="datastore keys")
    p.add_argument("--dim", type=count, default=192, help="key dimension")
    p.add_argument("--factory", type=factory, default="IVF1024,PQ64", help="faiss index factory (IVF<n>,PQ<m>)")
    p.add_argument("--train-size", type=size, default=40960, help="keys sampled to train the index")
    p.add_argument("--queries", type=count, default=4096, help="number of queries")
    p.add_argument("--k", type=count, default=1024, help="neighbours per query")
    p.add_argument("--nprobe", type=count, default=32, help="IVF lists probed")
    p.add_argument("--device", default="cpu", help="torch device of the torch search (cpu, cuda)")
    p.add_argument("--threads", type=count, default=2, help="faiss OpenMP threads and CPU torch threads")
    p.add_argument("--repeats", type=count, default=2, help="timed runs per side (best is reported)")
    p.add_argument("--seed", type=size, default=0)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA GPU (use --device cpu)")
    return args


def synthetic(n: int, d: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys (N, d) fp16 around 4,096 centres, queries (Q, d) float32 noisy copies of random keys)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, d), dtype=np.float32) * 3.0
    keys = (centres[rng.integers(0, 4096, n)] + rng.standard_normal((n, d), dtype=np.float32)).astype(np.float16)
    queries = keys[rng.integers(0, n, n_queries)].astype(np.float32)
    return keys, queries + 0.5 * rng.standard_normal(queries.shape, dtype=np.float32)


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each named function, the repeats interleaved (a load spike hits every side)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()  # both sides return numpy arrays: a CUDA search has synchronised
            times[name].append(time.perf_counter() - t0)
            print(f"  run {rep + 1} {name:5s}: {times[name][-1]:7.2f} s", flush=True)
    return {name: min(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    keys, queries = synthetic(args.n, args.dim, args.queries, args.seed)
    t0 = time.perf_counter()
    index = build_index(keys, args.factory, args.train_size, args.seed)
    add_keys(index, keys)
    set_nprobe(index, args.nprobe)
    print(f"built {args.factory} on synthetic N={args.n:,}, d={args.dim} in {time.perf_counter() - t0:.1f} s; "
          f"Q={len(queries):,}, k={args.k}, nprobe={args.nprobe}, threads={args.threads}, device={args.device}",
          flush=True)
    t0 = time.perf_counter()
    tindex = TorchIVFPQ.from_faiss(index, args.device)
    load_s = time.perf_counter() - t0
    form = "precomputed" if tindex.table is not None else "direct"
    print(f"torch copy: {load_s:.2f} s ({form} tables, {tindex.batch_size(args.nprobe)} queries per batch)")
    check_against_faiss(index, tindex, queries, args.k, args.nprobe)  # raises (one line) when they differ
    print("check_against_faiss: ids and distances agree on 256 queries")
    warm = queries[: min(len(queries), 256)]
    index.search(warm, args.k)
    tindex.search(warm, args.k, args.nprobe)
    best = best_of({"faiss": lambda: index.search(queries, args.k),
                    "torch": lambda: tindex.search(queries, args.k, args.nprobe)}, args.repeats)
    rate = {name: len(queries) / sec for name, sec in best.items()}
    print(f"faiss index.search (CPU, {args.threads} threads): {rate['faiss']:10,.0f} queries/s")
    print(f"torch TorchIVFPQ.search ({args.device}):{' ' * max(1, 14 - len(args.device))}{rate['torch']:10,.0f} "
          f"queries/s (+ {load_s:.2f} s load once)")
    print(f"ratio: {rate['torch'] / rate['faiss']:.2f}x (torch / faiss)")
    return {"faiss_qps": rate["faiss"], "torch_qps": rate["torch"], "load_s": load_s}


if __name__ == "__main__":
    main()
