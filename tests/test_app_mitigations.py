"""AppTest of the Mitigations page (SPEC §9, issue 10) and of the variant choice on Compare, on
ONE real ci-tiny run built with a validation corpus (plus two cheap copies of its database: a
second run to compare with, and one without the mitigation tables). Every per-bin PPL shown is
recomputed here with numpy from eval_tokens + mitigation_tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import app_on
from streamlit.testing.v1 import AppTest
from test_app_pages import open_page as open_app_page
from test_mitigations import _reference

from knnlm_core import adaptive, store

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")


@pytest.fixture(scope="module")
def mit_root(tmp_path_factory, mitigated_run) -> Path:
    """Runs `mit` (the session's tiny run built with mitigations), `mit-copy` (its database again) and
    `nomit` (tables dropped)."""
    root = tmp_path_factory.mktemp("mitruns")
    for name in ("mit", "mit-copy", "nomit"):
        (root / name).mkdir()
        for f in (store.DB_NAME, "manifest.json"):
            shutil.copy(mitigated_run / f, root / name / f)
    con = duckdb.connect(str(root / "nomit" / store.DB_NAME))
    for view in ("mitigations", "mitigation_tokens", "adaptive_lambda"):
        con.execute(f"DROP VIEW {view}")
    con.execute("DROP TABLE mitigation_tokens_data")
    con.close()
    return root


@pytest.fixture
def mit_env(mit_root, monkeypatch):
    yield from app_on(mit_root, monkeypatch)


def open_page(page: str, run: str = "mit", **params) -> AppTest:
    """test_app_pages.open_page on these runs, with no st.error either."""
    at = open_app_page(page, run, **params)
    assert not at.error, [e.value for e in at.error]
    return at


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    """eval_tokens and mitigation_tokens aligned on pos, and the mitigations rows."""
    con = duckdb.connect(str(run_dir / store.DB_NAME), read_only=True)
    try:
        joined = con.execute("""SELECT e.pos, e.freq_bin, e.p_lm, e.p_knn, m.* EXCLUDE (pos)
                                FROM eval_tokens e LEFT JOIN mitigation_tokens m USING (pos) ORDER BY e.pos""").df()
        variants = con.execute("SELECT * FROM mitigations").df()
        run = con.execute("SELECT * FROM run").df().iloc[0].to_dict()
    finally:
        con.close()
    ev = joined[["pos", "freq_bin", "p_lm", "p_knn"]]
    return {"eval_tokens": ev, "mitigation_tokens": joined.drop(columns=["freq_bin", "p_lm", "p_knn"]),
            "mitigations": variants, "run": run}


def test_page_renders_every_variant_per_bin(mit_env):
    at = open_page("mitigations")
    tables = _tables(mit_env / "mit")
    variants = tables["mitigations"]
    assert "plain" in set(variants["variant"]) and len(variants) >= 5  # plain, tau, idf, 2 adaptive (+ whitening)
    shown = at.dataframe[0].value.set_index("variant")
    assert list(shown.index) == [*variants.sort_values("variant", key=lambda v: v != "plain", kind="stable")["variant"],
                                 adaptive.ORACLE_LABEL]
    assert np.isclose(shown.loc["plain", "evaluation PPL"], tables["run"]["ppl_knnlm"], rtol=1e-9)
    stored_plain = float(variants.set_index("variant").loc["plain", "ppl"])
    assert np.isclose(stored_plain, tables["run"]["ppl_knnlm"], rtol=1e-9)
    assert not at.warning, [w.value for w in at.warning]  # stored evaluation PPLs agree with the recomputed ones

    per_bin = at.dataframe[1].value
    for variant in variants["variant"]:
        want = _reference(tables, variant).set_index("freq_bin")
        got = per_bin[per_bin["variant"] == variant].set_index("freq_bin")
        assert list(got.index) == list(want.index), variant
        for col in ("ppl", "share_harmed", "mean_p_knn", "mean_lambda"):
            np.testing.assert_allclose(got[col], want[col], rtol=1e-9, err_msg=f"{variant} {col}")
    assert (per_bin.loc[per_bin["variant"] == "plain", "verdict"] == "baseline").all()
    # SPEC §11: verdicts come from the paired intervals; the tiny run has one document, so no bin has one
    assert set(per_bin["verdict"]) <= {"helps", "hurts", "no significant difference", "no interval", "baseline"}
    assert {"delta_ppl_pct_ci_lo", "delta_ppl_pct_ci_hi", "n_docs"} <= set(per_bin.columns)
    oracle = per_bin[per_bin["variant"] == adaptive.ORACLE_LABEL]
    assert len(oracle) == tables["eval_tokens"]["freq_bin"].nunique() and (oracle["delta_ppl"] <= 1e-9).all()

    verdicts = " ".join(m.value for m in at.markdown)
    assert "rare bins (freq < 1,000)" in verdicts and f"{adaptive.ORACLE_LABEL}:" in verdicts
    captions = " ".join(c.value for c in at.caption)
    assert "chosen on the validation corpus, never on the evaluation tokens" in captions
    rules = at.dataframe[2].value
    assert set(rules["variant"]) == {"adaptive-nn", "adaptive-entropy"} and rules["lam"].between(0, 1).all()
    assert at.get("plotly_chart") and at.get("download_button")


def test_page_without_mitigation_tables_says_how_to_get_them(mit_env):
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "nomit"
    at.run()
    at.switch_page("pages/mitigations.py").run()
    assert not at.exception and not at.error
    message = " ".join(i.value for i in at.info)
    assert "no mitigation tables" in message and 'valid_corpus = "data/corpora/wikitext2-valid.raw.gz"' in message
    assert 'whiten = "zipfian,entries"' in message


def test_compare_shows_the_selected_variant(mit_env):
    tables = _tables(mit_env / "mit")
    variant = next(v for v in tables["mitigations"]["variant"] if v != "plain")
    at = open_page("compare", variant=variant)
    assert at.selectbox(key="variant").value == variant and at.selectbox(key="variant_b").value == "plain"
    merged = at.dataframe[-1].value.set_index("freq_bin")
    want = _reference(tables, variant).set_index("freq_bin")
    np.testing.assert_allclose(merged[f"ppl_knnlm [mit · {variant}]"], want["ppl"], rtol=1e-9)
    np.testing.assert_allclose(merged[f"share_harmed [mit · {variant}]"], want["share_harmed"], rtol=1e-9)
    # issue 21: the change vs the LM (and its mean gain) are the variant's too, not the plain run's
    np.testing.assert_allclose(merged[f"ppl_change [mit · {variant}]"], want["ppl"] / want["ppl_lm"] - 1, rtol=1e-9)
    np.testing.assert_allclose(merged[f"mean_gain [mit · {variant}]"], want["mean_gain"], rtol=1e-9, atol=1e-12)
    assert f"hit_1 (plain run) [mit · {variant}]" in merged and "hit_1 [mit-copy]" in merged
    plain = _reference(tables, "plain").set_index("freq_bin")
    np.testing.assert_allclose(merged["ppl_knnlm [mit-copy]"], plain["ppl"], rtol=1e-9)

    at = open_page("compare")  # plain: the page as without mitigations (run names only, the run's own PPL)
    merged = at.dataframe[-1].value.set_index("freq_bin")
    np.testing.assert_allclose(merged["ppl_knnlm [mit]"], plain["ppl"], rtol=1e-9)
    assert "For a variant" not in " ".join(c.value for c in at.caption)
