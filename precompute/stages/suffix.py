"""Stage: the datastore stream's suffix array and the SPEC §12 columns of every position.

1. The suffix array of `datastore_ids.npy` (knnlm_core.infgram.build_suffix_array), built once per
   datastore stream: `suffix_array.npy`, then its sidecar `suffix_array.json` (len(D), sha256 of D,
   sha256 of the array file). The sidecar goes first when a build starts and is written last when
   it ends, both atomically, so an array without a sidecar matching D is an unfinished or stale
   build (rebuilt), and an array whose sidecar matches D but whose bytes do not is damaged: refused,
   naming the file and the fix, as nothing in this stage can tell what else was damaged with it.
2. Per evaluation position (and validation position when the run has a validation corpus, for
   λ_∞): ctx_match_len, p_inf, inf_suffix_len, inf_count, in shards of `shard_size` positions
   (a killed stage resumes at its first unfinished shard), then `infgram.npz` (validation arrays
   prefixed `valid_`).
"""

from __future__ import annotations

import hashlib
import json
import time
from importlib.metadata import version

import numpy as np
from tqdm import tqdm

from knnlm_core.corpus import file_sha256
from knnlm_core.infgram import MAX_LEN, build_suffix_array, infgram
from precompute.runner import (
    Run,
    RunError,
    load_npy,
    npy_problem,
    save_json,
    save_npy,
    save_npz,
    shard_ranges,
    stage_shards,
)

SA_FILE = "suffix_array.npy"
SA_META = "suffix_array.json"
OUT_FILE = "infgram.npz"
SHARD_FOLDER = "infgram.shards"
OUTPUTS = [SA_FILE, SA_META, OUT_FILE]  # the stage's outputs for run_stage
COLUMNS = ("ctx_match_len", "p_inf", "inf_suffix_len", "inf_count")  # SPEC §12 eval_tokens columns


def stream_facts(ids_d: np.ndarray) -> dict:
    """What identifies a datastore stream: its length and the sha256 of its dtype and bytes."""
    digest = hashlib.sha256(str(ids_d.dtype).encode())
    digest.update(np.ascontiguousarray(ids_d).data)
    return {"n_tokens": int(len(ids_d)), "stream_sha256": digest.hexdigest()}


def read_meta(run: Run) -> dict | None:
    """The sidecar, or None when it is absent or unreadable (an unfinished build)."""
    try:
        return json.loads(run.path(SA_META).read_text())
    except (OSError, ValueError):
        return None


def array_problem(run: Run, meta: dict) -> str | None:
    """Why suffix_array.npy cannot be trusted although its sidecar matches the stream, or None."""
    path = run.path(SA_FILE)
    try:
        if problem := npy_problem(path):
            return problem
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        return f"unreadable ({type(err).__name__})"
    if arr.shape != (meta["n_tokens"],) or arr.dtype.kind != "i":
        return f"of shape {arr.shape} / {arr.dtype}, not ({meta['n_tokens']},) integers"
    if file_sha256(path) != meta.get("array_sha256"):
        return "corrupt (its sha256 differs from the one recorded in suffix_array.json)"
    return None


def open_suffix_array(run: Run, ids_d: np.ndarray) -> np.ndarray:
    """The run's suffix array of `ids_d`, memory-mapped, after checking it is whole; RunError naming the fix."""
    meta = read_meta(run)
    if meta is None or {k: meta.get(k) for k in ("n_tokens", "stream_sha256")} != stream_facts(ids_d):
        raise RunError(f"{run.run_dir} has no suffix array of its datastore stream: rerun to build it")
    if not run.path(SA_FILE).exists():
        raise RunError(f"{SA_FILE} in {run.run_dir} is missing: rerun to rebuild it")
    if problem := array_problem(run, meta):
        raise RunError(f"{SA_FILE} in {run.run_dir} is {problem}: delete {SA_FILE} and rerun")
    return np.load(run.path(SA_FILE), mmap_mode="r")


def ensure_suffix_array(run: Run, ids_d: np.ndarray) -> np.ndarray:
    """The suffix array of `ids_d`: the finished one on disk if its sidecar matches, else built now."""
    facts = stream_facts(ids_d)
    meta = read_meta(run)
    if meta is not None and {k: meta.get(k) for k in facts} == facts and run.path(SA_FILE).exists():
        return open_suffix_array(run, ids_d)
    run.path(SA_META).unlink(missing_ok=True)  # from here on, no array on disk counts as finished
    for leftover in run.run_dir.glob(f"{SA_FILE}.tmp*"):  # what a killed build's np.save left
        leftover.unlink(missing_ok=True)
    tqdm.write(f"[suffix] building the suffix array of {len(ids_d):,} datastore tokens")
    t0 = time.time()
    sa = build_suffix_array(np.asarray(ids_d))
    save_npy(run.path(SA_FILE), sa)
    del sa
    save_json(run.path(SA_META), {**facts, "array_sha256": file_sha256(run.path(SA_FILE)),
                                  "library": f"pydivsufsort {version('pydivsufsort')}",
                                  "build_seconds": round(time.time() - t0, 2)})
    return np.load(run.path(SA_FILE), mmap_mode="r")


def query_streams(run: Run) -> dict[str, np.ndarray]:
    """Prefix -> token stream whose positions get the columns: "" evaluation, "valid_" validation."""
    out = {"": np.asarray(load_npy(run.path("eval_ids.npy")))}
    if run.cfg.valid_corpus:
        out["valid_"] = np.asarray(load_npy(run.path("valid_ids.npy")))
    return out


def stage_suffix(run: Run, key: str, max_len: int = MAX_LEN) -> dict:
    # ---- validate
    ids_d = np.asarray(load_npy(run.path("datastore_ids.npy")))
    if len(ids_d) < 2:
        raise RunError(f"datastore_ids.npy in {run.run_dir} has fewer than 2 tokens: rerun with --overwrite")
    streams = query_streams(run)
    jobs = [(prefix, lo, hi) for prefix, ids in streams.items() for lo, hi in shard_ranges(len(ids) - 1,
                                                                                           run.cfg.shard_size)]
    # ---- compute
    sa = ensure_suffix_array(run, ids_d)
    shards = stage_shards(run, "suffix", key, SHARD_FOLDER)
    todo = list(shards.todo(len(jobs)))
    with tqdm(total=sum(jobs[i][2] - jobs[i][1] for i in todo), desc="∞-gram", unit="pos",
              dynamic_ncols=True) as bar:
        for i in todo:
            prefix, lo, hi = jobs[i]
            cols = infgram(sa, ids_d, streams[prefix], np.arange(lo, hi), max_len, progress=bar.update)
            shards.save(i, **{c: getattr(cols, c) for c in COLUMNS})
    # ---- persist
    parts = [(jobs[i][0], shards.load(i)) for i in range(len(jobs))]
    save_npz(run.path(OUT_FILE), **{prefix + c: np.concatenate([p[c] for pre, p in parts if pre == prefix])
                                    for prefix in streams for c in COLUMNS})
    shards.remove()
    run.memo.pop(("shards", SHARD_FOLDER, key), None)
    return {"infgram_max_len": max_len}
