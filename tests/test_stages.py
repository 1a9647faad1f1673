"""precompute.stages.STAGES: the one description of the pipeline that the runner and the planner iterate.

The resume keys must stay bit-identical to the ones the hand-wired build_run of a9e2309 produced
(a finished run resumes): recorded key dicts (tests/data/stage_keys_a9e2309.json) are recomputed
from STAGES, and for every shipped preset the key dicts are compared with an independent
transcription of the old build_run.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
from pathlib import Path

import pytest

from knnlm_core import store
from knnlm_core.config import load_config
from precompute.plan import Machine, Rates, estimate, plan_facts
from precompute.runner import Run, digest
from precompute.stages import STAGES, TAU_GRID, stage, stage_names

REPO = Path(__file__).resolve().parent.parent
RECORDED = json.loads((REPO / "tests/data/stage_keys_a9e2309.json").read_text())["runs"]
PRESETS = sorted(p for p in (REPO / "configs").glob("*.toml") if p.stem != "demo-lm")  # demo-lm trains an LM
OLD_ORDER = ["tokenize_datastore", "tokenize_eval", "datastore", "eval_lm", "index", "valid_lm", "whiten", "search",
             "types", "exact", "suffix", "mitigate", "words", "database"]


def run_from_record(recorded: list[dict], tmp_path: Path) -> Run:
    """A Run with the inputs the recorded keys were made from (config, corpora, model facts, name)."""
    keys = {s["name"]: s["key"] for s in recorded}
    cfg = load_config(None, keys["database"]["config"])
    corpora = {"datastore": keys["tokenize_datastore"]["corpus"], "eval": keys["tokenize_eval"]["corpus"]}
    if "valid_lm" in keys:
        corpora["valid"] = keys["valid_lm"]["corpus"]
    model = keys["datastore"]
    run = Run(cfg=cfg, run_dir=tmp_path, run_name=keys["database"]["name"], corpora=corpora)
    run.info.update(model_fingerprint=model["model_fingerprint"], max_context=model["max_context"],
                    stride=model["stride"], exact_search="exact" in keys)
    return run


def stage_keys(run: Run) -> dict[str, dict]:
    """Every enabled stage's key dict, chained the way build_run chains them (JSON round trip: as digested)."""
    ups: dict[str, str | None] = {}
    out = {}
    for s in STAGES:
        if s.enabled(run):
            out[s.name] = json.loads(json.dumps(s.key(run, ups), default=str))
            ups[s.name] = digest(out[s.name])
        else:
            ups[s.name] = None
    return out


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_keys_are_recomputed_bit_for_bit(name, tmp_path):
    recorded = RECORDED[name]
    got = stage_keys(run_from_record(recorded, tmp_path))
    assert sorted(got) == sorted(s["name"] for s in recorded)  # valid_lm now runs before index: keys unchanged
    for s in recorded:
        assert got[s["name"]] == s["key"], s["name"]
        assert digest(got[s["name"]]) == digest(s["key"])


def test_a_changed_input_changes_the_recorded_key(tmp_path):
    """The comparison above can fail: one changed field changes its stage's key and every key downstream."""
    recorded = copy.deepcopy(RECORDED["all-pq"])
    db = next(s for s in recorded if s["name"] == "database")
    db["key"]["config"]["k"] = 32
    db["key"]["config"]["store_neighbors"] = 16
    got = stage_keys(run_from_record(recorded, tmp_path))
    want = {s["name"]: s["key"] for s in RECORDED["all-pq"]}
    changed = {n for n in got if digest(got[n]) != digest(want[n])}
    assert changed == {"search", "exact", "mitigate", "database"}


def old_keys(run: Run, exact: bool) -> dict[str, dict]:
    """The key dicts as precompute/pipeline.py of a9e2309 wrote them by hand (a transcription, not STAGES)."""
    cfg, info, corpora = run.cfg, run.info, run.corpora
    tok = cfg.tokenizer or cfg.model
    ds_key, ev_key = {"tokenizer": tok, "corpus": corpora["datastore"]}, {"tokenizer": tok, "corpus": corpora["eval"]}
    k_dtok, k_etok = digest(ds_key), digest(ev_key)
    model_key = {"model_fingerprint": info["model_fingerprint"], "dtype": cfg.dtype, "max_context": info["max_context"],
                 "stride": info["stride"], "batch": cfg.batch_size, "shard": cfg.shard_size}
    out = {"tokenize_datastore": ds_key, "tokenize_eval": ev_key,
           "datastore": {"up": k_dtok, **model_key}, "eval_lm": {"up": k_etok, "lm_top": cfg.lm_top, **model_key}}
    k_ds, k_ev = digest(out["datastore"]), digest(out["eval_lm"])
    out["index"] = {"up": k_ds, "factory": cfg.index_factory, "train_size": cfg.train_size, "seed": cfg.seed,
                    "shard": cfg.shard_size}
    k_ix = digest(out["index"])
    k_va = k_wh = k_ex = k_mi = None
    if cfg.valid_corpus:
        out["valid_lm"] = {"tokenizer": tok, "corpus": corpora["valid"], "lm_top": cfg.lm_top, **model_key}
        k_va = digest(out["valid_lm"])
    if cfg.whiten_kinds:
        out["whiten"] = {"up": k_ds, "kinds": list(cfg.whiten_kinds), "eps": cfg.whiten_eps,
                         "factory": cfg.index_factory, "train_size": cfg.train_size, "seed": cfg.seed,
                         "shard": cfg.shard_size}
        k_wh = digest(out["whiten"])
    out["search"] = {"up": [k_ix, k_ev, k_va, k_wh], "k": cfg.k, "nprobe": cfg.nprobe, "tau": cfg.temperature,
                     "source": cfg.distance_source, "batch": cfg.search_batch, "shard": cfg.shard_size}
    k_se = digest(out["search"])
    out["types"] = {"up": [k_ds, k_ix], "mode": cfg.contamination_search, "shard": cfg.shard_size,
                    "nprobe": cfg.nprobe if cfg.contamination_search == "index" else None}
    if exact:
        out["exact"] = {"up": k_se, "shard": cfg.shard_size}
        k_ex = digest(out["exact"])
    out["suffix"] = {"up": [k_dtok, k_etok, k_va], "max_len": cfg.ctx_max_len, "shard": cfg.shard_size}
    k_sx = digest(out["suffix"])
    if cfg.valid_corpus:
        out["mitigate"] = {"up": [k_se, k_sx], "lambda": cfg.lam, "bins": cfg.adaptive_bins,
                           "tau_grid": TAU_GRID.tolist()}
        k_mi = digest(out["mitigate"])
    out["words"] = {"up": [k_dtok, k_etok]}
    up = [k_se, digest(out["types"]), k_ex, digest(out["words"]), k_sx] + ([k_mi] if k_mi else [])
    out["database"] = {"up": up, "lambda": cfg.lam, "name": run.run_name, "schema": store.SCHEMA_VERSION, "config": cfg.to_dict()}
    return out


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_keys_equal_the_old_pipeline(preset, exact, tmp_path):
    cfg = load_config(preset)
    corpora = {role: {"path": path, "sha256": f"{role}-sha", "limit_tokens": limit}
               for role, path, limit in (("datastore", cfg.datastore_corpus, cfg.datastore_limit_tokens),
                                         ("eval", cfg.eval_corpus, cfg.eval_limit_tokens),
                                         ("valid", cfg.valid_corpus, cfg.valid_limit_tokens)) if path}
    run = Run(cfg=cfg, run_dir=tmp_path, run_name=preset.stem, corpora=corpora)
    run.info.update(model_fingerprint="f" * 64, max_context=cfg.max_context or 1024, stride=cfg.stride or 512,
                    exact_search=exact)
    want = old_keys(run, exact)
    got = stage_keys(run)
    assert list(got) == [n for n in stage_names() if n in want]
    assert got == json.loads(json.dumps(want))


def test_the_list_is_the_pipeline():
    """Names are unique, every stage needs only stages before it, every run function and output resolves."""
    names = stage_names()
    assert sorted(names) == sorted(OLD_ORDER) and len(set(names)) == len(names)
    for i, s in enumerate(STAGES):
        assert set(s.needs) <= set(names[:i]), s.name
        module, _, function = s.body.partition(":")  # read, not imported (the stage modules load torch, faiss)
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        assert function in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, s.name
    cfg = load_config(REPO / "configs/demo.toml")
    assert stage("search").outputs(cfg)[0] == "search.npz" and len(stage("search").outputs(cfg)) == 1 + 6
    assert stage("whiten").outputs(cfg) == ["whiten_zipfian.npz", "index_zipfian.faiss", "index_zipfian.json",
                                            "whiten_entries.npz", "index_entries.faiss", "index_entries.json"]


def test_the_planner_iterates_the_list():
    """The plan's rows are the stages with work, in the list's order (the two tokenize stages have none)."""
    cfg = load_config(REPO / "configs/demo.toml", {"model": "gpt2"})  # a known shape: no model config read
    work = estimate(cfg, plan_facts(cfg, 100_000, 5_000), Rates(), Machine(0, 4, 1, "local"), exact_runs=False)
    planned = list(dict.fromkeys(w.stage for w in work))
    assert planned == [n for n in stage_names() if not n.startswith("tokenize_")]
    assert [w.runs for w in work if w.stage == "exact"] == [False]
