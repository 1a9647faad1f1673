"""Stages: queries, p_LM(target), the LM's entropy and top predictions (SPEC §1), sharded by windows.

Two corpora go through the same map: the evaluation text (`eval_lm`) and, for the
mitigations of SPEC §9, the validation text (`valid_lm`) that τ and adaptive λ are fitted
on. `lm_shard` is the map (run here or on Ray actors holding the model); the reduce
concatenates the shards into the stage's queries / LM files.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from knnlm_core.config import resolve_path
from knnlm_core.corpus import tokenize_file
from precompute.executor import Progress, ShardJob, executor_of
from precompute.extract import LMOutputs, extract, heap_allocations, owned_rows, shard_key
from precompute.runner import Run, RunError, concat_shards, save_npy, save_npz, stage_shards
from precompute.stages.datastore import window_groups

# stage -> (token ids file, queries file, LM results file, entropy file)
FILES = {
    "eval_lm": ("eval_ids.npy", "queries.npy", "eval_lm.npz", "eval_entropy.npy"),
    "valid_lm": ("valid_ids.npy", "valid_queries.npy", "valid_lm.npz", "valid_entropy.npy"),
}


def lm_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Queries, p_LM, entropy and LM top-k of shard i's owned positions into <stage>.shards/ (atomic)."""
    ids, groups = window_groups(run, FILES[job.stage][0])
    shards = stage_shards(run, job.stage, job.key, f"{job.stage}.shards")
    lo, hi = owned_rows(groups[i])
    if shards.done(i):  # a retried task whose first attempt had finished
        return hi - lo
    n, d, top = hi - lo, run.info["dim"], run.cfg.lm_top
    queries = np.empty((n, d), dtype=np.float16)  # (n_i, d)
    out = LMOutputs(np.empty(n), np.empty((n, top), np.int32), np.empty((n, top), np.float32), np.empty(n, np.float32))
    with heap_allocations():
        extract(run.lm, ids, groups[i], queries, run.cfg.batch_size, out, progress, run.cfg.threads)
    shards.save(i, queries=queries, p_lm=out.p_lm, lm_top_ids=out.top_ids, lm_top_p=out.top_p, entropy=out.entropy)
    return hi - lo


eval_shard = lm_shard  # the name the executors' tests know


def stage_lm(run: Run, key: str, stage: str = "eval_lm") -> dict:
    ids_file, queries_file, lm_file, entropy_file = FILES[stage]
    ids, groups = window_groups(run, ids_file)
    t = len(ids) - 1
    shards = stage_shards(run, stage, shard_key(key), f"{stage}.shards")
    executor = executor_of(run)
    desc = "eval queries + p_LM" if stage == "eval_lm" else "validation queries + p_LM"
    with tqdm(total=t, desc=desc, unit="pos", dynamic_ncols=True) as bar:
        executor.map(run, ShardJob(stage, shard_key(key), lm_shard, kind="gpu"), shards.todo(len(groups)),
                     bar.update)
    parts = concat_shards(shards, len(groups))
    save_npy(run.path(queries_file), parts.pop("queries"))
    save_npy(run.path(entropy_file), parts.pop("entropy"))
    save_npz(run.path(lm_file), **parts)
    shards.remove()
    hook_point = executor.hook_point(run)
    run.memo.clear()
    return {"n_eval": t, "hook_point": hook_point} if stage == "eval_lm" else {"n_valid": t}


def stage_eval_lm(run: Run, key: str) -> dict:
    return stage_lm(run, key, "eval_lm")


def stage_valid_lm(run: Run, key: str) -> dict:
    return stage_lm(run, key, "valid_lm")


def stage_valid_text(run: Run, key: str) -> dict:
    """The validation text tokenized (`valid_ids.npy`), then run through the model like the evaluation text."""
    cfg = run.cfg
    ids = tokenize_file(resolve_path(cfg.valid_corpus), run.tokenizer, cfg.valid_limit_tokens or None)
    if len(ids) < 2:
        raise RunError(f"valid_corpus {cfg.valid_corpus} has fewer than 2 tokens (choose a longer validation text)")
    save_npy(run.path("valid_ids.npy"), ids)
    run.memo.clear()
    return stage_valid_lm(run, key)
