"""Stage: the SPEC §7 tables from the stage outputs, written to `metrics.duckdb` atomically."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from knnlm_core import store
from knnlm_core.bins import freq_bin
from knnlm_core.knn import interpolate
from precompute.runner import Run, load_npy, load_npz


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


def stage_database(run: Run, key: str) -> dict:
    store.write_database(run.path(store.DB_NAME), build_tables(run))
    return {"ppl_lm": run.info["ppl_lm"], "ppl_knnlm": run.info["ppl_knnlm"]}
