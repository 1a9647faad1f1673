"""knnlm_core.queries against a real tiny run: every SQL aggregate is checked against a
pandas / scipy reference computed from the full tables."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from knnlm_core import queries, store


@pytest.fixture(scope="module")
def cur(tiny_run):
    con = store.open_readonly(tiny_run / store.DB_NAME)
    yield con.cursor()
    con.close()


@pytest.fixture(scope="module")
def ev(cur):
    return cur.execute("SELECT * FROM eval_tokens ORDER BY pos").df()


def test_run_info(cur):
    info = queries.run_info(cur)
    assert info["schema_version"] == store.SCHEMA_VERSION
    assert info["config"]["k"] == info["k"]
    assert queries.hit_ks_for(info["k"]) == tuple(k for k in store.HIT_KS if k <= info["k"])


def test_bin_summary_matches_pandas(cur, ev):
    k = queries.run_info(cur)["k"]
    got = queries.bin_summary(cur, k).set_index("freq_bin")
    for b, g in ev.groupby("freq_bin"):
        row = got.loc[b]
        assert row["n_tokens"] == len(g)
        assert row["ppl_lm"] == pytest.approx(np.exp(g["nll_lm"].mean()))
        assert row["ppl_knnlm"] == pytest.approx(np.exp(g["nll_knnlm"].mean()))
        assert row["share_harmed"] == pytest.approx((g["gain"] < 0).mean())
        assert row["hit_16"] == pytest.approx(g["hit_16"].astype(float).mean())
        assert row["nontarget_share"] == pytest.approx(1 - (g["n_target"] / k).mean())
    assert list(got["bin"]) == [queries.bin_labels([b])[0] for b in got.index]
    assert "hit_1024" not in got  # k = 64 in the tiny run


def test_bin_summary_filters(cur, ev):
    k = queries.run_info(cur)["k"]
    harmed = queries.bin_summary(cur, k, outcome="harmed")
    assert (harmed["share_harmed"] == 1.0).all()
    assert harmed["n_tokens"].sum() == (ev["gain"] < 0).sum()
    one = queries.bin_summary(cur, k, bin_lo=1, bin_hi=1)
    assert list(one["freq_bin"]) == [1]
    tid = int(ev["token_id"].mode()[0])
    only = queries.bin_summary(cur, k, token_ids=[tid])
    assert only["n_tokens"].sum() == (ev["token_id"] == tid).sum()
    with pytest.raises(ValueError):
        queries.eval_filter(outcome="1; DROP TABLE run")


def test_correlations_match_scipy(cur, ev):
    tt = cur.execute("SELECT token_id, pq_error_mean FROM token_types").df()
    m = ev.merge(tt, on="token_id").dropna(subset=["pq_error_mean"])
    ref = stats.pearsonr(m["pq_error_mean"], m["gain"])
    got = queries.corr_pq_error_gain(cur)
    assert got["n"] == len(m)
    assert got["r"] == pytest.approx(ref.statistic, abs=1e-9)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    s = ev[(ev["freq"] >= 1) & (ev["context_freq"] >= 1)]
    ref = stats.pearsonr(np.log10(s["context_freq"]), np.log10(s["freq"]))
    got = queries.corr_context_freq(cur)
    assert (got["n"], got["r"]) == (len(s), pytest.approx(ref.statistic, abs=1e-9))


def test_find_types(cur):
    tt = cur.execute("SELECT * FROM token_types WHERE eval_count > 0 ORDER BY eval_count DESC LIMIT 1").df()
    tid, tok = int(tt["token_id"][0]), tt["token"][0]
    assert queries.find_types(cur, str(tid))["token_id"].tolist() == [tid]
    hits = queries.find_types(cur, tok)
    assert int(hits["token_id"].iloc[0]) == tid  # exact match ranks first
    assert queries.find_types(cur, "'; DROP TABLE run; --").empty
    assert queries.find_types(cur, "").empty


def test_occurrences_and_context(cur, ev):
    tid = int(ev["token_id"].mode()[0])
    occ = queries.occurrences(cur, tid, 64, "gain (worst first)", 500, width=4)
    assert sorted(occ["pos"]) == ev.loc[ev["token_id"] == tid, "pos"].tolist()
    assert occ["gain"].is_monotonic_increasing
    vocab = dict(cur.execute("SELECT token_id, token FROM vocab").fetchall())
    p = int(occ["pos"].iloc[0])
    lo = max(0, p - 3)
    expect = "".join(vocab[t] for t in ev.loc[lo:p, "context_token_id"])
    assert occ["context"].iloc[0] == expect
    with pytest.raises(ValueError):
        queries.occurrences(cur, tid, 64, "pos; DROP TABLE run")


def test_eval_position_views(cur, ev):
    pos = 10
    row = queries.eval_row(cur, pos)
    assert row["token_id"] == ev.at[pos, "token_id"]
    assert queries.eval_row(cur, 10**9) == {}
    ctx = queries.eval_context(cur, pos, 5)
    assert ctx["token_id"].tolist() == ev.loc[pos - 4 : pos, "context_token_id"].tolist()
    lm = queries.top_predictions(cur, pos, "lm")
    assert lm["rank"].tolist() == sorted(lm["rank"]) and lm["p"].is_monotonic_decreasing


def test_neighbor_contexts_match_datastore(cur):
    pos, width = 7, 6
    nb = queries.neighbors(cur, pos, width)
    ref = cur.execute("SELECT * FROM neighbors WHERE pos = ? ORDER BY rank", [pos]).df()
    assert nb["entry"].tolist() == ref["entry"].tolist()
    ds = cur.execute("SELECT token_id FROM datastore_tokens ORDER BY pos").df()["token_id"].to_numpy()
    vocab = dict(cur.execute("SELECT token_id, token FROM vocab").fetchall())
    for entry, ctx, value in zip(nb["entry"], nb["context"], nb["token_id"], strict=True):
        assert ctx == "".join(vocab[t] for t in ds[max(0, entry - width + 1) : entry + 1])
        assert ds[entry + 1] == value  # the neighbour's value follows its context


def test_pearson_helpers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = 0.3 * x + rng.normal(size=200)
    ref = stats.pearsonr(x, y)
    got = queries.pearson_of(x, y)
    assert got["r"] == pytest.approx(ref.statistic) and got["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert np.isnan(queries.pearson_p(0.5, 2))
    assert np.isnan(queries.pearson_of(np.ones(5), np.arange(5))["r"])


def test_type_gain_and_percentiles(cur, ev):
    types = queries.type_gain(cur)
    ref = ev.groupby("token_id")["gain"].mean()
    merged = types.set_index("token_id")["mean_gain"]
    assert merged.loc[ref.index.intersection(merged.index)].to_numpy() == pytest.approx(
        ref.loc[ref.index.intersection(merged.index)].to_numpy()
    )
    tt = cur.execute("SELECT * FROM token_types WHERE freq >= 10 AND cv IS NOT NULL LIMIT 1").df().iloc[0]
    pct = queries.type_percentiles(cur, int(tt["token_id"])).set_index("metric")
    same_bin = cur.execute("SELECT cv FROM token_types WHERE freq_bin = ? AND freq >= 1", [int(tt["freq_bin"])]).df()
    assert pct.at["cv", "percentile_in_bin"] == pytest.approx((same_bin["cv"].dropna() <= tt["cv"]).mean())
    assert isinstance(queries.bin_type_metrics(cur, int(tt["freq_bin"])), pd.DataFrame)


# --------------------------------------------------------------------------- context novelty (SPEC §12)


def test_neighbor_overlap_and_context_tokens(cur, ev):
    """neighbors() carries each neighbour's overlap (checked by walking both contexts back here) and its copy
    flag; neighbor_context_tokens() lists the entry's decoded left context."""
    ds = cur.execute("SELECT token_id FROM datastore_tokens ORDER BY pos").df()["token_id"].to_numpy()
    e = ev["context_token_id"].to_numpy()
    vocab = dict(cur.execute("SELECT token_id, token FROM vocab").fetchall())
    pos = int(cur.execute("SELECT pos FROM neighbors ORDER BY overlap DESC, pos LIMIT 1").fetchone()[0])
    nb = queries.neighbors(cur, pos)
    for entry, overlap, copy in zip(nb["entry"], nb["overlap"], nb["copy"], strict=True):
        n = 0
        while n < min(pos, entry) + 1 and n < 64 and e[pos - n] == ds[entry - n]:
            n += 1
        assert overlap == n and copy == (n >= queries.infgram.COPY_MIN_OVERLAP)
    assert nb["overlap"].max() >= 1
    width = 9
    ctx = queries.neighbor_context_tokens(cur, pos, width)
    assert ctx["rank"].tolist() == nb["rank"].tolist() and ctx["overlap"].tolist() == nb["overlap"].tolist()
    for entry, tokens in zip(nb["entry"], ctx["tokens"], strict=True):
        assert list(tokens) == [vocab[t] for t in ds[max(0, entry - width + 1) : entry + 1]]


def _novelty_reference(g: pd.DataFrame, total_gain: float) -> dict:
    copy = g["copy_share"].dropna()
    return {"n_tokens": len(g), "ppl_lm": np.exp(g["nll_lm"].mean()), "ppl_knnlm": np.exp(g["nll_knnlm"].mean()),
            "ppl_change": np.exp(g["nll_knnlm"].mean() - g["nll_lm"].mean()) - 1,
            "share_harmed": (g["nll_knnlm"] > g["nll_lm"]).mean(), "hit_64": g["hit_64"].astype(float).mean(),
            "mean_copy_share": copy.mean() if len(copy) else np.nan, "n_copy_share": len(copy),
            "share_of_gain": g["gain"].sum() / total_gain if total_gain > 0 else np.nan}


def test_novelty_summary_matches_pandas(cur, ev):
    k = queries.run_info(cur)["k"]
    ctx_bin = queries.infgram.ctx_len_bin(ev["ctx_match_len"].to_numpy())
    total = float(ev["gain"].sum())
    for by_freq, keys in ((True, [ev["freq_bin"], ctx_bin]), (False, ctx_bin)):
        got = queries.novelty_summary(cur, k, by_freq=by_freq)
        got = got.set_index(["freq_bin", "ctx_bin"] if by_freq else "ctx_bin")
        groups = list(ev.groupby(keys))
        assert len(got) == len(groups) and got["n_tokens"].sum() == len(ev)
        for key, g in groups:
            row = got.loc[key]
            for col, want in _novelty_reference(g, total).items():
                assert (pd.isna(row[col]) if np.isnan(want) else row[col] == pytest.approx(want, rel=1e-9)), (key, col)
            assert row["L_t"] == queries.infgram.CTX_BIN_LABELS[key[-1] if by_freq else key]


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
    got = queries.novelty_summary(cur, queries.run_info(cur)["k"], by_freq=False).set_index("ctx_bin")
    ev = cur.execute("SELECT doc_id, ctx_match_len, nll_lm, nll_knnlm, gain, copy_share FROM eval_tokens").df()
    ev["ctx_bin"] = queries.infgram.ctx_len_bin(ev["ctx_match_len"].to_numpy())
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
    nov = queries.novelty_findings(cur)
    found = ev["ctx_match_len"] >= queries.FOUND_MIN_LEN
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
