"""Stage: the whitened indexes of SPEC §9 (config `whiten`), built before the search.

Per kind (zipfian, entries): the whitening fitted on the datastore keys (`knnlm_core.whiten`,
float64) as a map over key shards (partial moments, on the run's executor) reduced on the driver,
saved as `whiten_<kind>.npz`; an index of the run's factory trained and
filled on the whitened keys (the same keys: no second forward pass) as `index_<kind>.faiss`.
The search stage then searches it once per query split, like the plain index. A kind whose
files were built from the same keys and settings (`index_<kind>.json`) is reused: changing τ,
λ or the validation text never rebuilds an index.
"""

from __future__ import annotations

import json
import time

from tqdm import tqdm

from knnlm_core import whiten
from precompute.executor import Progress, ShardJob, executor_of
from precompute.runner import Run, digest, read_index, save_json, shard_ranges, stage_shards, write_index
from precompute.stages.index import build_index


def kind_files(kind: str) -> tuple[str, str, str]:
    """(whitening, index, record) file names of one kind."""
    return f"whiten_{kind}.npz", f"index_{kind}.faiss", f"index_{kind}.json"


def kind_key(run: Run, kind: str) -> str:
    """What a whitened index depends on: the datastore's keys (its stage key), the whitening and the index
    settings."""
    cfg = run.cfg
    return digest({"datastore": run.stages["datastore"]["key"], "kind": kind, "eps": cfg.whiten_eps,
                   "factory": cfg.index_factory, "train_size": cfg.train_size, "seed": cfg.seed,
                   "shard": cfg.shard_size})


def build_kind(run: Run, kind: str) -> dict:
    """Fit one whitening and build its index, unless its record says they are built from the same inputs."""
    cfg = run.cfg
    built = kind_key(run, kind)
    files = [run.path(f) for f in kind_files(kind)]
    if all(f.exists() for f in files) and json.loads(files[2].read_text()).get("key") == built:
        read_index(files[1])  # whole and readable, else the error names it
        return json.loads(files[2].read_text())
    keys = run.keys()
    t0 = time.time()
    transform = fit_on_shards(run, kind, built)
    fit_s = time.time() - t0
    transform.save(files[0])
    shards = stage_shards(run, "whiten", f"{built}-{kind}", f"index_{kind}.shards")
    t0 = time.time()
    index, _, _ = build_index(whiten.WhitenedKeys(keys, transform), cfg.index_factory, cfg.train_size, cfg.seed,
                              cfg.shard_size, shards, device=run.info["device"])  # torch encoding on a GPU
    write_index(index, files[1])
    shards.remove()
    record = {"key": built, "eps": transform.eps, "fit_seconds": round(fit_s, 2),
              "build_seconds": round(time.time() - t0, 2)}
    save_json(files[2], record)
    return record


def fit_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Shard i's partial moments of the whitening named in the job's folder (whiten_<kind>.fit)."""
    kind = job.folder.removeprefix("whiten_").removesuffix(".fit")
    keys = run.cached(("keys",), run.keys)
    values = run.cached(("values",), run.values)
    lo, hi = shard_ranges(len(values), run.cfg.shard_size)[i]
    shards = stage_shards(run, "whiten", job.key, job.folder)
    if not shards.done(i):
        shards.save(i, **whiten.partial_moments(kind, keys[lo:hi], values[lo:hi], run.info["vocab_size"]))
    if progress:
        progress(hi - lo)
    return hi - lo


def fit_on_shards(run: Run, kind: str, built: str) -> whiten.Whitening:
    """The whitening fitted as a map over key shards (partial moments) and a reduce on the driver."""
    folder = f"whiten_{kind}.fit"
    shards = stage_shards(run, "whiten", built, folder)
    n = run.info["n_entries"]
    ranges = shard_ranges(n, run.cfg.shard_size)
    with tqdm(total=n, desc=f"whiten: fit {kind}", unit="key", dynamic_ncols=True) as bar:
        executor_of(run).map(run, ShardJob("whiten", built, fit_shard, folder=folder), shards.todo(len(ranges)),
                             bar.update)
    transform = whiten.merge_partials(kind, [shards.load(i) for i in range(len(ranges))], run.cfg.whiten_eps)
    shards.remove()
    return transform


def stage_whiten(run: Run, key: str) -> dict:
    return {"whiten": {kind: build_kind(run, kind) for kind in run.cfg.whiten_kinds}}

