"""What-if: change λ (exact, from the run's own p_kNN), or k, τ and the distance source
(re-scored from the stored neighbours, all k of them from the run's neighbour block when its
directory has one: exact when all k are stored, labelled approximate or not available otherwise), and try two
mitigations: the oracle per-bin λ (an upper bound) and an IDF-weighted p_kNN
(knnlm_core.whatif, SPEC §9)."""

import pandas as pd
import streamlit as st

from knnlm_core import adaptive, whatif
from ui import cache, ci, figures, widgets
from ui.params import parse_float, parse_int

run, info = widgets.current_run()
st.title("What-if re-scoring")
try:
    data = cache.neighbours(run)
except ValueError as err:  # a damaged neighbour block, or one that does not match the run
    widgets.fail(f"Cannot read the stored neighbours of `{run}`: {err}")
settings = whatif.run_settings(info, data.n_stored, data.sources)
stored, run_k = settings.n_stored, settings.k
block = cache.has_block(run)
st.caption(f"Stored neighbours: {'all' if block else 'the first'} {stored} of the run's k = {run_k} per position "
           f"({'the neighbour block ' + cache.BLOCK + ', memory-mapped' if block else 'neighbors table'}; "
           f"distances: {', '.join(data.sources)}).")

tau_max = max(100.0, 2 * settings.tau)
asked = {  # URL values, each replaced by the run's own with a one-line note when unusable
    "k": widgets.url_param("k", lambda raw: parse_int("k", raw, 1, run_k, run_k, f"the run's k = {run_k}")),
    "tau": widgets.url_param("tau", lambda raw: parse_float("tau", raw, 0.1, tau_max, settings.tau,
                                                            f"the run's τ = {settings.tau:g}")),
    "lam": widgets.url_param("lam", lambda raw: parse_float("lam", raw, 0.0, 1.0, settings.lam,
                                                            f"the run's λ = {settings.lam:g}")),
}
c = st.columns(4)
fixed = stored == 0  # nothing to re-score: only λ can change
k = c[0].slider("k", 1, max(run_k, 2), run_k, key="k", bind="query-params", disabled=fixed or run_k < 2)
tau = c[1].slider("τ", 0.1, tau_max, settings.tau, 0.1, key="tau", bind="query-params", disabled=fixed)
lam = c[2].slider("λ", 0.0, 1.0, settings.lam, 0.01, key="lam", bind="query-params")
k, tau, lam = (widgets.settle(name, asked[name], v) for name, v in (("k", k), ("tau", tau), ("lam", lam)))
source = c[3].radio("distances", list(whatif.SOURCES), index=list(whatif.SOURCES).index(settings.source),
                    key="whatif_source", disabled=fixed)
if fixed:
    st.info("This run stores no neighbours (store_neighbors = 0): only λ can change, exactly, from the run's own "
            "p_kNN.")
    k, tau, source = run_k, settings.tau, settings.source
k = min(int(k), run_k)

plan = whatif.plan(k, tau, source, settings)
if plan.exact:
    st.caption(f"p_kNN — {plan.label}. λ changes are exact for any λ.")
else:
    st.warning(f"p_kNN — {plan.label}. The run's own value (k = {run_k}, τ = {settings.tau:g}): PPL "
               f"{info['ppl_knnlm']:.2f}, per bin in column ppl_knnlm_run.")
p_knn = data.p_knn_run if plan.k_used == 0 else cache.rescored(run, plan.k_used, tau, source)

use_idf = st.toggle("Also compute the IDF-weighted p_kNN (mitigation experiment)", key="whatif_idf", disabled=fixed)
best = whatif.best_lambda_per_bin(data.freq_bin, data.p_lm, p_knn)
st.subheader(f"Per-bin λ — {adaptive.ORACLE_LABEL}")
st.caption(
    "Pre-filled with the λ (grid 0, 0.01, …, 1) minimising each bin's NLL on this evaluation set, from the p_kNN "
    "above: the target's bin is unknown at test time, so this is an oracle, an upper bound for any bin-wise λ. "
    "Edit to try your own. Adaptive λ from what is known at test time (nearest neighbour's distance, LM entropy) "
    "is fitted on a validation split, which this run does not store."
)
lam_df = st.data_editor(
    pd.DataFrame({"freq_bin": list(best), "lam": list(best.values())}),
    hide_index=True,
    key="whatif_lams",
    disabled=["freq_bin"],
    column_config={"lam": st.column_config.NumberColumn(min_value=0.0, max_value=1.0, step=0.01)},
)
lam_by_bin = dict(zip(lam_df["freq_bin"], lam_df["lam"], strict=True))
lam_vec = whatif.lam_per_position(data.freq_bin, lam_by_bin, lam)
per_bin = "oracle per-bin λ" if lam_by_bin == best else "per-bin λ (edited)"

variants = {"what-if": whatif.interpolate(data, lam, p_knn), per_bin: whatif.interpolate(data, lam_vec, p_knn)}
if use_idf and source not in data.sources:
    st.info(f"IDF-weighted p_kNN: the stored neighbours have no {source} distances.")
elif use_idf:
    k_idf = min(k, stored)
    variants["IDF-weighted"] = whatif.interpolate(data, lam, cache.rescored(run, k_idf, tau, source, use_idf=True))
    st.caption(f"IDF-weighted p_kNN re-scored from {k_idf} stored neighbours per position"
               + ("." if k <= stored else f" (approximate: k = {k} requested, {stored} stored)."))
run_bins = cache.q(run, "bin_summary", run_k)
table = whatif.scenario_table(run_bins, data, variants, cache.q(run, "doc_ids"), int(info["n_docs"]),
                              float(info["lambda"]))
m = st.columns(len(variants) + 1)
m[0].metric("PPL kNN-LM (run)", f"{info['ppl_knnlm']:.2f}")
for col, (name, p) in zip(m[1:], variants.items(), strict=True):
    ppl = whatif.overall_ppl(p)
    approx = k > stored if name == "IDF-weighted" else not plan.exact
    col.metric(f"PPL {name}" + (" (approximate)" if approx else ""), f"{ppl:.2f}",
               delta=f"{ppl - info['ppl_knnlm']:+.2f}", delta_color="inverse")
st.plotly_chart(
    figures.lines_by_bin(
        table,
        {c: c.removeprefix("ppl_") for c in table.columns if c.startswith("ppl_") and "_ci_" not in c},
        "Perplexity per bin: run vs what-if",
        "perplexity",
        log_y=True,
    )
)
st.dataframe(table, hide_index=True)
st.caption("`change_<scenario>`: the scenario's PPL relative to the run's kNN-LM on the same tokens, with its paired "
           "interval; `<scenario>_vs_run` its verdict (lower / higher / no significant difference). " + ci.METHOD)
widgets.csv_button(table, f"{run}-whatif")
st.caption(
    "IDF-weighted p_kNN: neighbour j weighs exp(−d_j/τ) · ln(1 + N / freq(v_j)), renormalised over the "
    "k neighbours, so rare values count more. See docs/DASHBOARD.md."
)
