"""What-if: change λ (exact, from the run's own p_kNN), or k, τ and the distance source
(re-scored from the stored neighbours, all k of them from the run's neighbour block when its
directory has one: exact when all k are stored, labelled approximate or not available otherwise),
and try two mitigations: the oracle per-bin λ (an upper bound) and an IDF-weighted p_kNN
(knnlm_core.whatif, SPEC §9). A scenario re-scored from fewer neighbours than its k is compared
with the run's settings re-scored from the same neighbours (whatif.baseline_for), never with the
run's own PPL, which is shown as context."""

import streamlit as st

from knnlm_core import adaptive, whatif
from ui import cache, ci, figures, show, widgets
from ui.params import parse_float, parse_int
from ui.render import md_code

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
base = whatif.baseline_for(k, plan.k_used, settings)  # the same truncated neighbours when k > stored
if plan.exact:
    st.caption(f"p_kNN — {plan.label}. λ changes are exact for any λ.")
elif base.k_used:
    st.warning(f"p_kNN — {plan.label}. Every change below is measured {base.label}, column ppl_{base.name}: "
               f"what moves is the parameter, not the truncation. The run's own PPL from all {run_k} neighbours "
               f"({info['ppl_knnlm']:.2f}, per bin in column ppl_knnlm_run) is context only.")
else:
    st.warning(f"p_kNN — {plan.label}. The run's own value (k = {run_k}, τ = {settings.tau:g}): PPL "
               f"{info['ppl_knnlm']:.2f}, per bin in column ppl_knnlm_run.")
p_knn = data.p_knn_run if plan.k_used == 0 else cache.rescored(run, plan.k_used, tau, source)

use_idf = st.toggle("Also compute the IDF-weighted p_kNN (mitigation experiment)", key="whatif_idf", disabled=fixed)
best = whatif.best_lambda_per_bin(data.freq_bin, data.p_lm, p_knn)
if cache.q(run, "has_mitigations"):  # the validation-fitted adaptive λ of the run's mitigation tables
    n_valid = int(cache.q(run, "adaptive_rules").groupby("variant")["n_valid"].sum().max(skipna=True) or 0)
    adaptive_note = whatif.adaptive_note(cache.q(run, "mitigation_variants"), float(info["ppl_knnlm"]),
                                         md_code(str((info.get("config") or {}).get("valid_corpus") or "")), n_valid)
else:
    adaptive_note = whatif.adaptive_note(None, float(info["ppl_knnlm"]), "", 0)
st.subheader(f"Per-bin λ — {adaptive.ORACLE_LABEL}")
st.caption(
    "Pre-filled with the λ (grid 0, 0.01, …, 1) minimising each bin's NLL on this evaluation set, from the p_kNN "
    "above: the target's bin is unknown at test time, so this is an oracle, an upper bound for any bin-wise λ. "
    "Edit to try your own. " + adaptive_note
)
lam_df = st.data_editor(
    whatif.lam_editor_frame(best),
    hide_index=True,
    key="whatif_lams",
    disabled=["bin"],
    column_config={"bin": st.column_config.TextColumn("frequency bin"),
                   "lam": st.column_config.NumberColumn("λ", min_value=0.0, max_value=1.0, step=0.01, required=True)},
)
lam_by_bin = whatif.lams_from_editor(lam_df, best)
lam_vec = whatif.lam_per_position(data.freq_bin, lam_by_bin, lam)
per_bin = "oracle per-bin λ" if lam_by_bin == best else "per-bin λ (edited)"

variants = {"what-if": whatif.interpolate(data, lam, p_knn), per_bin: whatif.interpolate(data, lam_vec, p_knn)}
against = dict.fromkeys(variants, base)
if use_idf and source not in data.sources:
    st.info(f"IDF-weighted p_kNN: the stored neighbours have no {source} distances.")
elif use_idf:
    k_idf = min(k, stored)
    variants["IDF-weighted"] = whatif.interpolate(data, lam, cache.rescored(run, k_idf, tau, source, use_idf=True))
    against["IDF-weighted"] = whatif.baseline_for(k, k_idf, settings)
    st.caption(f"IDF-weighted p_kNN re-scored from {k_idf} stored neighbours per position"
               + ("." if k <= stored else f" (approximate: k = {k} requested, {stored} stored; compared with the "
                                          f"run's settings re-scored from the same {k_idf})."))
bases = {b.name: b for b in against.values()}
base_p = {b.name: whatif.baseline_p(data, b, settings, cache.rescored(run, b.k_used, settings.tau, settings.source))
          for b in bases.values() if b.k_used}  # the run's settings from the same truncated neighbours
run_bins = cache.q(run, "bin_summary", run_k)
table = whatif.scenario_table(run_bins, data, variants, cache.q(run, "doc_ids"), int(info["n_docs"]),
                              float(info["lambda"]), base_p, {n: b.name for n, b in against.items()})
m = st.columns(len(variants) + 1 + len(base_p))
m[0].metric(f"PPL kNN-LM (run, all {run_k} neighbours)", f"{info['ppl_knnlm']:.2f}")
for col, (name, p) in zip(m[1:], base_p.items(), strict=False):
    col.metric(f"PPL run's settings, {bases[name].k_used} neighbours", f"{whatif.overall_ppl(p):.2f}",
               help=f"τ = {settings.tau:g}, {settings.source} distances, λ = {settings.lam:g}: the baseline of "
                    f"the changes measured against the same {bases[name].k_used} neighbours")
for col, (name, p) in zip(m[1 + len(base_p):], variants.items(), strict=True):
    ppl, b = whatif.overall_ppl(p), against[name]
    ref = whatif.overall_ppl(base_p[b.name]) if b.k_used else float(info["ppl_knnlm"])
    approx = k > stored if name == "IDF-weighted" else not plan.exact
    col.metric(f"PPL {name}" + (" (approximate)" if approx else ""), f"{ppl:.2f}", delta=f"{ppl - ref:+.2f}",
               delta_color="inverse", help=f"Δ {b.label}")
st.caption("Δ: " + "; ".join(f"{', '.join(n for n in variants if against[n].name == b.name)} {b.label}"
                            for b in bases.values())
           + ("" if not base_p else f". The run's own PPL ({info['ppl_knnlm']:.2f}, from all {run_k} neighbours) "
              "is context: its gap to the re-scored baseline is truncation, not a parameter effect") + ".")
st.plotly_chart(
    figures.lines_by_bin(
        table,
        {c: c.removeprefix("ppl_") for c in table.columns if c.startswith("ppl_") and "_ci_" not in c},
        "Perplexity per bin: run vs what-if",
        "perplexity",
        log_y=True,
    )
)
show.table(table, hide_index=True)
st.caption("`change_<scenario>`: the scenario's PPL relative to its baseline on the same tokens, with its paired "
           "interval; `<scenario>_vs_<baseline>` its verdict (lower / higher / no significant difference). Baseline "
           "`run`: the run's own kNN-LM (`ppl_knnlm_run`)"
           + "".join(f"; `{b}`: the run's settings re-scored from the same {bases[b].k_used} stored neighbours "
                     f"(`ppl_{b}`)" for b in base_p) + ". " + ci.METHOD)
widgets.csv_button(table, f"{run}-whatif")
st.caption(
    "IDF-weighted p_kNN: neighbour j weighs exp(−d_j/τ) · ln(1 + N / freq(v_j)), renormalised over the "
    "k neighbours, so rare values count more. See docs/DASHBOARD.md."
)
