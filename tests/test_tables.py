"""ui.tables / ui.show (issue 21 §6): every column the pages show has a reading label, numbers are
rounded as a paper would print them, missing values are empty cells, and the CSV keeps the raw names.
Frames come from the query functions the pages call, on the shipped demo runs (read-only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from knnlm_core import adaptive, mitigations, read, store, whatif
from ui import tables

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "runs" / "demo" / store.DB_NAME
SHAKESPEARE = REPO / "data" / "runs" / "demo-shakespeare" / store.DB_NAME


def _side_by_side(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    """As the Compare page merges two runs: every non-bin column named `<column> [<name>]`."""
    keys = ["freq_bin", "bin"]
    a, b = (df.rename(columns={c: f"{c} [{n}]" for c in df if c not in keys}) for df, n in zip((a, b), names))
    return pd.merge(a, b, on=keys, how="outer")


@pytest.fixture(scope="module")
def page_frames() -> dict[str, pd.DataFrame]:
    return build_page_frames()


def build_page_frames() -> dict[str, pd.DataFrame]:
    """The frames the pages show, built by the pages' own query functions on the demo run (and, for the
    Compare page, against demo-shakespeare)."""
    con, con_b = store.open_readonly(DEMO), store.open_readonly(SHAKESPEARE)
    cur, cur_b = con.cursor(), con_b.cursor()
    info, info_b = read.run.run_info(cur), read.run.run_info(cur_b)
    k, lam = info["k"], float(info["lambda"])
    bins = read.bins.bin_summary(cur, k)
    out = {"bin_summary": bins, "type_gain": read.bins.type_gain(cur), "word_bin_summary": read.words.word_bin_summary(cur),
           "findings": read.findings.to_frame(read.findings.evaluate(bins, k, read.bins.corr_pq_error_gain(cur),
                                                           read.bins.corr_context_freq(cur),
                                                           read.bins.corr_freq_pq_error(cur))),
           "exact_bin_summary": read.exact.exact_bin_summary(cur, k, lam),
           "exact_changes": read.exact.exact_changes(cur, lam, None, 50),
           "novelty_cells": read.novelty.novelty_summary(cur, k),
           "novelty_by_ctx": read.novelty.novelty_summary(cur, k, by_freq=False)}
    words = read.words.find_words(cur, "the", 20)
    out |= {"find_words": words, "word_tokens": read.words.word_tokens(cur, int(words["first_pos"].iloc[0]), 1)}
    types = read.tokens.find_types(cur, "the", 50)
    tid = int(types["token_id"].iloc[0])
    out |= {"find_types": types, "type_percentiles": read.tokens.type_percentiles(cur, tid),
            "occurrences": read.tokens.occurrences(cur, tid, k, "position", 50)}
    nb = read.inspector.neighbors(cur, 5, 12)
    out["neighbors"] = nb.assign(hit=nb["token_id"] == 0, weight_in_p_knn=0.1)  # the two columns the page adds
    ex = read.exact.exact_neighbors(cur, 5, 12)
    out["exact_neighbors"] = ex.assign(hit=ex["token_id"] == 0)
    variants = read.mitigations.mitigation_variants(cur)
    per_variant = {v: read.mitigations.variant_bin_summary(cur, v) for v in variants["variant"]}
    totals = {v: read.mitigations.variant_overall(cur, v) for v in variants["variant"]}
    per_variant[adaptive.ORACLE_LABEL] = read.mitigations.oracle_bin_summary(cur)
    out |= {"compared": mitigations.compare_to_plain(per_variant), "adaptive_rules": read.mitigations.adaptive_rules(cur),
            "variants_table": mitigations.variants_table(variants, totals, per_variant[adaptive.ORACLE_LABEL],
                                                         info["temperature"])}
    bins_b = read.bins.bin_summary(cur_b, info_b["k"])
    out["compare_crisis"] = _side_by_side(read.findings.crisis_by_bin(bins), read.findings.crisis_by_bin(bins_b),
                                          ("demo", "demo-shakespeare"))
    out["compare_merged"] = _side_by_side(bins, bins_b, ("demo", "demo-shakespeare"))
    out["compare_difference"] = read.compare.run_difference(read.compare.doc_bin_sums(cur), info,
                                                         read.compare.doc_bin_sums(cur_b), info_b)
    if hasattr(read.mitigations, "variant_run_summary") and hasattr(mitigations, "label_own"):  # Compare with a variant
        variant = read.mitigations.variant_run_summary(cur, k, "idf")
        out["compare_variant"] = _side_by_side(mitigations.label_own(variant), bins_b, ("demo · idf", "b"))
    data = whatif.load_neighbours(cur)
    out["whatif"] = whatif.scenario_table(bins, data, {"what-if": whatif.interpolate(data, 0.3)},
                                          read.run.doc_ids(cur), int(info["n_docs"]), lam)
    con.close()
    con_b.close()
    return out


def test_every_page_column_has_a_label(page_frames):
    """A column without a label fails here: add it to ui.tables.LABELS (or PATTERNS)."""
    missing = {name: tables.unlabelled(df) for name, df in page_frames.items() if tables.unlabelled(df)}
    assert not missing, missing
    labels = tables.display_frame(page_frames["bin_summary"])[1]
    assert labels["ppl_lm"]["label"] == "PPL LM" and labels["share_harmed"]["label"] == "share harmed"
    assert labels["hit_16"]["label"] == "hit@16" and labels["knnlm_vs_lm"]["label"] == "kNN-LM vs LM"
    assert labels["ppl_change_ci_lo"]["label"] == "PPL change kNN-LM vs LM 95% CI low"
    assert labels["bin"]["label"] == "frequency bin" and labels["freq_bin"] is None  # id hidden beside its label
    merged = tables.display_frame(page_frames["compare_merged"])[1]
    assert merged["ppl_knnlm_ci_hi [demo-shakespeare]"]["label"] == "PPL kNN-LM 95% CI high [demo-shakespeare]"


def test_an_unlabelled_column_is_caught(page_frames):
    """The label check fails on a frame that gains a column nobody labelled."""
    edited = page_frames["bin_summary"].assign(fake_metric=1.0)
    assert tables.unlabelled(edited) == ["fake_metric"]
    assert tables.display_frame(edited)[1]["fake_metric"]["label"] == "fake_metric"  # shown, never a crash


@pytest.mark.parametrize("value, text", [(17794525.7598, "17,794,526"), (212.4421, "212.44"), (999.994, "999.99"),
                                         (1000.0, "1,000")])
def test_perplexity_rounding(value, text):
    """PPL: 2 decimals below 1,000; thousands separators and no decimals above (a column of one value)."""
    assert tables.cell_texts(pd.DataFrame({"ppl_lm": [value]}), "ppl_lm") == [text]


def test_formats_on_the_demo_bins(page_frames):
    """What the bin table shows, against an independent rendering of the raw values with Python's format."""
    df = page_frames["bin_summary"]
    ppl = df["ppl_lm"].to_numpy()
    assert ppl.max() >= 1000 > ppl.min()  # the demo's bins mix both regimes: one decimal with separators
    assert tables.cell_texts(df, "ppl_lm") == [f"{v:,.1f}" for v in ppl]
    assert tables.cell_texts(df, "ppl_lm")[0] == "17,794,525.8"
    seen = df[df["freq_bin"] >= 3]  # frequent bins only: every PPL below 1,000
    assert tables.cell_texts(seen, "ppl_knnlm") == [f"{v:.2f}" for v in seen["ppl_knnlm"]]
    assert tables.cell_texts(df, "share_harmed") == [f"{100 * v:,.2f}".rstrip("0").rstrip(".") + "%" for v in df["share_harmed"]]
    assert tables.cell_texts(df, "ppl_change") == [f"{100 * v:,.2f}".rstrip("0").rstrip(".") + "%" for v in df["ppl_change"]]
    assert tables.cell_texts(df, "n_tokens") == [f"{v:,}" for v in df["n_tokens"]]
    # bins without a datastore type have no cv: an empty cell, not None / NaN
    no_cv = df["mean_cv"].isna().to_numpy()
    assert no_cv.any() and all(t == "" for t, n in zip(tables.cell_texts(df, "mean_cv"), no_cv) if n)
    # an estimate and its interval share one format
    cfg = tables.display_frame(df)[1]
    assert cfg["hit_1"]["format"] == cfg["hit_1_ci_lo"]["format"] == cfg["hit_1_ci_hi"]["format"]


def test_text_cells_and_csv_unchanged(page_frames):
    """None in a text column becomes '', numbers stay numbers (sortable), the page's frame is untouched."""
    df = page_frames["bin_summary"].copy()
    df.loc[0, "knnlm_vs_lm"] = None
    before = df.copy()
    shown, cfg = tables.display_frame(df)
    assert shown["knnlm_vs_lm"].iloc[0] == "" and not shown["knnlm_vs_lm"].isna().any()
    assert pd.api.types.is_float_dtype(shown["ppl_lm"]) and pd.api.types.is_float_dtype(shown["share_harmed"])
    np.testing.assert_allclose(shown["share_harmed"], df["share_harmed"])  # fractions kept: Streamlit's percent format
    pd.testing.assert_frame_equal(df, before)  # the CSV (the page's frame) keeps raw names and values
    assert list(shown.columns) == list(df.columns)


def test_signed_and_small_values():
    df = pd.DataFrame({"ppl_change": [0.1234, -0.0004, np.nan], "mean_gain": [0.5, -0.25, np.nan],
                       "p_lm": [2.689114e-08, 0.2774, 1.0], "delta_ppl_pct": [1.0745, 0.0, -12.3],
                       "verdict": ["helps", None, "harms"]})
    assert tables.cell_texts(df, "ppl_change") == ["12.34%", "-0.04%", ""]  # Streamlit's percent: up to 2 decimals
    assert tables.cell_texts(df, "mean_gain") == ["+0.500", "-0.250", ""]
    assert tables.cell_texts(df, "p_lm") == ["2.69e-8", "0.277", "1"]
    assert tables.cell_texts(df, "delta_ppl_pct") == ["+1.1%", "+0.0%", "-12.3%"]  # already in percent
    assert tables.cell_texts(df, "verdict") == ["helps", "", "harms"]
    eps = pd.DataFrame({"ε": [np.nan, 3.078242e-07], "τ": [10.0, 22.627417]})  # whitening ε: never "0.000"
    assert tables.cell_texts(eps, "ε") == ["", "3.08e-7"] and tables.cell_texts(eps, "τ") == ["10.00", "22.63"]
    assert tables.render("%,.0f", math.inf) == "Infinity" and tables.render("%,d", None) == ""


def test_show_table_in_an_app():
    """ui.show.table: labels and formats reach st.dataframe's column config, missing values are empty
    cells, no index; a page's own column config wins for its column."""
    script = f"""
from pathlib import Path
import streamlit as st
from knnlm_core import read, store
from ui import show
cur = store.open_readonly(Path({str(DEMO)!r})).cursor()
df = read.bins.bin_summary(cur, read.run.run_info(cur)["k"])
show.table(df, column_config={{"ci_note": st.column_config.TextColumn("note", width="small")}})
"""
    at = AppTest.from_string(script, default_timeout=30).run()
    assert not at.exception
    frame = at.dataframe[0]
    cfg = json.loads(frame.proto.columns)
    assert cfg["freq_bin"] == {"hidden": True}
    assert cfg["ppl_lm"]["label"] == "PPL LM" and cfg["ppl_lm"]["type_config"]["format"] == "%,.1f"
    assert cfg["share_harmed"]["type_config"]["format"] == "percent" and cfg["ci_note"]["label"] == "note"
    assert frame.proto.placeholder == "" and frame.proto.HasField("placeholder")
    assert list(frame.value.columns)[:3] == ["freq_bin", "bin", "n_tokens"]  # raw names: the CSV's headers
