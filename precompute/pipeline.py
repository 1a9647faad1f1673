"""The precompute pipeline: model -> datastore -> index -> kNN-LM scores -> DuckDB (the wiring).

Phases: validate (nothing is written until config, corpora, model, run directory and
index factory are known to fit) -> stages -> persist. The stages are `precompute.stages.STAGES`,
run in order: each is keyed by a hash of what it depends on (its key fields and its upstream
stages' keys; the model by its fingerprint, not its path) and is resumable shard by shard
(`precompute.runner`).
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from knnlm_core import neighbours, store
from knnlm_core.config import RunConfig, check_import, resolve_path
from knnlm_core.corpus import file_sha256, read_text, tokenize_file
from knnlm_core.index import check_factory
from precompute.preflight import check_model_files, check_run_dir, check_run_dir_writable, recorded_config
from precompute.runner import (
    Run,
    RunError,
    digest,
    load_npy,
    model_source,
    resolve_device,
    return_freed_memory,
    run_stage,
    save_json,
)
from precompute.stages import STAGES
from precompute.stages import stage as stage_named

__all__ = ["RunError", "build_run", "check_run_dir", "resolve_device", "resolve_windows"]


# ---------------------------------------------------------------- validation

def resolve_windows(cfg: RunConfig, n_positions: int) -> tuple[int, int]:
    """(max_context, stride) per SPEC §1: defaults n_positions capped at 1024, and half of that."""
    max_context = cfg.max_context or min(int(n_positions), 1024)
    if max_context > n_positions:
        raise RunError(f"max_context {max_context} exceeds the model's {n_positions} positions (lower max_context)")
    stride = cfg.stride or max(1, max_context // 2)
    if stride > max_context:
        raise RunError(f"stride {stride} exceeds max_context {max_context} (use stride <= max_context)")
    return max_context, stride


def model_facts(cfg: RunConfig) -> dict[str, Any]:
    """Family, hidden size and positions from the model's config alone (no weights loaded)."""
    from knnlm_core.model import load_model_config

    mc = load_model_config(str(model_source(cfg.model)))
    n_positions = getattr(mc, "n_positions", None) or getattr(mc, "max_position_embeddings", 1024)
    return {"model_type": mc.model_type, "dim": int(mc.hidden_size), "n_positions": int(n_positions),
            "model_vocab_size": int(mc.vocab_size)}


def software_versions() -> dict[str, str]:
    import duckdb
    import faiss
    import torch
    import transformers

    return {"python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "faiss": faiss.__version__,
            "duckdb": duckdb.__version__}


def write_manifest(run: Run, corpora: dict) -> None:
    cfg, info = run.cfg, run.info
    manifest = {
        "schema_version": store.SCHEMA_VERSION, "run_name": run.run_name, "created_at": info["created_at"],
        "model": cfg.model, "model_fingerprint": info.get("model_fingerprint"), "model_type": info["model_type"],
        "hook_point": info.get("hook_point"), "key_dim": info["dim"], "device": info.get("device"),
        "key_layout": "keys/ shards (keys/shards.json)", "tokenizer": cfg.tokenizer or cfg.model,
        "corpora": corpora, "max_context": info["max_context"], "stride": info["stride"],
        "index_factory": cfg.index_factory, "n_entries": info["n_entries"], "n_eval": info["n_eval"],
        "parameters": {"nprobe": cfg.nprobe, "k": cfg.k, "temperature": cfg.temperature, "lambda": cfg.lam,
                       "distance": "squared L2", "distance_source": cfg.distance_source},
        "store_neighbors": cfg.store_neighbors_effective, "contamination_search": info.get("contamination_mode"),
        "exact_search": {"ran": bool(info.get("exact_search")), "why": info.get("exact_search_reason")},
        "ppl_lm": info["ppl_lm"], "ppl_knnlm": info["ppl_knnlm"], "software": software_versions(),
        "stage_seconds": {name: s["seconds"] for name, s in run.stages.items()},
        "neighbour_blocks": {f.name: {"n_rows": b.n_rows, "k": b.k, "shards": len(b.shards)}
                             for f in sorted(run.path(neighbours.ROOT).glob("*-*"))
                             if (b := neighbours.find_block(run.run_dir, *f.name.split("-", 1)))},
        "config": cfg.to_dict(),
    }
    if info.get("imported"):  # the knn-transformers check report (precompute.stages.imported)
        manifest["imported"] = info["imported"]
        manifest["key_layout"] = f"imported: keys/shards.json -> {manifest['imported']['directory']}"
    if cfg.valid_corpus:  # SPEC §9: every variant with its chosen τ, ε and PPLs, and the fitted λ rules
        fitted = json.loads(run.path("mitigations.json").read_text())
        manifest["mitigations"] = {k: fitted[k] for k in ("valid_corpus", "n_valid", "tau_grid", "variants", "rules")}
    save_json(run.path("manifest.json"), manifest)


def model_fingerprint(cfg: RunConfig, run_dir: Path) -> str:
    """Fingerprint of the model's config + weight files, cached in the run dir by file size and mtime."""
    from knnlm_core.model import source_fingerprint

    source = model_source(cfg.model)
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(source).glob("*")
                   if p.is_file()) if Path(source).is_dir() else str(source)
    cache = run_dir / "model_fingerprint.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("source") == str(source) and cached.get("stats") == json.loads(json.dumps(stats)):
            return cached["fingerprint"]
    fp = source_fingerprint(str(source))
    if run_dir.is_dir():
        save_json(cache, {"source": str(source), "stats": stats, "fingerprint": fp})
    return fp


def build_run(cfg: RunConfig, run_dir: Path, overwrite: bool = False, run_name: str | None = None,
              executor=None) -> Path:
    """Validate, run every stage that is not up to date, and write the manifest. Returns run_dir.

    `executor` runs the stages' shard maps (precompute.executor; None = local, in this
    process). It enters no stage key: a run resumes or is reused under either executor.
    """
    import faiss
    import torch

    run_dir = Path(run_dir)
    return_freed_memory()
    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    # ---- validate: nothing is written before these checks pass (precompute.preflight: no torch / faiss needed)
    check_run_dir_writable(run_dir)
    check_run_dir(run_dir, cfg, overwrite)
    check_import(cfg)
    check_model_files(cfg)  # truncated weights fail here, not after earlier outputs were replaced
    facts = model_facts(cfg)
    max_context, stride = resolve_windows(cfg, facts["n_positions"])
    device = executor.resolve_device(cfg.device) if executor is not None else resolve_device(cfg.device)
    corpora = {}
    roles = [("datastore", cfg.datastore_corpus, cfg.datastore_limit_tokens),
             ("eval", cfg.eval_corpus, cfg.eval_limit_tokens)]
    if cfg.valid_corpus:
        roles.append(("valid", cfg.valid_corpus, cfg.valid_limit_tokens))
    for role, rel, limit in roles:
        path = resolve_path(rel)
        read_text(path)  # raises CorpusError if missing, empty or not UTF-8
        corpora[role] = {"path": rel, "sha256": file_sha256(path), "limit_tokens": limit}
    run = Run(cfg=cfg, run_dir=run_dir, run_name=run_name or run_dir.name, executor=executor, corpora=corpora)
    stages_path = run_dir / "stages.json"
    if stages_path.exists():  # stage keys hash the config, so a record under another config is simply not reused
        try:
            run.stages = json.loads(stages_path.read_text())
        except ValueError:
            run.stages = {}  # an unreadable record: every stage is checked and rebuilt as needed
    run.info.update(facts, max_context=max_context, stride=stride, device=device,
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    for role, limit in (("datastore", cfg.datastore_limit_tokens), ("eval", cfg.eval_limit_tokens)):
        tokenize, name = stage_named(f"tokenize_{role}"), f"{role}_ids.npy"  # read now: k and the factory are checked
        if run.stages.get(tokenize.name, {}).get("key") != digest(tokenize.key(run, {})) or not run.path(name).exists():
            run.fresh[name] = tokenize_file(resolve_path(corpora[role]["path"]), run.tokenizer, limit or None)
    fresh = run.fresh
    n_entries = len(fresh["datastore_ids.npy"]) - 1 if "datastore_ids.npy" in fresh else \
        len(load_npy(run.path("datastore_ids.npy"))) - 1
    check_factory(cfg.index_factory, facts["dim"], min(cfg.train_size or n_entries, n_entries))
    if cfg.k > n_entries:  # refused, not capped: a capped k would silently be another experiment
        raise RunError(f"k = {cfg.k:,} exceeds the datastore's {n_entries:,} entries (use --k {n_entries} or less, "
                       "or a larger datastore)")
    if cfg.import_datastore:  # SPEC §13: the datastore is checked against the model and the text, nothing written yet
        from precompute.stages.imported import check_peer

        stream = fresh["datastore_ids.npy"] if "datastore_ids.npy" in fresh else \
            np.asarray(load_npy(run.path("datastore_ids.npy")))
        run.info["imported"] = check_peer(run, stream)
    fingerprint = model_fingerprint(cfg, run_dir)
    from precompute.plan import decide_exact, machine_of, plan_facts, plan_summary  # advice: never raises

    machine = machine_of(cfg, device, executor)
    n_eval = len(fresh["eval_ids.npy"]) - 1 if "eval_ids.npy" in fresh else len(load_npy(run.path("eval_ids.npy"))) - 1
    if summary := plan_summary(cfg, plan_facts(cfg, n_entries, n_eval), machine):
        print(summary, file=sys.stderr)
    # ---- compute
    run_dir.mkdir(parents=True, exist_ok=True)
    # run_config.json claims the directory for this config. Over a run of another config (--overwrite) it
    # is written only once a stage of the new config has finished, so a command that fails at once leaves
    # the previous run's record, and its outputs, as they were (runner.run_stage writes it).
    run.pending_config = cfg.to_dict()
    if recorded_config(run_dir) is None:
        run.write_pending_config()
    run.info["model_fingerprint"] = fingerprint
    run.info["exact_search"], run.info["exact_search_reason"] = decide_exact(
        cfg, plan_facts(cfg, n_entries, n_eval), machine)
    keys: dict[str, str | None] = {}  # stage -> its key digest this run (None: not in this run)
    for stage in STAGES:
        keys[stage.name] = run_stage(run, stage.name, stage.key(run, keys), stage.outputs(cfg),
                                     partial(stage.run, run)) if stage.enabled(run) else None
        if stage.after is not None:
            stage.after(run)
    # ---- persist
    run.write_pending_config()
    write_manifest(run, corpora)
    print(f"run written to {run_dir}: PPL LM {run.info['ppl_lm']:.2f}, kNN-LM {run.info['ppl_knnlm']:.2f}",
          file=sys.stderr)
    return run_dir
