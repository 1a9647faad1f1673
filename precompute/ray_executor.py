"""The Ray executor: each stage's shard functions on Ray actors, across GPUs and machines (issue 8).

Imported only for `--executor ray` (Ray is an optional dependency: requirements-ray.txt).
The driver (`python -m precompute`) validates, trains the index, runs every reduce and
writes DuckDB, exactly as with the local executor; only the maps move:

* "gpu" maps (datastore keys, evaluation queries + p_LM; on GPUs also the torch IVFPQ encoding and
  the exact contamination search): one actor per GPU (`num_gpus=1`), each loading the model once
  (when a map needs it) and writing its shards straight to the run directory on shared storage; on
  a cluster without GPUs, CPU actors.
* "cpu" maps (index encoding, search, per-type sums / spread / contamination): CPU actors
  that read keys, μ and the trained or full index (memory-mapped) from the run directory.

Tasks return only a row count: keys never travel through the object store. Ray Core
actors, not Ray Data: a shard is a file, and the stages already resume shard by shard.
Faults: an actor that dies is restarted (`max_restarts`) and its task retried
(`max_task_retries`); a retried shard whose first attempt had finished is not redone, and
per-process temporary names plus `os.replace` make one shard file win, never two.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray
from ray.util import ActorPool

from precompute import runner
from precompute.executor import Progress, ShardJob, pool_shape
from precompute.runner import Run, RunError, driver_fault

REPO_ROOT = Path(__file__).resolve().parent.parent
RETRIES = 3  # actor restarts and task retries per actor: a worker may die this often
# Environment the workers need from the driver's (model cache, offline mode, fault injection in tests).
PASS_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TQDM_DISABLE", runner.WORKER_FAULT_ENV)


@ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)
class ShardWorker:
    """Runs shard functions of one run; keeps the model and a stage's opened inputs between tasks."""

    def __init__(self, run: Run, use_gpu: bool):
        import faiss
        import torch

        runner.IN_WORKER = True
        runner.return_freed_memory()
        torch.set_num_threads(run.cfg.threads)
        faiss.omp_set_num_threads(run.cfg.threads)
        self.run, self.device, self.key = run, "cuda" if use_gpu else "cpu", None

    def run_shard(self, job: ShardJob, info: dict, i: int) -> int:
        """Compute and save shard i of `job`; returns the units done (never the data)."""
        if job.key != self.key:  # another stage: drop the last one's cached inputs (the model stays)
            self.run.memo.clear()
            self.key = job.key
        self.run.info = {**info, "device": self.device}
        data = job.load(self.run, job, i) if job.load else None
        return job.fn(self.run, job, i, None, data)

    def hook_point(self, info: dict) -> str:
        self.run.info = {**info, "device": self.device}
        return self.run.lm.hook_point


def worker_env() -> dict[str, str]:
    """Environment of every worker: the repo importable (same path on every node: shared storage)."""
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    return env


class RayExecutor:
    """Shard maps on Ray actors; one pool at a time (model actors, then CPU actors)."""

    name = "ray"
    in_process = False  # workers share nothing with the driver but the run directory

    def __init__(self, address: str | None = None):
        self.started = not ray.is_initialized()
        if self.started:
            # A new local instance without the dashboard; "auto" or host:port joins a running cluster.
            extra = {} if address else {"include_dashboard": False}
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=True, **extra)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise RunError(f"cannot start or reach Ray at {address or 'a new local instance'} ({err}); "
                               "start the cluster with `ray start --head` or drop --ray-address") from err
        self.pools: dict[str, list] = {}

    def gpus(self) -> int:
        return int(ray.cluster_resources().get("GPU", 0))

    def resolve_device(self, requested: str) -> str:
        """"auto" -> cuda when the cluster has GPUs; "cuda" without any is a RunError."""
        if requested == "auto":
            return "cuda" if self.gpus() else "cpu"
        if requested == "cuda" and not self.gpus():
            raise RunError("device = cuda but the Ray cluster has no GPU (use device = auto or cpu, or add GPU nodes)")
        return requested

    def pool(self, run: Run, kind: str) -> list:
        """The actors for `kind` ("gpu" or "cpu"), started on first use; the other pool is released."""
        if kind not in self.pools:
            self.release()  # GPU stages come before CPU stages; on one machine both would share its CPUs
            use_gpu = kind == "gpu" and run.info["device"] == "cuda"
            nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
            n, cpus = (self.gpus(), 1) if use_gpu else pool_shape(nodes, run.cfg.threads)
            options = {"num_cpus": cpus, "num_gpus": 1 if use_gpu else 0, "runtime_env": {"env_vars": worker_env()}}
            self.pools[kind] = [ShardWorker.options(**options).remote(run, use_gpu) for _ in range(n)]
            print(f"[ray] {n} {kind} actor(s), {cpus} CPU{'+1 GPU' if use_gpu else ''} each", file=sys.stderr)
        return self.pools[kind]

    def map(self, run: Run, job: ShardJob, todo, progress: Progress = None) -> None:
        """Every shard in `todo` on the pool's actors; progress and the driver fault hook per result."""
        todo = list(todo)
        if not todo:
            return
        info = dict(run.info)
        pool = ActorPool(self.pool(run, job.kind))
        for done, units in enumerate(pool.map_unordered(lambda a, i: a.run_shard.remote(job, info, i), todo), 1):
            if progress:
                progress(units)
            driver_fault(job.stage, done)

    def hook_point(self, run: Run) -> str:
        return ray.get(self.pool(run, "gpu")[0].hook_point.remote(dict(run.info)))

    def release(self) -> None:
        for actors in self.pools.values():
            for actor in actors:
                ray.kill(actor)
        self.pools.clear()

    def close(self) -> None:
        self.release()
        if self.started:
            ray.shutdown()
