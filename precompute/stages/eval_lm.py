"""Stage: evaluation queries, p_LM(target) and the LM's top predictions (SPEC §1), sharded by windows.

`eval_shard` is the map (run here or on Ray actors holding the model); the reduce
concatenates the shards into queries.npy and eval_lm.npz.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from precompute.executor import Progress, ShardJob, executor_of
from precompute.extract import LMOutputs, extract, owned_rows
from precompute.runner import Run, concat_shards, save_npy, save_npz, stage_shards
from precompute.stages.datastore import window_groups


def eval_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Queries, p_LM and LM top-k of shard i's owned positions into eval_lm.shards/ (atomic)."""
    ids, groups = window_groups(run, "eval_ids.npy")
    shards = stage_shards(run, "eval_lm", job.key, "eval_lm.shards")
    lo, hi = owned_rows(groups[i])
    if shards.done(i):  # a retried task whose first attempt had finished
        return hi - lo
    d, top = run.info["dim"], run.cfg.lm_top
    queries = np.empty((hi - lo, d), dtype=np.float16)  # (n_i, d)
    out = LMOutputs(np.empty(hi - lo), np.empty((hi - lo, top), np.int32), np.empty((hi - lo, top), np.float32))
    extract(run.lm, ids, groups[i], queries, run.cfg.batch_size, out, progress)
    shards.save(i, queries=queries, p_lm=out.p_lm, lm_top_ids=out.top_ids, lm_top_p=out.top_p)
    return hi - lo


def stage_eval_lm(run: Run, key: str) -> dict:
    ids, groups = window_groups(run, "eval_ids.npy")
    t = len(ids) - 1
    shards = stage_shards(run, "eval_lm", key, "eval_lm.shards")
    executor = executor_of(run)
    with tqdm(total=t, desc="eval queries + p_LM", unit="pos", dynamic_ncols=True) as bar:
        executor.map(run, ShardJob("eval_lm", key, eval_shard, kind="model"), shards.todo(len(groups)), bar.update)
    parts = concat_shards(shards, len(groups))
    save_npy(run.path("queries.npy"), parts.pop("queries"))
    save_npz(run.path("eval_lm.npz"), **parts)
    shards.remove()
    hook_point = executor.hook_point(run)
    run.memo.clear()
    return {"n_eval": t, "hook_point": hook_point}
