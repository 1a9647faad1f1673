"""AppTest of the Probe page (SPEC §13, issue 24): on the session's tiny run (index, keys and suffix array on
disk) a probe of the run's own evaluation text shows the run's numbers, the What-if re-scores without a new
search, hostile text renders literally; on a shipped run (only metrics.duckdb) and without the model's
packages the page says what is missing and the command that adds it.

The page is not registered in app.py yet, so the tests run it through a minimal navigation script that does
what app.py does for a page (st.navigation, the run picker, `widgets.navigated()`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, app_on
from streamlit.testing.v1 import AppTest

from knnlm_core import store
from knnlm_core.corpus import read_text
from precompute import probe as lib

PAGE = str(REPO / "pages" / "probe.py")
HARNESS = f"""
import streamlit as st
from ui import widgets
page = st.navigation([st.Page({PAGE!r}, title="Probe", url_path="probe")])
run = widgets.run_picker()
with widgets.navigated():
    page.run()
"""


def _open(run: str) -> AppTest:
    at = AppTest.from_string(HARNESS, default_timeout=120)
    at.query_params["run"] = run
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _texts(at: AppTest) -> str:
    return " ".join(str(e.value) for kind in (at.markdown, at.caption, at.info, at.warning, at.error) for e in kind)


def _score(at: AppTest, text: str) -> AppTest:
    at.text_area[0].set_value(text)
    at.button[0].click().run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _eval_prefix(run_dir: Path, max_chars: int = 1500) -> str:
    """Whole first lines of the run's evaluation corpus (tokenized line by line: a prefix of its stream)."""
    text = read_text(Path(lib.read_manifest(run_dir)["config"]["eval_corpus"]))
    lines, out = text.splitlines(keepends=True), ""
    for line in lines:
        if len(out) + len(line) > max_chars:
            break
        out += line
    return out


@pytest.fixture
def probe_env(runs_root, monkeypatch):
    yield from app_on(runs_root, monkeypatch)


def test_probe_page_scores_the_runs_own_text(probe_env):
    run_dir = probe_env / "tiny"
    at = _open("tiny")
    assert at.title[0].value == "Probe" and "press **Score**" in _texts(at)
    at = _score(at, _eval_prefix(run_dir))
    assert not at.error, [e.value for e in at.error]
    shown = at.dataframe[0].value
    con = store.open_readonly(run_dir / store.DB_NAME)
    try:
        want = con.execute("SELECT pos, p_lm, p_knn, ctx_match_len FROM eval_tokens WHERE pos < ? ORDER BY pos",
                           [len(shown)]).df()
    finally:
        con.close()
    assert len(shown) > 50
    for col in ("p_lm", "p_knn"):
        np.testing.assert_allclose(shown[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-6, atol=0)
    assert (shown["ctx_match_len"].to_numpy() == want["ctx_match_len"].to_numpy()).all()
    metrics = {m.label: m.value for m in at.metric}
    nll = -np.log(want["p_lm"].to_numpy(float))
    assert metrics["PPL LM"] == f"{np.exp(nll.mean()):,.2f}"
    # the neighbour view: the chosen position's neighbours, their contexts drawn with the inspector's renderer
    assert len(at.dataframe[1].value) > 0 and 'title="neighbour 1"' in _texts(at)

    # What-if: τ changed -> p_kNN re-scored from the searched neighbours, equal to a fresh probe at that τ
    at.number_input(key="probe_tau").set_value(3.0).run()
    assert not at.exception
    p = lib.cached(run_dir)
    fresh = p.score(_eval_prefix(run_dir), tau=3.0).tokens
    np.testing.assert_allclose(at.dataframe[0].value["p_knn"].to_numpy(float), fresh["p_knn"].to_numpy(float),
                               rtol=1e-12, atol=0)
    assert not np.allclose(at.dataframe[0].value["p_knn"].to_numpy(float), want["p_knn"].to_numpy(float))


def test_probe_page_hostile_text_is_literal(probe_env):
    at = _open("tiny")
    hostile = "<b>bold</b> **md** [x](http://evil.example) $x^2$ :red[hi] \x00\x1b[31m שלום \u202eabc end"
    at = _score(at, hostile)
    assert not at.error, [e.value for e in at.error]
    strip = next(m.value for m in at.markdown if "gain" in m.value and "<span" in m.value)
    assert "&lt;" in strip and "<b>" not in strip and "<a " not in strip  # the tags stay text
    assert "\\x1b" in strip and "\x1b" not in strip and "ל" in strip  # control characters shown as escapes
    at = _score(at, "")
    assert "empty" in _texts(at) and not at.exception
    at = _score(at, "word " * (lib.MAX_TOKENS + 5))
    assert len(at.error) == 1 and "too long" in at.error[0].value and "\n" not in at.error[0].value


def test_probe_page_on_a_shipped_run_names_what_is_missing(monkeypatch):
    if not (REPO / "data" / "runs" / "demo" / store.DB_NAME).exists():
        pytest.skip("shipped runs not present")
    for _ in app_on(REPO / "data" / "runs", monkeypatch):
        at = _open("demo")
        text = _texts(at)
        assert "index.faiss" in text and "suffix_array.npy" in text and "not yet available for shipped runs" in text
        assert "python -m precompute --config configs/demo.toml --run-dir data/runs/demo-full" in text
        assert not at.text_area and not at.error  # nothing to type into: the page stopped with its message


def test_probe_page_without_the_model_packages(probe_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # the import system now says: faiss is not installed
    at = _open("tiny")
    assert lib.INSTALL in _texts(at) and "faiss" in _texts(at) and not at.text_area
