"""Tests of precompute/runner.py: per-shard resume after a real SIGKILL, stage keys, shard folders.

The kill test runs the real CLI in a subprocess with `KNNLM_FAULT_AFTER_SHARD=<stage>:<n>`,
which SIGKILLs the process right after the stage's n-th shard is written (n = 2 for the datastore,
whose kept shards are counted, 1 elsewhere). One run directory is killed once in every heavy stage
in turn and finally completes; its DuckDB tables must equal those of an uninterrupted build with the
same config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import TINY_RUN_CONFIG, build_tiny_run, write_toml
from test_pipeline import tables

from precompute.runner import FAULT_ENV, Shards, shard_ranges
from precompute.stages import stage_names

REPO = Path(__file__).resolve().parent.parent
HEAVY_STAGES = tuple(n for n in stage_names() if n not in ("tokenize_datastore", "tokenize_eval", "words", "database"))
# (the stages that save shards, in run order: a kill in each finds every earlier stage done)
SMALL_SHARDS = {"shard_size": 250, "datastore_limit_tokens": 2000, "eval_limit_tokens": 600,
                "valid_corpus": str(REPO / "data/corpora/wikitext2-train.tokens.gz"), "valid_limit_tokens": 600,
                "whiten": "zipfian"}


def run_cli(cfg: Path, run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "precompute", "--config", str(cfg), "--run-dir", str(run_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def shard_files(run_dir: Path) -> dict[str, int]:
    """mtime of every finished shard file under run_dir (shard folders of all stages)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("shard_*")
            if ".tmp" not in p.name}


def test_kill_in_every_heavy_stage_then_resume_equals_uninterrupted(tmp_path, tiny_model):
    values = {"model": str(tiny_model), **TINY_RUN_CONFIG, **SMALL_SHARDS}
    cfg = write_toml(tmp_path / "cfg.toml", values)
    reference = build_tiny_run(tmp_path / "reference", tiny_model, **SMALL_SHARDS)
    run_dir = tmp_path / "killed"
    for stage in HEAVY_STAGES:
        before = shard_files(run_dir) if run_dir.exists() else {}
        # The first kill comes after the datastore's 2nd shard: it also checks that the fault hook counts shards
        # (it was a CLI run of its own, test_fault_hook_counts_shards); every later stage is killed after its 1st.
        count = 2 if stage == "datastore" else 1
        result = run_cli(cfg, run_dir, fault=f"{stage}:{count}")
        assert result.returncode == -9, (stage, result.returncode, result.stderr[-2000:])
        after = shard_files(run_dir)
        if stage == "datastore":  # the hook fired after exactly the 2nd of the stage's 8 shards
            assert sorted(p.name for p in (run_dir / "keys").glob("shard_*.npy")) == ["shard_00000.npy",
                                                                                    "shard_00001.npy"]
        # the shards finished before this kill were kept as they were (not recomputed) ...
        assert all(after.get(name) == mtime for name, mtime in before.items() if name in after), stage
        # ... and the killed stage kept exactly the one shard it finished
        stage_done = json.loads((run_dir / "stages.json").read_text())
        assert stage not in stage_done, stage
        assert len(after) > len({n for n in before if n in after}), stage
    done = run_cli(cfg, run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    want, got = tables(reference), tables(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        if name == "run":
            cols = [c for c in want[name].columns if c not in ("run_name", "created_at")]
            pd.testing.assert_frame_equal(want[name][cols], got[name][cols])
        else:
            pd.testing.assert_frame_equal(want[name], got[name], check_exact=True)
    assert not any(run_dir.rglob("*.shards")), "shard folders are removed after each reduce"


def test_shards_folder_of_another_key_is_cleared(tmp_path):
    old = Shards(tmp_path / "x.shards", "key-a")
    old.save(0, a=np.arange(3))
    assert Shards(tmp_path / "x.shards", "key-a").done(0)
    assert not Shards(tmp_path / "x.shards", "key-b").done(0)


def test_shard_ranges_cover_everything_once():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(0, 4) == []
