"""Stage: train the index once, encode every key once, add the codes (SPEC §2, §5 PQ error).

Map: each shard of keys is `sa_encode`d once; the same codes are `sa_decode`d for the
per-entry PQ error ||k_i - k̂_i||² and stored with it. Reduce: the codes go into the trained
index with `add_sa_codes` (bit-identical to `index.add`), so no key is encoded twice.
The trained, empty index is kept in the shard folder, so a resumed run does not retrain.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
from tqdm import tqdm

from knnlm_core.index import add_codes, encode_with_error, train_index
from precompute.runner import Run, Shards, read_index, save_npz, shard_ranges, write_index


def stage_index(run: Run, key: str) -> dict:
    cfg = run.cfg
    keys = run.keys()
    shards = Shards(run.path("index.shards"), key, stage="index")
    index, entry_err, train_s = build_index(keys, cfg.index_factory, cfg.train_size, cfg.seed, cfg.shard_size, shards)
    write_index(index, run.path("index.faiss"))
    save_npz(run.path("pq.npz"), entry_pq_error=entry_err)
    shards.remove()
    return {"index_train_seconds": round(train_s, 2), "index_ntotal": int(index.ntotal),
            "faiss_version": faiss.__version__}


def build_index(keys, factory: str, train_size: int, seed: int, shard_size: int,
                shards: Shards) -> tuple[faiss.Index, np.ndarray, float]:
    """(filled index, per-entry PQ error (N,) float64, training seconds): train, encode shards, add codes."""
    trained = shards.folder / "trained.faiss"
    t0 = time.time()
    if trained.exists():
        index = read_index(trained)
    else:
        tqdm.write(f"[index] training {factory} on {min(train_size or len(keys), len(keys)):,} keys")
        index = train_index(keys, factory, train_size, seed)
        write_index(index, trained)
    train_s = time.time() - t0
    ranges = shard_ranges(len(keys), shard_size)
    todo = list(shards.todo(len(ranges)))
    with tqdm(total=len(keys), initial=len(keys) - sum(ranges[i][1] - ranges[i][0] for i in todo),
              desc="index encode", unit="key", dynamic_ncols=True) as bar, ThreadPoolExecutor(1) as pool:
        # fp16 -> fp32 conversion of the next shard overlaps faiss's encoding of this one
        load = lambda i: np.ascontiguousarray(keys[ranges[i][0] : ranges[i][1]], dtype=np.float32)  # noqa: E731
        nxt = pool.submit(load, todo[0]) if todo else None
        for j, i in enumerate(todo):
            block = nxt.result()
            nxt = pool.submit(load, todo[j + 1]) if j + 1 < len(todo) else None
            codes, err = encode_with_error(index, block)
            shards.save(i, codes=codes, pq_error=err)
            bar.update(len(block))
    entry_err = np.empty(len(keys))
    for i, (lo, hi) in enumerate(ranges):
        part = shards.load(i)
        add_codes(index, part["codes"], lo)
        entry_err[lo:hi] = part["pq_error"]
    return index, entry_err, train_s
