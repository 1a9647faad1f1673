"""What-if: re-score p_kNN from the stored neighbours with another k, τ, λ or distance
source, and try two mitigations: a per-bin λ and an IDF-weighted p_kNN (knnlm_core.whatif)."""

import pandas as pd
import streamlit as st

from knnlm_core import whatif
from ui import cache, figures, widgets

run, info = widgets.current_run()
st.title("What-if re-scoring")
data = cache.neighbours(run)
stored, run_k = data.n_stored, info["k"]
if stored == 0:
    widgets.fail("This run stores no neighbours (store_neighbors = 0): nothing to re-score.", info=True)

raw_k = st.query_params.get("k")
if raw_k is not None and raw_k.isdigit() and int(raw_k) > stored:
    st.info(f"k = {raw_k} exceeds the {stored} neighbours stored per position; k is limited to {stored}.")
c = st.columns(4)
k = c[0].slider("k", 1, stored, min(run_k, stored), key="k", bind="query-params")
tau = c[1].slider(
    "τ", 0.1, max(100.0, 2 * info["temperature"]), float(info["temperature"]), 0.1, key="tau", bind="query-params"
)
lam = c[2].slider("λ", 0.0, 1.0, float(info["lambda"]), 0.01, key="lam", bind="query-params")
source = c[3].radio(
    "distances", ["pq", "exact"], index=["pq", "exact"].index(info["distance_source"]), key="whatif_source"
)
if k < run_k:
    st.warning(
        f"The run used k = {run_k}; with k = {k} the softmax is normalised over fewer neighbours, so "
        f"re-scored p_kNN differs from the run's even at τ = {info['temperature']} and λ = {info['lambda']}."
        + (f" Only {stored} neighbours per position are stored." if stored < run_k else "")
    )

use_idf = st.toggle("Also compute the IDF-weighted p_kNN (mitigation experiment)", key="whatif_idf")
p_knn = cache.rescored(run, k, tau, source)
best = whatif.best_lambda_per_bin(data.freq_bin, data.p_lm, p_knn)
st.subheader("Per-bin λ (oracle start)")
st.caption(
    "Pre-filled with the λ minimising each bin's NLL on this evaluation set (an oracle: the target's bin "
    "is unknown at test time). Edit to try your own."
)
lam_df = st.data_editor(
    pd.DataFrame({"freq_bin": list(best), "lam": list(best.values())}),
    hide_index=True,
    key="whatif_lams",
    disabled=["freq_bin"],
    column_config={"lam": st.column_config.NumberColumn(min_value=0.0, max_value=1.0, step=0.05)},
)
lam_vec = whatif.lam_per_position(data.freq_bin, dict(zip(lam_df["freq_bin"], lam_df["lam"], strict=True)), lam)

variants = {"what-if": lam * p_knn + (1 - lam) * data.p_lm, "per-bin λ": lam_vec * p_knn + (1 - lam_vec) * data.p_lm}
if use_idf:
    variants["IDF-weighted"] = lam * cache.rescored(run, k, tau, source, use_idf=True) + (1 - lam) * data.p_lm
run_bins = cache.q(run, "bin_summary", run_k)[["freq_bin", "bin", "n_tokens", "ppl_lm", "ppl_knnlm"]]
table = run_bins.rename(columns={"ppl_knnlm": "ppl_knnlm_run"})
for name, p in variants.items():
    table[f"ppl_{name}"] = whatif.ppl_by_bin(data.freq_bin, data.p_lm, p)["ppl"].to_numpy()
m = st.columns(len(variants) + 1)
m[0].metric("PPL kNN-LM (run)", f"{info['ppl_knnlm']:.2f}")
for col, (name, p) in zip(m[1:], variants.items(), strict=True):
    col.metric(
        f"PPL {name}",
        f"{whatif.overall_ppl(p):.2f}",
        delta=f"{whatif.overall_ppl(p) - info['ppl_knnlm']:+.2f}",
        delta_color="inverse",
    )
st.plotly_chart(
    figures.lines_by_bin(
        table,
        {c: c.removeprefix("ppl_") for c in table.columns if c.startswith("ppl_")},
        "Perplexity per bin: run vs re-scored",
        "perplexity",
        log_y=True,
    )
)
st.dataframe(table, hide_index=True)
widgets.csv_button(table, f"{run}-whatif")
st.caption(
    "IDF-weighted p_kNN: neighbour j weighs exp(−d_j/τ) · ln(1 + N / freq(v_j)), renormalised over the "
    "k neighbours, so rare values count more. See docs/DASHBOARD.md."
)
