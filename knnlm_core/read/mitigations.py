"""Mitigation variants (SPEC §9, issue 10): the `mitigations` / `mitigation_tokens` / `adaptive_lambda` tables
read as per-bin summaries of each variant with SPEC §11 intervals and verdicts (vs the LM and vs the plain run),
pooled rare / frequent changes, and the oracle per-bin λ (an upper bound). The variant rules themselves are
pure pandas / numpy in knnlm_core.mitigations."""

from __future__ import annotations

import duckdb
import pandas as pd

from knnlm_core import bootstrap as bs
from knnlm_core import mitigations
from knnlm_core.read.bins import bin_summary
from knnlm_core.read.ci import (
    add_verdict,
    doc_sums,
    group_names,
    n_docs,
    per_position_intervals,
    pooled_groups,
    with_intervals,
)
from knnlm_core.read.run import _df, add_bin_label

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
    """SQL (a subquery) of per-position freq_bin, doc_id, p_lm, nll_lm, nll_plain, p_knn_v, lam_v, nll_v of a
    variant, and its params."""
    p_knn, lam, params = _variant_sql(cur, variant)
    sql = f"""(SELECT freq_bin, doc_id, p_lm, nll_lm, nll_plain, p_knn_v, lam_v,
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
    return with_intervals(df, variant_intervals(cur, positions, params))


def variant_intervals(cur: duckdb.DuckDBPyConnection, positions: str, params: list,
                      group: str = "freq_bin") -> pd.DataFrame:
    """Per bin of one variant (_variant_positions: freq_bin, doc_id, nll_lm, nll_plain, p_knn_v,
    nll_v): PPL, share harmed, mean p_kNN and the paired change vs the plain run (`vs_plain`)."""
    frame = doc_sums(cur, {"nll_v": "nll_v", "nll_plain": "nll_plain", "nll_lm": "nll_lm", "p_knn": "p_knn_v",
                           "harmed": "(nll_v > nll_lm)::INTEGER"}, source=positions, params=params, group=group)
    figs = [bs.ppl("ppl", "nll_v"), bs.mean("share_harmed", "harmed"), bs.mean("mean_p_knn", "p_knn"),
            bs.ppl_change("change_vs_plain", "nll_v", "nll_plain"), bs.ppl_change("change_vs_lm", "nll_v", "nll_lm")]
    ci = bs.intervals(frame, figs, n_docs(cur), group=group)
    return add_verdict(ci, "change_vs_plain", "vs_plain", "helps", "hurts")


VARIANT_SUMS = {"nll_v": "nll_v", "nll_plain": "nll_plain", "nll_lm": "nll_lm", "p_knn": "p_knn_v", "p_lm": "p_lm",
                "gain": "nll_lm - nll_v", "harmed": "(nll_v > nll_lm)::INTEGER"}


def variant_run_figures() -> list[bs.Figure]:
    """The kNN-LM figures of bin_summary (mitigations.KNN_FIGURES) computed from a variant's NLL and p_kNN,
    plus its paired change vs the plain run (`change_vs_plain`)."""
    return [bs.ppl("ppl_knnlm", "nll_v"), bs.mean("mean_p_knn", "p_knn"), bs.mean("mean_gain", "gain"),
            bs.mean("share_harmed", "harmed"), bs.ppl_change("ppl_change", "nll_v", "nll_lm"),
            bs.mean_diff("p_knn_minus_p_lm", "p_knn", "p_lm"), bs.ppl_change("change_vs_plain", "nll_v", "nll_plain")]


def variant_run_intervals(cur: duckdb.DuckDBPyConnection, variant: str) -> pd.DataFrame:
    """Per bin, one variant's variant_run_figures with SPEC §11 intervals, the verdict of its change vs the LM
    (`knnlm_vs_lm`) and of its paired change vs the plain run (`vs_plain`), n_tokens, n_docs, ci_note."""
    positions, params = _variant_positions(cur, variant)
    frame = doc_sums(cur, VARIANT_SUMS, source=positions, params=params)
    ci = bs.intervals(frame, variant_run_figures(), n_docs(cur))
    add_verdict(ci, "ppl_change", "knnlm_vs_lm")
    return add_verdict(ci, "change_vs_plain", "vs_plain", "helps", "hurts")


def variant_run_summary(cur: duckdb.DuckDBPyConnection, run_k: int, variant: str) -> pd.DataFrame:
    """bin_summary of the run as seen through one variant (mitigations.with_variant of variant_run_intervals):
    every kNN-LM figure, interval and verdict the variant's; the LM's and the run's own columns kept."""
    return mitigations.with_variant(bin_summary(cur, run_k), variant_run_intervals(cur, variant))


def variant_group_changes(cur: duckdb.DuckDBPyConnection, variant: str) -> pd.DataFrame:
    """The variant's PPL change vs plain pooled over the rare (1 ≤ freq < 1,000) and the frequent (≥ 10k)
    bins, with intervals (columns group, change_vs_plain, _ci_lo, _ci_hi, vs_plain, n_tokens, n_docs)."""
    positions, params = _variant_positions(cur, variant)
    grouped = f"""(SELECT *, CASE WHEN freq_bin BETWEEN 0 AND 2 THEN 'rare' WHEN freq_bin >= 4 THEN 'frequent'
                                ELSE 'other' END AS grp FROM {positions})"""
    return variant_intervals(cur, grouped, params, group="grp")


def variant_overall(cur: duckdb.DuckDBPyConnection, variant: str) -> dict:
    """The same totals as variant_bin_summary over all evaluation positions."""
    positions, params = _variant_positions(cur, variant)
    return _df(cur, f"SELECT {VARIANT_AGGREGATES} FROM {positions}", params).iloc[0].to_dict()


def _oracle_positions(cur: duckdb.DuckDBPyConnection) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(per-bin oracle summary, per-position freq_bin / doc_id, per-position NLL sums of oracle and plain):
    the one load and fit behind oracle_bin_summary and oracle_group_changes."""
    ev = _df(cur, "SELECT freq_bin, p_lm, p_knn, doc_id, nll_knnlm FROM eval_tokens ORDER BY pos")
    out, nll = mitigations.oracle_summary(ev["freq_bin"].to_numpy(), ev["p_lm"].to_numpy(), ev["p_knn"].to_numpy(),
                                          with_nll=True)
    return out, ev, {"nll_v": nll, "nll_plain": ev["nll_knnlm"].to_numpy()}


def oracle_bin_summary(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The ORACLE per-frequency-bin λ (adaptive.oracle_by_bin, an upper bound) per bin, with the
    columns of variant_bin_summary plus `lam`, and its change vs plain with SPEC §11 intervals."""
    out, ev, sums = _oracle_positions(cur)
    ci = per_position_intervals(
        ev["doc_id"].to_numpy(), ev["freq_bin"].to_numpy(), n_docs(cur), sums,
        [bs.ppl("ppl", "nll_v"), bs.ppl_change("change_vs_plain", "nll_v", "nll_plain")])
    return with_intervals(out, add_verdict(ci, "change_vs_plain", "vs_plain", "helps", "hurts"))


def oracle_group_changes(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The oracle per-bin λ's PPL change vs plain pooled over the rare and the frequent bins (as
    variant_group_changes)."""
    _, ev, sums = _oracle_positions(cur)
    ci = per_position_intervals(
        ev["doc_id"].to_numpy(), pooled_groups(ev["freq_bin"].to_numpy()), n_docs(cur), sums,
        [bs.ppl_change("change_vs_plain", "nll_v", "nll_plain")])
    return group_names(add_verdict(ci, "change_vs_plain", "vs_plain", "helps", "hurts"))
