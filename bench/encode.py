"""Benchmark: index encoding in torch (`precompute.encode`) vs faiss's `sa_encode` + `sa_decode`, side by side.

Both sides compute what the index stage stores per shard: the codes and the per-entry PQ
error ||k − k̂||² (`knnlm_core.index.encode_with_error` for faiss). Same trained index, same
keys, best of two interleaved timings, keys/s and the share of codes that differ (float
near-ties: two centroids within float32 rounding of each other).

* CPU (always): faiss on `--threads` threads vs the torch encoder on the CPU (reported, no goal:
  the torch encoder exists for the GPU).
* GPU (when one is present; else "not measured: no GPU"): the torch encoder on the device vs
  faiss on all of the machine's cores (goal >= 10x over 1M x 1600 keys, IVF1024,PQ64).

    python bench/encode.py                                   # CPU: 200k x 192 keys, IVF1024,PQ64
    python bench/encode.py --n 1000000 --dim 1600 --threads 16   # the GPU machine's setting
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import BenchParser, DefaultsHelp, count, factory  # noqa: E402
from knnlm_core.index import encode_with_error, ivfpq_codec, train_index  # noqa: E402
from precompute.encode import TorchIVFPQEncoder  # noqa: E402

SHARD = 131072  # keys per call, as the index stage's shards


def synthetic_keys(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Clustered keys rounded to fp16 (as stored), returned as float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, d), dtype=np.float32) * 3.0
    keys = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, SHARD):
        b = min(a + SHARD, n)
        keys[a:b] = (centres[rng.integers(0, 4096, b - a)] + rng.standard_normal((b - a, d), dtype=np.float32)
                     ).astype(np.float16)
    return keys


def encode_all(encode, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and errors of every key, one shard at a time."""
    parts = [encode(keys[a : a + SHARD]) for a in range(0, len(keys), SHARD)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def compare(name: str, keys: np.ndarray, index, device: str, faiss_threads: int) -> None:
    torch_encoder = TorchIVFPQEncoder(ivfpq_codec(index), device)
    sides = {"faiss": lambda block: encode_with_error(index, block), name: torch_encoder.encode_with_error}
    faiss.omp_set_num_threads(faiss_threads)
    for encode in sides.values():  # warm-up
        encode(keys[:4096])
    times, results = {s: [] for s in sides}, {}
    for _ in range(2):
        for side, encode in sides.items():
            t0 = time.perf_counter()
            results[side] = encode_all(encode, keys)
            if device == "cuda":
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - t0)
    t_faiss, t_torch = min(times["faiss"]), min(times[name])
    (codes_f, err_f), (codes_t, err_t) = results["faiss"], results[name]
    differ = (codes_f != codes_t).any(axis=1)
    same_err = np.allclose(err_t[~differ], err_f[~differ], rtol=1e-5)
    print(f"  faiss sa_encode + sa_decode ({faiss_threads} threads): {len(keys) / t_faiss:10.0f} keys/s")
    print(f"  {name:34s}: {len(keys) / t_torch:10.0f} keys/s   ratio {t_faiss / t_torch:.2f}x; codes differing "
          f"from faiss's: {int(differ.sum())} of {len(keys):,} ({differ.mean():.2e}); PQ errors equal where the "
          f"codes are: {same_err}")


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelp)
    parser.add_argument("--n", type=count, default=200_000, help="synthetic keys")
    parser.add_argument("--dim", type=count, default=192)
    parser.add_argument("--factory", type=factory, default="IVF1024,PQ64")
    parser.add_argument("--train-size", type=count, default=65536)
    parser.add_argument("--threads", type=count, default=2, help="CPU threads of faiss and of the CPU torch side")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    keys = synthetic_keys(args.n, args.dim)
    t0 = time.perf_counter()
    index = train_index(keys, args.factory, args.train_size, seed=0)
    print(f"keys {args.n:,} x {args.dim}, {args.factory} trained on {min(args.train_size, args.n):,} keys in "
          f"{time.perf_counter() - t0:.0f} s")
    print("CPU:")
    compare("torch encoder on the CPU", keys, index, "cpu", args.threads)
    if not torch.cuda.is_available():
        print("GPU: not measured: no GPU")
        return
    print(f"GPU {torch.cuda.get_device_name()}:")
    compare("torch encoder on the GPU", keys, index, "cuda", os.cpu_count() or 1)


if __name__ == "__main__":
    main()
