"""SPEC §11 interval machinery shared by the read-side features: per-document sums in SQL, the bootstrap in
numpy (knnlm_core.bootstrap), and the merge of interval columns into a summary table.

A feature's `*_intervals` function returns, per group (usually the frequency bin), `n_docs`, `ci_note` and for
every figure `<figure>_ci_lo` / `<figure>_ci_hi` (plus the value of the paired-change figures, which the plain
summaries lack); `with_intervals` merges them into the feature's summary. All intervals of a run use the same
document draws (bootstrap.SEED), so figures on one page are resampled together.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import bootstrap as bs
from knnlm_core.bins import bin_labels


def n_docs(cur: duckdb.DuckDBPyConnection) -> int:
    """Documents of the run's evaluation text (resampling units, SPEC §11)."""
    return int(cur.execute("SELECT n_docs FROM run").fetchone()[0])


def doc_sums(cur: duckdb.DuckDBPyConnection, sums: dict[str, str], source: str = "eval_tokens", where: str = "TRUE",
             params: list | None = None, group: str = "freq_bin") -> pd.DataFrame:
    """Long (doc_id, group, n_tokens, <name> = SUM(<sql>)) over `source` rows matching `where`.

    `sums` maps output names to SQL expressions written by this package (never user text); user
    values reach SQL only through `params`.
    """
    cols = ", ".join(f"sum({expr})::DOUBLE AS {name}" for name, expr in sums.items())
    sql = f"""SELECT doc_id, {group}, count(*) AS n_tokens{', ' + cols if cols else ''}
              FROM {source} WHERE {where} GROUP BY doc_id, {group}"""
    return cur.execute(sql, params or []).fetchdf()


def with_intervals(summary: pd.DataFrame, ci: pd.DataFrame, group: str = "freq_bin") -> pd.DataFrame:
    """The summary with the interval columns (and any new figure columns) of `ci`, matched by group."""
    new = [c for c in ci.columns if c != group and (c not in summary or c.endswith(("_ci_lo", "_ci_hi")))]
    new = [c for c in new if c != "n_tokens"]
    return summary.merge(ci[[group, *new]], on=group, how="left")


def add_verdict(df: pd.DataFrame, figure: str, column: str, lower: str = "helps", higher: str = "harms") -> pd.DataFrame:
    """Column `column` = bootstrap.verdict of figure's interval (a difference: below 0 = `lower`)."""
    df[column] = [bs.verdict(lo, hi, lower, higher) for lo, hi in zip(df[f"{figure}_ci_lo"], df[f"{figure}_ci_hi"],
                                                                       strict=True)]
    return df


def per_position_intervals(doc_id: np.ndarray, freq_bin: np.ndarray, n_documents: int,
                           nll: dict[str, np.ndarray], figures: list[bs.Figure]) -> pd.DataFrame:
    """Intervals of figures over per-position arrays (the What-if's re-scored NLLs): sums per
    (document, bin) by bincount, then bootstrap.intervals. `nll` maps sum names to (T,) arrays."""
    keys = doc_id.astype(np.int64) * 1000 + (freq_bin.astype(np.int64) + 1)  # freq_bin >= -1, < 999
    uniq, inv = np.unique(keys, return_inverse=True)
    frame = pd.DataFrame({"doc_id": uniq // 1000, "freq_bin": uniq % 1000 - 1,
                          "n_tokens": np.bincount(inv.ravel(), minlength=len(uniq))})
    for name, x in nll.items():
        frame[name] = np.bincount(inv.ravel(), weights=np.asarray(x, np.float64), minlength=len(uniq))
    return bs.intervals(frame, figures, n_documents)


GROUPS = {"rare": (0, 2), "frequent": (4, 998)}  # pooled bins of the mitigation sentences (1 ≤ freq < 1,000; ≥ 10k)


def pooled_groups(freq_bin: np.ndarray) -> np.ndarray:
    """(T,) group code per position: 0 rare, 1 frequent, 2 other (see GROUPS)."""
    fb = np.asarray(freq_bin)
    return np.where((fb >= 0) & (fb <= 2), 0, np.where(fb >= 4, 1, 2))


def group_names(ci: pd.DataFrame) -> pd.DataFrame:
    """An interval table over pooled_groups codes with a `grp` name column instead of freq_bin."""
    return ci.assign(grp=ci["freq_bin"].map({0: "rare", 1: "frequent", 2: "other"})).drop(columns="freq_bin")


def label(ci: pd.DataFrame) -> pd.DataFrame:
    """The interval table with its ordered bin labels (for charts without a summary to merge into)."""
    return ci.assign(bin=bin_labels(ci["freq_bin"].to_numpy()))


def from_doc_bin_stats(cur: duckdb.DuckDBPyConnection, figures: list[bs.Figure] | None = None,
                       n_boot: int = bs.N_BOOT, seed: int = bs.SEED) -> pd.DataFrame:
    """Intervals straight from a run's `doc_bin_stats` table (for notebooks and SQL users): by default PPL LM,
    PPL kNN-LM, share harmed, hit@16 and kNN-LM's paired change vs the LM per frequency bin; any Figure over
    the table's sum columns (sum_nll_lm, sum_nll_knnlm, sum_p_lm, sum_p_knn, n_harmed, n_hit_<k>, ...) works."""
    frame = cur.execute("SELECT * FROM doc_bin_stats").fetchdf()
    figures = figures or [bs.ppl("ppl_lm", "sum_nll_lm"), bs.ppl("ppl_knnlm", "sum_nll_knnlm"),
                          bs.mean("share_harmed", "n_harmed"), bs.mean("hit_16", "n_hit_16"),
                          bs.ppl_change("ppl_change", "sum_nll_knnlm", "sum_nll_lm")]
    frame = frame[["doc_id", "freq_bin", "n_tokens", *{c for f in figures for c in f.cols}]].fillna(0.0)
    ci = bs.intervals(frame, figures, n_docs(cur), n_boot=n_boot, seed=seed)
    if any(f.name == "ppl_change" for f in figures):
        ci = add_verdict(ci, "ppl_change", "knnlm_vs_lm")
    return label(ci)
