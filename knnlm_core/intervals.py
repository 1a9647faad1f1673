"""SPEC §11 intervals of the dashboard's per-bin tables: per-document sums in SQL, bootstrap in numpy.

Each `*_intervals` function returns, per frequency bin, `n_docs`, `ci_note` and for every figure
`<figure>_ci_lo` / `<figure>_ci_hi` (plus the value of the paired-change figures, which the plain
summaries lack); `with_intervals` merges them into a summary table. All intervals of a run use the
same document draws (bootstrap.SEED), so figures on one page are resampled together.
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


# --------------------------------------------------------------------------- token level (SPEC §6)

TOKEN_SUMS = {"nll_lm": "nll_lm", "nll_knnlm": "nll_knnlm", "p_lm": "p_lm", "p_knn": "p_knn", "gain": "gain",
              "harmed": "(gain < 0)::INTEGER"}


def token_figures(hit_ks: tuple[int, ...]) -> list[bs.Figure]:
    """Figures of queries.bin_summary that are token means or PPLs, plus kNN-LM's change vs the LM."""
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


# --------------------------------------------------------------------------- word level (SPEC §10)


def word_intervals(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Per word-frequency bin: word PPL LM / kNN-LM, share harmed and the change, resampling documents
    (a word's document is that of its first token)."""
    source = "(SELECT w.*, e.doc_id FROM eval_words w JOIN eval_tokens e ON e.pos = w.first_pos)"
    frame = doc_sums(cur, {"nll_lm": "nll_lm", "nll_knnlm": "nll_knnlm", "harmed": "(nll_knnlm > nll_lm)::INTEGER",
                           "gain": "nll_lm - nll_knnlm"}, source=source)
    figs = [bs.ppl("ppl_lm", "nll_lm"), bs.ppl("ppl_knnlm", "nll_knnlm"), bs.mean("share_harmed", "harmed"),
            bs.mean("mean_gain", "gain"), bs.ppl_change("ppl_change", "nll_knnlm", "nll_lm")]
    ci = bs.intervals(frame, figs, n_docs(cur)).rename(columns={"n_tokens": "n_words"})
    return add_verdict(ci, "ppl_change", "knnlm_vs_lm")


# --------------------------------------------------------------------------- exact vs PQ (SPEC §8)

EXACT_SETTINGS = ("ivf_pq", "ivf_exact", "exact")


def exact_intervals(cur: duckdb.DuckDBPyConnection, lam: float, hit_ks: tuple[int, ...],
                    recall_ks: tuple[int, ...]) -> pd.DataFrame:
    """Per bin: PPL of the three search settings, recall@k, hit@k with the index's and the exact
    neighbours, and the paired changes of exact distances / exact search vs the paper's IVFPQ + PQ."""
    lam_s = f"{float(lam)!r}"
    sums = {"nll_lm": "nll_lm",
            **{f"nll_{s}": f"-ln({lam_s} * p_knn_{s} + (1 - {lam_s}) * p_lm)" for s in EXACT_SETTINGS},
            **{f"recall_{k}": f"recall_{k}" for k in recall_ks},
            **{f"hit_{k}_index": f"hit_{k}::INTEGER" for k in hit_ks},
            **{f"hit_{k}_exact": f"coalesce(exact_target_rank <= {int(k)}, FALSE)::INTEGER" for k in hit_ks}}
    frame = doc_sums(cur, sums, where="p_knn_exact IS NOT NULL")
    figs = [bs.ppl("ppl_lm", "nll_lm"), *[bs.ppl(f"ppl_{s}", f"nll_{s}") for s in EXACT_SETTINGS],
            *[bs.mean(c, c) for c in sums if c.startswith(("recall_", "hit_"))],
            bs.ppl_change("change_ivf_exact_vs_ivf_pq", "nll_ivf_exact", "nll_ivf_pq"),
            bs.ppl_change("change_exact_vs_ivf_pq", "nll_exact", "nll_ivf_pq"),
            bs.ppl_change("change_ivf_pq_vs_lm", "nll_ivf_pq", "nll_lm"),
            bs.ppl_change("change_exact_vs_lm", "nll_exact", "nll_lm")]
    ci = bs.intervals(frame, figs, n_docs(cur))
    add_verdict(ci, "change_exact_vs_ivf_pq", "exact_vs_ivf_pq", "exact lower", "exact higher")
    add_verdict(ci, "change_exact_vs_lm", "exact_knnlm_vs_lm")
    return add_verdict(ci, "change_ivf_pq_vs_lm", "knnlm_vs_lm")


# --------------------------------------------------------------------------- mitigations (SPEC §9)


def variant_intervals(cur: duckdb.DuckDBPyConnection, positions: str, params: list,
                      group: str = "freq_bin") -> pd.DataFrame:
    """Per bin of one variant (queries._variant_positions: freq_bin, doc_id, nll_lm, nll_plain, p_knn_v,
    nll_v): PPL, share harmed, mean p_kNN and the paired change vs the plain run (`vs_plain`)."""
    frame = doc_sums(cur, {"nll_v": "nll_v", "nll_plain": "nll_plain", "nll_lm": "nll_lm", "p_knn": "p_knn_v",
                           "harmed": "(nll_v > nll_lm)::INTEGER"}, source=positions, params=params, group=group)
    figs = [bs.ppl("ppl", "nll_v"), bs.mean("share_harmed", "harmed"), bs.mean("mean_p_knn", "p_knn"),
            bs.ppl_change("change_vs_plain", "nll_v", "nll_plain"), bs.ppl_change("change_vs_lm", "nll_v", "nll_lm")]
    ci = bs.intervals(frame, figs, n_docs(cur), group=group)
    return add_verdict(ci, "change_vs_plain", "vs_plain", "helps", "hurts")


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


def same_documents(info_a: dict, info_b: dict) -> bool:
    """Whether two runs were evaluated on the same text (corpus, limit, positions, documents): then a
    comparison between them resamples the same documents on both sides (paired)."""
    ca, cb = info_a.get("config") or {}, info_b.get("config") or {}
    return (ca.get("eval_corpus") == cb.get("eval_corpus") and ca.get("eval_limit_tokens") == cb.get("eval_limit_tokens")
            and info_a.get("n_eval") == info_b.get("n_eval") and info_a.get("n_docs") == info_b.get("n_docs"))


def run_difference(frame_a: pd.DataFrame, info_a: dict, frame_b: pd.DataFrame, info_b: dict) -> pd.DataFrame:
    """Per bin present in both runs: PPL kNN-LM of run a relative to run b (`ppl_knnlm_a_vs_b`) and the
    same for the LM, with intervals (paired when same_documents, else unpaired) and the verdict."""
    paired = same_documents(info_a, info_b)
    args = (frame_a, int(info_a["n_docs"]), frame_b, int(info_b["n_docs"]))
    knn = bs.two_run_change(*args, bs.ppl("a", "nll_knnlm"), bs.ppl("b", "nll_knnlm"), "ppl_knnlm_a_vs_b", paired)
    lm = bs.two_run_change(*args, bs.ppl("a", "nll_lm"), bs.ppl("b", "nll_lm"), "ppl_lm_a_vs_b", paired)
    out = label(knn.merge(lm, on="freq_bin"))
    out["a_vs_b"] = [bs.verdict(lo, hi, "a lower", "a higher") for lo, hi in
                     zip(out["ppl_knnlm_a_vs_b_ci_lo"], out["ppl_knnlm_a_vs_b_ci_hi"], strict=True)]
    out["resampling"] = "paired (same documents)" if paired else "unpaired (different evaluation text)"
    return out


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
