"""Read-only SQL over a run's `metrics.duckdb` (SPEC §6, §7) for the dashboard.

Every function takes a DuckDB cursor plus plain values and returns a pandas DataFrame
(or a small dict). User values are always bound as SQL parameters; column names used for
sorting come from a whitelist. Aggregation happens in SQL: no function loads a whole
per-position table into pandas. No streamlit, no torch.
"""

from __future__ import annotations

import json
import math
import re

import duckdb
import numpy as np
import pandas as pd
from scipy import stats

from knnlm_core import bootstrap as bs
from knnlm_core import infgram, intervals
from knnlm_core.bins import bin_labels
from knnlm_core.store import HIT_KS

OUTCOMES = ("all", "helped", "harmed")  # helped: gain > 0, harmed: gain < 0
OCCURRENCE_SORTS = {  # UI name -> ORDER BY clause (whitelist)
    "position": "pos",
    "gain (worst first)": "gain ASC, pos",
    "gain (best first)": "gain DESC, pos",
    "p_LM (lowest first)": "p_lm ASC, pos",
    "p_kNN (highest first)": "p_knn DESC, pos",
}
TYPE_METRICS = ("cv", "contamination", "pq_error_mean")


def _df(cur: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pd.DataFrame:
    """Run parameterized SQL and return a DataFrame."""
    return cur.execute(sql, params or []).df()


def add_bin_label(df: pd.DataFrame) -> pd.DataFrame:
    """Insert a `bin` label column (knnlm_core.bins) right after `freq_bin`."""
    df = df.copy()
    df.insert(df.columns.get_loc("freq_bin") + 1, "bin", bin_labels(df["freq_bin"].to_numpy()))
    return df


def hit_ks_for(run_k: int) -> tuple[int, ...]:
    """The hit@k cut-offs defined for a run (those <= its k)."""
    return tuple(k for k in HIT_KS if k <= run_k)


# --------------------------------------------------------------------------- run metadata


def run_info(cur: duckdb.DuckDBPyConnection) -> dict:
    """The single `run` row as a dict, with `config` parsed from `config_json`."""
    row = _df(cur, "SELECT * FROM run LIMIT 1")
    if row.empty:
        return {}
    info = {k: (None if pd.isna(v) else v) for k, v in row.iloc[0].to_dict().items()}
    try:
        info["config"] = json.loads(info.get("config_json") or "{}")
    except json.JSONDecodeError:
        info["config"] = {}
    for key in ("k", "n_eval", "n_entries", "nprobe", "store_neighbors", "dim"):
        if info.get(key) is not None:
            info[key] = int(info[key])
    return info


def bin_list(cur: duckdb.DuckDBPyConnection) -> list[int]:
    """Frequency bins that occur among evaluation targets, ascending."""
    return [int(b) for b in _df(cur, "SELECT DISTINCT freq_bin FROM eval_tokens ORDER BY 1")["freq_bin"]]


# --------------------------------------------------------------------------- filters


def eval_filter(
    bin_lo: int | None = None,
    bin_hi: int | None = None,
    token_ids: list[int] | None = None,
    outcome: str = "all",
    alias: str = "",
) -> tuple[str, list]:
    """WHERE clause (without WHERE) and params over eval_tokens for the dashboard filters."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}")
    a = f"{alias}." if alias else ""
    clauses, params = ["TRUE"], []
    if bin_lo is not None:
        clauses.append(f"{a}freq_bin >= ?")
        params.append(int(bin_lo))
    if bin_hi is not None:
        clauses.append(f"{a}freq_bin <= ?")
        params.append(int(bin_hi))
    if token_ids:
        clauses.append(f"{a}token_id = ANY(?)")
        params.append([int(t) for t in token_ids])
    if outcome == "helped":
        clauses.append(f"{a}gain > 0")
    elif outcome == "harmed":
        clauses.append(f"{a}gain < 0")
    return " AND ".join(clauses), params


# --------------------------------------------------------------------------- per-bin summaries


def bin_summary(
    cur: duckdb.DuckDBPyConnection,
    run_k: int,
    bin_lo: int | None = None,
    bin_hi: int | None = None,
    token_ids: list[int] | None = None,
    outcome: str = "all",
) -> pd.DataFrame:
    """SPEC §6 per-bin table: counts, PPL LM / kNN-LM, mean p, share harmed, hit@k, type metrics.

    Type-level columns (mean_cv, mean_contamination, mean_pq_error) average over the
    datastore types (freq >= 1) of the bin, restricted to `token_ids` when given.
    `nontarget_share` = mean over tokens of 1 - n_target / run_k.
    """
    where, params = eval_filter(bin_lo, bin_hi, token_ids, outcome)
    ks = hit_ks_for(run_k)
    hit_sql = ", ".join(f"avg(hit_{k}::DOUBLE) AS hit_{k}" for k in ks)
    t_where, t_params = eval_filter(bin_lo, bin_hi, token_ids)
    sql = f"""
    WITH agg AS (
        SELECT freq_bin, count(*) AS n_tokens, count(DISTINCT token_id) AS n_types_eval,
               exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm,
               avg(p_lm) AS mean_p_lm, avg(p_knn) AS mean_p_knn, avg(gain) AS mean_gain,
               avg((gain < 0)::DOUBLE) AS share_harmed, {hit_sql},
               1 - avg(n_target) / ? AS nontarget_share,
               avg(query_pq_error) AS mean_query_pq_error
        FROM eval_tokens WHERE {where} GROUP BY freq_bin),
    ty AS (
        SELECT freq_bin, count(*) AS n_types_datastore, avg(cv) AS mean_cv,
               avg(contamination) AS mean_contamination, avg(pq_error_mean) AS mean_pq_error
        FROM token_types WHERE freq >= 1 AND {t_where} GROUP BY freq_bin)
    SELECT agg.*, ty.n_types_datastore, ty.mean_cv, ty.mean_contamination, ty.mean_pq_error
    FROM agg LEFT JOIN ty USING (freq_bin) ORDER BY freq_bin
    """
    df = add_bin_label(_df(cur, sql, [float(run_k), *params, *t_params]))
    return intervals.with_intervals(df, intervals.bin_intervals(cur, run_k, ks, where, params))


def overall(cur: duckdb.DuckDBPyConnection, bin_lo=None, bin_hi=None, token_ids=None, outcome="all") -> dict:
    """Totals over the filtered evaluation tokens: n, PPL LM / kNN-LM, share harmed, and (SPEC §11) their
    intervals, kNN-LM's relative change vs the LM (`ppl_change`) with its verdict `knnlm_vs_lm`, n_docs."""
    where, params = eval_filter(bin_lo, bin_hi, token_ids, outcome)
    sql = f"""SELECT count(*) AS n_tokens, exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm,
                     avg((gain < 0)::DOUBLE) AS share_harmed, avg(gain) AS mean_gain
              FROM eval_tokens WHERE {where}"""
    out = _df(cur, sql, params).iloc[0].to_dict()
    ci = intervals.overall_intervals(cur, where, params)
    return {**{k: v for k, v in ci.items() if k not in ("all_bins",)}, **out}


# --------------------------------------------------------------------------- correlations


def pearson_p(r: float, n: int) -> float:
    """Two-sided p-value of a Pearson r over n pairs (t-test with n - 2 d.o.f.)."""
    if n < 3 or r is None or not math.isfinite(r):
        return float("nan")
    if abs(r) >= 1.0:
        return 0.0
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return float(2.0 * stats.t.sf(abs(t), n - 2))


def _corr(cur, sql: str, params: list) -> dict:
    """{'r', 'n', 'p'} from a query returning (corr, count)."""
    r, n = cur.execute(sql, params).fetchone()
    r = float("nan") if r is None else float(r)
    n = int(n or 0)
    return {"r": r, "n": n, "p": pearson_p(r, n)}


def corr_pq_error_gain(cur, bin_lo=None, bin_hi=None, token_ids=None, outcome="all") -> dict:
    """Pearson r over evaluation tokens between the target type's pq_error_mean and gain (SPEC §6)."""
    where, params = eval_filter(bin_lo, bin_hi, token_ids, outcome, alias="e")
    sql = f"""SELECT corr(t.pq_error_mean, e.gain), count(*) FROM eval_tokens e
              JOIN token_types t USING (token_id)
              WHERE t.pq_error_mean IS NOT NULL AND {where}"""
    return _corr(cur, sql, params)


def corr_context_freq(cur, bin_lo=None, bin_hi=None, token_ids=None, outcome="all") -> dict:
    """Pearson r over evaluation tokens between log10 context_freq and log10 freq (both >= 1)."""
    where, params = eval_filter(bin_lo, bin_hi, token_ids, outcome)
    sql = f"""SELECT corr(log10(context_freq), log10(freq)), count(*) FROM eval_tokens
              WHERE freq >= 1 AND context_freq >= 1 AND {where}"""
    return _corr(cur, sql, params)


def corr_freq_pq_error(cur) -> dict:
    """Pearson r over datastore types between log10 freq and pq_error_mean (rarer = larger error?)."""
    sql = """SELECT corr(log10(freq), pq_error_mean), count(*) FROM token_types
             WHERE freq >= 1 AND pq_error_mean IS NOT NULL"""
    return _corr(cur, sql, [])


def type_gain(cur, bin_lo=None, bin_hi=None, token_ids=None, outcome="all") -> pd.DataFrame:
    """Per evaluated type: freq, bin, cv, contamination, pq_error_mean, mean gain and count."""
    where, params = eval_filter(bin_lo, bin_hi, token_ids, outcome, alias="e")
    sql = f"""SELECT e.token_id, t.token, t.freq, t.freq_bin, t.cv, t.contamination, t.pq_error_mean,
                     avg(e.gain) AS mean_gain, count(*) AS n_eval
              FROM eval_tokens e JOIN token_types t USING (token_id)
              WHERE {where} GROUP BY ALL ORDER BY t.freq DESC, e.token_id"""
    return add_bin_label(_df(cur, sql, params))


def pearson_of(x: np.ndarray, y: np.ndarray) -> dict:
    """{'r', 'n', 'p'} of two arrays, ignoring pairs with a NaN."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return {"r": float("nan"), "n": n, "p": float("nan")}
    r = float(np.corrcoef(x[ok], y[ok])[0, 1])
    return {"r": r, "n": n, "p": pearson_p(r, n)}


# --------------------------------------------------------------------------- token types


def find_types(cur: duckdb.DuckDBPyConnection, query: str, limit: int = 50) -> pd.DataFrame:
    """Token types matching `query`: an integer is a token id; text matches exactly
    (ignoring surrounding whitespace and case) first, then as a substring; frequent first."""
    query = (query or "").strip("\n")
    cols = "token_id, token, freq, freq_bin, cv, contamination, pq_error_mean, eval_count"
    if re.fullmatch(r"-?[0-9]{1,9}", query.strip()):  # ASCII ('²'.isdigit() but not int()), fits INTEGER
        df = _df(cur, f"SELECT {cols} FROM token_types WHERE token_id = ?", [int(query.strip())])
        return add_bin_label(df)
    if not query.strip():
        return add_bin_label(_df(cur, f"SELECT {cols} FROM token_types LIMIT 0"))
    sql = f"""SELECT {cols} FROM token_types
              WHERE contains(lower(token), lower(?))
              ORDER BY (token = ?) DESC, (lower(trim(token)) = lower(trim(?))) DESC, freq DESC, token_id
              LIMIT ?"""
    return add_bin_label(_df(cur, sql, [query.strip(), query, query, int(limit)]))


def type_percentiles(cur: duckdb.DuckDBPyConnection, token_id: int) -> pd.DataFrame:
    """For cv, contamination, pq_error_mean: the type's value, its bin's median and quartiles,
    and its percentile (share of the bin's datastore types with a value <= it)."""
    parts = []
    for m in TYPE_METRICS:  # m is from the whitelist TYPE_METRICS
        parts.append(f"""SELECT '{m}' AS metric, any_value(t.{m}) AS value,
            quantile_cont(b.{m}, 0.25) AS bin_q25, median(b.{m}) AS bin_median,
            quantile_cont(b.{m}, 0.75) AS bin_q75,
            avg(CASE WHEN b.{m} IS NULL OR t.{m} IS NULL THEN NULL ELSE (b.{m} <= t.{m})::DOUBLE END)
                AS percentile_in_bin,
            count(b.{m}) AS n_types_in_bin
          FROM (SELECT * FROM token_types WHERE token_id = ?) t
          JOIN token_types b ON b.freq_bin = t.freq_bin AND b.freq >= 1""")
    return _df(cur, " UNION ALL ".join(parts), [int(token_id)] * len(TYPE_METRICS))


def bin_type_metrics(cur: duckdb.DuckDBPyConnection, freq_bin: int) -> pd.DataFrame:
    """cv, contamination, pq_error_mean of every datastore type in one bin (for distributions)."""
    sql = "SELECT token_id, token, freq, cv, contamination, pq_error_mean FROM token_types WHERE freq_bin = ? AND freq >= 1"
    return _df(cur, sql, [int(freq_bin)])


def occurrences(
    cur: duckdb.DuckDBPyConnection, token_id: int, run_k: int, sort: str = "position", limit: int = 500, width: int = 8
) -> pd.DataFrame:
    """Evaluation positions whose target is `token_id`: p_LM, p_kNN, gain, hits, rank, and the
    last `width` context tokens (one set-based join)."""
    if sort not in OCCURRENCE_SORTS:
        raise ValueError(f"sort must be one of {list(OCCURRENCE_SORTS)}")
    hits = ", ".join(f"hit_{k}" for k in hit_ks_for(run_k))
    sql = f"""
    WITH o AS (
        SELECT pos, p_lm, p_knn, p_knnlm, gain, {hits}, target_rank, n_target, query_pq_error, context_freq
        FROM eval_tokens WHERE token_id = ? ORDER BY {OCCURRENCE_SORTS[sort]} LIMIT ?),
    c AS (
        SELECT o.pos, string_agg(coalesce(v.token, '?'), '' ORDER BY e.pos) AS context
        FROM o JOIN range(0, ?) r(off) ON TRUE
        JOIN eval_tokens e ON e.pos = o.pos - r.off
        LEFT JOIN vocab v ON v.token_id = e.context_token_id
        GROUP BY o.pos)
    SELECT o.pos, c.context, o.* EXCLUDE (pos) FROM o LEFT JOIN c USING (pos)
    ORDER BY {OCCURRENCE_SORTS[sort]}
    """
    return _df(cur, sql, [int(token_id), int(limit), int(width)])


# --------------------------------------------------------------------------- one evaluation position


def eval_row(cur: duckdb.DuckDBPyConnection, pos: int) -> dict:
    """Every column of eval_tokens at `pos` ({} when out of range)."""
    df = _df(cur, "SELECT * FROM eval_tokens WHERE pos = ?", [int(pos)])
    return {} if df.empty else df.iloc[0].to_dict()


def eval_context(cur: duckdb.DuckDBPyConnection, pos: int, width: int = 64) -> pd.DataFrame:
    """Left context of `pos`: stream tokens pos-width+1..pos (`context_token_id`), decoded."""
    sql = """SELECT e.pos, e.context_token_id AS token_id, v.token FROM eval_tokens e
             LEFT JOIN vocab v ON v.token_id = e.context_token_id
             WHERE e.pos BETWEEN ? AND ? ORDER BY e.pos"""
    return _df(cur, sql, [int(pos) - int(width) + 1, int(pos)])


def top_predictions(cur: duckdb.DuckDBPyConnection, pos: int, which: str) -> pd.DataFrame:
    """Top LM (`which='lm'`) or kNN (`'knn'`) predictions at `pos`: rank, token_id, token, p."""
    table, col = {"lm": ("lm_top", "p_lm"), "knn": ("knn_top", "p_knn")}[which]
    sql = f"""SELECT t.rank, t.token_id, v.token, t.{col} AS p FROM {table} t
              LEFT JOIN vocab v USING (token_id) WHERE t.pos = ? ORDER BY t.rank"""
    return _df(cur, sql, [int(pos)])


def neighbors(cur: duckdb.DuckDBPyConnection, pos: int, width: int = 12) -> pd.DataFrame:
    """Stored neighbours of `pos` with rank, entry, value token, distances, context overlap with the
    query (SPEC §12) and whether that makes it a copy neighbour (overlap >= infgram.COPY_MIN_OVERLAP),
    and each entry's left context (datastore_tokens pos in [entry - width + 1, entry]) in one set-based query."""
    sql = """
    WITH n AS (SELECT rank, entry, token_id, distance_pq, distance_exact, overlap FROM neighbors WHERE pos = ?),
    o AS (SELECT n.rank, n.entry - r.off AS dpos FROM n JOIN range(0, ?) r(off) ON TRUE WHERE n.entry - r.off >= 0),
    c AS (SELECT o.rank, string_agg(coalesce(v.token, '?'), '' ORDER BY o.dpos) AS context
          FROM o JOIN datastore_tokens d ON d.pos = o.dpos
          LEFT JOIN vocab v ON v.token_id = d.token_id GROUP BY o.rank)
    SELECT n.rank, n.entry, n.token_id, v.token, n.distance_pq, n.distance_exact, n.overlap,
           n.overlap >= ? AS copy, c.context
    FROM n LEFT JOIN vocab v USING (token_id) LEFT JOIN c USING (rank) ORDER BY n.rank
    """
    return _df(cur, sql, [int(pos), int(width), infgram.COPY_MIN_OVERLAP])


def neighbor_context_tokens(cur: duckdb.DuckDBPyConnection, pos: int, width: int) -> pd.DataFrame:
    """Per stored neighbour of `pos` (rank, overlap): its entry's left context as a list of decoded
    tokens (`tokens`, datastore_tokens entry - width + 1 .. entry, oldest first), for the overlap highlight."""
    sql = """
    WITH n AS (SELECT rank, entry, overlap FROM neighbors WHERE pos = ?),
    o AS (SELECT n.rank, n.entry - r.off AS dpos FROM n JOIN range(0, ?) r(off) ON TRUE WHERE n.entry - r.off >= 0)
    SELECT n.rank, n.overlap, list(coalesce(v.token, '?') ORDER BY o.dpos) AS tokens
    FROM n JOIN o USING (rank) JOIN datastore_tokens d ON d.pos = o.dpos
    LEFT JOIN vocab v ON v.token_id = d.token_id GROUP BY n.rank, n.overlap ORDER BY n.rank
    """
    return _df(cur, sql, [int(pos), int(width)])


# --------------------------------------------------------------------------- exact vs quantized search (SPEC §8)

MIN_EFFECT_NATS = 1e-3  # |Δ mean NLL| below which a bin's "share explained" is not reported
EXACT_SETTINGS = {  # column of p_kNN -> what it means
    "p_knn_ivf_pq": "IVFPQ neighbours + PQ distances",
    "p_knn_ivf_exact": "IVFPQ neighbours + exact distances",
    "p_knn_exact": "exact neighbours + exact distances",
}


def has_exact(cur: duckdb.DuckDBPyConnection) -> bool:
    """Whether the run stored the exact-search comparison (its columns are not all NULL)."""
    return bool(cur.execute("SELECT count(p_knn_exact) > 0 FROM eval_tokens").fetchone()[0])


def exact_bin_summary(cur: duckdb.DuckDBPyConnection, run_k: int, lam: float) -> pd.DataFrame:
    """Per bin (SPEC §8): PPL of LM and of kNN-LM under the three search settings at the run's λ,
    mean recall@k, hit@k with the index's and with the exact neighbours, and the share of the
    bin's kNN-LM effect (mean NLL change vs the LM) that approximate search explains.

    `share_explained_by_quantization` = (Δ_ivfpq - Δ_exact) / Δ_ivfpq, Δ = mean NLL(kNN-LM) -
    mean NLL(LM) (`delta_nll_*`); split into `..._distances` (PQ vs exact distances on the
    index's neighbours) and `..._neighbours` (the index's vs the exact neighbours). NULL where
    |Δ_ivfpq| < MIN_EFFECT_NATS: a share of an effect that small is noise.
    """
    ks = hit_ks_for(run_k)
    recall = ", ".join(f"avg(recall_{k}) AS recall_{k}" for k in (16, 64, 1024) if k <= run_k)
    hits = ", ".join(
        f"avg(hit_{k}::DOUBLE) AS hit_{k}_index, avg(coalesce(exact_target_rank <= {k}, FALSE)::DOUBLE) AS hit_{k}_exact"
        for k in ks
    )
    nll = {col: f"avg(-ln(? * {col} + (1 - ?) * p_lm))" for col in EXACT_SETTINGS}
    sql = f"""
    WITH agg AS (
        SELECT freq_bin, count(*) AS n_tokens, avg(nll_lm) AS nll_lm,
               {nll['p_knn_ivf_pq']} AS nll_ivf_pq, {nll['p_knn_ivf_exact']} AS nll_ivf_exact,
               {nll['p_knn_exact']} AS nll_exact,
               avg(p_knn_ivf_pq) AS mean_p_knn_ivf_pq, avg(p_knn_exact) AS mean_p_knn_exact, {recall}, {hits}
        FROM eval_tokens WHERE p_knn_exact IS NOT NULL GROUP BY freq_bin)
    SELECT freq_bin, n_tokens, exp(nll_lm) AS ppl_lm, exp(nll_ivf_pq) AS ppl_ivf_pq,
           exp(nll_ivf_exact) AS ppl_ivf_exact, exp(nll_exact) AS ppl_exact,
           nll_ivf_pq - nll_lm AS delta_nll_ivf_pq, nll_exact - nll_lm AS delta_nll_exact,
           CASE WHEN abs(nll_ivf_pq - nll_lm) < {MIN_EFFECT_NATS} THEN NULL
                ELSE (nll_ivf_pq - nll_exact) / (nll_ivf_pq - nll_lm) END AS share_explained_by_quantization,
           CASE WHEN abs(nll_ivf_pq - nll_lm) < {MIN_EFFECT_NATS} THEN NULL
                ELSE (nll_ivf_pq - nll_ivf_exact) / (nll_ivf_pq - nll_lm) END AS share_explained_by_distances,
           CASE WHEN abs(nll_ivf_pq - nll_lm) < {MIN_EFFECT_NATS} THEN NULL
                ELSE (nll_ivf_exact - nll_exact) / (nll_ivf_pq - nll_lm) END AS share_explained_by_neighbours,
           agg.* EXCLUDE (freq_bin, n_tokens, nll_lm, nll_ivf_pq, nll_ivf_exact, nll_exact)
    FROM agg ORDER BY freq_bin
    """
    lam_params = [float(lam), float(lam)] * len(EXACT_SETTINGS)
    df = add_bin_label(_df(cur, sql, lam_params))
    recall_ks = tuple(k for k in (16, 64, 1024) if k <= run_k)
    return intervals.with_intervals(df, intervals.exact_intervals(cur, lam, ks, recall_ks))


def exact_overall(cur: duckdb.DuckDBPyConnection, lam: float) -> dict:
    """PPL of the LM and of kNN-LM under the three search settings over all positions."""
    parts = ", ".join(f"exp(avg(-ln(? * {col} + (1 - ?) * p_lm))) AS {col.replace('p_knn_', 'ppl_')}"
                      for col in EXACT_SETTINGS)
    sql = f"SELECT count(*) AS n_tokens, exp(avg(nll_lm)) AS ppl_lm, {parts} FROM eval_tokens WHERE p_knn_exact IS NOT NULL"
    return _df(cur, sql, [float(lam), float(lam)] * len(EXACT_SETTINGS)).iloc[0].to_dict()


def exact_changes(cur: duckdb.DuckDBPyConnection, lam: float, freq_bin: int | None, limit: int = 200) -> pd.DataFrame:
    """Positions where exact search changes the kNN-LM NLL most (largest |NLL IVFPQ - NLL exact|),
    optionally in one bin: the entry points into the neighbour inspector."""
    where = "p_knn_exact IS NOT NULL" + (" AND freq_bin = ?" if freq_bin is not None else "")
    params = [float(lam), float(lam), float(lam), float(lam)] + ([int(freq_bin)] if freq_bin is not None else [])
    sql = f"""
    SELECT pos, token, freq, freq_bin, p_lm, p_knn_ivf_pq, p_knn_exact, recall_16,
           -ln(? * p_knn_ivf_pq + (1 - ?) * p_lm) + ln(? * p_knn_exact + (1 - ?) * p_lm) AS nll_saved_by_exact,
           target_rank, exact_target_rank
    FROM eval_tokens WHERE {where}
    ORDER BY abs(nll_saved_by_exact) DESC, pos LIMIT ?"""
    return add_bin_label(_df(cur, sql, params + [int(limit)]))


def exact_neighbors(cur: duckdb.DuckDBPyConnection, pos: int, width: int = 12) -> pd.DataFrame:
    """Exact neighbours of `pos` (rank, entry, value token, exact distance, left context), and
    whether the index also returned each among the stored ones (`in_index_top`)."""
    sql = """
    WITH n AS (SELECT x.rank, x.entry, d.token_id, x.distance FROM exact_neighbors x
               JOIN datastore_tokens d ON d.pos = x.entry + 1 WHERE x.pos = ?),
    o AS (SELECT n.rank, n.entry - r.off AS dpos FROM n JOIN range(0, ?) r(off) ON TRUE WHERE n.entry - r.off >= 0),
    c AS (SELECT o.rank, string_agg(coalesce(v.token, '?'), '' ORDER BY o.dpos) AS context
          FROM o JOIN datastore_tokens d ON d.pos = o.dpos
          LEFT JOIN vocab v ON v.token_id = d.token_id GROUP BY o.rank)
    SELECT n.rank, n.entry, n.token_id, v.token, n.distance AS distance_exact,
           n.entry IN (SELECT entry FROM neighbors WHERE pos = ?) AS in_index_top, c.context
    FROM n LEFT JOIN vocab v USING (token_id) LEFT JOIN c USING (rank) ORDER BY n.rank
    """
    return _df(cur, sql, [int(pos), int(width), int(pos)])


# --------------------------------------------------------------------------- word level (SPEC §10)


def has_words(cur: duckdb.DuckDBPyConnection) -> bool:
    return bool(cur.execute("SELECT count(*) > 0 FROM eval_words").fetchone()[0])


def word_bin_summary(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Per word-frequency bin: words, word PPL of LM and kNN-LM, mean gain, share harmed, tokens per word."""
    sql = """SELECT freq_bin, count(*) AS n_words, count(DISTINCT word) AS n_word_types,
                    exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm,
                    avg(nll_lm - nll_knnlm) AS mean_gain, avg((nll_knnlm > nll_lm)::DOUBLE) AS share_harmed,
                    avg(n_tokens) AS mean_tokens_per_word
             FROM eval_words GROUP BY freq_bin ORDER BY freq_bin"""
    return intervals.with_intervals(add_bin_label(_df(cur, sql)), intervals.word_intervals(cur))


def word_overall(cur: duckdb.DuckDBPyConnection) -> dict:
    sql = """SELECT count(*) AS n_words, exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm,
                    avg((nll_knnlm > nll_lm)::DOUBLE) AS share_harmed FROM eval_words"""
    return _df(cur, sql).iloc[0].to_dict()


def find_words(cur: duckdb.DuckDBPyConnection, text: str, limit: int = 20) -> pd.DataFrame:
    """Evaluation words equal to `text` (exact first, then ignoring case and surrounding punctuation),
    one row per distinct word: datastore freq, bin, occurrences, word PPLs, first position, tokens."""
    text = (text or "").strip()
    if not text:
        return add_bin_label(_df(cur, "SELECT NULL::VARCHAR AS word, NULL::SMALLINT AS freq_bin LIMIT 0"))
    sql = """
    SELECT word, any_value(freq) AS freq, any_value(freq_bin) AS freq_bin, count(*) AS occurrences,
           exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm, min(first_pos) AS first_pos,
           arg_min(n_tokens, first_pos) AS n_tokens
    FROM eval_words
    WHERE word = ? OR lower(regexp_replace(word, '^\\W+|\\W+$', '', 'g')) = lower(?)
    GROUP BY word ORDER BY (word = ?) DESC, occurrences DESC, word LIMIT ?"""
    return add_bin_label(_df(cur, sql, [text, text, text, int(limit)]))


def word_tokens(cur: duckdb.DuckDBPyConnection, first_pos: int, n_tokens: int) -> pd.DataFrame:
    """The tokens of one word occurrence (positions first_pos .. first_pos + n_tokens - 1)."""
    sql = """SELECT pos, token_id, token, freq, freq_bin, p_lm, p_knn, gain FROM eval_tokens
             WHERE pos BETWEEN ? AND ? ORDER BY pos"""
    return add_bin_label(_df(cur, sql, [int(first_pos), int(first_pos) + int(n_tokens) - 1]))


# --------------------------------------------------------------------------- mitigations (SPEC §9, issue 10)

MITIGATION_TABLES = ("mitigations", "mitigation_tokens", "adaptive_lambda")
PLAIN = "plain"  # the variant that is the run itself


class MitigationError(ValueError):
    """A mitigations row that cannot be evaluated (unknown variant, a column that does not exist)."""


def _own_tables(cur: duckdb.DuckDBPyConnection) -> set[str]:
    """Tables and views of the run's own database (not of a database it attaches)."""
    sql = """SELECT table_name FROM information_schema.tables
             WHERE table_catalog = current_database() AND table_schema = current_schema()"""
    return set(_df(cur, sql)["table_name"])


def has_mitigations(cur: duckdb.DuckDBPyConnection) -> bool:
    """Whether the run was built with a validation corpus (all three mitigation tables present)."""
    return set(MITIGATION_TABLES) <= _own_tables(cur)


def mitigation_variants(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The `mitigations` table, one row per variant, plain first then in stored order."""
    return _df(cur, "SELECT * EXCLUDE (ord) FROM mitigations ORDER BY variant <> ?, ord", [PLAIN])


def adaptive_rules(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The fitted target-free λ rules: variant, bin, lo, hi, lam, n_valid (ordered)."""
    return _df(cur, "SELECT variant, bin, lo, hi, lam, n_valid FROM adaptive_lambda ORDER BY variant, bin")


def _token_columns(cur: duckdb.DuckDBPyConnection) -> set[str]:
    """Column names of the run's mitigation_tokens table."""
    sql = """SELECT column_name FROM information_schema.columns WHERE table_catalog = current_database()
             AND table_schema = current_schema() AND table_name = 'mitigation_tokens'"""
    return set(_df(cur, sql)["column_name"])


def _ident(name: str) -> str:
    """A validated column name as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _variant_sql(cur: duckdb.DuckDBPyConnection, variant: str) -> tuple[str, str, list]:
    """(p_kNN expression, λ expression, params) of a variant over `eval_tokens e LEFT JOIN
    mitigation_tokens m`. Column names come from the mitigations row and must be actual
    columns of mitigation_tokens (MitigationError otherwise); the variant name is bound."""
    row = _df(cur, "SELECT p_knn_column, lam_column, lam FROM mitigations WHERE variant = ?", [str(variant)])
    if row.empty:
        known = ", ".join(mitigation_variants(cur)["variant"])
        raise MitigationError(f"unknown mitigation variant {variant!r} (this run has: {known})")
    p_col, lam_col, lam = (None if pd.isna(v) else v for v in row.iloc[0])
    cols = _token_columns(cur)
    for field, name in (("p_knn_column", p_col), ("lam_column", lam_col)):
        if name is not None and name not in cols:
            raise MitigationError(
                f"mitigations row {variant!r}: {field} = {name!r} is not a column of mitigation_tokens "
                f"(columns: {', '.join(sorted(cols))}); rebuild the run's mitigation stage"
            )
    p_knn = "e.p_knn" if p_col is None else f"COALESCE(m.{_ident(p_col)}::DOUBLE, e.p_knn)"
    if lam_col is not None:
        return p_knn, f"m.{_ident(lam_col)}::DOUBLE", []
    if lam is None:
        raise MitigationError(f"mitigations row {variant!r} has neither a fixed lam nor a lam_column")
    return p_knn, "?::DOUBLE", [float(lam)]


def _variant_positions(cur: duckdb.DuckDBPyConnection, variant: str) -> tuple[str, list]:
    """SQL (a subquery) of per-position freq_bin, nll_lm, p_knn_v, lam_v, nll_v of a variant, and its params."""
    p_knn, lam, params = _variant_sql(cur, variant)
    sql = f"""(SELECT freq_bin, doc_id, nll_lm, nll_plain, p_knn_v, lam_v,
                      -ln(lam_v * p_knn_v + (1 - lam_v) * p_lm) AS nll_v
               FROM (SELECT e.freq_bin, e.doc_id, e.nll_lm, e.nll_knnlm AS nll_plain, e.p_lm, {p_knn} AS p_knn_v,
                            {lam} AS lam_v
                     FROM eval_tokens e LEFT JOIN mitigation_tokens m USING (pos)))"""
    return sql, params


VARIANT_AGGREGATES = """count(*) AS n_tokens, exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_v)) AS ppl,
    avg(nll_lm - nll_v) AS mean_gain, avg((nll_v > nll_lm)::DOUBLE) AS share_harmed,
    avg(p_knn_v) AS mean_p_knn, avg(lam_v) AS mean_lambda"""


def variant_bin_summary(cur: duckdb.DuckDBPyConnection, variant: str) -> pd.DataFrame:
    """Per frequency bin, for one mitigation variant: n_tokens, ppl_lm, ppl (the variant's kNN-LM),
    mean_gain (nats), share_harmed (variant NLL > LM NLL, i.e. gain < 0), mean_p_knn, mean_lambda."""
    positions, params = _variant_positions(cur, variant)
    sql = f"SELECT freq_bin, {VARIANT_AGGREGATES} FROM {positions} GROUP BY freq_bin ORDER BY freq_bin"
    df = add_bin_label(_df(cur, sql, params))
    return intervals.with_intervals(df, intervals.variant_intervals(cur, positions, params))


def variant_group_changes(cur: duckdb.DuckDBPyConnection, variant: str) -> pd.DataFrame:
    """The variant's PPL change vs plain pooled over the rare (1 ≤ freq < 1,000) and the frequent (≥ 10k)
    bins, with intervals (columns group, change_vs_plain, _ci_lo, _ci_hi, vs_plain, n_tokens, n_docs)."""
    positions, params = _variant_positions(cur, variant)
    grouped = f"""(SELECT *, CASE WHEN freq_bin BETWEEN 0 AND 2 THEN 'rare' WHEN freq_bin >= 4 THEN 'frequent'
                                ELSE 'other' END AS grp FROM {positions})"""
    return intervals.variant_intervals(cur, grouped, params, group="grp")


def variant_overall(cur: duckdb.DuckDBPyConnection, variant: str) -> dict:
    """The same totals as variant_bin_summary over all evaluation positions."""
    positions, params = _variant_positions(cur, variant)
    return _df(cur, f"SELECT {VARIANT_AGGREGATES} FROM {positions}", params).iloc[0].to_dict()


def _oracle_positions(cur: duckdb.DuckDBPyConnection) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(per-bin oracle summary, per-position freq_bin / doc_id, per-position NLL sums of oracle and plain):
    the one load and fit behind oracle_bin_summary and oracle_group_changes."""
    from knnlm_core import mitigations

    ev = _df(cur, "SELECT freq_bin, p_lm, p_knn, doc_id, nll_knnlm FROM eval_tokens ORDER BY pos")
    out, nll = mitigations.oracle_summary(ev["freq_bin"].to_numpy(), ev["p_lm"].to_numpy(), ev["p_knn"].to_numpy(),
                                          with_nll=True)
    return out, ev, {"nll_v": nll, "nll_plain": ev["nll_knnlm"].to_numpy()}


def oracle_bin_summary(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The ORACLE per-frequency-bin λ (adaptive.oracle_by_bin, an upper bound) per bin, with the
    columns of variant_bin_summary plus `lam`, and its change vs plain with SPEC §11 intervals."""
    out, ev, sums = _oracle_positions(cur)
    ci = intervals.per_position_intervals(
        ev["doc_id"].to_numpy(), ev["freq_bin"].to_numpy(), intervals.n_docs(cur), sums,
        [intervals.bs.ppl("ppl", "nll_v"), intervals.bs.ppl_change("change_vs_plain", "nll_v", "nll_plain")])
    return intervals.with_intervals(out, intervals.add_verdict(ci, "change_vs_plain", "vs_plain", "helps", "hurts"))


def oracle_group_changes(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The oracle per-bin λ's PPL change vs plain pooled over the rare and the frequent bins (as
    variant_group_changes)."""
    _, ev, sums = _oracle_positions(cur)
    ci = intervals.per_position_intervals(
        ev["doc_id"].to_numpy(), intervals.pooled_groups(ev["freq_bin"].to_numpy()), intervals.n_docs(cur), sums,
        [intervals.bs.ppl_change("change_vs_plain", "nll_v", "nll_plain")])
    return intervals.group_names(intervals.add_verdict(ci, "change_vs_plain", "vs_plain", "helps", "hurts"))


def doc_bin_sums(cur: duckdb.DuckDBPyConnection, variant: str = PLAIN) -> pd.DataFrame:
    """Per (doc_id, freq_bin): n_tokens, nll_lm and nll_knnlm sums (the variant's kNN-LM NLL for a variant)."""
    if variant == PLAIN:
        return intervals.doc_sums(cur, {"nll_lm": "nll_lm", "nll_knnlm": "nll_knnlm"})
    positions, params = _variant_positions(cur, variant)
    return intervals.doc_sums(cur, {"nll_lm": "nll_lm", "nll_knnlm": "nll_v"}, source=positions, params=params)


def doc_ids(cur: duckdb.DuckDBPyConnection) -> np.ndarray:
    """(T,) int32 document of every evaluation position (SPEC §11), in position order."""
    return _df(cur, "SELECT doc_id FROM eval_tokens ORDER BY pos")["doc_id"].to_numpy(np.int32)



# --------------------------------------------------------------------------- context novelty (SPEC §12, issue 17)

# Index into infgram.CTX_BIN_LABELS of ctx_match_len, as infgram.ctx_len_bin computes it (one count per left edge).
CTX_BIN_SQL = "(" + " + ".join(f"(ctx_match_len >= {int(edge)})::INTEGER" for edge in infgram.CTX_BINS[1:]) + ")"
CELL_STRIDE = 8  # group key of a two-way cell: (freq_bin + 1) * CELL_STRIDE + L_t bin (fewer than 8 L_t bins)
INFGRAM = "infgram"  # the ∞-gram interpolation variant of the mitigation tables
NOVEL_MAX_LEN = 1  # a novel context: L_t <= 1 (at most the last context token occurs in the datastore)
FOUND_MIN_LEN = infgram.COPY_MIN_OVERLAP  # a context found in the datastore: L_t >= 4, the copy-neighbour threshold


def has_infgram(cur: duckdb.DuckDBPyConnection) -> bool:
    """Whether the run carries the ∞-gram interpolation variant (built with a validation corpus)."""
    if not has_mitigations(cur):
        return False
    return bool(cur.execute("SELECT count(*) FROM mitigations WHERE variant = ?", [INFGRAM]).fetchone()[0])


def _novelty_source(cur: duckdb.DuckDBPyConnection, by_freq: bool, with_inf: bool) -> tuple[str, list]:
    """SQL subquery over eval_tokens with `ctx_bin`, the group key `cell` (two-way when by_freq, else the
    L_t bin) and, with_inf, `nll_inf`: the NLL of the ∞-gram interpolation read like any variant; and its params."""
    cell = f"(freq_bin + 1) * {CELL_STRIDE} + {CTX_BIN_SQL}" if by_freq else CTX_BIN_SQL
    if not with_inf:
        return f"(SELECT *, {CTX_BIN_SQL} AS ctx_bin, {cell} AS cell FROM eval_tokens)", []
    p_inf, lam, params = _variant_sql(cur, INFGRAM)
    sql = f"""(SELECT e.*, {CTX_BIN_SQL} AS ctx_bin, {cell} AS cell, -ln({lam} * {p_inf} + (1 - {lam}) * e.p_lm) AS nll_inf
               FROM eval_tokens e LEFT JOIN mitigation_tokens m USING (pos))"""
    return sql, params * 2  # λ appears twice


def _gain_share(frame: pd.DataFrame, n_documents: int, group: str) -> pd.DataFrame:
    """Per group of a doc_sums frame (columns doc_id, group, n_tokens, gain): `share_of_gain` = the group's
    sum of NLL gain / the sum over all groups, with a block-bootstrap percentile interval on the same
    document draws as bootstrap.intervals. NaN when the total gain is not positive (no net gain to
    share); no interval when a resample's total is not positive or the group is under MIN_TOKENS / MIN_DOCS."""
    groups, sums = bs.pivot(frame, ["n_tokens", "gain"], n_documents, group)
    n, gain = sums["n_tokens"], sums["gain"]  # (D, G)
    counts = bs.doc_counts(bs.draw_documents(n_documents), n_documents)  # (B, D)
    boot = counts @ gain  # (B, G)
    boot_total = boot.sum(axis=1, keepdims=True)
    total = gain.sum()
    share = gain.sum(axis=0) / total if total > 0 else np.full(len(groups), np.nan)
    lo, hi = bs.percentile_interval(np.where(boot_total > 0, boot / np.where(boot_total > 0, boot_total, 1), np.nan))
    small = (n.sum(axis=0) < bs.MIN_TOKENS) | ((n > 0).sum(axis=0) < bs.MIN_DOCS) | bool((boot_total <= 0).any())
    return pd.DataFrame({group: groups, "share_of_gain": share, "share_of_gain_ci_lo": np.where(small, np.nan, lo),
                         "share_of_gain_ci_hi": np.where(small, np.nan, hi)})


def novelty_summary(cur: duckdb.DuckDBPyConnection, run_k: int, by_freq: bool = True) -> pd.DataFrame:
    """SPEC §12 two-way view: per (target-frequency bin × context-match-length bin) cell, or per L_t bin
    alone (by_freq False): n_tokens, n_docs, PPL LM / kNN-LM, kNN-LM's paired PPL change (`ppl_change`,
    verdict `knnlm_vs_lm`), share harmed (NLL kNN-LM > NLL LM), mean gain, hit@k, the cell's share of the
    total NLL gain (`share_of_gain`), the mean copy share over the cell's positions with p_kNN > 0
    (`n_copy_share` of them) and, when the run has the ∞-gram variant, the ∞-gram interpolation's PPL,
    its change vs the LM and kNN-LM's change vs it (`knnlm_vs_infgram`). Every figure carries its SPEC §11
    interval (`*_ci_lo`, `*_ci_hi`); all are resampled on the same document draws."""
    with_inf = has_infgram(cur)
    source, params = _novelty_source(cur, by_freq, with_inf)
    ks = hit_ks_for(run_k)
    sums = {"nll_lm": "nll_lm", "nll_knnlm": "nll_knnlm", "gain": "gain", "harmed": "(nll_knnlm > nll_lm)::INTEGER",
            **{f"hit_{k}": f"hit_{k}::INTEGER" for k in ks}}
    figures = [bs.ppl("ppl_lm", "nll_lm"), bs.ppl("ppl_knnlm", "nll_knnlm"),
               bs.ppl_change("ppl_change", "nll_knnlm", "nll_lm"), bs.mean("share_harmed", "harmed"),
               bs.mean("mean_gain", "gain"), *[bs.mean(f"hit_{k}", f"hit_{k}") for k in ks]]
    if with_inf:
        sums["nll_inf"] = "nll_inf"
        figures += [bs.ppl("ppl_infgram", "nll_inf"), bs.ppl_change("infgram_change", "nll_inf", "nll_lm"),
                    bs.ppl_change("knnlm_vs_infgram_change", "nll_knnlm", "nll_inf")]
    docs = intervals.n_docs(cur)
    frame = intervals.doc_sums(cur, sums, source=source, params=params, group="cell")
    out = intervals.add_verdict(bs.intervals(frame, figures, docs, group="cell"), "ppl_change", "knnlm_vs_lm")
    if with_inf:
        intervals.add_verdict(out, "knnlm_vs_infgram_change", "knnlm_vs_infgram", "kNN-LM lower", "kNN-LM higher")
    copies = intervals.doc_sums(cur, {"copy_share": "copy_share"}, source=source, where="copy_share IS NOT NULL",
                                params=params, group="cell")
    copy = bs.intervals(copies, [bs.mean("mean_copy_share", "copy_share")], docs, group="cell")
    copy = copy.rename(columns={"n_tokens": "n_copy_share"}).drop(columns=["n_docs", "ci_note"])
    out = out.merge(_gain_share(frame, docs, "cell"), on="cell", how="left").merge(copy, on="cell", how="left")
    out["n_copy_share"] = out["n_copy_share"].fillna(0).astype(np.int64)
    cell = out.pop("cell").to_numpy(np.int64)
    ctx_bin = cell % CELL_STRIDE if by_freq else cell
    labels = {"ctx_bin": ctx_bin, "L_t": [infgram.CTX_BIN_LABELS[b] for b in ctx_bin]}
    if by_freq:
        labels = {"freq_bin": cell // CELL_STRIDE - 1, "bin": bin_labels(cell // CELL_STRIDE - 1), **labels}
    return pd.concat([pd.DataFrame(labels), out], axis=1)


def novelty_findings(cur: duckdb.DuckDBPyConnection) -> dict:
    """The numbers behind the two SPEC §12 findings rows (ui.findings), each with its SPEC §11 interval:

    `found`: positions whose context occurs in the datastore (L_t >= FOUND_MIN_LEN) against the others —
    their share of tokens, of the total NLL gain (`share_of_gain` with interval), their mean gain and
    mean copy share (with intervals) per side; `novel_rare` / `found_rare`: kNN-LM vs the LM on rare
    targets (intervals.GROUPS['rare'] bins, 1 <= freq < 1,000) in novel contexts (L_t <= NOVEL_MAX_LEN)
    and in found ones (intervals.overall_intervals: PPLs, paired change, verdict, n; {} when empty)."""
    source = f"(SELECT *, (ctx_match_len >= {int(FOUND_MIN_LEN)})::INTEGER AS found FROM eval_tokens)"
    docs = intervals.n_docs(cur)
    frame = intervals.doc_sums(cur, {"gain": "gain"}, source=source, group="found")
    sides = bs.intervals(frame, [bs.mean("mean_gain", "gain")], docs, group="found")
    copies = intervals.doc_sums(cur, {"copy_share": "copy_share"}, source=source, where="copy_share IS NOT NULL",
                                group="found")
    copy = bs.intervals(copies, [bs.mean("mean_copy_share", "copy_share")], docs, group="found")
    sides = sides.merge(_gain_share(frame, docs, "found"), on="found", how="left")
    sides = sides.merge(copy[["found", "mean_copy_share", "mean_copy_share_ci_lo", "mean_copy_share_ci_hi"]],
                        on="found", how="left")
    n_total = int(frame["n_tokens"].sum())
    by_side = {int(r["found"]): r for r in sides.to_dict("records")}
    rare_lo, rare_hi = intervals.GROUPS["rare"]
    rare = "freq_bin BETWEEN ? AND ? AND ctx_match_len "
    return {
        "min_len": int(FOUND_MIN_LEN), "novel_max_len": int(NOVEL_MAX_LEN), "n_tokens": n_total,
        "total_gain": float(frame["gain"].sum()), "n_docs": int(frame.loc[frame["n_tokens"] > 0, "doc_id"].nunique()),
        "found": {**by_side[1], "token_share": by_side[1]["n_tokens"] / n_total} if 1 in by_side else {},
        "other": by_side.get(0, {}),
        "novel_rare": intervals.overall_intervals(cur, rare + "<= ?", [rare_lo, rare_hi, int(NOVEL_MAX_LEN)]),
        "found_rare": intervals.overall_intervals(cur, rare + ">= ?", [rare_lo, rare_hi, int(FOUND_MIN_LEN)]),
    }
