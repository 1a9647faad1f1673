"""Tests of precompute/ray_executor.py on a real local Ray instance (skipped when ray is not installed).

One Ray instance (`ray.init(num_cpus=2)`) serves the whole module. A run built with the Ray
executor must give DuckDB tables identical to the same run built locally: with every stage
(validation pass, whitened indexes, exact search, mitigations) and a worker killed after its first
extraction, exact and mitigation shard (it is restarted and its task retried), the tables and every
neighbour block equal the local build's (the session's `mitigated_run`); a CLI driver joined to the
same instance and SIGKILLed after its first datastore shard resumes without redoing finished shards
and ends with the session's `tiny_run`. The pool shape leaves a CPU free on every node.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import MITIGATIONS, TINY_RUN_CONFIG, write_toml
from test_pipeline import tables

from knnlm_core import neighbours

ray = pytest.importorskip("ray")

from precompute.executor import pool_shape  # noqa: E402
from precompute.ray_executor import RayExecutor  # noqa: E402
from precompute.runner import WORKER_FAULT_ENV  # noqa: E402


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs for this module, shut down at its end."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def build_with_ray(run_dir, model_dir, **overrides):
    """The conftest tiny run (same config as `tiny_run`), built with the Ray executor."""
    from knnlm_core.config import load_config
    from precompute.pipeline import build_run

    cfg = load_config(write_toml(run_dir.parent / f"{run_dir.name}.toml",
                                 {"model": str(model_dir), **TINY_RUN_CONFIG}), overrides)
    executor = RayExecutor()
    try:
        return build_run(cfg, run_dir, executor=executor)
    finally:
        executor.close()


def assert_same_tables(reference, run_dir) -> None:
    want, got = tables(reference), tables(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        if name == "run":  # run_name differs by construction
            cols = [c for c in want[name].columns if c != "run_name"]
            pd.testing.assert_frame_equal(want[name][cols], got[name][cols], check_exact=True)
        else:
            pd.testing.assert_frame_equal(want[name], got[name], check_exact=True)


def test_every_stage_under_ray_with_killed_workers_equals_local(ray_instance, tmp_path, tiny_model, mitigated_run,
                                                                monkeypatch):
    # Validation pass, both whitenings, exact search and the mitigations, all mapped on Ray actors; one actor
    # exits (os._exit) right after saving its first datastore (extraction) shard, one after its first exact shard
    # and one after its first mitigation shard (once each: marker files). The datastore fault used to have a
    # build of its own (the plain tiny run); the mitigated run has the same datastore config, so its keys, and
    # every table made from them, check the retried extraction shard just as well, for one Ray build less.
    monkeypatch.setenv(WORKER_FAULT_ENV, "datastore:1,exact:1,mitigate:1")
    run_dir = build_with_ray(tmp_path / "tiny-ray-all", tiny_model, **MITIGATIONS)
    for stage in ("datastore", "exact", "mitigate"):
        assert (run_dir / f"worker_fault_{stage}.fired").exists(), f"a worker really exited in {stage}"
    assert_same_tables(mitigated_run, run_dir)  # a Ray run equals the local one, the retried shards included
    assert not list(run_dir.rglob("*.tmp*")), "no temporary file is left behind"
    for folder in sorted((mitigated_run / neighbours.ROOT).iterdir()):
        want = neighbours.open_block(folder)
        got = neighbours.open_block(run_dir / neighbours.ROOT / folder.name)
        for column in neighbours.COLUMNS:
            np.testing.assert_array_equal(got.rows(column), want.rows(column), err_msg=f"{folder.name} {column}")


def test_pool_leaves_a_cpu_free_per_node():
    assert pool_shape([2.0], threads=2) == (1, 1)  # this machine: 1 actor, 1 CPU reserved, 2 threads
    assert pool_shape([16.0] * 8, threads=16) == (8, 15)
    assert pool_shape([16.0, 32.0], threads=4) == (3 + 7, 4)
    with pytest.raises(Exception, match="no CPU"):
        pool_shape([0.0], threads=2)


def test_killed_driver_resumes_with_ray(ray_instance, tmp_path, tiny_model, tiny_run):
    """The CLI driver, joined to this module's Ray instance, is SIGKILLed after its first datastore shard
    (3 shards); the rerun redoes none of the finished shards and ends with the local run's tables."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    from precompute.runner import FAULT_ENV

    cfg = write_toml(tmp_path / "cfg.toml", {"model": str(tiny_model), **TINY_RUN_CONFIG})
    run_dir = tmp_path / "driver-killed"
    cmd = [sys.executable, "-m", "precompute", "--config", str(cfg), "--run-dir", str(run_dir), "--executor", "ray",
           "--ray-address", ray.get_runtime_context().gcs_address]  # this module's instance
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    killed = subprocess.run(cmd, cwd=REPO, env={**env, FAULT_ENV: "datastore:1"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    kept = sorted(p.name for p in (run_dir / "keys").glob("shard_*.npy") if ".tmp" not in p.name)
    assert 1 <= len(kept) < 3, kept
    # The rerun would be killed at its 3rd datastore shard: it completes only if the kept shards are reused.
    done = subprocess.run(cmd, cwd=REPO, env={**env, FAULT_ENV: "datastore:3"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert_same_tables(tiny_run, run_dir)
