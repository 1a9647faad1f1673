"""knnlm_core.read.tokens (the Token explorer) against a real tiny run and the shipped demo, checked with pandas."""

from __future__ import annotations

import pandas as pd
import pytest

from knnlm_core import read


def test_find_types(cur):
    tt = cur.execute("SELECT * FROM token_types WHERE eval_count > 0 ORDER BY eval_count DESC LIMIT 1").df()
    tid, tok = int(tt["token_id"][0]), tt["token"][0]
    assert read.tokens.find_types(cur, str(tid))["token_id"].tolist() == [tid]
    hits = read.tokens.find_types(cur, tok)
    assert int(hits["token_id"].iloc[0]) == tid  # exact match ranks first
    assert read.tokens.find_types(cur, "'; DROP TABLE run; --").empty
    assert read.tokens.find_types(cur, "").empty


def test_occurrences_and_context(cur, ev):
    tid = int(ev["token_id"].mode()[0])
    occ = read.tokens.occurrences(cur, tid, 64, "gain (worst first)", 500, width=4)
    assert sorted(occ["pos"]) == ev.loc[ev["token_id"] == tid, "pos"].tolist()
    assert occ["gain"].is_monotonic_increasing
    vocab = dict(cur.execute("SELECT token_id, token FROM vocab").fetchall())
    p = int(occ["pos"].iloc[0])
    lo = max(0, p - 3)
    expect = "".join(vocab[t] for t in ev.loc[lo:p, "context_token_id"])
    assert occ["context"].iloc[0] == expect
    with pytest.raises(ValueError):
        read.tokens.occurrences(cur, tid, 64, "pos; DROP TABLE run")


def test_type_gain_and_percentiles(cur, ev):
    types = read.bins.type_gain(cur)
    ref = ev.groupby("token_id")["gain"].mean()
    merged = types.set_index("token_id")["mean_gain"]
    assert merged.loc[ref.index.intersection(merged.index)].to_numpy() == pytest.approx(
        ref.loc[ref.index.intersection(merged.index)].to_numpy()
    )
    tt = cur.execute("SELECT * FROM token_types WHERE freq >= 10 AND cv IS NOT NULL LIMIT 1").df().iloc[0]
    pct = read.tokens.type_percentiles(cur, int(tt["token_id"])).set_index("metric")
    same_bin = cur.execute("SELECT cv FROM token_types WHERE freq_bin = ? AND freq >= 1", [int(tt["freq_bin"])]).df()
    assert pct.at["cv", "percentile_in_bin"] == pytest.approx((same_bin["cv"].dropna() <= tt["cv"]).mean())
    assert isinstance(read.tokens.bin_type_metrics(cur, int(tt["freq_bin"])), pd.DataFrame)


def test_find_types_prefers_the_evaluation_form(demo):
    """Issue 21: `the` resolves to `' the'` (113,176 in the datastore, the form the evaluation text uses), not
    `'the'` (36); in general the first match is, among the types equal to the query up to surrounding spaces
    and case, one of the same case with the most evaluation occurrences (recomputed with pandas)."""
    tt = demo.execute("SELECT token_id, token, freq, eval_count FROM token_types").df()
    got = read.tokens.find_types(demo, "the")
    assert got["token"].iloc[0] == " the" and int(got["freq"].iloc[0]) == 113_176
    assert got["token"].tolist().index(" the") < got["token"].tolist().index("the")
    for query in ("the", "The", "film", "Film", "of", "and", "he", "new", "album", "'"):
        whole = tt[tt["token"].str.strip().str.lower() == query.lower()]
        same_case = whole[whole["token"].str.strip() == query]
        best = (same_case if len(same_case) else whole).sort_values(["eval_count", "freq"], ascending=False)
        assert int(read.tokens.find_types(demo, query)["token_id"].iloc[0]) == int(best["token_id"].iloc[0]), query
    assert read.tokens.find_types(demo, " the")["token"].iloc[0] == " the"  # typed spaces ask for that form
    assert read.tokens.find_types(demo, "262")["token_id"].tolist() == [262]
