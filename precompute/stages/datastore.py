"""Stage: datastore keys and values (SPEC §1, §7), one key shard per group of windows.

Each shard is a range of consecutive windows whose keys go to `keys/shard_NNNNN.npy`
(float16, written under a temporary name and renamed); `keys/shards.json` is written when
every shard exists, then `values.npy` (value of entry i = datastore token i + 1).
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from knnlm_core.keystore import SHARD_DIR, SHARD_LIST, shard_name
from knnlm_core.windows import plan_windows
from precompute.extract import extract, owned_rows, shard_windows
from precompute.runner import Run, Shards, load_npy, save_json, save_npy


def stage_datastore(run: Run, key: str) -> dict:
    ids = np.asarray(load_npy(run.path("datastore_ids.npy")))
    n, d = len(ids) - 1, run.info["dim"]
    groups = shard_windows(plan_windows(len(ids), run.info["max_context"], run.info["stride"]), run.cfg.shard_size)
    if run.path("keys.npy").exists():  # an older single-file layout would shadow nothing but confuse readers
        os.remove(run.path("keys.npy"))
    shards = Shards(run.path(SHARD_DIR), key, suffix=".npy", stage="datastore")
    rows = [hi - lo for lo, hi in map(owned_rows, groups)]
    done = sum(r for i, r in enumerate(rows) if shards.done(i))
    with tqdm(total=n, initial=done, desc="datastore keys", unit="key", dynamic_ncols=True) as bar:
        for i in shards.todo(len(groups)):
            tmp = shards.path(i).with_name(shards.path(i).name + ".tmp.npy")
            keys = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows[i], d))  # (n_i, d)
            extract(run.lm, ids, groups[i], keys, run.cfg.batch_size, progress=bar.update)
            keys.flush()
            del keys
            os.replace(tmp, shards.path(i))
            shards.after_save()
    save_json(run.path(SHARD_DIR) / SHARD_LIST,
              {"n": n, "d": d, "shards": [{"file": shard_name(i), "rows": r} for i, r in enumerate(rows)]})
    save_npy(run.path("values.npy"), ids[1:].astype(np.int32))
    return {"n_entries": n, "key_shards": len(groups), "hook_point": run.lm.hook_point}
