"""Exact vs quantized search (SPEC §8): per-bin PPL of the three search settings with SPEC §11 intervals, the
share of kNN-LM's effect that approximate search explains, the positions exact search changes most, the exact
neighbours of one position, and the two findings rows about quantization (verdicts)."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import bootstrap as bs
from knnlm_core import schema
from knnlm_core.read.ci import add_verdict, doc_sums, n_docs, with_intervals
from knnlm_core.read.run import _df, add_bin_label, hit_ks_for
from knnlm_core.read.verdict import (
    NS_RULE,
    RARE_BIN_MAX,
    Finding,
    bins_between,
    ci_sign,
    ci_text,
    decide,
    is_ns,
    pct,
    undecided,
)

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
    recall = ", ".join(f"avg(recall_{k}) AS recall_{k}" for k in schema.RECALL_KS if k <= run_k)
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
    recall_ks = tuple(k for k in schema.RECALL_KS if k <= run_k)
    return with_intervals(df, exact_intervals(cur, lam, ks, recall_ks))


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


# --------------------------------------------------------------------------- intervals (SPEC §11)


def exact_intervals(cur: duckdb.DuckDBPyConnection, lam: float, hit_ks: tuple[int, ...],
                    recall_ks: tuple[int, ...]) -> pd.DataFrame:
    """Per bin: PPL of the three search settings, recall@k, hit@k with the index's and the exact
    neighbours, and the paired changes of exact distances / exact search vs the paper's IVFPQ + PQ."""
    lam_s = f"{float(lam)!r}"
    sums = {"nll_lm": "nll_lm",
            **{f"nll_{s}": f"-ln({lam_s} * p_knn_{s} + (1 - {lam_s}) * p_lm)" for s in schema.EXACT_SETTINGS},
            **{f"recall_{k}": f"recall_{k}" for k in recall_ks},
            **{f"hit_{k}_index": f"hit_{k}::INTEGER" for k in hit_ks},
            **{f"hit_{k}_exact": f"coalesce(exact_target_rank <= {int(k)}, FALSE)::INTEGER" for k in hit_ks}}
    frame = doc_sums(cur, sums, where="p_knn_exact IS NOT NULL")
    figs = [bs.ppl("ppl_lm", "nll_lm"), *[bs.ppl(f"ppl_{s}", f"nll_{s}") for s in schema.EXACT_SETTINGS],
            *[bs.mean(c, c) for c in sums if c.startswith(("recall_", "hit_"))],
            bs.ppl_change("change_ivf_exact_vs_ivf_pq", "nll_ivf_exact", "nll_ivf_pq"),
            bs.ppl_change("change_exact_vs_ivf_pq", "nll_exact", "nll_ivf_pq"),
            bs.ppl_change("change_ivf_pq_vs_lm", "nll_ivf_pq", "nll_lm"),
            bs.ppl_change("change_exact_vs_lm", "nll_exact", "nll_lm")]
    ci = bs.intervals(frame, figs, n_docs(cur))
    add_verdict(ci, "change_exact_vs_ivf_pq", "exact_vs_ivf_pq", "exact lower", "exact higher")
    add_verdict(ci, "change_exact_vs_lm", "exact_knnlm_vs_lm")
    return add_verdict(ci, "change_ivf_pq_vs_lm", "knnlm_vs_lm")


# --------------------------------------------------------------------------- verdicts (findings rows)


def _harmed_rare_bins(claim: str, exact: pd.DataFrame | None, rule: str) -> pd.DataFrame | Finding:
    """The rare bins whose PPL the index's kNN-LM raises (significantly, when the table has intervals),
    or the Finding saying why there are none."""
    if exact is None or exact.empty:
        return Finding(claim, None, "no exact search", "Not measured: the run has no exact-search comparison.",
                       rule=rule)
    rare = bins_between(exact, 0, RARE_BIN_MAX)
    if "knnlm_vs_lm" in rare:
        harmed = rare[rare["knnlm_vs_lm"] == "harms"]
    else:
        harmed = rare[rare["ppl_ivf_pq"] > rare["ppl_lm"]]
    if harmed.empty:
        return Finding(claim, None, "no harmed rare bin",
                       "Not evaluable: kNN-LM harms no rare bin significantly on this run.", rule=rule)
    return harmed


def _exact_finding(claim: str, exact: pd.DataFrame | None, col: str, want: int, numbers_fmt, notes: dict) -> Finding:
    """Shared logic of the two SPEC §8 findings: over the harmed rare bins, the sign of `col`'s interval."""
    side = {-1: "below", 1: "above"}
    rule = (f"over the rare bins (freq < 10^3) whose PPL kNN-LM (IVFPQ) raises significantly: ✓ when the 95% interval "
            f"of {notes['what']} lies {side[want]} 0 in every one; ✗ when it lies {side[-want]} 0 in any; {NS_RULE}; "
            "– when no rare bin is harmed")
    harmed = _harmed_rare_bins(claim, exact, rule)
    if isinstance(harmed, Finding):
        return harmed
    numbers = "; ".join(numbers_fmt(r) for r in harmed.itertuples())
    if f"{col}_ci_lo" in harmed:
        signs = [ci_sign(r, col) for r in harmed.itertuples()]
    else:
        signs = [int(np.sign(getattr(r, col))) for r in harmed.itertuples()]
    ok = decide(signs, [want] * len(signs))
    wrong = [r.bin for r, s in zip(harmed.itertuples(), signs) if s == -want]
    same = [r.bin for r, s in zip(harmed.itertuples(), signs) if s == 0]
    if ok or wrong:
        note = notes["wrong"].format(", ".join(wrong)) if wrong else ""
    else:
        note = notes["ns"].format(", ".join(same)) if same else undecided(list(harmed["bin"]), signs)
    return Finding(claim, ok, numbers, note, ns=is_ns(ok, signs), rule=rule)


def quantization_explains_rare_harm(exact: pd.DataFrame | None) -> Finding:
    """In the rare bins that kNN-LM harms (IVFPQ), exact search lowers the kNN-LM perplexity (SPEC §8)."""
    if exact is not None and "change_exact_vs_ivf_pq" not in exact:
        exact = exact.assign(change_exact_vs_ivf_pq=exact["ppl_exact"] / exact["ppl_ivf_pq"] - 1)
    return _exact_finding(
        "approximate (PQ) search adds to the rare-bin harm: exact search lowers kNN-LM PPL there", exact,
        "change_exact_vs_ivf_pq", -1,
        lambda r: (f"{r.bin}: {r.ppl_ivf_pq:.1f} (IVFPQ) → {r.ppl_exact:.1f} (exact; "
                   f"{r.change_exact_vs_ivf_pq:+.1%}{ci_text(r, 'change_exact_vs_ivf_pq')}), explains "
                   f"{pct(r.share_explained_by_quantization)}"),
        {"what": "the PPL change of exact search vs IVFPQ",
         "wrong": "In {} exact search raises kNN-LM's perplexity: the rare-bin harm is not caused by quantization here.",
         "ns": "In {} exact search makes no significant difference to kNN-LM's perplexity."})


def crisis_survives_exact(exact: pd.DataFrame | None) -> Finding:
    """With exact search, kNN-LM still raises PPL in the rare bins (quantization is not the whole cause)."""
    if exact is not None and "change_exact_vs_lm" not in exact:
        exact = exact.assign(change_exact_vs_lm=exact["ppl_exact"] / exact["ppl_lm"] - 1)
    return _exact_finding(
        "the rare-bin harm survives exact search (PQ is not the whole cause)", exact, "change_exact_vs_lm", 1,
        lambda r: f"{r.bin}: LM {r.ppl_lm:.1f}, exact kNN-LM {r.ppl_exact:.1f} ({r.change_exact_vs_lm:+.1%}"
                  f"{ci_text(r, 'change_exact_vs_lm')})",
        {"what": "the PPL change of exact-search kNN-LM vs the LM",
         "wrong": "With exact search kNN-LM no longer harms {}: there PQ is the cause.",
         "ns": "With exact search the harm in {} is no longer significant."})
