"""Tests of precompute/executor.py that need no Ray: the local path never imports it, a missing Ray
is a one-line error, and the local executor's prefetching loop runs every shard once, in order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from precompute.executor import LocalExecutor, ShardJob

REPO = Path(__file__).resolve().parent.parent


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_local_executor_never_imports_ray():
    out = python("import sys; import precompute.pipeline, precompute.plan; from precompute.executor import "
                 "make_executor; make_executor('local'); assert 'ray' not in sys.modules, 'ray imported'")
    assert out.returncode == 0, out.stderr[-2000:]


def test_executor_ray_without_ray_is_one_line_exit_2(tmp_path):
    # sys.modules['ray'] = None makes `import ray` fail as if it were not installed
    out = python("import sys; sys.modules['ray'] = None; from precompute.__main__ import main; "
                 f"sys.exit(main(['--config', 'configs/ci-tiny.toml', '--run-dir', '{tmp_path / 'r'}', "
                 "'--executor', 'ray']))")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == "error: ray is not installed: pip install -r requirements-ray.txt"
    assert not (tmp_path / "r").exists()


def record(run, job, i, progress, data):
    run.append((i, data))
    return 1


def load(run, job, i):
    return i * 10


def test_local_map_prefetches_and_runs_each_shard_once():
    seen: list = []
    LocalExecutor().map(seen, ShardJob("x", "k", record, load), [0, 2, 5])
    assert seen == [(0, 0), (2, 20), (5, 50)]
    seen.clear()
    LocalExecutor().map(seen, ShardJob("x", "k", record), [3])
    assert seen == [(3, None)]
