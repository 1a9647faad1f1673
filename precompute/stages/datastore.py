"""Stage: datastore keys and values (SPEC §1, §7), one key shard per group of windows.

Each shard is a range of whole batches of windows whose keys go to `keys/shard_NNNNN.npy`
(float16, written under a temporary name and renamed); `keys/shards.json` is written when
every shard exists, then `values.npy` (value of entry i = datastore token i + 1). A key is
bit-identical whatever the shard size, thread count or resume (precompute.extract).
`datastore_shard` is the map: the executor runs it here or on Ray actors, which write
their shards straight to the run directory (keys never travel through Ray's object store).
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from knnlm_core.keystore import SHARD_DIR, SHARD_LIST, shard_name
from knnlm_core.windows import Window, plan_windows
from precompute.executor import Progress, ShardJob, executor_of
from precompute.extract import extract, heap_allocations, owned_rows, shard_key, shard_windows
from precompute.runner import Run, load_npy, remove_tmp_files, save_json, save_npy, stage_shards, tmp_name


def window_groups(run: Run, name: str) -> tuple[np.ndarray, list[list[Window]]]:
    """(token ids of corpus file `name`, its windows grouped into shards of whole batches), once per process."""
    def make():
        ids = np.asarray(load_npy(run.path(name)))
        return ids, shard_windows(plan_windows(len(ids), run.info["max_context"], run.info["stride"]),
                                  run.cfg.shard_size, run.cfg.batch_size)
    return run.cached(("windows", name), make)


def write_keys(run: Run, ids: np.ndarray, windows: list[Window], path, progress: Progress = None) -> int:
    """Keys of the positions `windows` own into a new .npy file at `path` (float16, (n, d)), the forward
    passes on reused heap memory (`heap_allocations`); returns n."""
    lo, hi = owned_rows(windows)
    keys = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(hi - lo, run.info["dim"]))  # (n, d)
    with heap_allocations():
        extract(run.lm, ids, windows, keys, run.cfg.batch_size, progress=progress, threads=run.cfg.threads)
    keys.flush()
    del keys
    return hi - lo


def datastore_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Extract the keys of shard i's windows into keys/shard_i.npy (atomic); returns its row count."""
    ids, groups = window_groups(run, "datastore_ids.npy")
    shards = stage_shards(run, "datastore", job.key, SHARD_DIR, ".npy")
    lo, hi = owned_rows(groups[i])
    if shards.done(i):  # a retried task whose first attempt had finished: the shard counts once
        return hi - lo
    tmp = tmp_name(shards.path(i), ".npy")
    write_keys(run, ids, groups[i], tmp, progress)
    os.replace(tmp, shards.path(i))
    shards.after_save()
    return hi - lo


def stage_datastore(run: Run, key: str) -> dict:
    if run.cfg.import_datastore:  # a knn-transformers datastore, checked during validation, takes the place of extraction
        from precompute.stages.imported import import_body

        return import_body(run, key)
    ids, groups = window_groups(run, "datastore_ids.npy")
    n, d = len(ids) - 1, run.info["dim"]
    if run.path("keys.npy").exists():  # an older single-file layout would shadow nothing but confuse readers
        os.remove(run.path("keys.npy"))
    shards = stage_shards(run, "datastore", shard_key(key), SHARD_DIR, ".npy")
    rows = [hi - lo for lo, hi in map(owned_rows, groups)]
    done = sum(r for i, r in enumerate(rows) if shards.done(i))
    executor = executor_of(run)
    with tqdm(total=n, initial=done, desc="datastore keys", unit="key", dynamic_ncols=True) as bar:
        executor.map(run, ShardJob("datastore", shard_key(key), datastore_shard, kind="gpu"),
                     shards.todo(len(groups)), bar.update)
    remove_tmp_files(shards.folder)  # left by attempts that were killed mid-shard
    save_json(run.path(SHARD_DIR) / SHARD_LIST,
              {"n": n, "d": d, "shards": [{"file": shard_name(i), "rows": r} for i, r in enumerate(rows)]})
    save_npy(run.path("values.npy"), ids[1:].astype(np.int32))
    hook_point = executor.hook_point(run)
    run.memo.clear()
    return {"n_entries": n, "key_shards": len(groups), "hook_point": hook_point}
