"""Stage: the whitened indexes of SPEC §9 (config `whiten`), built before the search.

Per kind (zipfian, entries): the whitening fitted on the datastore keys (`knnlm_core.whiten`,
streamed, float64), saved as `whiten_<kind>.npz`; an index of the run's factory trained and
filled on the whitened keys (the same keys: no second forward pass) as `index_<kind>.faiss`.
The search stage then searches it once per query split, like the plain index. A kind whose
files were built from the same keys and settings (`index_<kind>.json`) is reused: changing τ,
λ or the validation text never rebuilds an index.
"""

from __future__ import annotations

import json
import time

from knnlm_core import whiten
from precompute.runner import Run, digest, read_index, save_json, stage_shards, write_index
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
    keys, values = run.keys(), run.values()
    t0 = time.time()
    transform = whiten.fit(kind, keys, values, cfg.whiten_eps)
    fit_s = time.time() - t0
    transform.save(files[0])
    shards = stage_shards(run, "whiten", f"{built}-{kind}", f"index_{kind}.shards")
    t0 = time.time()
    index, _, _ = build_index(whiten.WhitenedKeys(keys, transform), cfg.index_factory, cfg.train_size, cfg.seed,
                              cfg.shard_size, shards)
    write_index(index, files[1])
    shards.remove()
    record = {"key": built, "eps": transform.eps, "fit_seconds": round(fit_s, 2),
              "build_seconds": round(time.time() - t0, 2)}
    save_json(files[2], record)
    return record


def stage_whiten(run: Run, key: str) -> dict:
    return {"whiten": {kind: build_kind(run, kind) for kind in run.cfg.whiten_kinds}}


def whiten_outputs(kinds) -> list[str]:
    return [f for kind in kinds for f in kind_files(kind)]
