"""Stage: the SPEC §7 tables from the stage outputs, written to `metrics.duckdb` atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import documents, infgram, neighbours, schema, store, words
from knnlm_core.bins import freq_bin
from knnlm_core.config import resolve_path
from knnlm_core.corpus import read_text
from knnlm_core.knn import interpolate, softmax_weights
from precompute.runner import Run, RunError, load_npy, load_npz
from precompute.stages.suffix import COLUMNS as SUFFIX_COLUMNS


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
    exact_neighbors = add_exact_columns(run, eval_tokens)
    neighbors = add_novelty_columns(run, eval_tokens, ds_ids, ev_ids)
    docs = eval_documents(run, ev_ids)
    eval_tokens["doc_id"] = docs.doc_id

    eval_count = np.bincount(targets, minlength=len(freq))
    type_ids = np.flatnonzero((freq > 0) | (eval_count > 0))
    token_types = pd.DataFrame({
        "token_id": type_ids.astype(np.int32), "token": [text.get(int(i), "") for i in type_ids],
        "freq": freq[type_ids], "freq_bin": freq_bin(freq[type_ids]), "cv": ty["cv"][type_ids],
        "contamination": ty["contamination"][type_ids], "pq_error_mean": ty["pq_mean"][type_ids],
        "pq_error_max": ty["pq_max"][type_ids], "eval_count": eval_count[type_ids],
    })
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
        "store_neighbors": cfg.store_neighbors_effective, "hook_point": info.get("hook_point", ""),
        "contamination_mode": info.get("contamination_mode", cfg.contamination_search),
        "datastore_corpus": cfg.datastore_corpus, "eval_corpus": cfg.eval_corpus,
        "created_at": info["created_at"], "config_json": json.dumps(cfg.to_dict(), sort_keys=True),
        "eval_domain": cfg.eval_domain, "exact_search": bool(info.get("exact_search")),
        "datastore_sha256": datastore_sha256(ds_ids), "datastore_tokens_from": cfg.datastore_tokens_from or None,
        "n_docs": len(docs.first_pos), "doc_mode": docs.mode, "doc_block_tokens": docs.block_tokens,
    }])
    return {
        **mitigation_tables(run),
        "run": run_row, "eval_tokens": eval_tokens, "token_types": token_types, "neighbors": neighbors,
        "exact_neighbors": exact_neighbors, "eval_words": eval_words(run, nll_lm, nll_knnlm),
        "datastore_tokens": pd.DataFrame({"pos": np.arange(len(ds_ids), dtype=np.int64),
                                          "token_id": ds_ids.astype(np.int32)}),
        "lm_top": lm_top, "knn_top": knn_top, "documents": documents.to_frame(docs),
        "vocab": pd.DataFrame({"token_id": np.array(list(text), dtype=np.int32), "token": list(text.values())}),
    }


def eval_documents(run: Run, ev_ids: np.ndarray) -> documents.Documents:
    """SPEC §11 documents of the evaluation positions (articles, or blocks of doc_block_tokens)."""
    try:
        return documents.for_eval_tokens(read_text(resolve_path(run.cfg.eval_corpus)), run.tokenizer, ev_ids,
                                         run.cfg.doc_block_tokens)
    except ValueError as err:
        raise RunError(f"documents of {run.cfg.eval_corpus}: {err}") from err


def mitigation_tables(run: Run) -> dict[str, pd.DataFrame]:
    """SPEC §9 tables (docs/SCHEMA.md) when the run evaluated mitigations; none otherwise."""
    if not run.cfg.valid_corpus:
        return {}
    per_pos = load_npz(run.path("mitigations.npz"))
    meta = json.loads(run.path("mitigations.json").read_text())
    variants = pd.DataFrame(meta["variants"]).drop(columns=["fit_seconds", "build_seconds"], errors="ignore")
    # A τ chosen on validation that is the run's own τ gives the run's own p_kNN (the same index and τ):
    # point the variant at eval_tokens.p_knn instead of storing a copy (it keeps shipped runs small).
    same = (variants["variant"] == "tau") & (variants["tau"] == run.cfg.temperature)
    variants.loc[same, "p_knn_column"] = None
    columns = [c for c in variants["p_knn_column"].tolist() + variants["lam_column"].tolist() if isinstance(c, str)]
    tokens = pd.DataFrame({"pos": np.arange(len(per_pos[columns[0]]), dtype=np.int32),
                           **{c: per_pos[c].astype(np.float32 if c.startswith("p_knn") else np.float64)
                              for c in columns}})  # p_kNN stored REAL; λ exact (0.01 grid, docs/SCHEMA.md)
    rules = []
    for name, rule in meta["rules"].items():
        edges = [-np.inf, *rule["edges"], np.inf]
        rules += [{"variant": name, "bin": b, "lo": edges[b], "hi": edges[b + 1], "lam": lam,
                   "n_valid": rule["n_valid"][b]} for b, lam in enumerate(rule["lam"])]
    return {"mitigations": variants, "mitigation_tokens": tokens, "adaptive_lambda": pd.DataFrame(rules)}


def add_exact_columns(run: Run, eval_tokens: pd.DataFrame) -> pd.DataFrame:
    """SPEC §8 columns of eval_tokens (NULL when the run has no exact search) and the exact neighbours."""
    t = len(eval_tokens)
    if not run.info.get("exact_search"):
        for name in [f"recall_{k}" for k in store.RECALL_KS] + [f"p_knn_{s}" for s in schema.EXACT_SETTINGS]:
            eval_tokens[name] = np.full(t, np.nan)
        eval_tokens["exact_target_rank"] = pd.array([pd.NA] * t, dtype="Int32")
        return pd.DataFrame({"pos": [], "rank": [], "entry": [], "distance": []})
    ex = load_npz(run.path("exact.npz"))
    for name in [f"recall_{k}" for k in store.RECALL_KS] + [f"p_knn_{s}" for s in schema.EXACT_SETTINGS]:
        eval_tokens[name] = ex[name]
    rank = pd.array(ex["exact_target_rank"], dtype="Int32")
    rank[ex["exact_target_rank"] <= 0] = pd.NA
    eval_tokens["exact_target_rank"] = rank
    return first_neighbours(run, "exact", run.cfg.store_neighbors_effective, distance="dist_exact")


def add_novelty_columns(run: Run, eval_tokens: pd.DataFrame, ds_ids: np.ndarray, ev_ids: np.ndarray
                        ) -> pd.DataFrame:
    """SPEC §12 columns of eval_tokens (the suffix stage's ctx_match_len, p_inf, inf_suffix_len, inf_count, and
    copy_share from the (eval, plain) block: the share of p_kNN carried by neighbours whose context overlaps the
    query's by >= 4 tokens). The same pass over the block returns the `neighbors` table: the first
    store_neighbors neighbours of every position with both distances and their context overlap."""
    cfg = run.cfg
    inf = load_npz(run.path("infgram.npz"))
    for name in SUFFIX_COLUMNS:
        eval_tokens[name] = inf[name]
    block = neighbours.open_block(neighbours.block_dir(run.run_dir, "eval", "plain"))
    column = "dist_exact" if cfg.distance_source == "exact" else "dist_pq"
    targets, s = ev_ids[1:].astype(np.int64), cfg.store_neighbors_effective
    share, parts = np.full(len(targets), np.nan), []
    for lo, hi in block.row_ranges(16384):
        ids, vals = block.rows("ids", lo, hi), block.rows("values", lo, hi)
        pos = np.arange(lo, hi)
        weights, _ = softmax_weights(block.rows(column, lo, hi), cfg.temperature, vals)
        carriers = np.where(vals == targets[lo:hi, None], ids, -1)  # only they enter the share
        overlap = infgram.neighbour_overlap(ds_ids, ev_ids, pos, carriers, cfg.ctx_max_len)
        share[lo:hi] = infgram.copy_share(weights, vals, targets[lo:hi], overlap)
        first = ids[:, :s]
        part = per_rank(first >= 0, entry=first, token_id=vals[:, :s], distance_pq=block.rows("dist_pq", lo, hi, s),
                        distance_exact=block.rows("dist_exact", lo, hi, s))
        part["pos"] += lo
        part["overlap"] = infgram.neighbour_overlap(ds_ids, ev_ids, pos, first, cfg.ctx_max_len)[first >= 0].astype(
            np.int16)
        parts.append(part)
    eval_tokens["copy_share"] = pd.array(np.where(np.isnan(share), None, share), dtype="Float64")  # NULL: p_kNN = 0
    if parts:
        return pd.concat(parts, ignore_index=True)
    empty = np.zeros((0, s))
    return per_rank(empty.astype(bool), entry=empty, token_id=empty, distance_pq=empty, distance_exact=empty).assign(
        overlap=np.zeros(0, np.int16))


def first_neighbours(run: Run, index_name: str, s: int, **distances: str) -> pd.DataFrame:
    """Long table (pos, rank, entry, token_id, distances...) of the first `s` neighbours of every
    evaluation position, read from the block (eval, index_name) in row ranges (SPEC §7)."""
    block = neighbours.open_block(neighbours.block_dir(run.run_dir, "eval", index_name))
    parts = []
    for lo, hi in block.row_ranges(65536):
        ids = block.rows("ids", lo, hi, s)
        part = per_rank(ids >= 0, entry=ids, token_id=block.rows("values", lo, hi, s),
                        **{out: block.rows(col, lo, hi, s) for out, col in distances.items()})
        part["pos"] += lo
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else per_rank(np.zeros((0, s), bool), entry=np.zeros((0, s)))


def eval_words(run: Run, nll_lm: np.ndarray, nll_knnlm: np.ndarray) -> pd.DataFrame:
    """SPEC §10: one row per complete word of the evaluation text, NLLs summed over its tokens."""
    w = load_npz(run.path("words.npz"))
    first, n = w["first_pos"], w["n_tokens"]
    return pd.DataFrame({
        "word_idx": np.arange(len(first), dtype=np.int32), "word": words.unpack_strings(w["text_utf8"], w["text_ends"]),
        "first_pos": first.astype(np.int32), "n_tokens": n.astype(np.int16), "freq": w["freq"],
        "freq_bin": freq_bin(w["freq"]), "nll_lm": words.word_nll(first, n, nll_lm),
        "nll_knnlm": words.word_nll(first, n, nll_knnlm),
    })


def datastore_sha256(ds_ids: np.ndarray) -> str:
    """Identity of a datastore's token stream (int32 ids), shared-table checks compare it."""
    return hashlib.sha256(np.ascontiguousarray(ds_ids, dtype=np.int32).tobytes()).hexdigest()


def shared_datastore(run: Run, own_sha: str) -> Path | None:
    """The other run database whose datastore_tokens this run reads (config datastore_tokens_from),
    checked to hold the same datastore; None when the run stores its own."""
    rel = run.cfg.datastore_tokens_from
    if not rel:
        return None
    other = (run.run_dir / rel).resolve()
    try:
        con = duckdb.connect(str(other), read_only=True)
        theirs = con.execute("SELECT datastore_sha256 FROM run").fetchone()[0]
        con.close()
    except (duckdb.Error, TypeError) as err:
        raise RunError(f"datastore_tokens_from = {rel!r}: {other} is not a readable run database ({err}); build "
                       "that run first or leave datastore_tokens_from empty") from err
    if theirs != own_sha:
        raise RunError(f"datastore_tokens_from = {rel!r}: that run was built on another datastore (token streams "
                       "differ); point it at a run with the same datastore corpus, limit and tokenizer")
    return other


def stage_database(run: Run, key: str) -> dict:
    tables = build_tables(run)
    other = shared_datastore(run, tables["run"]["datastore_sha256"].iloc[0])
    if other is not None:
        del tables["datastore_tokens"]
    store.write_database(run.path(store.DB_NAME), tables, datastore_from=other)
    return {"ppl_lm": run.info["ppl_lm"], "ppl_knnlm": run.info["ppl_knnlm"]}
