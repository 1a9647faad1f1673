"""Benchmark: What-if re-scoring time at the full WikiText-2 scale (286k positions x 1024 neighbours).

Synthetic, seeded arrays of the shape a full run stores: ascending float32 squared L2
distances (PQ and exact), Zipf-distributed int32 neighbour values, targets that match about
5-10 % of the neighbours, p_LM and the run's p_kNN. Timed, in this order:
* prepare -- `whatif.from_arrays` (τ-independent work done once per run load: missing
  neighbours, the (T, k) target-match mask);
* cold -- the first `whatif.rescore` call of the process (k = 1024, τ = 10, pq);
* warm -- further calls with other τ / source (each a full re-score, no cache);
* λ only -- λ p_kNN + (1 − λ) p_LM from the run's own p_kNN (no neighbours);
* oracle -- the per-frequency-bin λ grid search (101 values) on T positions.
A slice of rows is checked against a direct float64 reference (knnlm_core.knn.p_knn_of).
Wall time depends on what else runs on the machine: the process CPU time of each call is
printed too (CPU / threads = the wall time on that many free cores).

    python bench/whatif.py
    python bench/whatif.py --positions 20000 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from bench.common import DefaultsHelp  # noqa: E402
from knnlm_core import knn, whatif  # noqa: E402


def synthetic(t: int, k: int, vocab: int, seed: int) -> whatif.StoredNeighbours:
    """Seeded arrays of a run storing all k neighbours of t positions (generated in blocks)."""
    rng = np.random.default_rng(seed)
    dq = np.empty((t, k), np.float32)  # (T, k) ascending PQ distances
    vals = np.empty((t, k), np.int32)  # (T, k)
    targets = (rng.zipf(1.2, t) % vocab).astype(np.int32)  # (T,)
    for lo in range(0, t, 8192):
        r = min(8192, t - lo)
        base = rng.uniform(20.0, 60.0, (r, 1)).astype(np.float32)
        dq[lo : lo + r] = base + np.cumsum(rng.exponential(0.05, (r, k)).astype(np.float32), axis=1)
        v = (rng.zipf(1.2, (r, k)) % vocab).astype(np.int32)
        hit = rng.random((r, k), dtype=np.float32) < 0.05
        vals[lo : lo + r] = np.where(hit, targets[lo : lo + r, None], v)
    de = dq + rng.normal(0.0, 0.5, (1, k)).astype(np.float32)  # exact: not sorted
    p_lm = rng.uniform(1e-4, 0.5, t)
    p_knn = rng.uniform(0.0, 1.0, t)
    freq_bin = rng.integers(-1, 7, t).astype(np.int16)
    return whatif.from_arrays(vals, dq, de, targets, p_lm, p_knn, freq_bin, np.ones(vocab, np.int64))


def timed(fn, *args, **kwargs):
    """(result, wall seconds); the process CPU seconds of the call go to CPU[-1]."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    CPU.append(time.process_time() - c0)
    return out, time.perf_counter() - t0


CPU: list[float] = []  # process CPU seconds of each timed call (all threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelp)
    ap.add_argument("--positions", type=int, default=286_000, help="T evaluation positions")
    ap.add_argument("--k", type=int, default=1024, help="neighbours per position (all stored)")
    ap.add_argument("--vocab", type=int, default=50_257)
    ap.add_argument("--threads", type=int, default=None, help="re-scoring threads (default: all CPUs, <= 8)")
    ap.add_argument("--warm", type=int, default=4, help="warm calls")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    raw = synthetic(args.positions, args.k, args.vocab, args.seed)
    print(f"generated {args.positions:,} x {args.k} in {time.perf_counter() - t0:.1f} s; "
          f"CPUs {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    data, t_prep = timed(whatif.from_arrays, raw.nbr_values, raw.dists_pq, raw.dists_exact, raw.targets, raw.p_lm,
                         raw.p_knn_run, raw.freq_bin, raw.type_freq)
    del raw
    print(f"prepare (once per load)  {t_prep:7.3f} s   match rate {data.match.mean():.3f}")
    p, t_cold = timed(whatif.rescore, data, args.k, 10.0, "pq", threads=args.threads)
    print(f"cold  rescore τ=10 pq    {t_cold:7.3f} s   (CPU {CPU[-1]:.3f} s)")
    warm = []
    settings = [(5.0, "pq"), (20.0, "exact"), (10.0, "pq"), (2.5, "exact"), (40.0, "pq"), (7.5, "pq")]
    for tau, source in settings[: args.warm]:
        _, dt = timed(whatif.rescore, data, args.k, tau, source, threads=args.threads)
        warm.append(dt)
        print(f"warm  rescore τ={tau:<4g} {source:5s} {dt:7.3f} s   (CPU {CPU[-1]:.3f} s)")
    n_threads = args.threads or min(os.cpu_count() or 1, 8)
    cpu = float(np.median(CPU[-len(warm):]))
    print(f"warm  best {min(warm):.3f} s, median {float(np.median(warm)):.3f} s  (goal <= 2 s); median CPU {cpu:.3f} s "
          f"on {n_threads} threads = {cpu / n_threads:.3f} s wall on {n_threads} uncontended cores; "
          f"load average now {os.getloadavg()[0]:.2f}")
    _, t_lam = timed(whatif.interpolate, data, 0.3)
    print(f"λ only (run's p_kNN)     {t_lam:7.3f} s")
    _, t_or = timed(whatif.best_lambda_per_bin, data.freq_bin, data.p_lm, p)
    print(f"oracle per-bin λ (101)   {t_or:7.3f} s")
    rows = np.sort(rng.choice(args.positions, 2000, replace=False))
    ref = knn.p_knn_of(data.dists_pq[rows], np.where(np.isfinite(data.dists_pq[rows]), data.nbr_values[rows], -1),
                       data.targets[rows], 10.0)
    print(f"max |p - reference| on 2,000 rows: {np.abs(p[rows] - ref).max():.2e}")


if __name__ == "__main__":
    main()
