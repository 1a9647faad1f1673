"""Executors: who runs a stage's per-shard work (the map of a map + reduce stage).

A stage describes its map as a `ShardJob`: a top-level function `fn(run, job, i, progress,
data)` that computes shard i and writes it atomically to the run directory, plus an
optional `load(run, job, i)` whose result is passed as `data`. The functions are top-level
so that Ray can send them to workers by reference; they return only the number of units
done (keys, positions, queries or shards) for the progress bar, never the data.

`LocalExecutor` (the default) runs them in a plain loop in this process, prefetching the
next shard's `load` in one thread; it never imports Ray. `precompute.ray_executor.RayExecutor`
runs the same functions on Ray actors. Neither choice enters a stage key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from precompute.runner import Run, RunError, resolve_device

EXECUTORS = ("local", "ray")
RAY_MISSING = "ray is not installed: pip install -r requirements-ray.txt"

Progress = Callable[[int], Any] | None


@dataclass(frozen=True)
class ShardJob:
    """One stage's map: which function computes shard i, under which stage key, on which workers."""

    stage: str  # stage name: fault hooks, messages
    key: str  # the stage key: every worker opens the stage's shard folder under it
    fn: Callable[[Run, ShardJob, int, Progress, Any], int]  # computes + saves shard i; returns units done
    load: Callable[[Run, ShardJob, int], Any] | None = None  # reads shard i's input (prefetched locally)
    kind: str = "cpu"  # "gpu": the GPU pool (one actor per GPU: the LM, torch encoding, exact search); "cpu": CPU work
    folder: str = ""  # the shard folder, relative to the run directory
    options: frozenset[str] = frozenset()  # the stage's switches for its shard function (search: "metrics")


class LocalExecutor:
    """Every shard in this process, in order; the next shard's input is read while this one computes."""

    name = "local"
    in_process = True  # shard functions see the driver's memory (no files needed to share μ, indexes)

    def resolve_device(self, requested: str) -> str:
        return resolve_device(requested)

    def map(self, run: Run, job: ShardJob, todo: Iterable[int], progress: Progress = None) -> None:
        todo = list(todo)
        if job.load is None:
            for i in todo:
                job.fn(run, job, i, progress, None)
            return
        with ThreadPoolExecutor(1) as pool:
            nxt = pool.submit(job.load, run, job, todo[0]) if todo else None
            for j, i in enumerate(todo):
                data = nxt.result()
                nxt = pool.submit(job.load, run, job, todo[j + 1]) if j + 1 < len(todo) else None
                job.fn(run, job, i, progress, data)

    def hook_point(self, run: Run) -> str:
        return run.lm.hook_point

    def close(self) -> None:
        pass


def pool_shape(node_cpus: list[float], threads: int) -> tuple[int, int]:
    """(CPU actors, CPUs reserved by each): about `threads` CPUs per actor, one CPU per node left free.

    The free CPU is for the driver and Ray's own processes: a pool that reserves every CPU
    starves them. Each actor still runs `threads` threads (on 2 cores: 1 actor, 1 CPU
    reserved, 2 threads).
    """
    nodes = [c for c in node_cpus if c >= 1]
    if not nodes:
        raise RunError("the Ray cluster has no CPU (start its nodes with --num-cpus >= 1)")
    each = max(1, min(threads, int(min(nodes)) - 1))
    return sum(max(1, (int(c) - 1) // each) for c in nodes), each


def executor_of(run: Run):
    """The run's executor (a LocalExecutor when none was chosen)."""
    if run.executor is None:
        run.executor = LocalExecutor()
    return run.executor


def make_executor(name: str, ray_address: str | None = None):
    """The executor named on the command line; RunError (one line) when Ray is asked for but missing."""
    if name not in EXECUTORS:
        raise RunError(f"unknown executor {name!r} (use one of {', '.join(EXECUTORS)})")
    if name == "local":
        if ray_address:
            raise RunError("--ray-address needs --executor ray")
        return LocalExecutor()
    try:
        import ray  # noqa: F401
    except ImportError as err:
        raise RunError(RAY_MISSING) from err
    from precompute.ray_executor import RayExecutor

    return RayExecutor(ray_address)
