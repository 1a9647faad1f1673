"""The Frequency bins view (SPEC §6): per-bin summaries with their SPEC §11 intervals and kNN-LM's verdict vs
the LM, the overall totals, and the correlations of the paper's findings (PQ error, context frequency)."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd
from scipy import stats

from knnlm_core import bootstrap as bs
from knnlm_core.read.ci import add_verdict, doc_sums, n_docs, with_intervals
from knnlm_core.read.run import _df, add_bin_label, eval_filter, hit_ks_for


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
    return with_intervals(df, bin_intervals(cur, run_k, ks, where, params))


def overall(cur: duckdb.DuckDBPyConnection, bin_lo=None, bin_hi=None, token_ids=None, outcome="all") -> dict:
    """Totals over the filtered evaluation tokens: n, PPL LM / kNN-LM, share harmed, and (SPEC §11) their
    intervals, kNN-LM's relative change vs the LM (`ppl_change`) with its verdict `knnlm_vs_lm`, n_docs."""
    where, params = eval_filter(bin_lo, bin_hi, token_ids, outcome)
    sql = f"""SELECT count(*) AS n_tokens, exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm,
                     avg((gain < 0)::DOUBLE) AS share_harmed, avg(gain) AS mean_gain
              FROM eval_tokens WHERE {where}"""
    out = _df(cur, sql, params).iloc[0].to_dict()
    ci = overall_intervals(cur, where, params)
    return {**{k: v for k, v in ci.items() if k not in ("all_bins",)}, **out}


# --------------------------------------------------------------------------- intervals (SPEC §11)


TOKEN_SUMS = {"nll_lm": "nll_lm", "nll_knnlm": "nll_knnlm", "p_lm": "p_lm", "p_knn": "p_knn", "gain": "gain",
              "harmed": "(gain < 0)::INTEGER"}


def token_figures(hit_ks: tuple[int, ...]) -> list[bs.Figure]:
    """Figures of bin_summary that are token means or PPLs, plus kNN-LM's change vs the LM."""
    return [bs.ppl("ppl_lm", "nll_lm"), bs.ppl("ppl_knnlm", "nll_knnlm"), bs.mean("mean_p_lm", "p_lm"),
            bs.mean("mean_p_knn", "p_knn"), bs.mean("mean_gain", "gain"), bs.mean("share_harmed", "harmed"),
            *[bs.mean(f"hit_{k}", f"hit_{k}") for k in hit_ks], bs.mean("nontarget_share", "nontarget"),
            bs.ppl_change("ppl_change", "nll_knnlm", "nll_lm"), bs.mean_diff("p_knn_minus_p_lm", "p_knn", "p_lm")]


def bin_intervals(cur: duckdb.DuckDBPyConnection, run_k: int, hit_ks: tuple[int, ...], where: str = "TRUE",
                  params: list | None = None) -> pd.DataFrame:
    """Intervals of the token-level per-bin figures over the eval_tokens rows matching `where`, and the
    verdict of kNN-LM vs the LM per bin (`knnlm_vs_lm`: helps / harms / no significant difference)."""
    sums = {**TOKEN_SUMS, **{f"hit_{k}": f"hit_{k}::INTEGER" for k in hit_ks},
            "nontarget": f"1 - n_target / {float(run_k)!r}"}
    frame = doc_sums(cur, sums, where=where, params=params)
    ci = bs.intervals(frame, token_figures(hit_ks), n_docs(cur))
    return add_verdict(ci, "ppl_change", "knnlm_vs_lm")


def overall_intervals(cur: duckdb.DuckDBPyConnection, where: str = "TRUE", params: list | None = None) -> dict:
    """Overall (all bins pooled) PPL LM / kNN-LM, share harmed and kNN-LM's change, with intervals."""
    source = f"(SELECT *, 0 AS all_bins FROM eval_tokens WHERE {where})"
    frame = doc_sums(cur, TOKEN_SUMS, source=source, params=params, group="all_bins")
    figs = [bs.ppl("ppl_lm", "nll_lm"), bs.ppl("ppl_knnlm", "nll_knnlm"), bs.mean("share_harmed", "harmed"),
            bs.ppl_change("ppl_change", "nll_knnlm", "nll_lm")]
    ci = bs.intervals(frame, figs, n_docs(cur), group="all_bins")
    return add_verdict(ci, "ppl_change", "knnlm_vs_lm").iloc[0].to_dict() if len(ci) else {}


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
