"""Tests of precompute/plan.py: entry, byte and FLOP counts against hand computation and a built run.

The tiny run of conftest (6,000 datastore tokens, 500 evaluation tokens, a 2 x 64 GPT-2,
IVF8,PQ8x4) is counted by hand; its real files (key shards, values, index) must match the
plan's byte counts. The paper's config gives 374 GB of fp16 keys (117M x 1600 x 2 bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN_CONFIG

from knnlm_core.config import load_config
from knnlm_core.windows import plan_windows
from precompute.plan import KNOWN_MODELS, Rates, estimate, run_facts, stage_work

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_cfg(tiny_model):
    from dataclasses import replace

    from knnlm_core.config import RunConfig

    return replace(RunConfig(), model=str(tiny_model), lam=0.25, **TINY_RUN_CONFIG).validate()


def test_tiny_config_counts_by_hand(tiny_cfg):
    f = run_facts(tiny_cfg)
    assert (f.n, f.t) == (5999, 499)  # 6,000 and 500 tokens: one entry / position fewer (the last has no target)
    assert (f.shape.d, f.shape.layers, f.shape.ffn, f.shape.positions) == (64, 2, 256, 128)
    work = {w.name: w for w in stage_work(tiny_cfg, f)}
    assert work["datastore"].written == 5999 * (64 * 2 + 4)  # fp16 keys + int32 values
    assert work["index"].written == 2 * 5999 * (4 + 8) + 16 * 5999  # PQ8x4 = 4-byte codes + 8-byte ids, twice; errors
    assert work["eval_lm"].count == 499
    # forward FLOP: 2 x body parameters per token + attention 2 x layers x d x window length², windows 128 / 64
    lengths = [w.end - w.begin for w in plan_windows(6000, 128, 64)]
    body = 2 * (4 * 64 * 64 + 2 * 64 * 256)
    assert work["datastore"].flop == 2 * body * sum(lengths) + 2 * 2 * 64 * sum(x * x for x in lengths)


def test_plan_matches_the_files_of_a_built_run(tiny_cfg, tiny_run):
    f = run_facts(tiny_cfg)
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert (f.n, f.t) == (manifest["n_entries"], manifest["n_eval"])
    with np.load(tiny_run / "types.npz") as types:
        assert f.types == int((types["freq"] > 0).sum())
    data_bytes = sum(np.load(p, mmap_mode="r").nbytes for p in (tiny_run / "keys").glob("shard_*.npy"))
    data_bytes += np.load(tiny_run / "values.npy", mmap_mode="r").nbytes
    assert stage_work(tiny_cfg, f)[0].written == data_bytes
    index_bytes = (tiny_run / "index.faiss").stat().st_size  # codes + ids + centroids and codebooks (< 16 kB)
    assert f.n * (4 + 8) <= index_bytes <= f.n * (4 + 8) + 16_000


def test_paper_setting_keys_are_374_gb():
    cfg = load_config(REPO / "configs/gpt2-xl-wikitext103.toml")
    f = run_facts(cfg, entries=117_000_000, eval_positions=286_220)
    assert f.shape == KNOWN_MODELS["gpt2-xl"]
    keys = stage_work(cfg, f)[0].written - 4 * f.n
    assert keys == 117_000_000 * 1600 * 2 and round(keys / 1e9) == 374


def test_map_time_divides_over_gpus():
    cfg = load_config(REPO / "configs/gpt2-xl-wikitext103.toml")
    f = run_facts(cfg, entries=117_000_000, eval_positions=286_220)
    rates = Rates()
    t8, t16 = (estimate(cfg, f, rates, g, 128, 8)[0].seconds for g in (8, 16))
    fixed = f.shape.params * 2 / rates.load_bytes + rates.start_s  # model load + pool start, paid once per worker
    assert (t8 - fixed) == pytest.approx(2 * (t16 - fixed))


def test_cli_bad_input_is_one_line_exit_2():
    out = subprocess.run([sys.executable, "-m", "precompute.plan", "--config", "nope.toml"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: config file not found")
    assert len(out.stderr.strip().splitlines()) == 1


def test_mitigation_stages_are_planned_only_with_a_validation_corpus(tiny_cfg):
    from dataclasses import replace

    assert not {"valid_lm", "mitigate"} & {w.name for w in stage_work(tiny_cfg, run_facts(tiny_cfg))}
    seconds = {}
    for whiten in ("none", "zipfian", "entries,zipfian"):
        cfg = replace(tiny_cfg, valid_corpus=TINY_RUN_CONFIG["eval_corpus"], valid_limit_tokens=300,
                      whiten=whiten).validate()
        f = run_facts(cfg)
        assert f.t_valid == 299  # tokenized here: 300 tokens
        work = {w.name: w for w in estimate(cfg, f, Rates(), 0, 2, 1, "local")}
        assert work["valid_lm"].count == 299
        assert work["mitigate"].count == (1 + len(cfg.whiten_kinds)) * (f.t + f.t_valid)  # queries searched
        seconds[whiten] = work["mitigate"].seconds
    assert seconds["none"] < seconds["zipfian"] < seconds["entries,zipfian"]  # one index build per whitening
