"""Stage: train the index once, encode every key once, add the codes (SPEC §2, §5 PQ error).

Map (`encode_shard`): each shard of keys is encoded once; the same codes are decoded for
the per-entry PQ error ||k_i - k̂_i||² and stored with it. On a GPU (the run's device is
"cuda") an IVFPQ index's codes are computed in torch (`precompute.encode`: faiss's codes
except float near-ties) on the GPU workers; otherwise faiss's `sa_encode` / `sa_decode`
(`knnlm_core.index.encode_with_error`). The stage records which (`index_encoder`). Reduce: the
codes go into the trained index with `add_sa_codes` (bit-identical to `index.add`), so no
key is encoded twice. The trained, empty index is kept in the shard folder, so a resumed
run does not retrain, and Ray workers read it from there.
"""

from __future__ import annotations

import time
from dataclasses import replace

import faiss
import numpy as np
from tqdm import tqdm

from knnlm_core.config import RunConfig
from knnlm_core.index import add_codes, encode_with_error, ivfpq_codec, train_index
from precompute.executor import LocalExecutor, Progress, ShardJob, executor_of
from precompute.runner import Run, Shards, read_index, save_npz, shard_ranges, stage_shards, write_index

TRAINED = "trained.faiss"  # the trained, empty index inside the stage's shard folder
TORCH_ENCODER_DEVICES = ("cuda",)  # devices whose workers encode IVFPQ codes in torch (tests add "cpu")


def stage_index(run: Run, key: str) -> dict:
    cfg = run.cfg
    if cfg.import_datastore and run.info["imported"]["index_used"]:  # the imported datastore's own index
        from precompute.stages.imported import import_index

        return import_index(run, key)
    run.memo[("keys",)] = keys = run.keys()
    shards = stage_shards(run, "index", key, "index.shards")
    index, entry_err, train_s = build_index(keys, cfg.index_factory, cfg.train_size, cfg.seed, cfg.shard_size, shards,
                                            run)
    write_index(index, run.path("index.faiss"))
    save_npz(run.path("pq.npz"), entry_pq_error=entry_err)
    shards.remove()
    run.memo.clear()
    return {"index_train_seconds": round(train_s, 2), "index_ntotal": int(index.ntotal),
            "faiss_version": faiss.__version__, "index_encoder": encoder_name(index, run.info.get("device", "cpu"))}


def encoder_name(index: faiss.Index, device: str) -> str:
    """Who encodes the shards: "torch-<device>" for an IVFPQ index on a torch device, else "faiss"."""
    return f"torch-{device}" if device in TORCH_ENCODER_DEVICES and ivfpq_codec(index) is not None else "faiss"


def shard_encoder(index: faiss.Index, device: str):
    """`encode_with_error(block) -> (codes, PQ error)` of the trained index for this worker's device."""
    if encoder_name(index, device) == "faiss":
        return lambda block: encode_with_error(index, block)
    from precompute.encode import TorchIVFPQEncoder

    return TorchIVFPQEncoder(ivfpq_codec(index), device).encode_with_error


def encode_load(run: Run, job: ShardJob, i: int) -> np.ndarray:
    """Shard i's keys as float32 (n_i, d): read (and converted) while the previous shard encodes."""
    keys = run.cached(("keys",), run.keys)
    lo, hi = shard_ranges(len(keys), run.cfg.shard_size)[i]
    return np.ascontiguousarray(keys[lo:hi], dtype=np.float32)


def encode_shard(run: Run, job: ShardJob, i: int, progress: Progress, block: np.ndarray) -> int:
    """Encode shard i's keys with the trained index; save codes + per-entry PQ error (atomic)."""
    shards = stage_shards(run, job.stage, job.key, job.folder)
    if not shards.done(i):  # a retried task whose first attempt had finished counts once
        index = run.cached(("trained", job.key), lambda: read_index(shards.folder / TRAINED))
        device = run.info.get("device", "cpu")
        encode = run.cached(("encoder", job.key, device), lambda: shard_encoder(index, device))
        codes, err = encode(block)
        shards.save(i, codes=codes, pq_error=err)
    if progress:
        progress(len(block))
    return len(block)


def build_index(keys, factory: str, train_size: int, seed: int, shard_size: int, shards: Shards,
                run: Run | None = None, device: str = "cpu") -> tuple[faiss.Index, np.ndarray, float]:
    """(filled index, per-entry PQ error (N,) float64, training seconds): train, encode shards, add codes.

    The encode map runs on `run`'s executor (on its device); without a run (bench/index.py) on
    a local one over a bare run on `device` that knows only these keys and this shard folder.
    """
    if run is None:
        run = Run(cfg=replace(RunConfig(), shard_size=shard_size), run_dir=shards.folder.parent, run_name="index",
                  info={"device": device})
        run.memo[("keys",)] = keys
        run.memo[("shards", shards.folder.name, shards.key)] = shards
        run.executor = LocalExecutor()
    trained = shards.folder / TRAINED
    t0 = time.time()
    if trained.exists():
        index = read_index(trained)
    else:
        tqdm.write(f"[index] training {factory} on {min(train_size or len(keys), len(keys)):,} keys")
        index = train_index(keys, factory, train_size, seed)
        write_index(index, trained)
    train_s = time.time() - t0
    run.memo[("trained", shards.key)] = index  # in-process shards encode with it; Ray workers read trained.faiss
    ranges = shard_ranges(len(keys), shard_size)
    todo = list(shards.todo(len(ranges)))
    on_gpu = encoder_name(index, run.info.get("device", "cpu")) == "torch-cuda"  # Ray: the GPU actors encode
    job = ShardJob("index", shards.key, encode_shard, encode_load, kind="gpu" if on_gpu else "cpu",
                   folder=shards.folder.name)
    with tqdm(total=len(keys), initial=len(keys) - sum(ranges[i][1] - ranges[i][0] for i in todo),
              desc="index encode", unit="key", dynamic_ncols=True) as bar:
        executor_of(run).map(run, job, todo, bar.update)
    entry_err = np.empty(len(keys))
    for i, (lo, hi) in enumerate(ranges):
        part = shards.load(i)
        add_codes(index, part["codes"], lo)
        entry_err[lo:hi] = part["pq_error"]
    return index, entry_err, train_s
