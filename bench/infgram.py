"""Benchmark: the suffix stage's cost (SPEC §12): suffix-array build time and peak memory, query rate.

* build: `knnlm_core.infgram.build_suffix_array` (pydivsufsort) on the WikiText-2 train stream
  (2.45M GPT-2 tokens; a run's `datastore_ids.npy`, or tokenized here) and on synthetic streams of
  `--synthetic` sizes, each in a fresh process that first loads its stream, so the peak RSS
  (VmHWM) is the build's own (stream included); plus saving the array and its sha256 (what the
  stage adds). The 117M-token figure is a LINEAR PROJECTION from the largest synthetic stream
  (seconds and bytes per token times 117M), not a measurement.
* overlap: `knnlm_core.infgram.neighbour_overlap` for 64 neighbours of each WikiText-2 test position,
  drawn among the entries that share the query's last token (most kNN-LM neighbours do).
* query: `knnlm_core.infgram.infgram` (L_t, p_∞, |s|, count(s ·) per position) over the memory-
  mapped suffix array, for the WikiText-2 test stream's positions (286k) against the WikiText-2
  train stream, and for the same number of positions of a synthetic evaluation stream against the
  largest synthetic datastore stream (deeper binary searches, a larger working set).

Synthetic streams: Zipf(1.1) unigrams over a 50,257-token vocabulary, with 10% of the stream made of
copies (8 to 64 tokens) of earlier stretches, so that long repeated contexts exist as in text.

    python bench/infgram.py                                  # tokenizes WikiText-2 train and test
    python bench/infgram.py --datastore-ids /work/runs/demo/datastore_ids.npy --synthetic 20000000 60000000 117000000

Measured on 2 shared cores (the second command): WikiText-2 build 1.3 s, 0.09 GiB peak; synthetic
20M 12.9 s / 0.48 GiB, 60M 36.3 s / 1.38 GiB, 117M 56.7 s / 2.65 GiB peak RSS (48-65 s and ~2.3 GiB per
100M tokens), int32 array of 0.44 GiB, save + sha256 0.7 s; queries 57k positions/s on WikiText-2
test vs train, 38k/s for synthetic positions vs the 117M synthetic stream; neighbour overlap
2.05M (position, neighbour) pairs/s (64 per WikiText-2 test position: 9.0 s).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from bench.common import BenchParser, count  # noqa: E402
from knnlm_core import infgram as ig  # noqa: E402

PROJECT_TO = 117_000_000  # WikiText-103 scale datastore (SPEC §12 sizing)
VOCAB = 50_257


def parse_args(argv=None):
    p = BenchParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datastore-ids", default="", help="a run's datastore_ids.npy (default: tokenize WikiText-2 train)")
    p.add_argument("--train-corpus", default="data/corpora/wikitext2-train.tokens.gz")
    p.add_argument("--test-corpus", default="data/corpora/wikitext2-test.raw.gz")
    p.add_argument("--tokenizer", default="data/models/demo-gpt2")
    p.add_argument("--synthetic", type=count, nargs="*", default=[5_000_000, 20_000_000],
                   help="synthetic stream sizes to build on (the largest one is projected to 117M)")
    p.add_argument("--max-len", type=count, default=ig.MAX_LEN)
    return p.parse_args(argv)


def synthetic_stream(n: int, seed: int) -> np.ndarray:
    """(n,) int32: Zipf(1.1) tokens with 10% of the stream overwritten by copies of earlier stretches."""
    rng = np.random.default_rng(seed)
    ids = ((rng.zipf(1.1, n) - 1) % VOCAB).astype(np.int32)
    lengths = rng.integers(8, 65, size=n // 10 // 36)  # mean copy length 36: ~10% of the tokens
    dest = np.sort(rng.integers(64, n - 64, size=len(lengths)))
    for to, length in zip(dest, lengths, strict=True):
        src = rng.integers(0, to - length) if to > length else 0
        ids[to : to + length] = ids[src : src + length]
    return ids


def vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build_child(path: str, out: str, queue) -> None:
    """In a fresh process: load the stream, build, save, hash; report seconds and peak RSS."""
    ids = np.load(path)
    loaded_kb = vm_kb("VmRSS")
    t0 = time.perf_counter()
    sa = ig.build_suffix_array(ids)
    build_s = time.perf_counter() - t0
    peak_kb = vm_kb("VmHWM")
    t0 = time.perf_counter()
    np.save(out, sa)
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    queue.put({"build_s": build_s, "save_hash_s": time.perf_counter() - t0, "peak_kb": peak_kb,
               "stream_kb": loaded_kb, "dtype": str(sa.dtype)})


def measure_build(ids: np.ndarray, folder: Path, name: str) -> dict:
    path, out = folder / f"{name}.ids.npy", folder / f"{name}.sa.npy"
    np.save(path, ids)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=build_child, args=(str(path), str(out), queue))
    proc.start()
    result = queue.get()
    proc.join()
    print(f"build {name:>22s} {len(ids):>12,} tokens: {result['build_s']:7.1f} s "
          f"({result['build_s'] / len(ids) * 1e8:6.0f} s / 100M), save + sha256 {result['save_hash_s']:5.1f} s, "
          f"peak RSS {result['peak_kb'] / 2**20:5.2f} GiB (stream alone {result['stream_kb'] / 2**20:4.2f} GiB), "
          f"{result['dtype']}", flush=True)
    return {**result, "n": len(ids), "sa": out}


def measure_query(sa_path: Path, ids_d: np.ndarray, ids_e: np.ndarray, label: str, max_len: int) -> None:
    sa = np.load(sa_path, mmap_mode="r")
    positions = np.arange(len(ids_e) - 1)
    ig.infgram(sa, ids_d, ids_e, positions[:5000], max_len)  # warm the page cache and the code paths
    t0 = time.perf_counter()
    cols = ig.infgram(sa, ids_d, ids_e, positions, max_len)
    query_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ig.ctx_match_len(sa, ids_d, ids_e, positions, max_len)
    match_s = time.perf_counter() - t0
    bins = np.bincount(ig.ctx_len_bin(cols.ctx_match_len), minlength=len(ig.CTX_BINS)) / len(positions)
    print(f"query {label}: {len(positions):,} positions in {query_s:.1f} s = {len(positions) / query_s:,.0f} "
          f"positions/s (L_t alone: {len(positions) / match_s:,.0f} /s); mean |s| {cols.inf_suffix_len.mean():.2f}, "
          f"p_inf > 0 at {np.mean(cols.p_inf > 0):.1%}; L_t bins "
          + ", ".join(f"{lab} {b:.1%}" for lab, b in zip(ig.CTX_BIN_LABELS, bins, strict=True)), flush=True)


def measure_overlap(ids_d: np.ndarray, ids_e: np.ndarray, per_position: int) -> None:
    """neighbour_overlap for `per_position` neighbours of every position, drawn among the entries whose
    last context token is the query's (as most kNN-LM neighbours' are; random entries when none is)."""
    rng = np.random.default_rng(0)
    n_pos = len(ids_e) - 1
    order = np.argsort(ids_d[:-1], kind="stable")  # entries grouped by their last context token
    lo = np.searchsorted(ids_d[:-1][order], ids_e[:-1])
    hi = np.searchsorted(ids_d[:-1][order], ids_e[:-1], side="right")
    pick = lo[:, None] + (rng.random((n_pos, per_position)) * np.maximum(hi - lo, 1)[:, None]).astype(np.int64)
    entry_ids = np.where((hi > lo)[:, None], order[np.minimum(pick, len(order) - 1)],
                         rng.integers(0, len(ids_d) - 1, (n_pos, per_position)))
    t0 = time.perf_counter()
    overlap = ig.neighbour_overlap(ids_d, ids_e, np.arange(n_pos), entry_ids)
    dt = time.perf_counter() - t0
    print(f"overlap: {overlap.size:,} (position, neighbour) pairs in {dt:.1f} s = {overlap.size / dt / 1e6:.2f}M "
          f"pairs/s; copy neighbours (overlap >= {ig.COPY_MIN_OVERLAP}) {np.mean(overlap >= ig.COPY_MIN_OVERLAP):.1%}",
          flush=True)


def wikitext(args) -> tuple[np.ndarray, np.ndarray]:
    from knnlm_core.config import resolve_path
    from knnlm_core.corpus import load_tokenizer, tokenize_file

    tok = load_tokenizer(str(resolve_path(args.tokenizer)))
    ids_d = np.load(args.datastore_ids) if args.datastore_ids else tokenize_file(resolve_path(args.train_corpus), tok)
    return np.asarray(ids_d, dtype=np.int32), tokenize_file(resolve_path(args.test_corpus), tok)


def main(argv=None) -> None:
    args = parse_args(argv)
    ids_d, ids_e = wikitext(args)
    print(f"WikiText-2: datastore stream {len(ids_d):,} tokens, test stream {len(ids_e):,} tokens; "
          f"{os.cpu_count()} CPUs, max_len {args.max_len}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wt2 = measure_build(ids_d, folder, "wikitext-2 train")
        built = [measure_build(synthetic_stream(n, seed=n), folder, f"synthetic {n // 1_000_000}M") for n in
                 sorted(args.synthetic)]
        measure_query(wt2["sa"], ids_d, ids_e, "WikiText-2 test vs train", args.max_len)
        measure_overlap(ids_d, ids_e, 64)
        if built:
            big = built[-1]
            measure_query(big["sa"], np.load(folder / f"synthetic {big['n'] // 1_000_000}M.ids.npy"),
                          synthetic_stream(len(ids_e), seed=7), f"synthetic eval vs synthetic {big['n']:,}",
                          args.max_len)
            if big["n"] >= PROJECT_TO:
                return  # measured above, nothing to project
            scale = PROJECT_TO / big["n"]
            print(f"PROJECTION (linear from the {big['n']:,}-token synthetic build, not measured) to "
                  f"{PROJECT_TO:,} tokens: build {big['build_s'] * scale / 60:.1f} min, save + sha256 "
                  f"{big['save_hash_s'] * scale:.0f} s, peak RSS {big['peak_kb'] * scale / 2**20:.1f} GiB, "
                  f"suffix array {PROJECT_TO * (4 if big['dtype'] == 'int32' else 8) / 2**30:.2f} GiB on disk")


if __name__ == "__main__":
    main()
