"""Benchmark: the exact search of SPEC §8 (`precompute.exact`) against its plain counterparts, side by side.

CPU (always): the same float32 keys and queries, the same k, best of two interleaved timings:
* faiss.knn -- one `faiss.knn(queries, keys, k)` over all keys: the plain exact search;
* faiss shortlist -- `faiss_knn`: faiss's k + margin nearest (streamed in 2 GiB blocks into a
  `ResultHeap`), reranked by the difference and certified;
* subspace bound -- `precompute.exact_projection.projection_knn`, the CPU path the exact stage runs
  on keys whose top 64 principal directions hold >= 90% of the variance (real LM keys; not the
  synthetic isotropic ones: use --run-dir): a 65-column faiss brute force over a proven lower bound,
  4k shortlist reranked and certified (ratio = faiss.knn time / its time, goal >= 1.0x);
* torch path on CPU (--torch, for information) -- the GPU code (`shortlist_knn`) on this CPU in bf16.
The result sets are compared (identical between the two exact paths; faiss.knn's own float32
distances may order near-ties otherwise).

GPU (when one is present; else "not measured: no GPU"): random fp16 keys resident on the
device (default 1M x 1600) and 16,384 queries:
* bare -- per key block a bare fp16 matmul + top-k, the blocks' top-k merged: the floor;
* shortlist -- `shortlist_knn` on the same blocks (centring, bound, merge, rerank, certificate);
  ratio = bare time / shortlist time (goal >= 0.8x) and queries/s (goal >= 20k on one H100/H200).

    python bench/exact.py                        # synthetic 500k x 192 on the CPU, k = 1024
    python bench/exact.py --run-dir /work/runs/wt2-final --queries 1024
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

from bench.common import BenchParser, DefaultsHelp, count  # noqa: E402
from precompute.exact import GPU_KEY_BLOCK, QUERY_BLOCK, exact_knn_with_dists, faiss_knn, shortlist_knn  # noqa: E402
from precompute.exact_projection import MIN_SHARE, fit_lower_bound, projection_knn  # noqa: E402


def best_of(fns: dict, repeats: int = 2) -> dict[str, float]:
    """Best wall time of each named function, the repeats interleaved (a load spike hits every side)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def load(args):
    """(keys (N, d) float32, queries (Q, d) float32): a built run's or synthetic clustered fp16 values."""
    if args.run_dir:
        from knnlm_core.keystore import open_keys

        run = Path(args.run_dir)
        keys = open_keys(run)
        queries = np.load(run / "queries.npy", mmap_mode="r")
        rows = np.sort(np.random.default_rng(0).choice(len(queries), min(args.queries, len(queries)), replace=False))
        return np.asarray(keys, dtype=np.float32), np.asarray(queries[rows], dtype=np.float32)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4096, args.dim)).astype(np.float32) * 4
    keys = (centres[rng.integers(0, 4096, args.n)] + rng.normal(size=(args.n, args.dim))).astype(np.float16)
    queries = keys[rng.integers(0, args.n, args.queries)].astype(np.float32) + rng.normal(size=(args.queries, args.dim))
    return keys.astype(np.float32), queries.astype(np.float32)


def cpu_sides(args) -> None:
    keys, q = load(args)
    n, d = keys.shape
    k = min(args.k, n)
    print(f"CPU: keys {n:,} x {d} (fp16 values in float32), {len(q):,} queries, k = {k}, {args.threads} threads")
    t0 = time.perf_counter()
    lower = fit_lower_bound(keys)  # once per process in the stage (exact_inputs), not per query block
    fit_s = time.perf_counter() - t0
    warm = q[: max(1, len(q) // 20)]
    faiss.knn(warm, keys, k), faiss_knn(warm, keys, k)
    stats = {"faiss": {}, "projection": {}, "torch": {}}
    results = {}

    def side(name, fn):
        def run():
            results[name] = fn()
        return run

    sides = {"faiss.knn": side("faiss.knn", lambda: faiss.knn(q, keys, k)),
             "faiss shortlist": side("faiss shortlist", lambda: faiss_knn(q, keys, k, stats=stats["faiss"]))}
    if lower is not None:
        sides["subspace bound"] = side("subspace bound", lambda: projection_knn(q, keys, k, lower,
                                                                                 stats=stats["projection"]))
    if args.torch:
        sides["torch path"] = side("torch path", lambda: shortlist_knn(q, keys, k, "cpu", low_dtype="bfloat16",
                                                                       stats=stats["torch"]))
    times = best_of(sides)
    plain_ids, (exact_d, exact_ids) = results["faiss.knn"][1], results["faiss shortlist"]
    same_sets = float((np.sort(plain_ids, 1) == np.sort(exact_ids, 1)).mean())
    print(f"  faiss.knn (all keys, one call)         : {len(q) / times['faiss.knn']:8.1f} queries/s")
    print(f"  exact, faiss shortlist + rerank        : {len(q) / times['faiss shortlist']:8.1f} queries/s   ratio "
          f"{times['faiss.knn'] / times['faiss shortlist']:.2f}x; queries searched again "
          f"{stats['faiss']['requeried']}; same neighbour sets as faiss.knn: {same_sets:.4%}")
    if lower is None:
        print("  exact, subspace bound                  : not used (the top 64 directions hold under "
              f"{MIN_SHARE:.0%} of the variance, or d < 128): the stage runs the faiss shortlist")
    else:
        pd_, pi = results["subspace bound"]
        print(f"  exact, subspace bound (the stage's)    : {len(q) / times['subspace bound']:8.1f} queries/s   ratio "
              f"{times['faiss.knn'] / times['subspace bound']:.2f}x (goal >= 1.0x); queries searched again "
              f"{stats['projection']['requeried']}; top {lower.dims} directions hold {lower.share:.1%} of the "
              f"variance; bound fitted once in {fit_s:.1f} s; identical to the faiss shortlist: "
              f"{np.array_equal(pi, exact_ids) and np.array_equal(pd_, exact_d)}")
    if args.torch:
        torch_d, torch_ids = results["torch path"]
        print(f"  torch path on this CPU (bf16)          : {len(q) / times['torch path']:8.1f} queries/s   ratio "
              f"{times['faiss.knn'] / times['torch path']:.2f}x; queries searched again {stats['torch']['requeried']}; "
              f"identical: {np.array_equal(torch_ids, exact_ids) and np.array_equal(torch_d, exact_d)}")


def bare_topk(q16, keys16, k: int, key_block: int, query_block: int) -> None:
    """Per key block a bare fp16 matmul + top-k, merged with the running top-k: no centring, no rerank."""
    for a in range(0, len(q16), query_block):
        best = None
        for start in range(0, len(keys16), key_block):
            scores = torch.mm(q16[a : a + query_block], keys16[start : start + key_block].T)
            top = torch.topk(scores, k, dim=1, largest=True, sorted=False).values
            best = top if best is None else torch.topk(torch.cat([best, top], 1), k, dim=1, sorted=False).values


def gpu_sides(args) -> None:
    if not torch.cuda.is_available():
        print("GPU: not measured: no GPU")
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys16 = torch.randn(args.gpu_n, args.gpu_dim, device="cuda", dtype=torch.float16, generator=gen)
    q = torch.randn(args.gpu_queries, args.gpu_dim, device="cuda", generator=gen).half().float().cpu().numpy()
    q16 = torch.from_numpy(q).cuda().half()
    k = args.k
    print(f"GPU {torch.cuda.get_device_name()}: keys {args.gpu_n:,} x {args.gpu_dim} fp16 on the device, "
          f"{len(q):,} queries, k = {k}")
    stats = {}
    shortlist_knn(q[:QUERY_BLOCK], keys16, k, "cuda"), bare_topk(q16[:QUERY_BLOCK], keys16, k, GPU_KEY_BLOCK,
                                                                  QUERY_BLOCK)
    times = best_of({
        "bare": lambda: bare_topk(q16, keys16, k, GPU_KEY_BLOCK, QUERY_BLOCK),
        "shortlist": lambda: shortlist_knn(q, keys16, k, "cuda", stats=stats),
    })
    print(f"  bare fp16 matmul + top-k : {len(q) / times['bare']:9.1f} queries/s")
    print(f"  shortlist_knn (exact)    : {len(q) / times['shortlist']:9.1f} queries/s   "
          f"ratio {times['bare'] / times['shortlist']:.2f}x (goal >= 0.8x); queries searched again "
          f"{stats['requeried']} of {len(q):,}")
    sample = np.random.default_rng(1).choice(len(q), 64, replace=False)
    d_gpu, i_gpu = shortlist_knn(q[sample], keys16, k, "cuda")
    d_cpu, i_cpu = exact_knn_with_dists(q[sample], keys16.cpu().float().numpy(), k, "cpu")
    print(f"  64 queries against the CPU path: same ids {float((i_gpu == i_cpu).mean()):.4%}, "
          f"max distance difference {float(np.max(np.abs(d_gpu - d_cpu) / d_cpu)):.2e} relative")


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelp)
    parser.add_argument("--run-dir", help="a built run: its keys and a sample of its queries (CPU side)")
    parser.add_argument("--n", type=count, default=500_000, help="synthetic keys (without --run-dir)")
    parser.add_argument("--dim", type=count, default=192)
    parser.add_argument("--queries", type=count, default=2000)
    parser.add_argument("--k", type=count, default=1024)
    parser.add_argument("--threads", type=count, default=2)
    parser.add_argument("--torch", action="store_true", help="also the GPU code on this CPU in bf16 (for information)")
    parser.add_argument("--gpu-n", type=count, default=1_000_000, help="GPU side: random keys")
    parser.add_argument("--gpu-dim", type=count, default=1600)
    parser.add_argument("--gpu-queries", type=count, default=16384)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    cpu_sides(args)
    gpu_sides(args)


if __name__ == "__main__":
    main()
