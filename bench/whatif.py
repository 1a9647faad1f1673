"""Benchmark: What-if re-scoring at the full WikiText-2 shape (286,220 positions x 1024 neighbours):
`rescore.p_knn` (what `whatif.rescore` calls) against the plain per-neighbour float64 softmax
(`per_neighbour` below), side by side in one process (goal: p_knn <= 2 s cold, <= 0.5 s warm on 2 cores).

Synthetic, seeded arrays of the shape a run storing all k neighbours holds (the side file
`neighbors_all.parquet`): ascending float32 squared L2 distances (PQ; exact = PQ + noise, not sorted),
log-uniform (Zipf-like) int32 neighbour values, targets matching about 5-10 % of the neighbours,
p_LM, and the run's p_kNN computed like the search stage (float64 `knn.softmax_weights` +
`knn.p_knn_from_weights`, k = 1024, τ = 10, pq). Each line times both on one setting: cold (the
first call: p_knn finds and caches the positions of the target neighbours), then warm calls at other
τ / source, plain and IDF-weighted. Checks: at the run's k, τ, source the re-scored PPL (λ = 0.25)
against the run's, and every result of p_knn against the per-neighbour one.
Wall time depends on what else runs on the machine: compare the sides of one run; process CPU
seconds (all threads) are printed too.

    python bench/whatif.py
    python bench/whatif.py --positions 20000 --threads 1
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from bench.common import BenchParser, DefaultsHelp, count, size  # noqa: E402
from knnlm_core import knn, rescore, whatif  # noqa: E402

RUN_TAU, RUN_LAM = 10.0, 0.25  # the synthetic run's own τ and λ (pq distances, all k)


def synthetic(t: int, k: int, vocab: int, seed: int, threads: int) -> whatif.StoredNeighbours:
    """Seeded arrays of a run storing all k neighbours of t positions (generated in blocks)."""
    rng = np.random.default_rng(seed)
    dq = np.empty((t, k), np.float32)  # (T, k) ascending PQ distances
    vals = np.empty((t, k), np.int32)  # (T, k)
    targets = (vocab ** rng.random(t) - 1).astype(np.int32)  # (T,) log-uniform token ids
    for lo in range(0, t, 8192):
        r = min(8192, t - lo)
        base = rng.uniform(20.0, 60.0, (r, 1)).astype(np.float32)
        dq[lo : lo + r] = base + np.cumsum(0.05 * rng.standard_exponential((r, k), dtype=np.float32), axis=1)
        v = (vocab ** rng.random((r, k), dtype=np.float32) - 1).astype(np.int32)
        hit = rng.random((r, k), dtype=np.float32) < 0.05
        vals[lo : lo + r] = np.where(hit, targets[lo : lo + r, None], v)
    de = dq + rng.normal(0.0, 0.5, (1, k)).astype(np.float32)  # exact: not sorted
    p_knn = np.zeros(t)  # (T,) the run's own p_kNN, as the search stage computes it

    def run_block(lo: int, hi: int) -> None:
        w, _ = knn.softmax_weights(dq[lo:hi], RUN_TAU, vals[lo:hi])
        p_knn[lo:hi] = knn.p_knn_from_weights(w, vals[lo:hi], targets[lo:hi])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda lo: run_block(lo, min(lo + 4096, t)), range(0, t, 4096)))
    p_lm = rng.uniform(1e-4, 0.5, t)
    freq_bin = rng.integers(-1, 7, t).astype(np.int16)
    type_freq = rng.integers(1, 1000, vocab).astype(np.int64)
    return whatif.from_arrays(vals, dq, de, targets, p_lm, p_knn, freq_bin, type_freq)


def per_neighbour(data: whatif.StoredNeighbours, k: int, tau: float, source: str = "pq",
                  idf_weights: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """The plain float64 softmax (an earlier What-if re-scoring): per row Σ_match w_j / Σ_j w_j with
    w_j = exp(-(d_j - min d) / tau) for all k neighbours, blocks of 256 rows on threads."""
    rows = 256
    dists = data.dists_pq if source == "pq" else data.dists_exact  # (T, S) float32, inf = missing
    t = len(data.targets)
    out = np.zeros(t)  # (T,)
    n = max(1, min(threads or min(os.cpu_count() or 1, 8), -(-t // rows)))
    spans = [(i * t // n, (i + 1) * t // n) for i in range(n)]

    def work(span: tuple[int, int]) -> None:
        buf = np.empty((rows, k))  # (rows, k) float64 weights of one block
        for lo in range(span[0], span[1], rows):
            hi = min(lo + rows, span[1])
            out[lo:hi] = _block(dists[lo:hi, :k], data.match[lo:hi, :k], data.nbr_values[lo:hi, :k],
                                tau, idf_weights, buf[: hi - lo])

    if n == 1:
        work(spans[0])
    else:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(work, spans))
    return out


def _block(d: np.ndarray, match: np.ndarray, vals: np.ndarray, tau: float, idf_w: np.ndarray | None,
           buf: np.ndarray) -> np.ndarray:
    """p_kNN(target) (r,) of one block: d (r, k) float32 (inf = missing), match (r, k) bool."""
    low = d.min(axis=1).astype(np.float64)  # (r,) shift: the largest weight of a row is exp(0) = 1
    low[~np.isfinite(low)] = 0.0  # a row without neighbours: every weight stays exp(-inf) = 0
    np.multiply(d, -1.0 / tau, out=buf, dtype=np.float64)
    np.add(buf, (low / tau)[:, None], out=buf)
    np.exp(buf, out=buf)  # (r, k) w_j
    if idf_w is not None:
        buf *= idf_w[np.maximum(vals, 0)]  # missing neighbours already weigh 0
    den = buf.sum(axis=1)
    num = np.einsum("ij,ij->i", buf, match)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def new(data: whatif.StoredNeighbours, k: int, tau: float, source: str = "pq",
        idf_weights: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """rescore.p_knn on the data's arrays."""
    dists = data.dists_pq if source == "pq" else data.dists_exact
    return rescore.p_knn(data.nbr_values, dists, data.targets, k, tau, idf_weights, threads)


SIDES = {"new": new, "per-neighbour": per_neighbour}


def timed(fn, *args) -> tuple[np.ndarray, float, float]:
    """(result, wall seconds, process CPU seconds of all threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| / |b| (0 / 0 counts as 0)."""
    return float(np.max(np.abs(a - b) / np.where(b != 0, np.abs(b), 1.0)))


def side_by_side(label: str, data, k: int, tau: float, source: str, threads: int | None,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float], float]:
    """Time both sides on one setting (new first); print their wall / CPU seconds, the time ratio and the
    largest relative difference. Returns (new's result, wall seconds per side, the difference)."""
    runs = {name: timed(fn, data, k, tau, source, weights, threads) for name, fn in SIDES.items()}
    diff = rel_diff(runs["new"][0], runs["per-neighbour"][0])
    cells = "  ".join(f"{name} {w:6.3f} s (CPU {c:5.2f})" for name, (_, w, c) in runs.items())
    print(f"{label:5s} τ={tau:<4g} {source:5s}{' idf' if weights is not None else '    '}  {cells}  "
          f"per-neighbour/new {runs['per-neighbour'][1] / runs['new'][1]:5.2f}x  max rel diff {diff:.1e}", flush=True)
    return runs["new"][0], {name: r[1] for name, r in runs.items()}, diff


def main() -> None:
    ap = BenchParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelp)
    ap.add_argument("--positions", type=size, default=286_220, help="T evaluation positions")
    ap.add_argument("--k", type=count, default=1024, help="neighbours per position (all stored)")
    ap.add_argument("--vocab", type=size, default=50_257)
    ap.add_argument("--threads", type=count, default=None, help="re-scoring threads (default: all CPUs, <= 8)")
    ap.add_argument("--seed", type=size, default=0)
    args = ap.parse_args()
    n_threads = args.threads or min(os.cpu_count() or 1, 8)

    t0 = time.perf_counter()
    data = synthetic(args.positions, args.k, args.vocab, args.seed, n_threads)
    print(f"generated {args.positions:,} x {args.k} in {time.perf_counter() - t0:.1f} s; CPUs {os.cpu_count()}, "
          f"threads {n_threads}, load average {os.getloadavg()[0]:.2f}; match rate {data.match.mean():.3f}")

    p_run, cold, diff = side_by_side("cold", data, args.k, RUN_TAU, "pq", args.threads)
    ppl_run = whatif.overall_ppl(whatif.interpolate(data, RUN_LAM))
    ppl_new = whatif.overall_ppl(whatif.interpolate(data, RUN_LAM, p_run))
    print(f"  at the run's k, τ, source: PPL rel diff {abs(ppl_new / ppl_run - 1):.1e} (goal <= 1e-9), "
          f"p_kNN per position max rel diff {rel_diff(p_run, data.p_knn_run):.1e}")
    warm, diffs = [], [diff]
    weights = whatif.idf(data.type_freq, 100 * args.positions)
    for tau, source in [(5.0, "pq"), (20.0, "exact"), (2.5, "exact"), (40.0, "pq"), (7.5, "pq"), (0.5, "pq")]:
        _, times, diff = side_by_side("warm", data, args.k, tau, source, args.threads)
        warm.append(times)
        diffs.append(diff)
    for tau in (10.0, 5.0):
        diffs.append(side_by_side("warm", data, args.k, tau, "pq", args.threads, weights)[2])
    print("cold  " + ", ".join(f"{name} {cold[name]:.3f} s" for name in SIDES) + " (goal new <= 2 s)")
    med = {name: float(np.median([w[name] for w in warm])) for name in SIDES}
    print(f"warm median ({len(warm)} calls)  " + ", ".join(f"{name} {med[name]:.3f} s" for name in SIDES)
          + f" (goal new <= 0.5 s); largest new vs per-neighbour rel diff {max(diffs):.1e}; "
          f"load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
