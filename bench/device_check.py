"""Device check (issue 23 item 5): the GPU-capable stages' own code timed on a lent GPU beside the same work on
that machine's CPU cores, and the planner's GPU rates written from the timings.

One call, inside `--budget-s` (default 420 s), on a random-weight GPT2-XL-shaped model (48 x 1600, built from a
`GPT2Config` on the device: no download) over 1,048,576 datastore entries of WikiText-2 train text:

1. extraction -- `precompute.extract.extract` (the datastore stage's extraction; bf16 on CUDA) over every entry,
   keys/s and the forward FLOP/s the planner counts (`gpu_flops`); beside it the same windows on the CPU cores
   (a float32 copy of the model; short windows of `cmp_context` tokens for both sides, since a GPT2-XL forward of
   1,024 tokens takes a minute on one core).
2. encoding -- `precompute.encode.TorchIVFPQEncoder` (the index stage's torch path) over every key with an index
   trained by `knnlm_core.index.train_index`, keys/s and FLOP/s (`gpu_encode_flops`); beside it faiss's
   `encode_with_error` (the CPU path) on a sample, and the share of codes that differ.
3. exact search -- `precompute.exact.shortlist_knn` over every key (`gpu_exact_flops`), queries/s and how many
   queries the certificate sent back; beside it `precompute.exact.faiss_knn` (the CPU path) on a sample of the
   same queries, and the share of equal neighbour ids.
4. the torch IVFPQ search -- `precompute.torch_ivfpq.TorchIVFPQ` over the index filled with part 2's codes,
   queries/s and code visits/s (`gpu_visits`); beside it faiss's `index.search` on the CPU cores (sample).
5. the Ray executor -- `precompute.ray_executor.RayExecutor` running the index stage's encode map
   (`precompute.stages.index.encode_shard`) on a GPU actor: ray.init seconds, actor-pool start (`start_s`) and
   keys/s; beside it the same map on CPU actors.

Without faiss (its 18 MiB wheel does not fit beside the tree in the 64 MiB a device call carries), part 2
trains its codec in torch (`torch_codec`) and times the torch encoder on the CPU cores beside, part 3 runs
without its CPU side (the CPU path needs faiss), part 4 searches a `TorchIVFPQ` built from part 2's codes
(`ivfpq_from_codes`) beside the same search on the CPU, part 5 is skipped; that needs `knnlm_core.index` to
import without faiss (bench/README.md, `bench/device_check.py`).

Queries are the keys of the text that follows the datastore's. Every part has a share of the budget: a pilot
timing sizes it, and it shrinks (or is skipped, with the reason printed) to fit; a part whose module is missing
(faiss, ray, precompute/torch_ivfpq.py) or that fails is skipped with a one-line reason, and the rest still run.
Where extraction cannot cover every entry in its share, the remaining keys are synthesized from the extracted
ones (a resampled row plus 5% Gaussian noise per dimension) and the JSON says how many.

Writes `<out>/device_check.json` (every figure) and `<out>/device_rates.json` (the planner's `--rates` format:
only the GPU fields measured, plus a "source" mapping saying how each was measured); `<out>` is `--out`, else
$OUT, else a new temporary folder. `--small` runs the same code on tiny sizes on the CPU (device "cpu"; its
"GPU" rates are then CPU figures, so labelled): that is how it is tested.

    python bench/device_check.py                  # on the GPU machine (bench/device_check.sh)
    python bench/device_check.py --small --out /tmp/dc
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import BenchParser, DefaultsHelp, count  # noqa: E402

SHARES = {"extract": 0.35, "encode": 0.2, "exact": 0.15, "ivfpq": 0.15, "ray": 0.15}  # of the budget left
CPU_FLOPS_GUESS = 2.0e10  # FLOP/s per core assumed to size the CPU samples before they are timed
PART_FLOOR_S = 5.0  # a part with less time than this left is skipped


@dataclass(frozen=True)
class Sizes:
    """What one check runs on: model shape, entries, index, search settings."""

    layers: int
    d: int
    heads: int
    n_positions: int
    entries: int  # datastore entries (keys)
    corpus: str  # text the keys are extracted from (repo-relative)
    factory: str  # index of parts 2, 4 and 5
    train_size: int
    k: int
    nprobe: int
    queries: int  # queries of the device sides (at most)
    batch_size: int  # windows per forward pass
    cmp_context: int  # window length of the extraction's CPU comparison
    dtype: str  # forward-pass dtype on the device
    shard: int  # keys per shard (encode map, Ray)
    kmeans_iters: int = 0  # k-means iterations of the index training; 0 = the index stage's (`train_index`)


FULL = Sizes(48, 1600, 25, 1024, 1 << 20, "data/corpora/wikitext2-train.tokens.gz", "IVF1024,PQ64", 65536, 1024,
             32, 8192, 32, 128, "bfloat16", 131072)
SMALL = Sizes(2, 64, 4, 128, 12000, "data/corpora/wikitext2-valid.raw.gz", "IVF16,PQ4", 10000, 64, 4, 256, 8, 32,
              "float32", 2048, kmeans_iters=4)
TOKENIZER = "data/models/demo-gpt2"  # GPT-2's vocabulary


@dataclass
class Budget:
    """Seconds left of the whole check and each part's share of them."""

    total: float
    t0: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.t0)

    def allowance(self, part: str, remaining: list[str]) -> float:
        """This part's share of the seconds left, among the parts still to run (savings pass on)."""
        return self.left() * SHARES[part] / sum(SHARES[p] for p in remaining)


@dataclass
class Context:
    """What the parts share: sizes, device, model, token ids, keys, queries, the trained and filled index."""

    s: Sizes
    device: str
    threads: int
    lm: Any = None
    ids: np.ndarray | None = None
    keys: np.ndarray | None = None  # (N, d) float16
    queries: np.ndarray | None = None  # (Q, d) float32
    trained: Any = None  # faiss index, trained and empty
    index: Any = None  # the same, filled with part 2's codes
    codec: Any = None  # without faiss: part 2's torch-trained IVFPQCodec ...
    codes: np.ndarray | None = None  # ... and every key's code (N, code_size) uint8
    work: Path | None = None
    _keys32: np.ndarray | None = None

    def keys32(self) -> np.ndarray:
        """The keys as float32 (N, d), converted once: the stages convert in a prefetch thread, off the clock."""
        if self._keys32 is None or len(self._keys32) != len(self.keys):
            self._keys32 = self.keys.astype(np.float32)
        return self._keys32


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[Any, float]:
    """(fn(), wall seconds) with the device synchronized before the clock stops."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def parse_args(argv: list[str] | None = None):
    p = BenchParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    p.add_argument("--small", action="store_true", help="tiny sizes on the CPU (device cpu): the test's setting")
    p.add_argument("--budget-s", type=count, default=420, help="the whole check finishes inside this many seconds")
    p.add_argument("--out", default="", help="output folder; '' = $OUT, else a new temporary folder")
    p.add_argument("--device", default="", choices=["", "cuda", "cpu"], help="'' = cuda when visible, else cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the CPU sides; 0 = every core")
    p.add_argument("--parts", default=",".join(SHARES), help="comma-separated parts to run")
    p.add_argument("--without", default="", help="comma-separated modules to treat as not installed (tests: a "
                   "part whose module is missing is skipped with its reason)")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(SHARES)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)} (use {', '.join(SHARES)})")
    return args


# ------------------------------------------------------------------------------------------------ set-up


def build_model(s: Sizes, device: str, dtype: str):
    """A random-weight GPT-2 of the given shape on `device` (LoadedModel)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from knnlm_core.model import DTYPES, wrap_model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=s.n_positions, n_embd=s.d, n_layer=s.layers, n_head=s.heads)
    with torch.device(device):
        model = GPT2LMHeadModel(config).to(DTYPES[dtype])
    return wrap_model(model)


def token_ids(s: Sizes) -> np.ndarray:
    """Token ids of the corpus: entries + 1 for the datastore, then the queries' text."""
    from knnlm_core.corpus import load_tokenizer, tokenize_file

    need = s.entries + s.queries + 2
    ids = tokenize_file(REPO_ROOT / s.corpus, load_tokenizer(str(REPO_ROOT / TOKENIZER)), need)
    if len(ids) < need:
        raise SystemExit(f"error: {s.corpus} has {len(ids):,} tokens, {need:,} needed")
    return ids


def forward_flop(lm, windows) -> float:
    """The planner's forward FLOP of these windows (`plan.cost.Model.forward`: body + attention)."""
    from precompute.plan.facts import ModelShape

    cfg = lm.model.config
    shape = ModelShape(cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_inner or 4 * cfg.n_embd, False)
    tokens = sum(w.end - w.begin for w in windows)
    sq = sum((w.end - w.begin) ** 2 for w in windows)
    return 2 * shape.body_params * tokens + 2 * shape.layers * shape.d * sq


def run_extract(lm, ids: np.ndarray, windows, batch_size: int, threads: int) -> np.ndarray:
    """Keys (n, d) float16 of `windows` over `ids` by the datastore stage's extraction."""
    from precompute.extract import extract, heap_allocations

    n = windows[-1].end - 1 - windows[0].first_pos
    keys = np.empty((n, lm.dim), dtype=np.float16)
    with heap_allocations():
        extract(lm, ids, windows, keys, batch_size, threads=threads)
    return keys


# ------------------------------------------------------------------------------------------------ the parts


def part_extract(ctx: Context, allow: float) -> dict:
    """Part 1: keys of every entry on the device; the same short windows on the device and the CPU cores."""
    from knnlm_core.windows import plan_windows

    s, lm, ids = ctx.s, ctx.lm, ctx.ids
    ctx_len = min(lm.n_positions, 1024)
    stride = ctx_len // 2
    pilot = plan_windows(min(len(ids), 4 * s.batch_size * stride + ctx_len), ctx_len, stride)
    run_extract(lm, ids, pilot, s.batch_size, ctx.threads)  # warm-up
    _, t_pilot = timed(lambda: run_extract(lm, ids, pilot, s.batch_size, ctx.threads), ctx.device)
    pilot_rate = (pilot[-1].end - 1) / t_pilot
    n_ext = int(min(s.entries, max(pilot[-1].end - 1, pilot_rate * allow * 0.55)))
    windows = plan_windows(n_ext + 1, ctx_len, stride)
    keys_ext, t_dev = timed(lambda: run_extract(lm, ids, windows, s.batch_size, ctx.threads), ctx.device)
    ctx.keys = fill_keys(keys_ext, s.entries)
    q_windows = plan_windows(s.queries + 1, ctx_len, stride)
    ctx.queries = run_extract(lm, ids[s.entries + 1 :], q_windows, s.batch_size, ctx.threads).astype(np.float32)
    out = {"keys_extracted": n_ext, "keys_synthesized": s.entries - n_ext, "max_context": ctx_len, "stride": stride,
           "batch_size": s.batch_size, "dtype": s.dtype, "device_seconds": t_dev, "device_keys_per_s": n_ext / t_dev,
           "device_flops": forward_flop(lm, windows) / t_dev}
    out.update(compare_extract(ctx, allow * 0.35))
    print(f"extract: device {out['device_keys_per_s']:,.0f} keys/s over {n_ext:,} keys (windows {ctx_len}, stride "
          f"{stride}, {s.dtype}; {out['device_flops']:.3g} FLOP/s); {out['keys_synthesized']:,} keys synthesized")
    print(f"extract, windows of {out['cmp_context']}: device {out['cmp_device_keys_per_s']:,.0f} keys/s, CPU "
          f"({ctx.threads} threads, float32) {out['cmp_cpu_keys_per_s']:,.0f} keys/s: ratio "
          f"{out['cmp_device_keys_per_s'] / out['cmp_cpu_keys_per_s']:.1f}x; keys max rel. diff {out['cmp_rel_diff']:.2e}")
    return out


def fill_keys(extracted: np.ndarray, n: int) -> np.ndarray:
    """(n, d) float16: the extracted keys, then resampled extracted rows plus 5% Gaussian noise per dimension."""
    if len(extracted) >= n:
        return extracted[:n]
    rng = np.random.default_rng(0)
    keys = np.empty((n, extracted.shape[1]), dtype=np.float16)
    keys[: len(extracted)] = extracted
    std = extracted[: 65536].astype(np.float32).std(0) * 0.05  # (d,)
    for a in range(len(extracted), n, 65536):
        b = min(a + 65536, n)
        rows = extracted[rng.integers(0, len(extracted), b - a)].astype(np.float32)
        keys[a:b] = rows + rng.standard_normal(rows.shape, dtype=np.float32) * std
    return keys


def compare_extract(ctx: Context, allow: float) -> dict:
    """The same short windows extracted on the device (run's dtype) and on the CPU cores (float32 copy)."""
    from knnlm_core.model import wrap_model
    from knnlm_core.windows import plan_windows

    s, lm = ctx.s, ctx.lm
    ctx_len = min(s.cmp_context, lm.n_positions)
    probe = plan_windows(ctx_len + 1, ctx_len, ctx_len)
    per_window = forward_flop(lm, probe)
    n_win = int(max(1, min(2 * ctx.threads, allow * 0.7 * ctx.threads * CPU_FLOPS_GUESS / per_window)))
    windows = plan_windows(n_win * (ctx_len // 2) + ctx_len // 2 + 1, ctx_len, ctx_len // 2)
    cpu_lm = wrap_model(copy.deepcopy(lm.model).to("cpu", torch.float32))
    run_extract(cpu_lm, ctx.ids, windows[:1], 1, 1)  # warm-up
    keys_cpu, t_cpu = timed(lambda: run_extract(cpu_lm, ctx.ids, windows, 1, ctx.threads), "cpu")
    cpu_lm = None  # the float32 copy's memory back before the device side
    run_extract(lm, ctx.ids, windows, s.batch_size, ctx.threads)  # warm-up (new shapes)
    keys_dev, t_dev = timed(lambda: run_extract(lm, ctx.ids, windows, s.batch_size, ctx.threads), ctx.device)
    a, b = keys_dev.astype(np.float32), keys_cpu.astype(np.float32)
    n = len(keys_cpu)
    return {"cmp_context": ctx_len, "cmp_windows": len(windows), "cmp_keys": n, "cmp_device_keys_per_s": n / t_dev,
            "cmp_cpu_keys_per_s": n / t_cpu, "cmp_cpu_threads": ctx.threads,
            "cmp_rel_diff": float(np.abs(a - b).max() / np.abs(b).max())}


def part_encode(ctx: Context, allow: float) -> dict:
    """Part 2: the index stage's torch encoder on the device over every key; faiss (the CPU path) on a sample.
    Without faiss: a codec trained in torch (`torch_codec`) and the torch encoder on the CPU cores beside."""
    from knnlm_core.index import ivfpq_codec
    from precompute.encode import TorchIVFPQEncoder

    s, keys = ctx.s, ctx.keys
    with_faiss = have("faiss")
    if with_faiss:
        import faiss

        faiss.omp_set_num_threads(ctx.threads)
        index, t_train = timed(lambda: train(keys, s), "cpu")
        ctx.trained, codec = faiss.clone_index(index), ivfpq_codec(index)
    else:
        codec, t_train = timed(lambda: torch_codec(keys, s, ctx.device), ctx.device)
    encoder = TorchIVFPQEncoder(codec, ctx.device)
    keys32 = ctx.keys32()
    block = lambda a, b: keys32[a:b]  # noqa: E731
    pilot = block(0, min(len(keys), 2 * s.shard))
    encoder.encode_with_error(pilot[:4096])  # warm-up
    _, t_pilot = timed(lambda: encoder.encode_with_error(pilot), ctx.device)
    n = int(min(len(keys), max(len(pilot), len(pilot) / t_pilot * allow * 0.5)))
    codes, t_dev = timed(lambda: np.concatenate([encoder.encode_with_error(block(a, min(a + s.shard, n)))[0]
                                                 for a in range(0, n, s.shard)]), ctx.device)
    nlist = len(codec.centroids)
    flop_per_key = 2 * s.d * (nlist + 256)
    m_cpu = int(min(n, 1 << 17, max(1024, allow * 0.25 * ctx.threads * 1.2e9 / flop_per_key)))
    if with_faiss:
        from knnlm_core.index import add_codes, encode_with_error

        (cpu_codes, _), t_cpu = timed(lambda: encode_with_error(index, block(0, m_cpu)), "cpu")
        if n == len(keys):
            add_codes(index, codes, 0)
            ctx.index = index
    else:
        if n == len(keys):
            ctx.codec, ctx.codes = codec, codes  # part 4 builds its TorchIVFPQ from them (`ivfpq_from_codes`)
        cpu_encoder = TorchIVFPQEncoder(codec, "cpu")
        (cpu_codes, _), t_cpu = timed(lambda: cpu_encoder.encode_with_error(block(0, m_cpu)), "cpu")
    differ = float((cpu_codes != codes[:m_cpu]).any(axis=1).mean())
    out = {"factory": s.factory, "trained_by": "faiss (train_index)" if with_faiss else "torch k-means (no faiss)",
           "train_keys": min(s.train_size, len(keys)), "train_seconds": t_train, "keys_encoded": n,
           "device_keys_per_s": n / t_dev, "device_flops": n * flop_per_key / t_dev,
           "cpu_path": "faiss encode_with_error" if with_faiss else "TorchIVFPQEncoder on the CPU", "cpu_keys": m_cpu,
           "cpu_keys_per_s": m_cpu / t_cpu, "cpu_threads": ctx.threads, "codes_differing_share": differ}
    print(f"encode ({s.factory}): device {out['device_keys_per_s']:,.0f} keys/s over {n:,} keys "
          f"({out['device_flops']:.3g} FLOP/s), {out['cpu_path']} on {ctx.threads} CPU threads "
          f"{out['cpu_keys_per_s']:,.0f} keys/s over {m_cpu:,}: ratio "
          f"{out['device_keys_per_s'] / out['cpu_keys_per_s']:.1f}x; codes differing {differ:.2e}; trained by "
          f"{out['trained_by']} in {t_train:.1f} s")
    return out


def have(module: str) -> bool:
    """Whether `module` imports here."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def kmeans(x, k: int, iters: int):
    """k centroids (k, d) of rows x (n, d) float32 tensor: Lloyd's iterations from k distinct random rows."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    cent = x[torch.randperm(len(x), generator=gen)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = nearest(x, cent)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)  # an empty cluster keeps its centroid
    return cent


def nearest(x, cent, rows: int = 16384):
    """Index (n,) of the nearest centroid of each row, `rows` rows at a time."""
    c_sq = (cent * cent).sum(1)
    return torch.cat([torch.argmin(c_sq[None, :] - 2 * (x[a : a + rows] @ cent.T), dim=1)
                      for a in range(0, len(x), rows)])


def torch_codec(keys: np.ndarray, s: Sizes, device: str):
    """An IVFPQ codec (`knnlm_core.index.IVFPQCodec`) of `s.factory` trained in torch where faiss is missing:
    coarse k-means, then 256 centroids per sub-space of the residuals (8-bit codes)."""
    import re

    from knnlm_core.index import IVFPQCodec, ivf_nlist, sample_rows

    nlist, m = ivf_nlist(s.factory), int(re.search(r"PQ(\d+)", s.factory).group(1))
    iters = s.kmeans_iters or 10
    x = torch.from_numpy(np.ascontiguousarray(keys[sample_rows(len(keys), s.train_size, 0)], dtype=np.float32))
    x = x.to(device)  # (n_train, d)
    with torch.autocast(device, enabled=False):
        cent = kmeans(x, nlist, iters)  # (nlist, d)
        residual = (x - cent[nearest(x, cent)]).view(len(x), m, -1)  # (n_train, M, dsub)
        pq = torch.stack([kmeans(residual[:, j].contiguous(), 256, iters) for j in range(m)])  # (M, 256, dsub)
    coarse_bytes = max(1, ((nlist - 1).bit_length() + 7) // 8)
    return IVFPQCodec(transforms=(), centroids=cent.cpu().numpy(), pq_centroids=pq.cpu().numpy(), nbits=8,
                      coarse_bytes=coarse_bytes, by_residual=True)


def train(keys: np.ndarray, s: Sizes):
    """The index stage's `train_index`; with `kmeans_iters`, the same index trained with shorter k-means (tests)."""
    import faiss

    from knnlm_core.index import sample_rows, train_index

    if not s.kmeans_iters:
        return train_index(keys, s.factory, s.train_size, seed=0)
    index = faiss.index_factory(keys.shape[1], s.factory, faiss.METRIC_L2)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed, ivf.cp.niter, ivf.pq.cp.niter, ivf.do_polysemous_training = 0, s.kmeans_iters, s.kmeans_iters, False
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # tiny k-means: OpenMP's spin-waits cost 10x on a loaded 2-core machine
    try:
        index.train(np.ascontiguousarray(keys[sample_rows(len(keys), s.train_size, 0)], dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    return index


def part_exact(ctx: Context, allow: float) -> dict:
    """Part 3: `shortlist_knn` on the device over every key; the CPU path `faiss_knn` on a sample of queries
    (without faiss the CPU side is skipped: the torch path's CPU reranking calls faiss too)."""
    from precompute.exact import shortlist_knn

    s, keys, q = ctx.s, ctx.keys, ctx.queries
    n, d = keys.shape
    low = "float16" if ctx.device == "cuda" else "bfloat16"  # the CPU has no fast fp16 matmul
    keys_dev = torch.from_numpy(keys).to(ctx.device)
    pilot = q[: min(len(q), 512)]
    shortlist_knn(pilot[:64], keys_dev, s.k, ctx.device, low_dtype=low)  # warm-up
    _, t_pilot = timed(lambda: shortlist_knn(pilot, keys_dev, s.k, ctx.device, low_dtype=low), ctx.device)
    n_q = int(min(len(q), max(len(pilot), len(pilot) / t_pilot * allow * 0.5)))
    stats: dict = {}
    (dev_d, dev_i), t_dev = timed(lambda: shortlist_knn(q[:n_q], keys_dev, s.k, ctx.device, low_dtype=low,
                                                        stats=stats), ctx.device)
    keys_dev = None  # the device's memory back
    out = {"keys": n, "k": s.k, "low_dtype": low, "device_queries": n_q, "device_queries_per_s": n_q / t_dev,
           "device_requeried": stats["requeried"], "device_flops": 2 * n * d * n_q / t_dev}
    line = (f"exact (k {s.k}, {n:,} keys): device {out['device_queries_per_s']:,.1f} queries/s ({low} shortlist; "
            f"{stats['requeried']} of {n_q:,} requeried)")
    if not have("faiss"):
        out["cpu_skipped"] = "faiss cannot be imported here"
        print(f"{line}; CPU side skipped: faiss cannot be imported here")
        return out
    from precompute.exact import faiss_knn

    n_cpu = int(min(n_q, 512, max(8, allow * 0.2 * ctx.threads * CPU_FLOPS_GUESS / (2 * n * d))))
    cpu_stats: dict = {}
    keys32 = ctx.keys32()
    (cpu_d, cpu_i), t_cpu = timed(lambda: faiss_knn(q[:n_cpu], keys32, s.k, stats=cpu_stats), "cpu")
    out.update({"cpu_queries": n_cpu, "cpu_queries_per_s": n_cpu / t_cpu, "cpu_requeried": cpu_stats["requeried"],
                "cpu_threads": ctx.threads, "same_ids_share": float((dev_i[:n_cpu] == cpu_i).mean()),
                "max_dist_rel_diff": float(np.max(np.abs(dev_d[:n_cpu] - cpu_d) / np.maximum(cpu_d, 1e-30)))})
    print(f"{line}, faiss_knn on {ctx.threads} CPU threads {out['cpu_queries_per_s']:,.1f} queries/s over {n_cpu}: "
          f"ratio {out['device_queries_per_s'] / out['cpu_queries_per_s']:.1f}x; same ids {out['same_ids_share']:.4%}")
    return out


def part_ivfpq(ctx: Context, allow: float) -> dict:
    """Part 4: `TorchIVFPQ` on the device over part 2's filled index; faiss `index.search` on the CPU cores.
    Without faiss: over part 2's torch codec and codes (`ivfpq_from_codes`), beside the same search on the CPU."""
    from precompute.torch_ivfpq import TorchIVFPQ

    s, q = ctx.s, ctx.queries
    if ctx.index is not None:
        tindex, t_load = timed(lambda: TorchIVFPQ.from_faiss(ctx.index, ctx.device), ctx.device)
    elif ctx.codes is not None:
        tindex, t_load = timed(lambda: ivfpq_from_codes(ctx.codec, ctx.codes, ctx.device), ctx.device)
    else:
        raise PartSkipped("part 2 did not encode every key (no filled index)")
    pilot = q[: min(len(q), 256)]
    tindex.search(pilot[:32], s.k, s.nprobe)  # warm-up
    _, t_pilot = timed(lambda: tindex.search(pilot, s.k, s.nprobe), ctx.device)
    n_q = int(min(len(q), max(len(pilot), len(pilot) / t_pilot * allow * 0.5)))
    (dev_d, dev_i), t_dev = timed(lambda: tindex.search(q[:n_q], s.k, s.nprobe), ctx.device)
    visits = s.nprobe * tindex.ntotal / len(tindex.centroids)  # codes scanned per query (the planner's count)
    n_cpu = int(min(n_q, 1024, max(16, allow * 0.25 * ctx.threads * 1.8e6 / visits)))
    if ctx.index is not None:
        import faiss

        from knnlm_core.index import search, set_nprobe

        faiss.omp_set_num_threads(ctx.threads)
        set_nprobe(ctx.index, s.nprobe)
        cpu_path = "faiss index.search"
        (cpu_d, cpu_i), t_cpu = timed(lambda: search(ctx.index, q[:n_cpu], s.k), "cpu")
    else:
        cpu_path = "TorchIVFPQ on the CPU (no faiss)"
        cpu_index = ivfpq_from_codes(ctx.codec, ctx.codes, "cpu")
        (cpu_d, cpu_i), t_cpu = timed(lambda: cpu_index.search(q[:n_cpu], s.k, s.nprobe), "cpu")
    overlap = np.mean([len(np.intersect1d(a[a >= 0], b[b >= 0])) / max(1, (b >= 0).sum())
                       for a, b in zip(dev_i[:n_cpu], cpu_i)])
    out = {"factory": s.factory, "k": s.k, "nprobe": s.nprobe, "visits_per_query": visits, "load_seconds": t_load,
           "device_queries": n_q, "device_queries_per_s": n_q / t_dev, "device_visits_per_s": n_q * visits / t_dev,
           "cpu_path": cpu_path, "cpu_queries": n_cpu, "cpu_queries_per_s": n_cpu / t_cpu,
           "cpu_threads": ctx.threads, "id_overlap_share": float(overlap)}
    print(f"torch IVFPQ search (k {s.k}, nprobe {s.nprobe}): device {out['device_queries_per_s']:,.0f} queries/s "
          f"({out['device_visits_per_s']:.3g} visits/s), {cpu_path} on {ctx.threads} CPU threads "
          f"{out['cpu_queries_per_s']:,.0f} queries/s: ratio "
          f"{out['device_queries_per_s'] / out['cpu_queries_per_s']:.1f}x; id overlap {overlap:.4%}")
    return out


def ivfpq_from_codes(codec, codes: np.ndarray, device: str):
    """A `TorchIVFPQ` without faiss: entries 0..n-1 with sa_encode-layout codes (n, coarse_bytes + M) of an 8-bit
    IVFPQ `codec`, laid out as `TorchIVFPQ.from_faiss` lays out a faiss index filled with them (list after list,
    ids ascending in a list), tables in faiss's precomputed form."""
    from precompute.encode import ieee_float32
    from precompute.torch_ivfpq import TorchIVFPQ

    cb, nlist = codec.coarse_bytes, len(codec.centroids)
    lists = (codes[:, :cb].astype(np.int64) << (8 * np.arange(cb))).sum(1)  # (n,) little-endian list numbers
    order = np.argsort(lists, kind="stable")  # (n,) entry ids, list after list
    offsets = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=nlist))])  # (nlist + 1,)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    centroids, pq = t(codec.centroids.astype(np.float32)), t(codec.pq_centroids.astype(np.float32))
    m, _, dsub = pq.shape
    pq_sq = (pq * pq).sum(2)  # (M, ksub)
    with ieee_float32():
        dots = torch.einsum("lmd,mkd->lmk", centroids.view(nlist, m, dsub), pq)  # (nlist, M, ksub)
    return TorchIVFPQ(device=device, transforms=[], centroids=centroids, centroid_sq=(centroids * centroids).sum(1),
                      pq=pq, pq_sq=pq_sq, table=pq_sq[None] + 2.0 * dots, codes=t(codes[order, cb:]),
                      ids=t(order.astype(np.int64)), offsets=t(offsets.astype(np.int64)))


def part_ray(ctx: Context, allow: float) -> dict:
    """Part 5: the index stage's encode map on Ray actors (a GPU actor on CUDA), then on CPU actors."""
    import ray

    from knnlm_core.config import RunConfig
    from precompute.ray_executor import RayExecutor
    from precompute.runner import Run

    if ctx.trained is None:
        raise PartSkipped("part 2 trained no faiss index")
    s = ctx.s
    n = int(min(len(ctx.keys), 4 * s.shard))
    run_dir = Path(tempfile.mkdtemp(prefix="ray-", dir=ctx.work))
    np.save(run_dir / "keys.npy", ctx.keys[:n])
    cfg = replace(RunConfig(), shard_size=s.shard)
    run = Run(cfg=cfg, run_dir=run_dir, run_name="device-check", info={"n_entries": n, "dim": s.d})
    started = not ray.is_initialized()
    executor, t_init = timed(RayExecutor, "cpu")
    run.executor = executor
    out = {"keys": n, "shard": s.shard, "ray_init_seconds": t_init if started else 0.0}
    sides = [("device", ctx.device)] + ([("cpu", "cpu")] if ctx.device != "cpu" else [])  # on cpu: one side
    try:
        for side, device in sides:
            out.update(ray_side(run, ctx.trained, side, device, n))
    finally:
        executor.close()
    line = (f"ray: init {out['ray_init_seconds']:.1f} s; {out['device_kind']} actor pool start "
            f"{out['device_start_seconds']:.1f} s, {out['device_keys_per_s']:,.0f} keys/s")
    if "cpu_keys_per_s" in out:
        line += (f"; cpu actors start {out['cpu_start_seconds']:.1f} s, {out['cpu_keys_per_s']:,.0f} keys/s: ratio "
                 f"{out['device_keys_per_s'] / out['cpu_keys_per_s']:.1f}x")
    print(line)
    return out


def ray_side(run, trained, side: str, device: str, n: int) -> dict:
    """One shard (the pool starts), then every shard on the warm pool: start seconds and keys/s."""
    from precompute.executor import ShardJob
    from precompute.runner import Shards, shard_ranges, write_index
    from precompute.stages.index import TRAINED, encode_load, encode_shard, encoder_name

    run.info["device"] = device
    run.executor.release()  # a fresh pool for each side: its start is what is timed
    kind = "gpu" if encoder_name(trained, device) == "torch-cuda" else "cpu"
    times = []
    for attempt, todo in enumerate(([0], list(range(len(shard_ranges(n, run.cfg.shard_size)))))):
        key = f"{side}-{attempt}"
        shards = Shards(run.path(f"index.shards.{key}"), key, stage="index")
        write_index(trained, shards.folder / TRAINED)
        job = ShardJob("index", key, encode_shard, encode_load, kind=kind, folder=shards.folder.name)
        _, t = timed(lambda job=job, todo=todo: run.executor.map(run, job, todo), "cpu")
        times.append(t)
    rate = n / times[1]
    first = min(n, run.cfg.shard_size)
    return {f"{side}_kind": kind, f"{side}_start_seconds": max(times[0] - first / rate, 0.0),
            f"{side}_keys_per_s": rate}


class PartSkipped(Exception):
    """A part cannot run here (a missing module or input): the message says why."""


PARTS = {"extract": part_extract, "encode": part_encode, "exact": part_exact, "ivfpq": part_ivfpq,
         "ray": part_ray}
NEEDS = {"encode": ("extract",), "exact": ("extract",), "ivfpq": ("encode",), "ray": ("encode",)}


def run_parts(ctx: Context, budget: Budget, parts: list[str]) -> dict:
    """Every part in order, each inside its allowance; a missing module, input or error skips it (one line)."""
    results: dict[str, dict] = {}
    def blocked(part: str) -> list[str]:  # the parts `part` needs that did not run (or were not asked for)
        return [p for p in NEEDS.get(part, ()) if "skipped" in results.get(p, {"skipped": "not run"})
                and (p in results or p not in parts)]

    for i, name in enumerate(parts):
        missing = blocked(name)
        allow = budget.allowance(name, [p for p in parts[i:] if not blocked(p)] or [name])
        t0 = time.perf_counter()
        try:
            if missing:
                raise PartSkipped(f"needs part {missing[0]}, which did not run")
            if allow < PART_FLOOR_S:
                raise PartSkipped(f"budget spent ({budget.left():.0f} s left)")
            results[name] = PARTS[name](ctx, allow)
        except ImportError as err:
            results[name] = {"skipped": f"{err.name or err} cannot be imported here ({err})"}
        except PartSkipped as err:
            results[name] = {"skipped": str(err)}
        except Exception as err:  # noqa: BLE001 - one part failing (e.g. out of memory) must not end the check
            results[name] = {"skipped": f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        results[name]["seconds"] = time.perf_counter() - t0
        results[name]["allowance_s"] = allow
        if "skipped" in results[name]:
            print(f"{name}: skipped: {results[name]['skipped']}")
    return results


# ------------------------------------------------------------------------------------------------ outputs


def rates_of(results: dict, device: str, small: bool) -> dict:
    """The planner's GPU rates measured here (precompute.plan.cost.Rates fields) and how each was measured."""
    lead = ("not a GPU rate: a format check by bench/device_check.py --small on the CPU"
            if small else f"measured by bench/device_check.py on {device_name(device)}")
    picks = {
        "gpu_flops": ("extract", "device_flops", "precompute.extract.extract, forward FLOP (plan.cost.Model.forward) "
                      "per second over every extracted key"),
        "gpu_encode_flops": ("encode", "device_flops", "precompute.encode.TorchIVFPQEncoder, 2 d (nlist + 256) FLOP "
                             "per key per second"),
        "gpu_exact_flops": ("exact", "device_flops", "precompute.exact.shortlist_knn, 2 d FLOP per query and key per "
                            "second (certificate and requeries included)"),
        "gpu_visits": ("ivfpq", "device_visits_per_s", "precompute.torch_ivfpq.TorchIVFPQ.search, nprobe N / nlist "
                       "code visits per query per second (coarse search and top-k included)"),
        "start_s": ("ray", "device_start_seconds", "precompute.ray_executor.RayExecutor, start of the actor pool of "
                    "the encode map (one shard's time less its steady time)"),
    }
    rates, source = {}, {}
    for name, (part, fig, how) in picks.items():
        value = results.get(part, {}).get(fig)
        if value is not None and value > 0:
            rates[name] = float(value)
            source[name] = f"{lead}: {how}"
    return {**rates, "source": source}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"


def out_dir(arg: str) -> Path:
    path = Path(arg or os.environ.get("OUT") or tempfile.mkdtemp(prefix="device-check-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(float(args.budget_s))
    for name in filter(None, args.without.split(",")):
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` now raises ImportError
    s = SMALL if args.small else FULL
    device = "cpu" if args.small else (args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device == "cpu":
        s = replace(s, dtype="float32")  # the CPU path's dtype (no fast bf16 assumed)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out = out_dir(args.out)
    print(f"device check on {device_name(device)}: torch {torch.__version__}, {threads} CPU threads, budget "
          f"{args.budget_s} s, output {out}", flush=True)
    ctx = Context(s, device, threads, work=Path(tempfile.mkdtemp(prefix="device-check-work-")))
    ctx.lm, t_model = timed(lambda: build_model(s, device, s.dtype), device)
    ctx.ids, t_tok = timed(lambda: token_ids(s), "cpu")
    print(f"model: random GPT-2 {s.layers} x {s.d} ({s.dtype}) built in {t_model:.1f} s; {len(ctx.ids):,} tokens "
          f"of {s.corpus} in {t_tok:.1f} s", flush=True)
    try:
        results = run_parts(ctx, budget, [p for p in SHARES if p in args.parts.split(",")])
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    report = {"device": device_name(device), "device_kind": device, "small": args.small, "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "threads": threads, "budget_s": args.budget_s, "sizes": asdict(s),
              "model_build_seconds": t_model, "tokenize_seconds": t_tok, "parts": results,
              "wall_seconds": budget.total - budget.left()}
    rates = rates_of(results, device, args.small)
    (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "device_rates.json").write_text(json.dumps(rates, indent=2) + "\n")
    print(f"wrote {out / 'device_check.json'} and {out / 'device_rates.json'} ({len(rates) - 1} rates); wall "
          f"{report['wall_seconds']:.0f} s of {args.budget_s} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
