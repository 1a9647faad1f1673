"""The Token explorer (SPEC §6): finding token types, a type against its bin, and its evaluation occurrences."""

from __future__ import annotations

import re

import duckdb
import pandas as pd

from knnlm_core.read.run import _df, add_bin_label, hit_ks_for

OCCURRENCE_SORTS = {  # UI name -> ORDER BY clause (whitelist)
    "position": "pos",
    "gain (worst first)": "gain ASC, pos",
    "gain (best first)": "gain DESC, pos",
    "p_LM (lowest first)": "p_lm ASC, pos",
    "p_kNN (highest first)": "p_knn DESC, pos",
}
TYPE_METRICS = ("cv", "contamination", "pq_error_mean")


def find_types(cur: duckdb.DuckDBPyConnection, query: str, limit: int = 50) -> pd.DataFrame:
    """Token types matching `query`, best first: an integer is a token id; text matches case-insensitively
    as a substring, ranked by

    1. the token exactly as typed, when the query itself has surrounding spaces (`' the'` asks for `' the'`);
    2. whole-token matches: the token equals the query ignoring surrounding spaces and case;
    3. among those, the same case (`The` before `the` for the query `The`);
    4. the most evaluation occurrences (`eval_count`): the form the evaluation text uses;
    5. the highest datastore frequency, then the lowest id.

    So `the` gives `' the'` (113,176 in the demo datastore, 888 evaluation targets) before `'the'` (36, 1).
    """
    query = (query or "").strip("\n")
    cols = "token_id, token, freq, freq_bin, cv, contamination, pq_error_mean, eval_count"
    if re.fullmatch(r"-?[0-9]{1,9}", query.strip()):  # ASCII ('²'.isdigit() but not int()), fits INTEGER
        df = _df(cur, f"SELECT {cols} FROM token_types WHERE token_id = ?", [int(query.strip())])
        return add_bin_label(df)
    if not query.strip():
        return add_bin_label(_df(cur, f"SELECT {cols} FROM token_types LIMIT 0"))
    sql = f"""SELECT {cols} FROM token_types
              WHERE contains(lower(token), lower(?))
              ORDER BY (? <> trim(?) AND token = ?) DESC, (lower(trim(token)) = lower(trim(?))) DESC,
                       (trim(token) = trim(?)) DESC, coalesce(eval_count, 0) DESC, freq DESC, token_id
              LIMIT ?"""
    return add_bin_label(_df(cur, sql, [query.strip(), query, query, query, query, query, int(limit)]))


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
