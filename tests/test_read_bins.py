"""knnlm_core.read.bins against a real tiny run and the shipped demo: every SQL aggregate and correlation is
checked against a pandas / scipy reference computed from the full tables."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from knnlm_core import read
from knnlm_core.bins import bin_labels


def test_bin_summary_matches_pandas(cur, ev):
    k = read.run.run_info(cur)["k"]
    got = read.bins.bin_summary(cur, k).set_index("freq_bin")
    for b, g in ev.groupby("freq_bin"):
        row = got.loc[b]
        assert row["n_tokens"] == len(g)
        assert row["ppl_lm"] == pytest.approx(np.exp(g["nll_lm"].mean()))
        assert row["ppl_knnlm"] == pytest.approx(np.exp(g["nll_knnlm"].mean()))
        assert row["share_harmed"] == pytest.approx((g["gain"] < 0).mean())
        assert row["hit_16"] == pytest.approx(g["hit_16"].astype(float).mean())
        assert row["nontarget_share"] == pytest.approx(1 - (g["n_target"] / k).mean())
    assert list(got["bin"]) == [bin_labels([b])[0] for b in got.index]
    assert "hit_1024" not in got  # k = 64 in the tiny run


def test_bin_summary_filters(cur, ev):
    k = read.run.run_info(cur)["k"]
    harmed = read.bins.bin_summary(cur, k, outcome="harmed")
    assert (harmed["share_harmed"] == 1.0).all()
    assert harmed["n_tokens"].sum() == (ev["gain"] < 0).sum()
    one = read.bins.bin_summary(cur, k, bin_lo=1, bin_hi=1)
    assert list(one["freq_bin"]) == [1]
    tid = int(ev["token_id"].mode()[0])
    only = read.bins.bin_summary(cur, k, token_ids=[tid])
    assert only["n_tokens"].sum() == (ev["token_id"] == tid).sum()
    with pytest.raises(ValueError):
        read.run.eval_filter(outcome="1; DROP TABLE run")


def test_correlations_match_scipy(cur, ev):
    tt = cur.execute("SELECT token_id, pq_error_mean FROM token_types").df()
    m = ev.merge(tt, on="token_id").dropna(subset=["pq_error_mean"])
    ref = stats.pearsonr(m["pq_error_mean"], m["gain"])
    got = read.bins.corr_pq_error_gain(cur)
    assert got["n"] == len(m)
    assert got["r"] == pytest.approx(ref.statistic, abs=1e-9)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    s = ev[(ev["freq"] >= 1) & (ev["context_freq"] >= 1)]
    ref = stats.pearsonr(np.log10(s["context_freq"]), np.log10(s["freq"]))
    got = read.bins.corr_context_freq(cur)
    assert (got["n"], got["r"]) == (len(s), pytest.approx(ref.statistic, abs=1e-9))


def test_pearson_helpers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.3 * x + rng.normal(size=200)
    ref = stats.pearsonr(x, y)
    got = read.bins.pearson_of(x, y)
    assert got["r"] == pytest.approx(ref.statistic) and got["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert np.isnan(read.bins.pearson_p(0.5, 2))
    assert np.isnan(read.bins.pearson_of(np.ones(5), np.arange(5))["r"])


@pytest.mark.parametrize("filters", [dict(token_ids=[26240]), dict(bin_lo=-1, bin_hi=-1, outcome="helped")])
def test_empty_selection_on_the_demo(demo, filters):
    """The two crash paths of issue 21: `'film'` (26240, never an evaluation target) and the unseen bin with
    'helped only' select no token (checked with pandas): every filtered query returns an empty table or n = 0."""
    ev = demo.execute("SELECT token_id, freq_bin, gain FROM eval_tokens").df()
    sel = ev[ev["token_id"].isin(filters.get("token_ids", ev["token_id"].unique()))
             & ev["freq_bin"].between(filters.get("bin_lo", -1), filters.get("bin_hi", 99))]
    sel = sel[sel["gain"] > 0] if filters.get("outcome") == "helped" else sel
    assert len(sel) == 0
    table = read.bins.bin_summary(demo, 1024, **filters)
    assert table.empty and {"ppl_knnlm", "ppl_change_ci_lo", "knnlm_vs_lm", "n_docs", "bin"} <= set(table.columns)
    assert read.bins.overall(demo, **filters)["n_tokens"] == 0
    assert read.bins.type_gain(demo, **filters).empty
    assert read.bins.corr_pq_error_gain(demo, **filters)["n"] == 0 and read.bins.corr_context_freq(demo, **filters)["n"] == 0


def test_one_document_token_has_no_interval(demo):
    """A token whose evaluation occurrences lie in one document (found with pandas): its bin's PPL is the plain
    mean over those tokens, with no interval and the reason."""
    ev = demo.execute("SELECT token_id, doc_id, freq_bin, nll_knnlm FROM eval_tokens").df()
    docs = ev.groupby("token_id")["doc_id"].nunique()
    counts = ev["token_id"].value_counts()
    tid = int(counts[docs[docs == 1].index].idxmax())
    row = read.bins.bin_summary(demo, 1024, token_ids=[tid]).iloc[0]
    mine = ev[ev["token_id"] == tid]
    assert row["n_tokens"] == len(mine) >= 30 and row["n_docs"] == 1
    assert row["ppl_knnlm"] == pytest.approx(np.exp(mine["nll_knnlm"].mean()))
    assert np.isnan(row["ppl_change_ci_lo"]) and row["ci_note"] == "no interval: < 5 documents"
    assert row["knnlm_vs_lm"] == "no interval"
