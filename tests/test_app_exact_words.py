"""AppTest of the issue-9 views on a real tiny run: the Exact vs PQ page (its three PPLs per bin
recomputed here with numpy from eval_tokens), the neighbour inspector's exact neighbours, the
word level of the bins page, words in the token explorer, and the Compare page's crisis rows."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import streamlit as st
from conftest import build_tiny_run
from streamlit.testing.v1 import AppTest
from test_app_pages import _texts
from test_app_pages import open_page as open_any_page

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def open_page(page: str, run: str = "tiny", **params) -> AppTest:
    """test_app_pages.open_page, also requiring that the page shows no error box."""
    at = open_any_page(page, run, **params)
    assert not at.error, [e.value for e in at.error]
    return at


def _table(run_dir: Path, sql: str):
    con = duckdb.connect(str(run_dir / "metrics.duckdb"), read_only=True)
    try:
        return con.execute(sql).df()
    finally:
        con.close()


def test_exact_page_shows_the_three_perplexities_per_bin(runs_env):
    at = open_page("exact")
    ev = _table(runs_env / "tiny", "SELECT freq_bin, p_lm, p_knn_ivf_pq, p_knn_ivf_exact, p_knn_exact FROM eval_tokens")
    lam = float(_table(runs_env / "tiny", 'SELECT "lambda" FROM run').iloc[0, 0])
    shown = at.dataframe[0].value.set_index("freq_bin")
    assert len(shown) == ev["freq_bin"].nunique()
    for b, grp in ev.groupby("freq_bin"):
        for col, ppl in (("p_knn_ivf_pq", "ppl_ivf_pq"), ("p_knn_ivf_exact", "ppl_ivf_exact"), ("p_knn_exact", "ppl_exact")):
            want = np.exp(np.mean(-np.log(lam * grp[col] + (1 - lam) * grp["p_lm"])))
            assert np.isclose(shown.loc[b, ppl], want, rtol=1e-9), (b, ppl)
        assert np.isclose(shown.loc[b, "ppl_lm"], np.exp(np.mean(-np.log(grp["p_lm"]))), rtol=1e-9)
    metrics = {m.label: m.value for m in at.metric}
    overall = np.exp(np.mean(-np.log(lam * ev["p_knn_exact"] + (1 - lam) * ev["p_lm"])))
    assert metrics["exact search"] == f"{overall:.2f}"
    assert "share_explained_by_quantization" in _texts(at)
    assert at.dataframe[1].value["pos"].notna().all()  # positions that link into the inspector


def test_exact_page_without_exact_search(tmp_path, tiny_model, monkeypatch):
    (tmp_path / "runs").mkdir()
    build_tiny_run(tmp_path / "runs" / "noexact", tiny_model, exact_search="off")
    monkeypatch.setenv("KNNLM_RUNS_DIR", str(tmp_path / "runs"))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "noexact"
    at.run()
    at.switch_page("pages/exact.py").run()
    assert not at.exception
    assert any("no exact-search comparison" in i.value for i in at.info)
    at.switch_page("pages/overview.py").run()
    assert not at.exception and "no exact search" in " ".join(str(d.value.to_csv()) for d in at.dataframe)
    st.cache_data.clear()
    st.cache_resource.clear()


def test_inspector_shows_exact_neighbours(runs_env):
    at = open_page("neighbors", pos=7)
    assert "Exact neighbours" in " ".join(h.value for h in at.subheader)
    exact = _table(runs_env / "tiny", "SELECT entry FROM exact_neighbors WHERE pos = 7 ORDER BY rank")
    shown = [d.value for d in at.dataframe if "in_index_top" in d.value.columns][0]
    assert list(shown["entry"]) == list(exact["entry"])


def test_bins_page_at_word_level(runs_env):
    at = open_page("bins", level="word")
    words = _table(runs_env / "tiny", "SELECT nll_lm, nll_knnlm FROM eval_words")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["words"] == f"{len(words):,}"
    assert metrics["word PPL LM"] == f"{np.exp(words['nll_lm'].mean()):.2f}"
    assert metrics["word PPL kNN-LM"] == f"{np.exp(words['nll_knnlm'].mean()):.2f}"
    assert "n_words" in at.dataframe[0].value.columns


def test_token_explorer_accepts_a_word_and_any_text(runs_env):
    at = open_page("tokens", token="Boulter")  # a word of the first test sentence, three GPT-2 tokens
    text = _texts(at)
    assert "splits into 3 token(s)" in text
    assert list(at.dataframe[0].value["word"]) == ["Boulter"]
    assert list(at.dataframe[1].value["token"]) == [" B", "oul", "ter"]
    at = open_page("tokens", token="Zyxqv unheard-of")  # neither a type nor an evaluation word
    assert "the run's tokenizer splits it into" in _texts(at)


def test_compare_states_the_crisis_per_setting(runs_env):
    at = open_page("compare")
    text = _texts(at)
    assert "Does the long-tail crisis hold" in " ".join(h.value for h in at.subheader)
    assert "**tiny**" in text and "the crisis" in text
    crisis = at.dataframe[0].value
    assert {"kNN-LM [tiny]", "delta_ppl [tiny]"} <= set(crisis.columns)
