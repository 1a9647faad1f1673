"""Benchmark: what whitening adds to a build (SPEC §9), measured side by side in one run.

For the same keys (a built run's first `--n` entries and their values, or synthetic ones):
* plain -- the index stage's `build_index` on the raw keys (train, encode every shard, add codes);
* zipfian / entries -- the streamed float64 fit of the whitening (`knnlm_core.whiten.fit`), then
  `build_index` on the whitened keys (`knnlm_core.whiten.WhitenedKeys`, transformed as
  they are read: no second forward pass, no copy of the keys on disk).
Prints seconds and each variant's ratios: fit / plain build and (fit + build) / plain build,
i.e. the extra build time one whitened variant costs a run.

    python bench/whiten.py                                            # synthetic 300k x 192
    python bench/whiten.py --run-dir /work/runs/ship/demo --n 2451000 --factory IVF4096,PQ64 --train-size 262144
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import BenchParser, DefaultsHelp, count, factory, size  # noqa: E402
from bench.index import synthetic_keys  # noqa: E402
from knnlm_core import whiten  # noqa: E402
from knnlm_core.keystore import open_keys  # noqa: E402
from knnlm_core.whiten import WhitenedKeys  # noqa: E402
from precompute.runner import Shards  # noqa: E402
from precompute.stages.index import build_index  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    p.add_argument("--run-dir", default="", help="use a built run's keys and values instead of synthetic ones")
    p.add_argument("--n", type=count, default=300_000, help="number of keys (first n of the run's)")
    p.add_argument("--factory", type=factory, default="IVF1024,PQ64")
    p.add_argument("--train-size", type=size, default=65536)
    p.add_argument("--shard-size", type=count, default=131072)
    p.add_argument("--threads", type=count, default=2)
    p.add_argument("--eps", type=float, default=1e-6, help="relative ε of the whitening")
    return p.parse_args(argv)


def build(keys, args, folder: Path) -> float:
    t0 = time.perf_counter()
    build_index(keys, args.factory, args.train_size, 0, args.shard_size, Shards(folder, "bench"))
    Shards(folder, "bench").remove()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    if args.run_dir:
        values = np.load(Path(args.run_dir) / "values.npy", mmap_mode="r")
        n = min(args.n, len(values))
        keys = open_keys(Path(args.run_dir), n=len(values))[:n]
        values = np.asarray(values[:n])
    else:
        keys = synthetic_keys(args.n, 192)
        values = np.random.default_rng(1).zipf(1.3, args.n).clip(max=50_000).astype(np.int32)
    print(f"keys {keys.shape[0]:,} x {keys.shape[1]} ({'run ' + args.run_dir if args.run_dir else 'synthetic'}), "
          f"{args.factory}, train {args.train_size:,}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        plain_s = build(keys, args, Path(tmp) / "plain")
        print(f"plain build                 {plain_s:8.1f} s")
        for kind in whiten.KINDS:
            t0 = time.perf_counter()
            transform = whiten.fit(kind, keys, values, args.eps)
            fit_s = time.perf_counter() - t0
            build_s = build(WhitenedKeys(keys, transform), args, Path(tmp) / kind)
            print(f"{kind:8s} fit {fit_s:7.1f} s, build {build_s:7.1f} s   fit / plain build {fit_s / plain_s:5.2f}x, "
                  f"(fit + build) / plain build {(fit_s + build_s) / plain_s:5.2f}x")


if __name__ == "__main__":
    main()
