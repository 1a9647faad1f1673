"""One AppTest per dashboard page on real runs (tests/conftest.py `runs_root`), plus the
error paths: missing run, old schema, bad ?pos=, empty runs directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from knnlm_core import neighbours, store

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def open_page(page: str, run: str = "tiny", **params) -> AppTest:
    """Run app.py, switch to pages/<page>.py with URL params, and return the finished AppTest."""
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["run"] = run
    at.run()
    at.switch_page(f"pages/{page}.py")
    for key, value in params.items():
        at.query_params[key] = str(value)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _run_row(runs_root: Path, name: str = "tiny") -> dict:
    con = store.open_readonly(runs_root / name / store.DB_NAME)
    try:
        return con.execute("SELECT * FROM run").df().iloc[0].to_dict()
    finally:
        con.close()


def _texts(at: AppTest) -> str:
    return " ".join(str(e.value) for kind in (at.markdown, at.caption, at.info, at.warning, at.error) for e in kind)


def test_overview(runs_env):
    at = open_page("overview")
    run = _run_row(runs_env)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["PPL LM"] == f"{run['ppl_lm']:.2f}"
    assert metrics["PPL kNN-LM"] == f"{run['ppl_knnlm']:.2f}"
    per_bin, findings = at.dataframe[0].value, at.dataframe[1].value
    assert {"ppl_knnlm_ci_lo", "ppl_change_ci_hi", "n_docs", "knnlm_vs_lm"} <= set(per_bin.columns)
    assert len(findings) == 12 and set(findings["verdict"]) <= {"✓", "✗", "–", "≈"}  # SPEC §6, 2 exact-search, 2 §12 rows
    assert "checkable findings hold" in _texts(at)
    assert not at.error


def test_bins_page_and_filters(runs_env):
    at = open_page("bins")
    table = at.dataframe[0].value
    con = store.open_readonly(runs_env / "tiny" / store.DB_NAME)
    n_bins = con.execute("SELECT count(DISTINCT freq_bin) FROM eval_tokens").fetchone()[0]
    con.close()
    assert len(table) == n_bins and {"ppl_lm", "ppl_knnlm", "hit_64", "mean_contamination"} <= set(table.columns)
    # SPEC §11: the tiny run's 500 positions are one document, so no bin has an interval, and each says so
    assert table["ppl_knnlm_ci_lo"].isna().all() and (table["ci_note"] == "no interval: < 5 documents").all()
    assert (table["knnlm_vs_lm"] == "no interval").all() and "no interval" in _texts(at)
    assert "r =" in " ".join(m.value for m in at.metric)
    at.radio(key="bins_outcome").set_value("harmed").run()
    assert not at.exception
    assert (at.dataframe[0].value["share_harmed"] == 1.0).all()
    at.text_input(key="bins_tokens").set_value("no-such-token-xyz").run()
    assert "No token type matches" in _texts(at)


def test_tokens_page(runs_env):
    con = store.open_readonly(runs_env / "tiny" / store.DB_NAME)
    tid, count = con.execute("SELECT token_id, eval_count FROM token_types ORDER BY eval_count DESC LIMIT 1").fetchone()
    con.close()
    at = open_page("tokens", token=tid)
    occ = at.dataframe[-1].value
    assert len(occ) == count and {"pos", "p_lm", "p_knn", "gain", "context"} <= set(occ.columns)
    assert "Inspect position" in str(at.get("page_link")[0].proto.label)
    at.text_input(key="token").set_value("zzqqxx-none").run()
    assert "is not a token type or a word of the evaluation text" in _texts(at)


def _eval_row(runs_env, pos):
    con = duckdb.connect(str(runs_env / "tiny" / "metrics.duckdb"), read_only=True)
    row = con.execute(
        "SELECT e.p_knn, e.knn_log_z, r.temperature FROM eval_tokens e, run r WHERE e.pos = ?", [pos]
    ).fetchdf().iloc[0]
    con.close()
    return row


def test_neighbors_page(runs_env):
    run = _run_row(runs_env)
    at = open_page("neighbors", pos=5)
    assert at.number_input(key="pos").value == 5
    nb = at.dataframe[0].value
    assert len(nb) == run["store_neighbors"]
    assert {"rank", "token", "hit", "distance_pq", "distance_exact", "weight_in_p_knn", "context"} <= set(nb.columns)
    row = _eval_row(runs_env, 5)
    # Exact p_kNN weights: rank-ordered (non-increasing), the stored 16 of k = 64 sum to at most 1,
    # and the stored hits' weights never exceed the run's p_kNN (which sums hits over all 64).
    w = nb["weight_in_p_knn"].to_numpy()
    assert (w[:-1] >= w[1:] - 1e-12).all() and 0 < w.sum() <= 1 + 1e-9
    assert w[nb["hit"].to_numpy()].sum() <= row["p_knn"] + 1e-9
    assert w[0] == pytest.approx(np.exp(-nb["distance_pq"].iloc[0] / row["temperature"] - row["knn_log_z"]), rel=1e-5)


@pytest.mark.parametrize(
    "bad, message", [("999999", "out of range"), ("abc", "not an integer"), ("-1", "out of range")]
)
def test_neighbors_bad_pos(runs_env, bad, message):
    """A bad ?pos= is replaced by the inspector's first view (the rare target with the largest |gain| among
    positions with a full 64-token context, recomputed with pandas) with a one-line warning; the page draws."""
    con = store.open_readonly(runs_env / "tiny" / store.DB_NAME)
    ev = con.execute("SELECT pos, freq, gain FROM eval_tokens WHERE pos >= 63").df()
    con.close()
    ev = ev.assign(rare=ev["freq"].between(1, 999), mag=ev["gain"].abs())
    first = int(ev.sort_values(["rare", "mag", "pos"], ascending=[False, False, True])["pos"].iloc[0])
    at = open_page("neighbors", pos=bad)
    assert at.warning and message in at.warning[0].value and f"using position {first}" in at.warning[0].value
    assert not at.error and at.number_input(key="pos").value == first > 0 and at.dataframe


def test_neighbors_opens_on_an_informative_position(runs_env):
    """Without ?pos= the inspector opens on its first view, says why in a caption, and the URL stays clean."""
    at = open_page("neighbors")
    first = at.number_input(key="pos").value
    assert first > 0 and any(f"Opened on position {int(first)}" in c.value for c in at.caption)
    at.number_input(key="pos").set_value(3.0).run()
    assert not at.exception and not any("Opened on position" in c.value for c in at.caption)


def _metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def test_whatif_page(runs_env):
    run = _run_row(runs_env)
    at = open_page("whatif")
    k = at.slider(key="k")
    assert k.max == run["k"] and k.value == run["k"]  # default: the run's own k, τ, source
    texts = _texts(at)
    assert "exact: the run's own p_kNN" in texts and "an oracle, an upper bound" in texts
    assert any("oracle (upper bound)" in h.value for h in at.subheader)
    assert _metrics(at)["PPL what-if"] == f"{run['ppl_knnlm']:.2f}"
    table = at.dataframe[-1].value
    assert {"ppl_knnlm_run", "ppl_what-if", "ppl_oracle per-bin λ"} <= set(table.columns)
    np.testing.assert_allclose(table["ppl_what-if"], table["ppl_knnlm_run"], rtol=1e-9)
    assert float(_metrics(at)["PPL oracle per-bin λ"]) <= float(f"{run['ppl_knnlm']:.2f}")
    # λ only: still exact, equal to direct interpolation of the run's p_LM and p_kNN
    at.slider(key="lam").set_value(0.5).run()
    con = store.open_readonly(runs_env / "tiny" / store.DB_NAME)
    try:
        ev = con.execute("SELECT p_lm, p_knn FROM eval_tokens").fetchnumpy()
    finally:
        con.close()
    direct = float(np.exp(np.mean(-np.log(0.5 * ev["p_knn"] + 0.5 * ev["p_lm"]))))
    assert _metrics(at)["PPL what-if"] == f"{direct:.2f}" and "exact: the run's own p_kNN" in _texts(at)
    at.toggle(key="whatif_idf").set_value(True).run()
    assert "ppl_IDF-weighted" in at.dataframe[-1].value.columns
    assert "IDF-weighted p_kNN re-scored from 64 stored neighbours per position." in _texts(at)  # all: the block
    # τ at the run's k: all 64 neighbours in the block -> exact (without the block: tests/test_whatif.py)
    at.slider(key="tau").set_value(2.0).run()
    assert not at.warning and "exact: re-scored from all 64 neighbours" in _texts(at)
    # k <= stored: exact re-scoring
    at.slider(key="k").set_value(4).run()
    assert "exact: re-scored from all 4 neighbours" in _texts(at) and "PPL what-if" in _metrics(at)
    assert not at.exception


def test_whatif_k_beyond_run_k_note(runs_env):
    at = open_page("whatif", k=1000)
    assert "is out of range (1…64); using the run's k = 64" in _texts(at) and at.slider(key="k").value == 64


def test_whatif_without_stored_neighbours(fresh_run, monkeypatch):
    """A run storing no neighbours (the tiny run with its neighbors table emptied, no block): λ only, exact."""
    shutil.rmtree(fresh_run / neighbours.ROOT)
    con = duckdb.connect(str(fresh_run / store.DB_NAME))
    con.execute("DELETE FROM neighbors")
    con.execute("UPDATE run SET store_neighbors = 0")
    con.close()
    monkeypatch.setenv("KNNLM_RUNS_DIR", str(fresh_run.parent))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = open_page("whatif", run=fresh_run.name)
    run = _run_row(fresh_run.parent, fresh_run.name)
    assert "only λ can change" in _texts(at) and at.slider(key="tau").disabled
    assert _metrics(at)["PPL what-if"] == f"{run['ppl_knnlm']:.2f}"
    at.slider(key="lam").set_value(0.6).run()
    assert not at.exception and _metrics(at)["PPL what-if"] != f"{run['ppl_knnlm']:.2f}"
    st.cache_data.clear()
    st.cache_resource.clear()


def test_compare_page(runs_env):
    at = open_page("compare")
    assert at.selectbox(key="run_b").value == "tiny-exact"
    merged = at.dataframe[0].value
    assert "ppl_knnlm [tiny]" in merged.columns and "ppl_knnlm [tiny-exact]" in merged.columns


def test_unknown_run(runs_env):
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["run"] = "no-such-run"
    at.run()
    assert not at.exception and not at.error
    assert at.warning and "is not one of: tiny, tiny-exact; using run = tiny" in at.warning[0].value
    assert at.title[0].value == "kNN-LM long-tail diagnostics"  # the default run's page, drawn


def test_old_schema_run(fresh_run, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    shutil.move(str(fresh_run), root / "old")
    con = duckdb.connect(str(root / "old" / store.DB_NAME))
    con.execute("UPDATE run SET schema_version = 0")
    con.close()
    monkeypatch.setenv("KNNLM_RUNS_DIR", str(root))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert at.error and "schema version 0" in at.error[0].value and "rebuild" in at.error[0].value


def test_empty_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KNNLM_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not at.exception
    assert at.info and "No run found" in at.info[0].value
