"""Context novelty (SPEC §12, issue 17): the two-way view (target frequency × context-match length L_t) with
SPEC §11 intervals and each cell's share of the NLL gain, the numbers behind the two novelty findings rows, those
rows' verdicts, and the sentence the Novelty page opens with."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import bootstrap as bs
from knnlm_core import infgram
from knnlm_core.bins import bin_labels
from knnlm_core.bootstrap import MIN_TOKENS
from knnlm_core.read.bins import overall_intervals
from knnlm_core.read.ci import GROUPS, add_verdict, doc_sums, n_docs
from knnlm_core.read.mitigations import _variant_sql, has_mitigations
from knnlm_core.read.run import hit_ks_for
from knnlm_core.read.verdict import NS_RULE, Finding, ci_text, pct

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
    docs = n_docs(cur)
    frame = doc_sums(cur, sums, source=source, params=params, group="cell")
    out = add_verdict(bs.intervals(frame, figures, docs, group="cell"), "ppl_change", "knnlm_vs_lm")
    if with_inf:
        add_verdict(out, "knnlm_vs_infgram_change", "knnlm_vs_infgram", "kNN-LM lower", "kNN-LM higher")
    copies = doc_sums(cur, {"copy_share": "copy_share"}, source=source, where="copy_share IS NOT NULL",
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
    """The numbers behind the two SPEC §12 findings rows (the rules below), each with its SPEC §11 interval:

    `found`: positions whose context occurs in the datastore (L_t >= FOUND_MIN_LEN) against the others —
    their share of tokens, of the total NLL gain (`share_of_gain` with interval), their mean gain and
    mean copy share (with intervals) per side; `novel_rare` / `found_rare`: kNN-LM vs the LM on rare
    targets (ci.GROUPS['rare'] bins, 1 <= freq < 1,000) in novel contexts (L_t <= NOVEL_MAX_LEN)
    and in found ones (overall_intervals: PPLs, paired change, verdict, n; {} when empty)."""
    source = f"(SELECT *, (ctx_match_len >= {int(FOUND_MIN_LEN)})::INTEGER AS found FROM eval_tokens)"
    docs = n_docs(cur)
    frame = doc_sums(cur, {"gain": "gain"}, source=source, group="found")
    sides = bs.intervals(frame, [bs.mean("mean_gain", "gain")], docs, group="found")
    copies = doc_sums(cur, {"copy_share": "copy_share"}, source=source, where="copy_share IS NOT NULL",
                                group="found")
    copy = bs.intervals(copies, [bs.mean("mean_copy_share", "copy_share")], docs, group="found")
    sides = sides.merge(_gain_share(frame, docs, "found"), on="found", how="left")
    sides = sides.merge(copy[["found", "mean_copy_share", "mean_copy_share_ci_lo", "mean_copy_share_ci_hi"]],
                        on="found", how="left")
    n_total = int(frame["n_tokens"].sum())
    by_side = {int(r["found"]): r for r in sides.to_dict("records")}
    rare_lo, rare_hi = GROUPS["rare"]
    rare = "freq_bin BETWEEN ? AND ? AND ctx_match_len "
    return {
        "min_len": int(FOUND_MIN_LEN), "novel_max_len": int(NOVEL_MAX_LEN), "n_tokens": n_total,
        "total_gain": float(frame["gain"].sum()), "n_docs": int(frame.loc[frame["n_tokens"] > 0, "doc_id"].nunique()),
        "found": {**by_side[1], "token_share": by_side[1]["n_tokens"] / n_total} if 1 in by_side else {},
        "other": by_side.get(0, {}),
        "novel_rare": overall_intervals(cur, rare + "<= ?", [rare_lo, rare_hi, int(NOVEL_MAX_LEN)]),
        "found_rare": overall_intervals(cur, rare + ">= ?", [rare_lo, rare_hi, int(FOUND_MIN_LEN)]),
    }


# --------------------------------------------------------------------------- verdicts (findings rows) and the page's sentence


MIN_CELL_TOKENS = MIN_TOKENS  # a two-way cell named in the novelty sentence has at least as many tokens as an interval needs


def _d(d: dict, col: str, fmt: str = "{:+.1%}") -> str:
    """' [lo, hi]' of a dict's interval keys, or ' [no interval]' (as _ci for a table row)."""
    lo, hi = d.get(f"{col}_ci_lo", float("nan")), d.get(f"{col}_ci_hi", float("nan"))
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return " [no interval]"
    return f" [{fmt.format(lo)}, {fmt.format(hi)}]"


def gains_from_found_contexts(nov: dict) -> Finding:
    """SPEC §12: positions whose context occurs in the datastore (L_t >= 4) carry most (> 50%) of kNN-LM's
    total NLL gain, decided by the interval of that share (novelty_findings)."""
    m = nov["min_len"]
    claim = f"kNN-LM's gains come mostly from positions whose context occurs in the datastore (L_t ≥ {m})"
    rule = (f"✓ when the 95% interval of the L_t ≥ {m} positions' share of the total NLL gain lies above 50%; ✗ when "
            "it lies below 50%; ≈ when it includes 50%; – without a net gain or an interval")
    found, other = nov["found"], nov["other"]
    if not found or not other:
        side = "no" if not found else "every"
        return Finding(claim, None, f"{side} position has L_t ≥ {m}",
                       f"Not evaluable: {side} evaluation position's context occurs in the datastore ({m}+ tokens).",
                       rule=rule)
    if nov["total_gain"] <= 0:
        return Finding(claim, None, f"total NLL gain {nov['total_gain']:+.1f} nats over {nov['n_tokens']:,} tokens",
                       "Not evaluable: kNN-LM has no net gain on this run, so there is no gain to attribute.", rule=rule)
    share = found["share_of_gain"]
    numbers = (f"L_t ≥ {m}: {pct(found['token_share'])} of the {nov['n_tokens']:,} tokens carry "
               f"{share:.1%}{_d(found, 'share_of_gain', '{:.1%}')} of the total NLL gain "
               f"({nov['total_gain']:+.1f} nats); mean gain {found['mean_gain']:+.3f}{_d(found, 'mean_gain', '{:+.3f}')} "
               f"vs {other['mean_gain']:+.3f}{_d(other, 'mean_gain', '{:+.3f}')} nats at L_t < {m}; mean copy share of "
               f"p_kNN {pct(found.get('mean_copy_share'))} vs {pct(other.get('mean_copy_share'))}")
    lo, hi = found.get("share_of_gain_ci_lo"), found.get("share_of_gain_ci_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return Finding(claim, None, numbers, "No interval for the share (fewer than 30 tokens or 5 documents on a "
                       "side, or resamples without a net gain).", rule=rule)
    ok = True if lo > 0.5 else False if hi < 0.5 else None
    note = ""
    if ok is False:
        note = f"Most of the gain comes from positions whose last {m} context tokens never occur in the datastore."
    elif ok is None:
        note = "The 95% interval of the share includes 50%: no significant majority either way."
    elif share <= found["token_share"]:
        note = (f"A majority, but no more than these positions' share of the tokens ({pct(found['token_share'])}): "
                "the gain does not concentrate there.")
    return Finding(claim, ok, numbers, note, ns=ok is None, rule=rule)


def _cell_text(d: dict, where: str) -> str:
    """'where: PPL a → b (change [lo, hi], verdict), n = … tokens in … documents' (no verdict without an interval)."""
    verdict = "" if d["knnlm_vs_lm"] == "no interval" else f", {d['knnlm_vs_lm']}"
    return (f"{where}: PPL {d['ppl_lm']:.1f} → {d['ppl_knnlm']:.1f} ({d['ppl_change']:+.1%}{_d(d, 'ppl_change')}"
            f"{verdict}), n = {int(d['n_tokens']):,} tokens in {int(d['n_docs'])} documents")


def novel_rare_harmed(nov: dict) -> Finding:
    """SPEC §12: in novel contexts (L_t <= 1) kNN-LM still raises the rare targets' PPL (paired interval)."""
    n_max, m = nov["novel_max_len"], nov["min_len"]
    claim = f"within novel contexts (L_t ≤ {n_max}), rare targets (1 ≤ freq < 1,000) are still harmed by kNN-LM"
    rule = (f"✓ when the 95% interval of kNN-LM's PPL change vs the LM on these tokens (L_t ≤ {n_max}, freq 1–999) lies "
            f"above 0; ✗ when it lies below 0; {NS_RULE.replace('a bin has', 'they have')}")
    novel, found = nov["novel_rare"], nov["found_rare"]
    if not novel:
        return Finding(claim, None, "no such token", f"Not evaluable: no rare target follows a context with L_t ≤ {n_max}.",
                       rule=rule)
    numbers = _cell_text(novel, f"L_t ≤ {n_max}, freq 1–999")
    if found:
        numbers += "; for contrast " + _cell_text(found, f"L_t ≥ {m}, freq 1–999")
    sign = {"harms": 1, "helps": -1, "no significant difference": 0}.get(novel["knnlm_vs_lm"])
    ok = None if sign in (None, 0) else sign == 1
    note = ""
    if ok is False:
        note = "kNN-LM lowers the rare targets' perplexity even where the context is novel."
    elif sign == 0:
        note = "The 95% interval of the PPL change includes 0: no significant difference."
    elif sign is None:
        note = "No interval (fewer than 30 tokens or 5 documents)."
    return Finding(claim, ok, numbers, note, ns=sign == 0, rule=rule)


def _change_phrase(r) -> str:
    """'+x.x% [lo, hi] (verdict)' of a novelty_summary row's kNN-LM change (no verdict without an interval)."""
    verdict = "" if r.knnlm_vs_lm == "no interval" else f" ({r.knnlm_vs_lm})"
    return f"{r.ppl_change:+.1%}{ci_text(r, 'ppl_change')}{verdict}"


def novelty_sentence(by_ctx: pd.DataFrame, cells: pd.DataFrame) -> str:
    """What the two-way view (novelty_summary) shows on a run: kNN-LM's PPL change at the lowest and
    the highest context-match-length bins, the seen-target cells (>= MIN_CELL_TOKENS tokens) where its change
    is lowest and highest, and where the NLL gain concentrates (the cells with the largest share of it)."""
    if by_ctx.empty:
        return "No evaluation token on this run."
    n = by_ctx["n_tokens"].sum()
    lo, hi = by_ctx.iloc[0], by_ctx.iloc[-1]
    parts = [f"kNN-LM changes perplexity by {_change_phrase(lo)} where L_t is {lo.L_t} ({pct(lo.n_tokens / n)} of "
             f"tokens) and by {_change_phrase(hi)} where it is {hi.L_t} ({pct(hi.n_tokens / n)})."]
    seen = cells[(cells["freq_bin"] >= 0) & (cells["n_tokens"] >= MIN_CELL_TOKENS)].sort_values("ppl_change")
    if len(seen) >= 2:
        best, worst = seen.iloc[0], seen.iloc[-1]
        parts.append(f"Among seen targets (cells of ≥ {MIN_CELL_TOKENS} tokens) its change is lowest at freq {best.bin} × "
                     f"L_t {best.L_t}: {_change_phrase(best)}, and highest at freq {worst.bin} × L_t {worst.L_t}: "
                     f"{_change_phrase(worst)}.")
    if cells["share_of_gain"].notna().any():
        top = cells.sort_values("share_of_gain", ascending=False).head(3)
        where = "; ".join(f"freq {r.bin} × L_t {r.L_t} ({r.share_of_gain:.0%}{ci_text(r, 'share_of_gain', '{:.0%}')} "
                          f"of the gain from {pct(r.n_tokens / n)} of tokens)" for r in top.itertuples())
        parts.append(f"The NLL gain concentrates in {where}.")
    else:
        parts.append("kNN-LM has no net NLL gain on this run, so no share of it is reported.")
    return " ".join(parts)
