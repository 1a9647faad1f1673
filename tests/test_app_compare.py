"""Compare runs with a mitigation variant on each side (issue 21 item 2), on the shipped runs: `demo · idf` (a
p_kNN column) against `demo-shakespeare · adaptive-nn` (a per-position λ column). Every column, interval,
verdict, sentence and error bar the page shows for a side must be that variant's: each is recomputed here
from the run's DuckDB tables with numpy / pandas (the variant's per-position NLLs) and the independent
bootstrap loop of test_findings (SPEC §11), and the columns that stay the run's own carry their label."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from conftest import app_on
from streamlit.testing.v1 import AppTest
from test_findings import REPO, RUNS, boot, mean_of, needs_runs, per_doc, ppl_change, read

from knnlm_core import mitigations

SIDES = (("demo", "idf"), ("demo-shakespeare", "adaptive-nn"))  # (run, variant): page side a, side b
RARE, FREQUENT = (0, 2), 4  # pooled bins of the "against the plain run" sentence


def positions(run: str, variant: str) -> pd.DataFrame:
    """Per evaluation position of a run under a variant: doc_id, freq_bin, p_lm, nll_lm, nll_plain (the run's
    kNN-LM), hit_16, p_knn_v, lam_v and nll_v = −ln(λ p_kNN + (1 − λ) p_LM), from the stored tables."""
    ev = read(run, "SELECT pos, doc_id, freq_bin, p_lm, p_knn, nll_lm, nll_knnlm AS nll_plain, hit_16 "
                   "FROM eval_tokens ORDER BY pos")
    tok = read(run, "SELECT * FROM mitigation_tokens ORDER BY pos")
    row = read(run, "SELECT * FROM mitigations").set_index("variant").loc[variant]
    ev = ev.merge(tok, on="pos", how="left")
    p_knn = ev["p_knn"].to_numpy(np.float64)
    if pd.notna(row["p_knn_column"]):
        col = ev[row["p_knn_column"]].to_numpy(np.float64, na_value=np.nan)
        p_knn = np.where(np.isnan(col), p_knn, col)
    lam = ev[row["lam_column"]].to_numpy(np.float64) if pd.notna(row["lam_column"]) else np.full(len(ev), row["lam"])
    nll_v = -np.log(lam * p_knn + (1 - lam) * ev["p_lm"].to_numpy(np.float64))
    assert np.isfinite(nll_v).all()
    return ev.assign(p_knn_v=p_knn, lam_v=lam, nll_v=nll_v)[
        ["doc_id", "freq_bin", "p_lm", "nll_lm", "nll_plain", "hit_16", "p_knn_v", "lam_v", "nll_v"]]


def verdict(lo: float, hi: float, lower: str, higher: str) -> str:
    """SPEC §11 in words: `lower` when the interval lies below 0, `higher` above, else no significant difference."""
    if np.isnan(lo) or np.isnan(hi):
        return "no interval"
    return lower if hi < 0 else higher if lo > 0 else "no significant difference"


FIGURES = {  # figure -> statistic over per-document sums (the variant's, paired where two columns)
    "ppl_knnlm": lambda n, s: np.exp(s["v"] / n), "mean_gain": mean_of("lm", "v"), "share_harmed": mean_of("harmed"),
    "mean_p_knn": mean_of("pknn"), "p_knn_minus_p_lm": mean_of("pknn", "plm"), "ppl_change": ppl_change("v", "lm"),
    "change_vs_plain": ppl_change("v", "plain"),
}


def reference(run: str, variant: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(per bin: every FIGURES value with _ci_lo / _ci_hi, ppl_lm, hit_16, delta_ppl and both verdicts;
    per pooled group rare / frequent: change_vs_plain with interval and n_docs; the per-document sums)."""
    p, nd = positions(run, variant), int(read(run, "SELECT n_docs FROM run").iloc[0, 0])
    sums = {"v": p["nll_v"], "lm": p["nll_lm"], "plain": p["nll_plain"], "harmed": p["nll_v"] > p["nll_lm"],
            "pknn": p["p_knn_v"], "plm": p["p_lm"], "hit": p["hit_16"]}
    bins, n, s = per_doc(p["doc_id"].to_numpy(), p["freq_bin"].to_numpy(), sums, nd)
    out = pd.DataFrame({"freq_bin": bins, "n_tokens": n.sum(axis=0), "ppl_lm": np.exp(s["lm"].sum(0) / n.sum(0)),
                        "hit_16": s["hit"].sum(0) / n.sum(0)})
    for name, stat in FIGURES.items():
        out[name], out[f"{name}_ci_lo"], out[f"{name}_ci_hi"], _ = boot(nd, n, s, stat)
    out["delta_ppl"] = out["ppl_knnlm"] - out["ppl_lm"]
    out["knnlm_vs_lm"] = [verdict(lo, hi, "helps", "harms") for lo, hi in zip(out["ppl_change_ci_lo"],
                                                                              out["ppl_change_ci_hi"])]
    out["vs_plain"] = [verdict(lo, hi, "helps", "hurts") for lo, hi in zip(out["change_vs_plain_ci_lo"],
                                                                          out["change_vs_plain_ci_hi"])]
    grp = np.where(p["freq_bin"].between(*RARE), 0, np.where(p["freq_bin"] >= FREQUENT, 1, 2))
    names, gn, gs = per_doc(p["doc_id"].to_numpy(), grp, sums, nd)
    value, lo, hi, _ = boot(nd, gn, gs, FIGURES["change_vs_plain"])
    groups = pd.DataFrame({"grp": names, "change": value, "lo": lo, "hi": hi, "n_docs": (gn > 0).sum(0)})
    return out, groups.set_index("grp"), {"n": n, "s": s, "nd": nd, "bins": bins}


@pytest.fixture(scope="module")
def page():
    """One AppTest of Compare with both sides on a variant, and the references of both sides."""
    with pytest.MonkeyPatch.context() as mp:
        env = app_on(RUNS, mp)
        next(env)
        try:
            at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
            at.query_params["run"] = SIDES[0][0]
            at.run()
            at.switch_page("pages/compare.py")
            at.query_params["variant"], at.query_params["variant_b"] = SIDES[0][1], SIDES[1][1]
            at.run()
            assert not at.exception and not at.error, [e.value for e in at.exception or at.error]
            yield at, {f"{r} · {v}": reference(r, v) for r, v in SIDES}
        finally:
            next(env, None)


def side(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """The columns `<col> [name]` of a side-by-side table as `<col>`, indexed by freq_bin."""
    cols = {c: c[: -len(f" [{name}]")] for c in table.columns if c.endswith(f" [{name}]")}
    return table.set_index("freq_bin")[list(cols)].rename(columns=cols).dropna(subset=["n_tokens"])


def check_crisis(shown: pd.DataFrame, ref: pd.DataFrame) -> None:
    """The crisis table of one side equals the recomputation: values, intervals and verdicts."""
    ref = ref.set_index("freq_bin")
    assert list(shown.index) == list(ref.index)
    for col in ("ppl_lm", "ppl_knnlm", "delta_ppl", "ppl_change", "ppl_change_ci_lo", "ppl_change_ci_hi",
                "change_vs_plain", "change_vs_plain_ci_lo", "change_vs_plain_ci_hi"):
        np.testing.assert_allclose(shown[col].astype(float), ref[col], rtol=1e-9, atol=1e-12, err_msg=col)
    assert list(shown["kNN-LM"]) == list(ref["knnlm_vs_lm"]) and list(shown["vs_plain"]) == list(ref["vs_plain"])


@needs_runs
def test_crisis_table_is_each_variants(page):
    at, refs = page
    crisis = at.dataframe[0].value
    for name, (ref, _, _) in refs.items():
        check_crisis(side(crisis, name), ref)
    idf = refs["demo · idf"][0].set_index("freq_bin").loc[0]  # the bin: PPL 318,855 → 150,530
    assert round(idf["ppl_lm"]) == 318855 and round(idf["ppl_knnlm"]) == 150530
    assert np.isclose(idf["ppl_change"], idf["ppl_knnlm"] / idf["ppl_lm"] - 1, rtol=1e-9)


@needs_runs
def test_the_check_catches_the_plain_runs_verdicts(page):
    """The page as it was: the variant's PPL beside the plain run's change, interval and verdict. The check fails."""
    at, refs = page
    shown = side(at.dataframe[0].value, "demo · idf")
    ev = read("demo", "SELECT doc_id, freq_bin, nll_lm, nll_knnlm FROM eval_tokens")
    plain = ev.groupby("freq_bin").apply(lambda g: np.expm1((g["nll_knnlm"] - g["nll_lm"]).mean()))
    stale = shown.assign(ppl_change=plain.reindex(shown.index).to_numpy())
    with pytest.raises(AssertionError, match="ppl_change"):
        check_crisis(stale, refs["demo · idf"][0])


def _pct(x: float) -> str:
    return f"{x:+.1%}"


@needs_runs
def test_sentences_are_each_variants(page):
    at, refs = page
    text = " ".join(m.value for m in at.markdown)
    for name, (ref, groups, _) in refs.items():
        line = next(t for t in text.split("\n- ") if f"`{name}`" in t)
        rare = ref[ref["freq_bin"].between(*RARE)]
        for r in rare.itertuples():
            assert f"{_pct(r.ppl_change)} [{_pct(r.ppl_change_ci_lo)}, {_pct(r.ppl_change_ci_hi)}]" in line, (name, line)
        v = list(rare["knnlm_vs_lm"])
        head = "holds:" if all(x == "harms" for x in v) else "does not hold:" if "helps" in v else "is not significant"
        assert f"the crisis {head}" in line, line
        for grp, words in ((0, "the rare bins"), (1, "the frequent bins")):
            g = groups.loc[grp]
            verb = verdict(g["lo"], g["hi"], "helps", "hurts").replace("no significant difference",
                                                                       "no significant difference on")
            want = (f"{verb} {words}") if verb != "no interval" else words
            assert want in line and (f"PPL {100 * g['change']:+.1f}% (95% CI {100 * g['lo']:+.1f} … "
                                     f"{100 * g['hi']:+.1f}%, {int(g['n_docs'])} documents)") in line, (name, line)


def _figure(at: AppTest, title: str) -> go.Figure:
    """The plotly figure drawn whose title starts with `title`."""
    figs = [pio.from_json(c.proto.spec) for c in at.get("plotly_chart")]
    return next(f for f in figs if f.layout.title.text.startswith(title))


def _array(v) -> np.ndarray:
    """A plotly JSON array: plain list, or typed {'dtype', 'bdata' (base64)} as plotly writes numpy arrays."""
    if isinstance(v, dict):
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
    return np.asarray(v, np.float64)


@needs_runs
def test_bars_and_error_bars_are_each_variants(page):
    at, refs = page
    for title, col in (("PPL kNN-LM per bin", "ppl_knnlm"), ("Mean gain per bin", "mean_gain"),
                       ("Share harmed", "share_harmed")):
        fig = _figure(at, title)
        for name, (ref, _, _) in refs.items():
            trace = next(t for t in fig.data if t.name == name)
            np.testing.assert_allclose(_array(trace.y), ref[col], rtol=1e-9, err_msg=f"{title} {name}")
            np.testing.assert_allclose(_array(trace.error_y.array), ref[f"{col}_ci_hi"] - ref[col], rtol=1e-7,
                                       atol=1e-12)
            np.testing.assert_allclose(_array(trace.error_y.arrayminus), ref[col] - ref[f"{col}_ci_lo"], rtol=1e-7,
                                       atol=1e-12)
    for title in ("hit@16", "Mean contamination", "Mean PQ error"):  # the run's own columns say so
        assert "(the run's own: plain index)" in _figure(at, title).layout.title.text
    hit = _figure(at, "hit@16")
    for name, (ref, _, _) in refs.items():
        np.testing.assert_allclose(_array(next(t for t in hit.data if t.name == name).y), ref["hit_16"], rtol=1e-12)


@needs_runs
def test_merged_table_is_each_variants_with_own_columns_labelled(page):
    at, refs = page
    merged = at.dataframe[-1].value
    for name, (ref, _, _) in refs.items():
        shown, ref = side(merged, name), ref.set_index("freq_bin")
        for fig in ("mean_gain", "share_harmed", "mean_p_knn", "p_knn_minus_p_lm", "ppl_knnlm"):
            for col in (fig, f"{fig}_ci_lo", f"{fig}_ci_hi"):
                np.testing.assert_allclose(shown[col].astype(float), ref[col], rtol=1e-9, atol=1e-12, err_msg=col)
        own = [c for c in shown.columns if c.startswith(("hit_", "mean_contamination", "mean_pq_error"))]
        assert own and all(c.endswith(mitigations.OWN_SUFFIX) for c in own), own
        lm = {"n_tokens", "n_types_eval", "ppl_lm", "mean_p_lm", "n_docs", "ci_note", "knnlm_vs_lm", "vs_plain"}
        known = lm | set(mitigations.KNN_FIGURES) | set(mitigations.VS_PLAIN)
        unsorted = [c for c in shown.columns if not c.endswith(mitigations.OWN_SUFFIX)
                    and c.removesuffix("_ci_lo").removesuffix("_ci_hi") not in known]
        assert not unsorted, f"columns neither the variant's, the LM's nor labelled the run's own: {unsorted}"
        np.testing.assert_allclose(shown["hit_16" + mitigations.OWN_SUFFIX].astype(float), ref["hit_16"], rtol=1e-12)


@needs_runs
def test_difference_is_between_the_variants(page):
    """ppl_knnlm_a_vs_b: the variants' PPL ratio − 1 per bin; the runs read different text, so each side is
    resampled on its own (seeds 0 and 1) and the interval is that of the ratio."""
    at, refs = page
    diff = next(d.value for d in at.dataframe if "ppl_knnlm_a_vs_b" in d.value.columns).set_index("freq_bin")
    (_, _, a), (_, _, b) = refs.values()
    common = np.intersect1d(a["bins"], b["bins"])
    ppl = lambda n, s: np.exp(s["v"] / n)  # noqa: E731
    sides = []
    for ref, seed in ((a, 0), (b, 1)):
        cols = np.searchsorted(ref["bins"], common)
        point, lo, _, samples = boot(ref["nd"], ref["n"][:, cols], {"v": ref["s"]["v"][:, cols]}, ppl, seed=seed)
        sides.append((point, samples, np.isnan(lo)))
    ratio = sides[0][1] / sides[1][1] - 1
    lo, hi = np.nanpercentile(ratio, [2.5, 97.5], axis=0)
    small = sides[0][2] | sides[1][2]
    shown = diff.loc[common]
    np.testing.assert_allclose(shown["ppl_knnlm_a_vs_b"], sides[0][0] / sides[1][0] - 1, rtol=1e-9)
    np.testing.assert_allclose(shown["ppl_knnlm_a_vs_b_ci_lo"], np.where(small, np.nan, lo), rtol=1e-9)
    np.testing.assert_allclose(shown["ppl_knnlm_a_vs_b_ci_hi"], np.where(small, np.nan, hi), rtol=1e-9)


def test_with_variant_refuses_a_table_without_the_knn_figures():
    summary = pd.DataFrame({"freq_bin": [0], "ppl_lm": [10.0], "ppl_knnlm": [9.0], "ppl_change": [-0.1],
                            "knnlm_vs_lm": ["helps"], "hit_16": [0.2]})
    with pytest.raises(ValueError, match="ppl_change, knnlm_vs_lm"):
        mitigations.with_variant(summary, pd.DataFrame({"freq_bin": [0], "ppl_knnlm": [8.0]}))
    out = mitigations.with_variant(summary, pd.DataFrame({"freq_bin": [0], "ppl_knnlm": [8.0], "ppl_change": [-0.2],
                                                          "knnlm_vs_lm": ["harms"], "hit_16": [0.9]}))
    assert out.iloc[0].to_dict() == {"freq_bin": 0, "ppl_lm": 10.0, "ppl_knnlm": 8.0, "ppl_change": -0.2,
                                     "knnlm_vs_lm": "harms", "hit_16": 0.2}  # hit rates stay the run's own
    assert list(mitigations.label_own(out).columns)[-1] == "hit_16 (plain run)"
