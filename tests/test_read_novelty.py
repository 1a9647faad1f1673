"""knnlm_core.read.novelty (SPEC §12) against a real tiny run: the two-way view, its intervals and the findings
numbers recomputed with pandas and a plain bootstrap loop."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest

from knnlm_core import infgram, read, store


def _novelty_reference(g: pd.DataFrame, total_gain: float) -> dict:
    copy = g["copy_share"].dropna()
    return {"n_tokens": len(g), "ppl_lm": np.exp(g["nll_lm"].mean()), "ppl_knnlm": np.exp(g["nll_knnlm"].mean()),
            "ppl_change": np.exp(g["nll_knnlm"].mean() - g["nll_lm"].mean()) - 1,
            "share_harmed": (g["nll_knnlm"] > g["nll_lm"]).mean(), "hit_64": g["hit_64"].astype(float).mean(),
            "mean_copy_share": copy.mean() if len(copy) else np.nan, "n_copy_share": len(copy),
            "share_of_gain": g["gain"].sum() / total_gain if total_gain > 0 else np.nan}


def test_novelty_summary_matches_pandas(cur, ev):
    k = read.run.run_info(cur)["k"]
    ctx_bin = infgram.ctx_len_bin(ev["ctx_match_len"].to_numpy())
    total = float(ev["gain"].sum())
    for by_freq, keys in ((True, [ev["freq_bin"], ctx_bin]), (False, ctx_bin)):
        got = read.novelty.novelty_summary(cur, k, by_freq=by_freq)
        got = got.set_index(["freq_bin", "ctx_bin"] if by_freq else "ctx_bin")
        groups = list(ev.groupby(keys))
        assert len(got) == len(groups) and got["n_tokens"].sum() == len(ev)
        for key, g in groups:
            row = got.loc[key]
            for col, want in _novelty_reference(g, total).items():
                assert (pd.isna(row[col]) if np.isnan(want) else row[col] == pytest.approx(want, rel=1e-9)), (key, col)
            assert row["L_t"] == infgram.CTX_BIN_LABELS[key[-1] if by_freq else key]


def test_novelty_intervals_equal_a_plain_loop(tiny_run, tmp_path):
    """With the tiny run cut into 10 documents, the intervals of the L_t-bin view (the paired PPL change, the
    mean copy share over positions with p_kNN > 0, the share of the total gain) equal a plain loop over the
    documented draws (bootstrap module docstring), computed from eval_tokens without project code."""
    path = tmp_path / store.DB_NAME
    shutil.copy(tiny_run / store.DB_NAME, path)
    con = duckdb.connect(str(path))
    con.execute("UPDATE eval_tokens SET doc_id = pos // 50")
    n_docs = int(con.execute("SELECT max(doc_id) + 1 FROM eval_tokens").fetchone()[0])
    con.execute("UPDATE run SET n_docs = ?", [n_docs])
    con.close()
    cur = store.open_readonly(path).cursor()
    got = read.novelty.novelty_summary(cur, read.run.run_info(cur)["k"], by_freq=False).set_index("ctx_bin")
    ev = cur.execute("SELECT doc_id, ctx_match_len, nll_lm, nll_knnlm, gain, copy_share FROM eval_tokens").df()
    ev["ctx_bin"] = infgram.ctx_len_bin(ev["ctx_match_len"].to_numpy())
    by_doc = [ev[ev["doc_id"] == d] for d in range(n_docs)]
    samples = {b: {"ppl_change": [], "mean_copy_share": [], "share_of_gain": []} for b in got.index}
    for row in np.random.default_rng(0).integers(0, n_docs, size=(1000, n_docs)):
        resample = pd.concat([by_doc[d] for d in row])
        total = resample["gain"].sum()
        for b, part in resample.groupby("ctx_bin"):
            samples[b]["ppl_change"].append(np.exp(part["nll_knnlm"].mean() - part["nll_lm"].mean()) - 1)
            samples[b]["mean_copy_share"].append(part["copy_share"].mean())  # pandas skips NULL (p_kNN = 0)
            samples[b]["share_of_gain"].append(part["gain"].sum() / total if total > 0 else np.nan)
    checked = 0
    for b in got.index:
        for col, values in samples[b].items():
            lo, hi = got.loc[b, f"{col}_ci_lo"], got.loc[b, f"{col}_ci_hi"]
            if pd.isna(lo):  # too few tokens / documents (or, for the share, a resample without a net gain)
                continue
            want = np.nanpercentile(np.array(values, np.float64), [2.5, 97.5])
            assert (lo, hi) == pytest.approx(tuple(want), rel=1e-9), (b, col)
            checked += 1
    assert checked >= 3
    assert got["n_docs"].to_dict() == ev.groupby("ctx_bin")["doc_id"].nunique().to_dict()


def test_novelty_findings_match_pandas(cur, ev):
    nov = read.novelty.novelty_findings(cur)
    found = ev["ctx_match_len"] >= read.novelty.FOUND_MIN_LEN
    assert nov["n_tokens"] == len(ev) and nov["total_gain"] == pytest.approx(ev["gain"].sum(), rel=1e-9)
    assert nov["found"]["token_share"] == pytest.approx(found.mean())
    assert nov["found"]["mean_gain"] == pytest.approx(ev.loc[found, "gain"].mean(), rel=1e-9)
    assert nov["other"]["mean_gain"] == pytest.approx(ev.loc[~found, "gain"].mean(), rel=1e-9)
    if ev["gain"].sum() > 0:
        assert nov["found"]["share_of_gain"] == pytest.approx(ev.loc[found, "gain"].sum() / ev["gain"].sum(), rel=1e-9)
    rare = ev["freq_bin"].between(0, 2)
    for key, part in (("novel_rare", ev[rare & (ev["ctx_match_len"] <= 1)]),
                      ("found_rare", ev[rare & found])):
        if part.empty:
            assert nov[key] == {}
            continue
        assert nov[key]["n_tokens"] == len(part)
        assert nov[key]["ppl_change"] == pytest.approx(np.exp(part["nll_knnlm"].mean() - part["nll_lm"].mean()) - 1,
                                                       rel=1e-9)
