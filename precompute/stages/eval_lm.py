"""Stage: evaluation queries, p_LM(target) and the LM's top predictions (SPEC §1), sharded by windows."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from knnlm_core.windows import plan_windows
from precompute.extract import LMOutputs, extract, owned_rows, shard_windows
from precompute.runner import Run, Shards, concat_shards, load_npy, save_npy, save_npz


def stage_eval_lm(run: Run, key: str) -> dict:
    ids = np.asarray(load_npy(run.path("eval_ids.npy")))
    t, d, top = len(ids) - 1, run.info["dim"], run.cfg.lm_top
    groups = shard_windows(plan_windows(len(ids), run.info["max_context"], run.info["stride"]), run.cfg.shard_size)
    shards = Shards(run.path("eval_lm.shards"), key, stage="eval_lm")
    with tqdm(total=t, desc="eval queries + p_LM", unit="pos", dynamic_ncols=True) as bar:
        for i in shards.todo(len(groups)):
            lo, hi = owned_rows(groups[i])
            queries = np.empty((hi - lo, d), dtype=np.float16)  # (n_i, d)
            out = LMOutputs(np.empty(hi - lo), np.empty((hi - lo, top), np.int32), np.empty((hi - lo, top), np.float32))
            extract(run.lm, ids, groups[i], queries, run.cfg.batch_size, out, bar.update)
            shards.save(i, queries=queries, p_lm=out.p_lm, lm_top_ids=out.top_ids, lm_top_p=out.top_p)
    parts = concat_shards(shards, len(groups))
    save_npy(run.path("queries.npy"), parts.pop("queries"))
    save_npz(run.path("eval_lm.npz"), **parts)
    shards.remove()
    return {"n_eval": t, "hook_point": run.lm.hook_point}
