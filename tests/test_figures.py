"""ui.figures / ui.findings / ui.render: pure builders (no streamlit), checked on small frames,
plus the import-isolation rule (STYLE §1) in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from knnlm_core.bins import bin_labels
from ui import figures, findings, render

REPO = Path(__file__).resolve().parent.parent


def _bins_frame(gain_sign: float = 1.0) -> pd.DataFrame:
    b = np.array([-1, 0, 1, 2, 3, 4])
    ppl_lm = np.array([900.0, 400, 200, 100, 50, 20])
    ratio = np.exp(-gain_sign * np.array([-0.3, -0.2, -0.1, 0.05, 0.1, 0.2]))
    return pd.DataFrame(
        {
            "freq_bin": b,
            "bin": bin_labels(b),
            "n_tokens": [5, 10, 20, 40, 80, 160],
            "ppl_lm": ppl_lm,
            "ppl_knnlm": ppl_lm * ratio,
            "mean_p_lm": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3],
            "mean_p_knn": [0.0, 0.005, 0.02, 0.08, 0.25, 0.4],
            "mean_gain": np.log(1 / ratio),
            "share_harmed": [1, 0.8, 0.6, 0.4, 0.3, 0.2],
            "hit_1": [0, 0.05, 0.1, 0.2, 0.3, 0.5],
            "hit_16": [0, 0.1, 0.2, 0.3, 0.45, 0.7],
            "hit_64": [0, 0.2, 0.3, 0.5, 0.7, 0.9],
            "nontarget_share": [1, 0.99, 0.95, 0.9, 0.8, 0.6],
            "mean_cv": [np.nan, 0.3, 0.4, 0.4, 0.5, 0.5],
            "mean_contamination": [np.nan, 0.9, 0.8, 0.6, 0.5, 0.3],
            "mean_pq_error": [np.nan, 9, 8, 6, 5, 4],
            "mean_query_pq_error": [5, 5, 5, 5, 5, 5],
        }
    )


def test_bin_axes_are_ordered_categories():
    df = _bins_frame()
    for fig in (
        figures.ppl_by_bin(df),
        figures.hits_by_bin(df, (1, 16, 64)),
        figures.bin_bars(df, {"share_harmed": "harmed"}, "t", "y", percent=True),
        figures.lines_by_bin(df, {"mean_pq_error": "pq"}, "t", "y"),
        figures.compare_bins(df, df.iloc[1:], "ppl_knnlm", ("a", "b"), "t", log_y=True),
    ):
        assert isinstance(fig, go.Figure)
        assert fig.layout.xaxis.type == "category"
        assert list(fig.layout.xaxis.categoryarray) == list(df["bin"])
    assert figures.ppl_by_bin(df).layout.yaxis.type == "log"
    assert [t.name for t in figures.hits_by_bin(df, (1, 16)).data] == ["hit@1", "hit@16"]


def test_scatter_and_top_predictions():
    types = pd.DataFrame(
        {
            "token": ["a", "b", "c"],
            "freq": [1, 10, 100],
            "pq_error_mean": [3.0, 2.0, np.nan],
            "mean_gain": [-0.5, 0.1, 0.3],
        }
    )
    fig = figures.pq_gain_scatter(types, {"r": -0.2, "n": 2, "p": 0.5})
    assert len(fig.data[0].x) == 2 and "r = -0.200" in fig.layout.title.text
    lm = pd.DataFrame({"token": [" the", " a"], "p": [0.5, 0.2]})
    knn = pd.DataFrame({"token": [" a"], "p": [0.9]})
    fig = figures.top_predictions(lm, knn, " a")
    assert list(fig.data[0].marker.color)[1] == figures.COLORS["knn"]  # target highlighted
    box = figures.type_vs_bin(
        pd.DataFrame({"cv": [0.1, 0.2], "contamination": [0.5, 0.6]}),
        {"cv": 0.15, "contamination": None},
        ("cv", "contamination"),
    )
    assert len(box.data) == 3


def test_findings_agree_with_paper_shaped_run():
    corr = {"r": -0.2, "n": 100, "p": 0.01}
    out = findings.evaluate(_bins_frame(), 64, corr, {"r": -0.05, "n": 100, "p": 0.3}, corr)
    verdicts = [f.ok for f in out]
    assert verdicts[0] is True and verdicts[1] is True
    # k = 64 < 1024: hit@1024 is not measured; hit@64 must not stand in for it
    assert verdicts[2] is None and "not measured" in out[2].numbers.lower()
    assert verdicts[-2:] == [None, None] and "no exact search" in out[-1].numbers  # no exact-search frame given
    assert all(v is True for v in verdicts[:2] + verdicts[3:-2])
    table = findings.to_frame(out)
    assert set(table["verdict"]) == {"✓", "–"}


def _exact_frame(ppl_exact_ratio: float) -> pd.DataFrame:
    """exact_bin_summary-shaped frame: kNN-LM (IVFPQ) harms bins 0..2; exact search scales its PPL."""
    b = np.array([0, 1, 2, 3])
    ppl_lm = np.array([400.0, 200, 100, 50])
    ppl_ivf = ppl_lm * np.array([1.2, 1.1, 1.05, 0.9])
    ppl_exact = ppl_ivf * ppl_exact_ratio
    d_ivf, d_exact = np.log(ppl_ivf / ppl_lm), np.log(ppl_exact / ppl_lm)
    return pd.DataFrame({"freq_bin": b, "bin": bin_labels(b), "ppl_lm": ppl_lm, "ppl_ivf_pq": ppl_ivf,
                         "ppl_exact": ppl_exact, "share_explained_by_quantization": (d_ivf - d_exact) / d_ivf})


def test_exact_findings():
    cured = _exact_frame(0.8)  # exact search lowers kNN-LM PPL below the LM's in every rare bin
    assert findings.quantization_explains_rare_harm(cured).ok is True
    survives = findings.crisis_survives_exact(cured)
    assert survives.ok is False and "no longer harms" in survives.note
    worse = _exact_frame(1.1)  # exact search makes it worse: quantization does not explain the harm
    q = findings.quantization_explains_rare_harm(worse)
    assert q.ok is False and "not caused by quantization" in q.note
    assert findings.crisis_survives_exact(worse).ok is True
    assert findings.quantization_explains_rare_harm(None).ok is None


def test_hit_finding_uses_only_its_own_cut_off():
    df = _bins_frame()
    df["hit_64"] = 0.9  # would fail the hit@1024 claim if it stood in for it
    out = findings.hit_below_half(df, 1024, 0, 64)
    assert out.ok is None and "not measured" in out.note.lower()
    df["hit_1024"] = [0.0, 0.3, 0.6, 0.7, 0.8, 0.9]
    assert findings.hit_below_half(df, 1024, 0, 1024).ok is True
    df.loc[df["freq_bin"] == 0, "hit_1024"] = 0.7
    assert findings.hit_below_half(df, 1024, 0, 1024).ok is False


def test_crisis_by_bin_and_verdict():
    df = _bins_frame()
    df.loc[df["freq_bin"].between(0, 2), "ppl_knnlm"] = df["ppl_lm"] * 0.9  # kNN-LM helps every rare bin
    table = findings.crisis_by_bin(df)
    assert list(table.loc[table["freq_bin"].between(0, 2), "kNN-LM"]) == ["helps", "helps", "helps"]
    ok, sentence = findings.crisis_holds(df)
    assert ok is False and "lowers perplexity in a rare bin" in sentence
    ok, sentence = findings.crisis_holds(_bins_frame())
    assert ok is False and "1–9" in sentence  # bin 100–999 is helped in the paper-shaped frame
    harm_all = _bins_frame()
    harm_all.loc[harm_all["freq_bin"] == 2, "ppl_knnlm"] = 1000.0
    assert findings.crisis_holds(harm_all)[0] is True


def test_crisis_verdicts_follow_the_intervals():
    """SPEC §11: with interval columns, a bin counts as harmed / helped only when the interval excludes 0."""
    df = _bins_frame()
    df.loc[df["freq_bin"] == 2, "ppl_knnlm"] = 1000.0  # every rare bin's point estimate is harmed
    df["ppl_change"] = df["ppl_knnlm"] / df["ppl_lm"] - 1
    df["ppl_change_ci_lo"], df["ppl_change_ci_hi"] = df["ppl_change"] - 0.01, df["ppl_change"] + 0.01
    df["knnlm_vs_lm"] = ["harms" if lo > 0 else "helps" if hi < 0 else "no significant difference"
                         for lo, hi in zip(df["ppl_change_ci_lo"], df["ppl_change_ci_hi"])]
    assert findings.crisis_holds(df)[0] is True
    wide = df.copy()
    wide.loc[wide["freq_bin"] == 0, "ppl_change_ci_lo"] = -0.5  # the 1–9 interval now includes 0
    wide.loc[wide["freq_bin"] == 0, "knnlm_vs_lm"] = "no significant difference"
    ok, sentence = findings.crisis_holds(wide)
    assert ok is None and "not significant" in sentence and "[" in sentence
    finding = findings.helps_high_hurts_low(wide)
    assert finding.ok is None and finding.ns and "No significant difference in 1–9" in finding.note
    assert findings.to_frame([finding])["verdict"].iloc[0] == "≈"
    assert findings.helps_high_hurts_low(df).ok is True


def test_findings_explain_disagreement():
    corr = {"r": 0.3, "n": 100, "p": 0.01}
    out = findings.evaluate(_bins_frame(gain_sign=-1.0), 64, corr, {"r": 0.1, "n": 100, "p": 0.3}, corr)
    assert out[0].ok is False and "lowers perplexity" in out[0].note
    assert out[6].ok is False and out[6].note
    nan = {"r": float("nan"), "n": 0, "p": float("nan")}
    assert findings.pq_error_gain(nan).ok is None


def test_render_escapes_html():
    html = render.context_html(["<b>", " x"], "&y")
    assert "&lt;b&gt;" in html and "&amp;y" in html and "<b>" not in html
    assert render.show_token(" a\n") == "'␣a⏎'"
    assert render.fmt_p(1e-6) == "1.00e-06" and render.fmt_p(None) == "n/a"


def test_pure_modules_import_neither_streamlit_nor_torch():
    code = (
        "import sys; import knnlm_core.queries, knnlm_core.whatif, ui.figures, ui.findings, ui.render, ui.params; "
        "bad = [m for m in ('streamlit', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_interval_columns_become_error_bars():
    """A column with `<col>_ci_lo` / `<col>_ci_hi` is drawn with asymmetric error bars; one without gets none."""
    df = _bins_frame()
    df["ppl_knnlm_ci_lo"], df["ppl_knnlm_ci_hi"] = df["ppl_knnlm"] * 0.9, df["ppl_knnlm"] * 1.2
    df.loc[0, ["ppl_knnlm_ci_lo", "ppl_knnlm_ci_hi"]] = np.nan  # a bin without an interval: no bar
    lm, knn = figures.ppl_by_bin(df).data
    assert lm.error_y.array is None
    np.testing.assert_allclose(knn.error_y.array[1:], (df["ppl_knnlm"] * 0.2)[1:])
    np.testing.assert_allclose(knn.error_y.arrayminus[1:], (df["ppl_knnlm"] * 0.1)[1:])
    assert knn.error_y.array[0] == 0 and knn.error_y.arrayminus[0] == 0
    line = figures.lines_by_bin(df, {"ppl_knnlm": "x"}, "t", "y").data[0]
    np.testing.assert_allclose(line.error_y.array[1:], (df["ppl_knnlm"] * 0.2)[1:])
