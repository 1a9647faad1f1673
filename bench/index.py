"""Benchmark: the index stage vs a plain faiss train + `index.add` of the same keys, in one run.

* stage -- `precompute.stages.index.build_index`, the index stage's own code: train once,
  `sa_encode` each key shard once (the next shard's fp16 -> fp32 conversion overlapping),
  per-entry PQ error from the same codes (`sa_decode`), shards written atomically, then
  `add_sa_codes`; plus writing index.faiss.
* plain -- what knn-transformers does: `index_factory` + `train` on the same sample (no
  polysemous training, as its directly constructed IndexIVFPQ), `index.add` of fp32
  blocks, `write_index`. It computes no PQ error: the stage does that on top.

Both sides train on the same rows with the same seed and produce bit-identical indexes
(checked). Ratio = plain time / stage time (goal >= 1.0x). Keys come from a built run
(`--run-dir`, first `--n` entries) or are synthetic, clustered fp16 (default).

    python bench/index.py                                   # synthetic 300k x 192, IVF1024,PQ64
    python bench/index.py --run-dir /work/runs/wt2 --n 658000 --factory IVF4096,PQ64 --train-size 262144
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
from knnlm_core.index import _ivf_or_none, blocks, sample_rows  # noqa: E402
from knnlm_core.keystore import open_keys  # noqa: E402
from precompute.runner import Shards  # noqa: E402
from precompute.stages.index import build_index  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    p.add_argument("--run-dir", default="", help="use a built run's keys instead of synthetic ones")
    p.add_argument("--n", type=count, default=300_000, help="number of keys (first n of the run's)")
    p.add_argument("--dim", type=count, default=192, help="synthetic key dimension")
    p.add_argument("--factory", type=factory, default="IVF1024,PQ64")
    p.add_argument("--train-size", type=size, default=65536)
    p.add_argument("--shard-size", type=count, default=131072)
    p.add_argument("--threads", type=count, default=2)
    p.add_argument("--repeats", type=count, default=1)
    return p.parse_args(argv)


def synthetic_keys(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, d), dtype=np.float32) * 3.0
    return (centres[rng.integers(0, 4096, n)] + rng.standard_normal((n, d), dtype=np.float32)).astype(np.float16)


def plain(keys, factory: str, train_size: int, seed: int, out: Path) -> faiss.Index:
    """index_factory + train + add in fp32 blocks + write: the plain faiss way."""
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_L2)
    ivf = _ivf_or_none(index)
    if ivf is not None:
        ivf.cp.seed = seed
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
    index.train(np.ascontiguousarray(keys[sample_rows(len(keys), train_size, seed)], dtype=np.float32))
    for _, block in blocks(keys):
        index.add(block)
    faiss.write_index(index, str(out))
    return index


def stage(keys, factory: str, train_size: int, seed: int, shard_size: int, folder: Path, out: Path):
    index, err, _ = build_index(keys, factory, train_size, seed, shard_size, Shards(folder, "bench"))
    faiss.write_index(index, str(out))
    Shards(folder, "bench").remove()
    return index, err


def main(argv=None) -> None:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    if args.run_dir:
        keys = open_keys(Path(args.run_dir))[: args.n]
        desc = f"run {args.run_dir}, first {len(keys):,} keys"
    else:
        keys = synthetic_keys(args.n, args.dim)
        desc = f"synthetic {len(keys):,} clustered keys"
    tmp = Path(tempfile.mkdtemp())
    np.save(tmp / "keys.npy", np.asarray(keys))
    keys = np.load(tmp / "keys.npy", mmap_mode="r")  # both sides read the same fp16 memmap, as a run does
    print(f"keys: {desc}, d={keys.shape[1]}; {args.factory}, train on {min(args.train_size, len(keys)):,}, "
          f"threads {args.threads}, shard {args.shard_size:,}", flush=True)
    best = {"stage": float("inf"), "plain": float("inf")}
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        ours, err = stage(keys, args.factory, args.train_size, 0, args.shard_size, tmp / "shards", tmp / "a.faiss")
        best["stage"] = min(best["stage"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = plain(keys, args.factory, args.train_size, 0, tmp / "b.faiss")
        best["plain"] = min(best["plain"], time.perf_counter() - t0)
        print(f"  run {rep + 1}: stage {best['stage']:.1f} s, plain {best['plain']:.1f} s", flush=True)
    same = faiss.serialize_index(ours).tobytes() == faiss.serialize_index(ref).tobytes()
    print(f"indexes bit-identical: {same}; mean per-entry PQ error {err.mean():.4g} (stage only)")
    print(f"stage (train + encode once + PQ error + add_sa_codes + write): {best['stage']:7.1f} s "
          f"({len(keys) / best['stage']:,.0f} keys/s)")
    print(f"plain (train + index.add + write, no PQ error):                {best['plain']:7.1f} s "
          f"({len(keys) / best['plain']:,.0f} keys/s)")
    print(f"ratio plain / stage: {best['plain'] / best['stage']:.2f}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()
