"""The precompute pipeline: model -> datastore -> IVFPQ index -> kNN-LM scores -> DuckDB.

Phases: validate (nothing is written until config, corpora, model family and index
factory are known to fit) -> stages -> persist. Each stage has a key (hash of the config
fields and upstream keys it depends on), recorded in `stages.json` when it finishes; a
rerun skips every stage whose key matches and whose outputs load, so an interrupted run
resumes and a λ change only rewrites the database. Every output is written to a
temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from knnlm_core import store
from knnlm_core.bins import freq_bin
from knnlm_core.config import RunConfig, resolve_path
from knnlm_core.corpus import file_sha256, load_tokenizer, read_text, tokenize_file
from knnlm_core.index import (
    add_keys,
    blocks,
    check_factory,
    exact_sq_dists,
    reconstruction_error,
    search,
    set_nprobe,
    train_index,
)
from knnlm_core.knn import (
    interpolate,
    p_knn_from_weights,
    softmax_weights,
    target_stats,
    top_tokens_from_weights,
)
from knnlm_core.metrics import (
    centroids,
    coefficient_of_variation,
    contamination_from_neighbors,
    exact_knn,
    per_type_mean_max,
    spread,
    token_freq,
)
from knnlm_core.windows import plan_windows

CONTAMINATION_MAX = 1024  # SPEC §5: m_v = min(freq(v), 1024)
KNN_TOP = 10  # kNN top predictions stored per position


class RunError(RuntimeError):
    """A problem with the run directory or its files; the message names the fix."""


@dataclass
class Run:
    """State shared by the stages of one invocation."""

    cfg: RunConfig
    run_dir: Path
    run_name: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # resolved facts: dims, windows, hashes
    _lm: Any = None
    _tokenizer: Any = None

    def path(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(str(model_source(self.cfg.tokenizer or self.cfg.model)))
        return self._tokenizer

    @property
    def lm(self):
        """The model, loaded on first use (only stages that run the model need it)."""
        if self._lm is None:
            from knnlm_core.model import fingerprint, load_model

            self._lm = load_model(str(model_source(self.cfg.model)), self.cfg.dtype, self.cfg.device)
            self.info["model_fingerprint"] = fingerprint(self._lm.model)
        return self._lm


def model_source(name: str) -> str | Path:
    """A local directory (resolved against the repo root) when one exists, else the hub name."""
    p = resolve_path(name)
    return p if p.is_dir() else name


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- atomic writes

def save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def load_npy(path: Path, shape: tuple | None = None, dtype: Any = None, mmap: bool = True) -> np.ndarray:
    """Load an .npy (memmapped), checking shape/dtype; RunError naming the fix if corrupt."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as err:
        raise RunError(f"{path.name} in {path.parent} is truncated or corrupt ({err}): delete it and rerun "
                       "to rebuild that stage") from err
    if (shape is not None and arr.shape != shape) or (dtype is not None and arr.dtype != dtype):
        raise RunError(f"{path.name} in {path.parent} has shape {arr.shape} / {arr.dtype}, expected {shape} / "
                       f"{dtype}: delete it and rerun to rebuild that stage")
    return arr


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise RunError(f"{path.name} in {path.parent} is truncated or corrupt ({err}): delete it and rerun") from err


def read_index(path: Path):
    import faiss

    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise RunError(f"index file {path} is corrupt or truncated: delete it and rerun to rebuild the index") from err


def write_index(index, path: Path) -> None:
    import faiss

    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


# ---------------------------------------------------------------- stage runner

def run_stage(run: Run, name: str, key_parts: dict, outputs: list[str], body: Callable[[], dict | None]) -> str:
    """Run `body` unless stages.json records `name` with the same key and its outputs exist."""
    key = digest(key_parts)
    done = run.stages.get(name)
    if done and done.get("key") == key and all(run.path(o).exists() for o in outputs):
        tqdm.write(f"[{name}] up to date, skipped")
        run.info.update(done.get("info", {}))
        return key
    t0 = time.time()
    info = body() or {}
    run.stages[name] = {"key": key, "seconds": round(time.time() - t0, 2), "outputs": outputs, "info": info}
    run.info.update(info)
    save_json(run.path("stages.json"), run.stages)
    tqdm.write(f"[{name}] done in {time.time() - t0:.1f} s")
    return key


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


def check_run_dir(run_dir: Path, cfg: RunConfig, overwrite: bool) -> None:
    """Refuse a run directory that holds a run with another config unless overwrite is set."""
    recorded = run_dir / "run_config.json"
    if not recorded.exists():
        if run_dir.exists() and (run_dir / "manifest.json").exists():
            previous = json.loads((run_dir / "manifest.json").read_text()).get("config", {})
        else:
            return
    else:
        previous = json.loads(recorded.read_text())
    current = json.loads(json.dumps(cfg.to_dict()))
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if changed and not overwrite:
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise RunError(f"{run_dir} holds a run with a different config ({detail}); pass --overwrite to rebuild "
                       "it (unchanged stages are reused) or choose another --run-dir")


# ---------------------------------------------------------------- stages

def stage_tokenize(run: Run, name: str, ids: np.ndarray) -> dict:
    save_npy(run.path(name), ids)
    return {}


def extract(run: Run, ids: np.ndarray, keys_out: np.ndarray, desc: str,
            on_logits: Callable[[int, Any, np.ndarray], None] | None = None) -> None:
    """Fill keys_out (n-1, d) with the key of every position, window batch by window batch."""
    from knnlm_core.model import batch_windows, forward_windows

    windows = plan_windows(len(ids), run.info["max_context"], run.info["stride"])
    with tqdm(total=len(ids) - 1, desc=desc, unit="pos", dynamic_ncols=True) as bar:
        for batch in batch_windows(windows, run.cfg.batch_size):
            keys, logits = forward_windows(run.lm, ids, batch, with_logits=on_logits is not None)
            for i, w in enumerate(batch):
                keys_out[w.first_pos : w.end - 1] = keys[i]
                if on_logits is not None:
                    on_logits(w.first_pos, logits[i], ids[w.first_pos + 1 : w.end])
                bar.update(w.n_owned)


def stage_datastore(run: Run) -> dict:
    ids = load_npy(run.path("datastore_ids.npy"))
    n, d = len(ids) - 1, run.info["dim"]
    tmp = run.path("keys.npy.tmp.npy")
    keys = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))  # (N, d) on disk
    extract(run, np.asarray(ids), keys, "datastore keys")
    keys.flush()
    del keys
    os.replace(tmp, run.path("keys.npy"))
    save_npy(run.path("values.npy"), np.asarray(ids[1:], dtype=np.int32))  # value of entry i = token i+1
    return {"n_entries": n, "model_fingerprint": run.info["model_fingerprint"], "hook_point": run.lm.hook_point}


def stage_eval_lm(run: Run) -> dict:
    import torch

    ids = np.asarray(load_npy(run.path("eval_ids.npy")))
    t, d, top = len(ids) - 1, run.info["dim"], run.cfg.lm_top
    queries = np.lib.format.open_memmap(run.path("queries.npy.tmp.npy"), mode="w+", dtype=np.float16, shape=(t, d))
    p_lm = np.empty(t, dtype=np.float64)
    top_ids = np.empty((t, top), dtype=np.int32)
    top_p = np.empty((t, top), dtype=np.float32)

    def on_logits(first: int, logits: Any, targets: np.ndarray) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V) float32, SPEC §1
        tgt = torch.from_numpy(targets.astype(np.int64))
        sl = slice(first, first + len(targets))
        p_lm[sl] = np.exp(logp.gather(1, tgt[:, None])[:, 0].double().cpu().numpy())
        values, indices = torch.topk(logp, top, dim=-1)
        top_ids[sl], top_p[sl] = indices.cpu().numpy(), np.exp(values.cpu().numpy())

    extract(run, ids, queries, "eval queries + p_LM", on_logits)
    queries.flush()
    del queries
    os.replace(run.path("queries.npy.tmp.npy"), run.path("queries.npy"))
    save_npz(run.path("eval_lm.npz"), p_lm=p_lm, lm_top_ids=top_ids, lm_top_p=top_p)
    return {"n_eval": t, "model_fingerprint": run.info["model_fingerprint"], "hook_point": run.lm.hook_point}


def open_keys(run: Run) -> tuple[np.ndarray, np.ndarray]:
    n, d = run.info["n_entries"], run.info["dim"]
    keys = load_npy(run.path("keys.npy"), (n, d), np.float16)
    values = np.asarray(load_npy(run.path("values.npy"), (n,), np.int32))
    return keys, values


def open_index(run: Run):
    index = read_index(run.path("index.faiss"))
    if index.d != run.info["dim"]:
        raise RunError(f"index.faiss in {run.run_dir} has dimension {index.d} but the model's keys have "
                       f"{run.info['dim']}: rerun with --overwrite (or delete index.faiss) to rebuild the index")
    return index


def stage_index(run: Run) -> dict:
    import faiss

    keys, _ = open_keys(run)
    t0 = time.time()
    tqdm.write(f"[index] training {run.cfg.index_factory} on {min(run.cfg.train_size or len(keys), len(keys)):,} keys")
    index = train_index(keys, run.cfg.index_factory, run.cfg.train_size, run.cfg.seed)
    train_s = time.time() - t0
    with tqdm(total=len(keys), desc="index add", unit="key", dynamic_ncols=True) as bar:
        add_keys(index, keys, bar.update)
    write_index(index, run.path("index.faiss"))
    return {"index_train_seconds": round(train_s, 2), "index_ntotal": int(index.ntotal),
            "faiss_version": faiss.__version__}


def search_batch(index, keys: np.ndarray, values: np.ndarray, q: np.ndarray, targets: np.ndarray,
                 cfg: RunConfig) -> dict[str, np.ndarray]:
    """All per-position retrieval results of one batch of queries q (B, d) float32 (SPEC §2, §4)."""
    s = cfg.store_neighbors_effective
    dists, ids = search(index, q, cfg.k)  # (B, k)
    nbr_values = np.where(ids >= 0, values[np.maximum(ids, 0)], -1)  # (B, k), -1 = missing
    exact = exact_sq_dists(q, keys, ids if cfg.distance_source == "exact" else ids[:, :s])
    used = exact if cfg.distance_source == "exact" else dists
    target_rank, n_target = target_stats(nbr_values, targets)
    weights, log_z = softmax_weights(used, cfg.temperature, nbr_values)  # (B, k), (B,): computed once
    knn_top_ids, knn_top_p = top_tokens_from_weights(weights, nbr_values, KNN_TOP)
    return {
        "p_knn": p_knn_from_weights(weights, nbr_values, targets), "target_rank": target_rank,
        "n_target": n_target, "n_found": (ids >= 0).sum(axis=1), "nbr_ids": ids[:, :s], "dist_pq": dists[:, :s],
        "dist_exact": exact[:, :s], "knn_top_ids": knn_top_ids, "knn_top_p": knn_top_p,
        "query_pq_error": reconstruction_error(index, q), "knn_log_z": log_z,
    }


def stage_search(run: Run) -> dict:
    cfg = run.cfg
    keys, values = open_keys(run)
    index = open_index(run)
    set_nprobe(index, cfg.nprobe)
    queries = load_npy(run.path("queries.npy"), (run.info["n_eval"], run.info["dim"]), np.float16)
    targets = np.asarray(load_npy(run.path("eval_ids.npy")))[1:].astype(np.int64)
    parts: list[dict[str, np.ndarray]] = []
    with tqdm(total=len(targets), desc="search", unit="query", dynamic_ncols=True) as bar:
        for lo in range(0, len(targets), cfg.search_batch):
            hi = min(lo + cfg.search_batch, len(targets))
            parts.append(search_batch(index, keys, values, np.asarray(queries[lo:hi], dtype=np.float32),
                                      targets[lo:hi], cfg))
            bar.update(hi - lo)
    save_npz(run.path("search.npz"), **{name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
    return {}


def stage_pq(run: Run) -> dict:
    """||k_i - k̂_i||² of every datastore entry (SPEC §5 PQ error)."""
    keys, _ = open_keys(run)
    index = open_index(run)
    entry_err = np.empty(len(keys))
    with tqdm(total=len(keys), desc="PQ error", unit="key", dynamic_ncols=True) as bar:
        for start, block in blocks(keys):
            entry_err[start : start + len(block)] = reconstruction_error(index, block)
            bar.update(len(block))
    save_npz(run.path("pq.npz"), entry_pq_error=entry_err)
    return {}


def stage_types(run: Run) -> dict:
    cfg = run.cfg
    keys, values = open_keys(run)
    v = run.info["vocab_size"]
    freq = token_freq(values, v)
    tqdm.write("[types] centroids and spread")
    mu = centroids(keys, values, v)  # (V, d) float64
    cv = coefficient_of_variation(spread(keys, values, mu), values, v)
    pq = load_npz(run.path("pq.npz"))
    pq_mean, pq_max = per_type_mean_max(pq["entry_pq_error"], values, v)
    type_ids = np.flatnonzero(freq)  # types with freq >= 1
    m = np.minimum(freq[type_ids], CONTAMINATION_MAX)
    kk = int(min(CONTAMINATION_MAX, len(keys)))
    mu_q = mu[type_ids].astype(np.float32)
    if cfg.contamination_search == "exact":
        with tqdm(total=len(keys), desc="contamination (exact)", unit="key", dynamic_ncols=True) as bar:
            nbr = exact_knn(mu_q, keys, kk, bar.update)
    else:
        index = open_index(run)
        set_nprobe(index, cfg.nprobe)
        nbr = np.concatenate([search(index, mu_q[lo : lo + 1024], kk)[1] for lo in
                              tqdm(range(0, len(mu_q), 1024), desc="contamination (index)", dynamic_ncols=True)])
    nbr_values = np.where(nbr >= 0, values[np.maximum(nbr, 0)], -1)
    contamination = np.full(v, np.nan)
    contamination[type_ids] = contamination_from_neighbors(type_ids, nbr_values, m)
    save_npz(run.path("types.npz"), freq=freq, cv=cv, contamination=contamination, pq_mean=pq_mean, pq_max=pq_max)
    return {"contamination_mode": cfg.contamination_search}


# ---------------------------------------------------------------- database

def decode_tokens(tokenizer, ids: np.ndarray) -> dict[int, str]:
    """Readable text of each token id (byte-level pieces decoded; spaces kept)."""
    return {int(i): tokenizer.decode([int(i)]) for i in np.unique(ids) if i >= 0}


def per_rank(keep: np.ndarray, **columns: np.ndarray) -> pd.DataFrame:
    """Long table (pos, rank 1..w, columns...) from (T, w) arrays, keeping the cells where `keep`."""
    t, w = keep.shape
    frame = pd.DataFrame({"pos": np.repeat(np.arange(t, dtype=np.int32), w),
                          "rank": np.tile(np.arange(1, w + 1, dtype=np.int16), t),
                          **{name: col.ravel() for name, col in columns.items()}})
    return frame[keep.ravel()].reset_index(drop=True)


def build_tables(run: Run) -> dict[str, pd.DataFrame]:
    """All SPEC §7 tables from the stage outputs."""
    cfg, info = run.cfg, run.info
    ev_ids = np.asarray(load_npy(run.path("eval_ids.npy")))
    ds_ids = np.asarray(load_npy(run.path("datastore_ids.npy")))
    lm, se, ty = (load_npz(run.path(f)) for f in ("eval_lm.npz", "search.npz", "types.npz"))
    targets, context = ev_ids[1:], ev_ids[:-1]
    t = len(targets)
    freq = ty["freq"]
    p_lm, p_knn = lm["p_lm"], se["p_knn"]
    p_knnlm = interpolate(p_lm, p_knn, cfg.lam)
    with np.errstate(divide="ignore"):
        nll_lm, nll_knnlm = -np.log(p_lm), -np.log(p_knnlm)
    text = decode_tokens(run.tokenizer, np.concatenate([ds_ids, ev_ids, lm["lm_top_ids"].ravel(),
                                                        se["knn_top_ids"].ravel()]))
    rank = se["target_rank"]
    eval_tokens = pd.DataFrame({
        "pos": np.arange(t, dtype=np.int32), "token_id": targets.astype(np.int32),
        "token": [text[int(i)] for i in targets], "freq": freq[targets], "freq_bin": freq_bin(freq[targets]),
        "p_lm": p_lm, "p_knn": p_knn, "p_knnlm": p_knnlm, "nll_lm": nll_lm, "nll_knnlm": nll_knnlm,
        "gain": nll_lm - nll_knnlm,
    })
    for k in store.HIT_KS:
        hit = (rank > 0) & (rank <= k)
        eval_tokens[f"hit_{k}"] = pd.array(hit, dtype="boolean") if k <= cfg.k else pd.array([pd.NA] * t, "boolean")
    target_rank = pd.array(rank, dtype="Int32")
    target_rank[rank <= 0] = pd.NA  # SPEC §4: NULL when no neighbour carries the target
    eval_tokens["target_rank"] = target_rank
    eval_tokens["n_target"] = se["n_target"]
    eval_tokens["query_pq_error"] = se["query_pq_error"]
    eval_tokens["context_freq"] = freq[context]
    eval_tokens["context_token_id"] = context.astype(np.int32)
    eval_tokens["knn_log_z"] = se["knn_log_z"]  # neighbour j's weight in p_kNN = exp(-d_j / τ - knn_log_z)

    eval_count = np.bincount(targets, minlength=len(freq))
    type_ids = np.flatnonzero((freq > 0) | (eval_count > 0))
    token_types = pd.DataFrame({
        "token_id": type_ids.astype(np.int32), "token": [text.get(int(i), "") for i in type_ids],
        "freq": freq[type_ids], "freq_bin": freq_bin(freq[type_ids]), "cv": ty["cv"][type_ids],
        "contamination": ty["contamination"][type_ids], "pq_error_mean": ty["pq_mean"][type_ids],
        "pq_error_max": ty["pq_max"][type_ids], "eval_count": eval_count[type_ids],
    })
    s = se["nbr_ids"].shape[1]
    values = np.asarray(load_npy(run.path("values.npy")))
    nbr_ids = se["nbr_ids"]
    neighbors = per_rank(nbr_ids >= 0, entry=nbr_ids,
                         token_id=np.where(nbr_ids >= 0, values[np.maximum(nbr_ids, 0)], -1).astype(np.int32),
                         distance_pq=se["dist_pq"], distance_exact=se["dist_exact"])
    lm_top = per_rank(lm["lm_top_ids"] >= 0, token_id=lm["lm_top_ids"].astype(np.int32),
                      p_lm=lm["lm_top_p"].astype(np.float32))
    knn_top = per_rank(se["knn_top_ids"] >= 0, token_id=se["knn_top_ids"].astype(np.int32),
                       p_knn=se["knn_top_p"].astype(np.float32))
    ppl_lm, ppl_knnlm = float(np.exp(nll_lm.mean())), float(np.exp(nll_knnlm.mean()))
    run.info.update(ppl_lm=ppl_lm, ppl_knnlm=ppl_knnlm)
    run_row = pd.DataFrame([{
        "run_name": run.run_name, "model": cfg.model, "n_entries": info["n_entries"], "n_eval": t,
        "dim": info["dim"], "index_factory": cfg.index_factory, "nprobe": cfg.nprobe, "k": cfg.k,
        "temperature": cfg.temperature, "lambda": cfg.lam, "distance_source": cfg.distance_source,
        "ppl_lm": ppl_lm, "ppl_knnlm": ppl_knnlm, "schema_version": store.SCHEMA_VERSION,
        "store_neighbors": s, "hook_point": info.get("hook_point", ""),
        "contamination_mode": info.get("contamination_mode", cfg.contamination_search),
        "datastore_corpus": cfg.datastore_corpus, "eval_corpus": cfg.eval_corpus,
        "created_at": info["created_at"], "config_json": json.dumps(cfg.to_dict(), sort_keys=True),
    }])
    return {
        "run": run_row, "eval_tokens": eval_tokens, "token_types": token_types, "neighbors": neighbors,
        "datastore_tokens": pd.DataFrame({"pos": np.arange(len(ds_ids), dtype=np.int64),
                                          "token_id": ds_ids.astype(np.int32)}),
        "lm_top": lm_top, "knn_top": knn_top,
        "vocab": pd.DataFrame({"token_id": np.array(list(text), dtype=np.int32), "token": list(text.values())}),
    }


def stage_database(run: Run) -> dict:
    store.write_database(run.path(store.DB_NAME), build_tables(run))
    return {"ppl_lm": run.info["ppl_lm"], "ppl_knnlm": run.info["ppl_knnlm"]}


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
        "hook_point": info.get("hook_point"), "key_dim": info["dim"], "tokenizer": cfg.tokenizer or cfg.model,
        "corpora": corpora, "max_context": info["max_context"], "stride": info["stride"],
        "index_factory": cfg.index_factory, "n_entries": info["n_entries"], "n_eval": info["n_eval"],
        "parameters": {"nprobe": cfg.nprobe, "k": cfg.k, "temperature": cfg.temperature, "lambda": cfg.lam,
                       "distance": "squared L2", "distance_source": cfg.distance_source},
        "store_neighbors": cfg.store_neighbors_effective, "contamination_search": info.get("contamination_mode"),
        "ppl_lm": info["ppl_lm"], "ppl_knnlm": info["ppl_knnlm"], "software": software_versions(),
        "stage_seconds": {name: s["seconds"] for name, s in run.stages.items()},
        "config": cfg.to_dict(),
    }
    save_json(run.path("manifest.json"), manifest)


def build_run(cfg: RunConfig, run_dir: Path, overwrite: bool = False, run_name: str | None = None) -> Path:
    """Validate, run every stage that is not up to date, and write the manifest. Returns run_dir."""
    import faiss
    import torch

    run_dir = Path(run_dir)
    torch.set_num_threads(cfg.threads)
    faiss.omp_set_num_threads(cfg.threads)
    # ---- validate: nothing is written before these checks pass
    check_run_dir(run_dir, cfg, overwrite)
    facts = model_facts(cfg)
    max_context, stride = resolve_windows(cfg, facts["n_positions"])
    corpora = {}
    for role, rel, limit in (("datastore", cfg.datastore_corpus, cfg.datastore_limit_tokens),
                             ("eval", cfg.eval_corpus, cfg.eval_limit_tokens)):
        path = resolve_path(rel)
        read_text(path)  # raises CorpusError if missing or empty
        corpora[role] = {"path": rel, "sha256": file_sha256(path), "limit_tokens": limit}
    run = Run(cfg=cfg, run_dir=run_dir, run_name=run_name or run_dir.name)
    stages_path = run_dir / "stages.json"
    if stages_path.exists() and (run_dir / "run_config.json").exists():
        run.stages = json.loads(stages_path.read_text())
    run.info.update(facts, max_context=max_context, stride=stride,
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    tokenizer_name = cfg.tokenizer or cfg.model
    ds_key = {"tokenizer": tokenizer_name, "corpus": corpora["datastore"]}
    ev_key = {"tokenizer": tokenizer_name, "corpus": corpora["eval"]}
    fresh = {}  # tokenized in memory during validation, persisted by the tokenize stages
    for name, key, rel, limit in (("datastore_ids.npy", ds_key, cfg.datastore_corpus, cfg.datastore_limit_tokens),
                                  ("eval_ids.npy", ev_key, cfg.eval_corpus, cfg.eval_limit_tokens)):
        stage = "tokenize_" + name.split("_")[0]
        if run.stages.get(stage, {}).get("key") != digest(key) or not run.path(name).exists():
            fresh[name] = tokenize_file(resolve_path(rel), run.tokenizer, limit or None)
    n_entries = len(fresh["datastore_ids.npy"]) - 1 if "datastore_ids.npy" in fresh else \
        len(load_npy(run.path("datastore_ids.npy"))) - 1
    check_factory(cfg.index_factory, facts["dim"], min(cfg.train_size or n_entries, n_entries))
    # ---- compute
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(run.path("run_config.json"), cfg.to_dict())
    k_dtok = run_stage(run, "tokenize_datastore", ds_key, ["datastore_ids.npy"],
                       lambda: stage_tokenize(run, "datastore_ids.npy", fresh["datastore_ids.npy"]))
    k_etok = run_stage(run, "tokenize_eval", ev_key, ["eval_ids.npy"],
                       lambda: stage_tokenize(run, "eval_ids.npy", fresh["eval_ids.npy"]))
    ds = np.asarray(load_npy(run.path("datastore_ids.npy")))
    ev = np.asarray(load_npy(run.path("eval_ids.npy")))
    run.info["n_entries"], run.info["n_eval"] = len(ds) - 1, len(ev) - 1
    run.info["vocab_size"] = int(max(facts["model_vocab_size"], ds.max() + 1, ev.max() + 1))
    model_key = {"model": cfg.model, "dtype": cfg.dtype, "max_context": max_context, "stride": stride}
    k_ds = run_stage(run, "datastore", {"up": k_dtok, **model_key}, ["keys.npy", "values.npy"],
                     lambda: stage_datastore(run))
    k_ev = run_stage(run, "eval_lm", {"up": k_etok, "lm_top": cfg.lm_top, **model_key},
                     ["queries.npy", "eval_lm.npz"], lambda: stage_eval_lm(run))
    k_ix = run_stage(run, "index", {"up": k_ds, "factory": cfg.index_factory, "train_size": cfg.train_size,
                                    "seed": cfg.seed}, ["index.faiss"], lambda: stage_index(run))
    k_se = run_stage(run, "search", {"up": [k_ix, k_ev], "k": cfg.k, "nprobe": cfg.nprobe, "tau": cfg.temperature,
                                     "source": cfg.distance_source, "store": cfg.store_neighbors_effective},
                     ["search.npz"], lambda: stage_search(run))
    k_pq = run_stage(run, "pq", {"up": k_ix}, ["pq.npz"], lambda: stage_pq(run))
    k_ty = run_stage(run, "types", {"up": [k_ds, k_pq], "mode": cfg.contamination_search,
                                    "nprobe": cfg.nprobe if cfg.contamination_search == "index" else None},
                     ["types.npz"], lambda: stage_types(run))
    run_stage(run, "database", {"up": [k_se, k_ty], "lambda": cfg.lam, "name": run.run_name,
                                "schema": store.SCHEMA_VERSION, "config": cfg.to_dict()},
              [store.DB_NAME], lambda: stage_database(run))
    # ---- persist
    write_manifest(run, corpora)
    print(f"run written to {run_dir}: PPL LM {run.info['ppl_lm']:.2f}, kNN-LM {run.info['ppl_knnlm']:.2f}",
          file=sys.stderr)
    return run_dir
