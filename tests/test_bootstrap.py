"""Tests of knnlm_core.bootstrap and knnlm_core.read.ci (SPEC §11): coverage by simulation, the
reason for resampling documents, an independent loop over the shipped demo's eval_tokens, paired
vs unpaired differences, and the minimum sizes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from knnlm_core import bootstrap as bs
from knnlm_core import read, store
from knnlm_core.config import REPO_ROOT

DEMO_DB = REPO_ROOT / "data" / "runs" / "demo" / store.DB_NAME


def _docs_frame(rng: np.random.Generator, n_docs: int, per_doc: int, delta: float, doc_sd: float,
                tok_sd: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic tokens of one bin: nll_b per token, nll_a = nll_b + delta + doc effect + token noise.
    Returns (per-document sums, per-token frame). True relative PPL change of a vs b: exp(delta) − 1."""
    doc = np.repeat(np.arange(n_docs), per_doc)
    nll_b = rng.gamma(2.0, 2.0, doc.size)
    nll_a = nll_b + delta + rng.normal(0, doc_sd, n_docs)[doc] + rng.normal(0, tok_sd, doc.size)
    tokens = pd.DataFrame({"doc_id": doc, "freq_bin": 0, "nll_a": nll_a, "nll_b": nll_b})
    sums = tokens.groupby(["doc_id", "freq_bin"], as_index=False).agg(
        n_tokens=("nll_a", "size"), nll_a=("nll_a", "sum"), nll_b=("nll_b", "sum"))
    return sums, tokens


def test_document_intervals_cover_the_truth():
    """95% intervals of a paired PPL change cover the known truth in 90–99% of 400 seeded repetitions."""
    rng = np.random.default_rng(0)
    delta, fig = 0.05, bs.ppl_change("change", "nll_a", "nll_b")
    covered = 0
    for rep in range(400):
        sums, _ = _docs_frame(rng, n_docs=40, per_doc=50, delta=delta, doc_sd=0.3, tok_sd=0.5)
        ci = bs.intervals(sums, [fig], 40, seed=rep).iloc[0]
        covered += ci["change_ci_lo"] <= np.expm1(delta) <= ci["change_ci_hi"]
    assert 0.90 <= covered / 400 <= 0.99, covered


def test_token_level_bootstrap_under_covers_correlated_tokens():
    """The same data resampled token by token (each token its own 'document') covers far less often:
    tokens of a document share its effect, the reason SPEC §11 resamples documents."""
    rng = np.random.default_rng(1)
    delta, fig = 0.05, bs.ppl_change("change", "nll_a", "nll_b")
    covered_doc = covered_tok = 0
    reps = 100
    for rep in range(reps):
        sums, tokens = _docs_frame(rng, n_docs=40, per_doc=50, delta=delta, doc_sd=0.3, tok_sd=0.5)
        doc_ci = bs.intervals(sums, [fig], 40, n_boot=300, seed=rep).iloc[0]
        per_token = tokens.assign(doc_id=np.arange(len(tokens)), n_tokens=1)
        tok_ci = bs.intervals(per_token, [fig], len(tokens), n_boot=300, seed=rep).iloc[0]
        covered_doc += doc_ci["change_ci_lo"] <= np.expm1(delta) <= doc_ci["change_ci_hi"]
        covered_tok += tok_ci["change_ci_lo"] <= np.expm1(delta) <= tok_ci["change_ci_hi"]
    assert covered_tok / reps < 0.6 < 0.85 < covered_doc / reps, (covered_tok, covered_doc)


def test_demo_intervals_equal_a_plain_loop_over_documents():
    """read.bins.bin_summary's intervals on the shipped demo equal a plain numpy loop over the same document
    draws, computed from eval_tokens directly (no project function in the reference)."""
    cur = store.open_readonly(DEMO_DB).cursor()
    got = read.bins.bin_summary(cur, 1024).set_index("freq_bin")
    ev = cur.execute("SELECT doc_id, freq_bin, nll_lm, nll_knnlm, hit_16::INTEGER AS hit_16 FROM eval_tokens"
                     " ORDER BY pos").fetchdf()
    n_docs = int(cur.execute("SELECT count(*) FROM documents").fetchone()[0])
    draws = np.random.default_rng(0).integers(0, n_docs, size=(1000, n_docs))  # the documented draws
    by_doc = [ev[ev["doc_id"] == d] for d in range(n_docs)]
    samples = {b: {"ppl_knnlm": [], "ppl_change": [], "hit_16": []} for b in got.index}
    for row in draws:
        resample = pd.concat([by_doc[d] for d in row])
        for b, part in resample.groupby("freq_bin"):
            samples[b]["ppl_knnlm"].append(np.exp(part["nll_knnlm"].mean()))
            samples[b]["ppl_change"].append(np.exp(part["nll_knnlm"].mean() - part["nll_lm"].mean()) - 1)
            samples[b]["hit_16"].append(part["hit_16"].mean())
    for b in got.index:
        for col, values in samples[b].items():
            lo, hi = np.percentile(values, [2.5, 97.5])
            assert got.loc[b, f"{col}_ci_lo"] == pytest.approx(lo, rel=1e-9), (b, col)
            assert got.loc[b, f"{col}_ci_hi"] == pytest.approx(hi, rel=1e-9), (b, col)
    assert (got["n_docs"] == n_docs).all() and set(got["knnlm_vs_lm"]) <= {"helps", "harms",
                                                                           "no significant difference"}


def test_paired_interval_is_narrower_and_decides_the_verdict():
    """Two settings with strongly correlated per-token NLLs: the paired interval of their PPL change is
    narrower than the unpaired one, and only the paired one finds the (real) 2% improvement."""
    rng = np.random.default_rng(2)
    sums, _ = _docs_frame(rng, n_docs=30, per_doc=40, delta=-0.02, doc_sd=0.01, tok_sd=0.05)
    paired = bs.intervals(sums, [bs.ppl_change("change", "nll_a", "nll_b")], 30).iloc[0]
    frame_a = sums.rename(columns={"nll_a": "nll"})[["doc_id", "freq_bin", "n_tokens", "nll"]]
    frame_b = sums.rename(columns={"nll_b": "nll"})[["doc_id", "freq_bin", "n_tokens", "nll"]]
    unpaired = bs.two_run_change(frame_a, 30, frame_b, 30, bs.ppl("a", "nll"), bs.ppl("b", "nll"), "change",
                                 paired=False).iloc[0]
    same_draws = bs.two_run_change(frame_a, 30, frame_b, 30, bs.ppl("a", "nll"), bs.ppl("b", "nll"), "change",
                                   paired=True).iloc[0]
    width = lambda r: r["change_ci_hi"] - r["change_ci_lo"]  # noqa: E731
    assert width(paired) < width(unpaired) / 5
    assert same_draws["change_ci_lo"] == pytest.approx(paired["change_ci_lo"]) and \
        same_draws["change_ci_hi"] == pytest.approx(paired["change_ci_hi"])  # paired across runs = same draws
    assert bs.verdict(paired["change_ci_lo"], paired["change_ci_hi"]) == "helps"
    assert bs.verdict(unpaired["change_ci_lo"], unpaired["change_ci_hi"]) == "no significant difference"
    ci = read.ci.add_verdict(bs.intervals(sums, [bs.ppl_change("change", "nll_a", "nll_b")], 30), "change", "v")
    assert ci["v"].iloc[0] == "helps"


def test_small_groups_get_no_interval():
    """A bin under MIN_TOKENS tokens or MIN_DOCS documents has NaN bounds and says why."""
    frame = pd.DataFrame({"doc_id": [0, 1, 2, 0, 1, 2, 3, 4, 5], "freq_bin": [0, 0, 0, 1, 1, 1, 1, 1, 1],
                          "n_tokens": [100, 100, 100, 3, 3, 3, 3, 3, 3], "nll": np.arange(9.0)})
    ci = bs.intervals(frame, [bs.ppl("ppl", "nll")], 6).set_index("freq_bin")
    assert np.isnan(ci.loc[0, "ppl_ci_lo"]) and "documents" in ci.loc[0, "ci_note"]  # 3 documents
    assert np.isnan(ci.loc[1, "ppl_ci_hi"]) and "tokens" in ci.loc[1, "ci_note"]  # 18 tokens
    assert ci.loc[0, "ppl"] == pytest.approx(np.exp(3.0 / 300))
    assert bs.verdict(np.nan, np.nan) == "no interval"


def test_corrupt_document_ids_are_refused_or_collapse_the_interval():
    """Guarding checks seen to fail: a doc_id outside the run's documents is refused; ids all 0 (one
    document) leave no interval instead of a falsely narrow one."""
    rng = np.random.default_rng(3)
    sums, _ = _docs_frame(rng, n_docs=10, per_doc=20, delta=0.0, doc_sd=0.2, tok_sd=0.2)
    fig = [bs.ppl("ppl", "nll_a")]
    assert np.isfinite(bs.intervals(sums, fig, 10)["ppl_ci_lo"].iloc[0])
    with pytest.raises(ValueError, match="doc_id outside"):
        bs.intervals(sums, fig, 5)
    one_doc = sums.assign(doc_id=0).groupby(["doc_id", "freq_bin"], as_index=False).sum()
    assert np.isnan(bs.intervals(one_doc, fig, 10)["ppl_ci_lo"].iloc[0])


def test_draws_are_the_documented_ones():
    draws = bs.draw_documents(7, 50, seed=4)
    assert draws.shape == (50, 7)
    np.testing.assert_array_equal(draws, np.random.default_rng(4).integers(0, 7, size=(50, 7)))
    counts = bs.doc_counts(draws, 7)
    np.testing.assert_array_equal(counts, np.stack([np.bincount(r, minlength=7) for r in draws]))


def test_notebook_function_over_doc_bin_stats_matches_the_app():
    """read.ci.from_doc_bin_stats (SQL users' and notebooks' entry point) gives the app's intervals."""
    import duckdb

    con = duckdb.connect(str(DEMO_DB), read_only=True)
    mine = read.ci.from_doc_bin_stats(con).set_index("freq_bin")
    app = read.bins.bin_summary(con.cursor(), 1024).set_index("freq_bin")
    con.close()
    for col in ("ppl_knnlm_ci_lo", "ppl_change_ci_hi", "hit_16_ci_lo", "share_harmed_ci_hi"):
        np.testing.assert_allclose(mine[col], app[col], rtol=1e-9, err_msg=col)
    assert list(mine["knnlm_vs_lm"]) == list(app["knnlm_vs_lm"])


def test_empty_selection_gives_an_empty_table_not_an_exception():
    """Issue 21: a filter that selects no token (an empty per-document frame) gives an empty interval table
    with every column; no groups or no documents give no interval rather than a ValueError."""
    fig = [bs.ppl("ppl", "nll"), bs.ppl_change("change", "nll", "nll_b")]
    empty = pd.DataFrame({"doc_id": pd.Series([], dtype=np.int64), "freq_bin": pd.Series([], dtype=np.int64),
                          "n_tokens": pd.Series([], dtype=np.int64), "nll": [], "nll_b": []})
    for n_docs in (5, 1, 0):
        ci = bs.intervals(empty, fig, n_docs)
        assert ci.empty and {"freq_bin", "n_tokens", "n_docs", "ppl", "ppl_ci_lo", "change_ci_hi", "ci_note"} <= set(ci)
    lo, hi = bs.percentile_interval(np.zeros((1000, 0)))
    assert lo.shape == hi.shape == (0,)
    assert bs.draw_documents(0, 7).shape == (7, 0)
    unshared = bs.two_run_change(empty, 5, empty.assign(freq_bin=1), 5, bs.ppl("a", "nll"), bs.ppl("b", "nll"),
                                 "change", paired=True)
    assert unshared.empty and {"change", "change_ci_lo", "change_ci_hi"} <= set(unshared)


def test_one_document_selection_has_values_but_no_interval():
    """Tokens of a single document: the figure is the plain mean over its tokens (numpy), the bounds NaN."""
    rng = np.random.default_rng(5)
    nll = rng.gamma(2.0, 2.0, 200)
    frame = pd.DataFrame({"doc_id": [3], "freq_bin": [2], "n_tokens": [200], "nll": [nll.sum()]})
    ci = bs.intervals(frame, [bs.ppl("ppl", "nll")], 10).iloc[0]
    assert ci["ppl"] == pytest.approx(np.exp(nll.mean())) and ci["n_docs"] == 1
    assert np.isnan(ci["ppl_ci_lo"]) and np.isnan(ci["ppl_ci_hi"]) and ci["ci_note"] == "no interval: < 5 documents"
    assert bs.verdict(ci["ppl_ci_lo"], ci["ppl_ci_hi"]) == "no interval"
