"""Stage: search every query split on every index once, into neighbour blocks (SPEC §2, §4, §7).

Blocks: (eval, plain) always; with a validation corpus also (valid, plain), and (eval, kind),
(valid, kind) for each whitening kind. Map (`search_shard`) over shards of each block's
queries, on the run's executor (on Ray workers the index is memory-mapped): the index's k
neighbours with PQ and exact distances (`precompute.search.search_rows`) are written as the
block's shard i; for (eval, plain) the per-position kNN results of those rows
(`position_metrics`, and the query's PQ error) are saved beside it. Reduce: the block
listings and `search.npz`. No later stage searches an index again.
"""

from __future__ import annotations

import sys

import numpy as np
from tqdm import tqdm

from knnlm_core import neighbours, whiten
from knnlm_core.index import reconstruction_error, set_nprobe
from precompute import runner
from precompute.executor import Progress, ShardJob, executor_of
from precompute.runner import Run, artifact_problem, concat_shards, save_npz, shard_ranges, stage_shards
from precompute.search import open_index, position_metrics, resident_keys, search_rows
from precompute.stages import search_blocks

METRICS = "search.shards"
TORCH_SEARCH_DEVICES = ("cuda",)  # devices whose workers run the IVFPQ search on the GPU (tests add "cpu")  # per-position results of (eval, plain), one npz per shard


def blocks(run: Run) -> list[tuple[str, str]]:
    """(split, index) of every block this run searches (`precompute.stages.search_blocks`)."""
    return search_blocks(run.cfg)


def index_inputs(run: Run, index_name: str, mmap: bool) -> dict:
    """The index (nprobe set), the keys in its space (float32 in memory when they fit, whitened once:
    `resident_keys`), the query transform and the values."""
    transform = None
    if index_name == "plain":
        index = open_index(run.path("index.faiss"), run.info["dim"], mmap)
    else:
        transform = whiten.Whitening.load(run.path(f"whiten_{index_name}.npz"))
        index = open_index(run.path(f"index_{index_name}.faiss"), run.info["dim"], mmap)
    set_nprobe(index, run.cfg.nprobe)
    searcher = gpu_searcher(run, index, transform) if run.info["device"] in TORCH_SEARCH_DEVICES else None
    return {"index": index, "keys": resident_keys(run.keys(), transform), "transform": transform,
            "values": run.values(), "searcher": searcher}


def gpu_searcher(run: Run, index, transform):
    """The IVFPQ search on the run's GPU: faiss-gpu where installed (k <= 2048), else the torch search over the
    index's own lists and codes (`precompute.torch_ivfpq`), first checked against faiss on the CPU on 256
    evaluation queries (a RunError naming the difference otherwise); None (faiss on the CPU) for an index
    the torch search does not cover."""
    import faiss

    from precompute.torch_ivfpq import TorchIVFPQ, TorchIVFPQError, check_against_faiss, faiss_gpu_search, to_faiss_gpu

    device, k, nprobe = run.info["device"], run.cfg.k, run.cfg.nprobe
    if device == "cuda" and faiss.get_num_gpus() > 0 and k <= 2048:
        on_gpu = to_faiss_gpu(index)
        return lambda q, kk: faiss_gpu_search(on_gpu, q, kk)
    try:
        tindex = TorchIVFPQ.from_faiss(index, device)
    except TorchIVFPQError as err:
        print(f"[search] faiss on the CPU: {err}", file=sys.stderr)
        return None
    sample = np.asarray(run.split("eval")[0][:256], dtype=np.float32)
    try:
        check_against_faiss(index, tindex, sample if transform is None else transform.apply(sample), k, nprobe)
    except TorchIVFPQError as err:
        raise runner.RunError(str(err)) from None
    return lambda q, kk: tindex.search(q, kk, nprobe)


def current_index(run: Run, key: str, index_name: str) -> dict:
    """`index_inputs` of this index, held once per process: the previous index's inputs (its resident
    keys: 1.9 GB for WikiText-2) are dropped first, so one index's keys are in memory at a time."""
    name = ("index", key, index_name)
    for other in [m for m in run.memo if isinstance(m, tuple) and m[:1] == ("index",) and m != name]:
        del run.memo[other]
    return run.cached(name, lambda: index_inputs(run, index_name, runner.IN_WORKER))


def parse_folder(folder: str) -> tuple[str, str]:
    """(split, index) of a block's folder (`neighbours/<split>-<index>`)."""
    split, _, index_name = folder.rpartition("/")[2].partition("-")
    return split, index_name


def search_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Search shard i of one block's queries and save the block shard (and, for (eval, plain), its metrics)."""
    cfg = run.cfg
    split, index_name = parse_folder(job.folder)
    with_metrics = "metrics" in job.options  # (eval, plain) unless search.npz of this key is whole
    queries, targets = run.cached(("queries", split), lambda: run.split(split))
    ix = current_index(run, job.key, index_name)
    lo, hi = shard_ranges(len(targets), cfg.shard_size)[i]
    tag = stage_shards(run, "search", job.key, job.folder, suffix=".json")
    metrics = stage_shards(run, "search", job.key, METRICS) if with_metrics else None
    if neighbours.shard_done(tag.folder, i, lo, hi, cfg.k) and (metrics is None or metrics.done(i)):
        return hi - lo  # a retried task whose first attempt had finished counts once
    block = search_rows(ix["index"], ix["keys"], ix["values"], queries, lo, hi, cfg.k, cfg.search_batch,
                        ix["transform"], progress, ix["searcher"])
    neighbours.write_shard(tag.folder, i, lo, **block)
    if metrics is not None:
        q = np.asarray(queries[lo:hi], dtype=np.float32)
        metrics.save(i, **position_metrics(block, targets[lo:hi], cfg.temperature, cfg.distance_source),
                      query_pq_error=reconstruction_error(ix["index"], q))
    else:
        tag.after_save()  # fault hooks count a finished shard
    return hi - lo


def search_kind(run: Run) -> str:
    """The pool the search map runs on: the GPU workers when the run computes on cuda (the IVFPQ search,
    `gpu_searcher`), else CPU workers."""
    return "gpu" if run.info["device"] == "cuda" else "cpu"


def stage_search(run: Run, key: str) -> dict:
    cfg = run.cfg
    # Rebuilding under the same key (a damaged block shard): search.npz of this key is whole and kept.
    keep_metrics = run.stages.get("search", {}).get("key") == key and artifact_problem(run.path("search.npz")) is None
    todo_total, jobs = 0, []
    for split, index_name in blocks(run):
        folder = f"{neighbours.ROOT}/{split}-{index_name}"
        n = len(run.split(split)[1])
        ranges = shard_ranges(n, cfg.shard_size)
        tag = stage_shards(run, "search", key, folder, suffix=".json")
        with_metrics = (split, index_name) == ("eval", "plain") and not keep_metrics
        metrics = stage_shards(run, "search", key, METRICS) if with_metrics else None
        todo = [j for j, (lo, hi) in enumerate(ranges) if not neighbours.shard_done(tag.folder, j, lo, hi, cfg.k)
                or (metrics is not None and not metrics.done(j))]
        todo_total += sum(ranges[j][1] - ranges[j][0] for j in todo)
        job = ShardJob("search", key, search_shard, folder=folder, kind=search_kind(run),
                       options=frozenset({"metrics"}) if with_metrics else frozenset())
        jobs.append((job, todo, ranges, tag.folder))
    with tqdm(total=todo_total, desc="search", unit="query", dynamic_ncols=True) as bar:
        for job, todo, _, _ in jobs:
            executor_of(run).map(run, job, todo, bar.update)
    run.memo.clear()
    for _, _, ranges, folder in jobs:
        neighbours.finish(folder, ranges, cfg.k)
    if not keep_metrics:
        metrics = stage_shards(run, "search", key, METRICS)
        save_npz(run.path("search.npz"), **concat_shards(metrics, len(shard_ranges(run.info["n_eval"], cfg.shard_size))))
        metrics.remove()
    return {"index_searches": {f"{s}-{i}": 1 for s, i in blocks(run)}}
