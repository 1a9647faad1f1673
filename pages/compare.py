"""Compare runs: two runs side by side per frequency bin (PPL, gain, harmed share, hit rates,
contamination, PQ error), each run's setting (in- / out-of-domain) and, per bin, whether the
long-tail crisis (kNN-LM harming rare bins) holds in each. A run built with mitigations
(SPEC §9) can be compared as one of its variants instead of plain."""

import pandas as pd
import streamlit as st

from knnlm_core import mitigations
from ui import cache, figures, findings, widgets
from ui.params import list_runs


def variant_ui(name: str, summary: pd.DataFrame, key: str, where) -> tuple[str, pd.DataFrame]:
    """Variant selectbox of a run with mitigation tables (none otherwise): (display name, its bin summary)."""
    if not cache.q(name, "has_mitigations"):
        return name, summary
    options = list(cache.q(name, "mitigation_variants")["variant"])
    variant = where.selectbox(f"Variant of {name}", options, key=key, bind="query-params",
                              help="a mitigation the run was built with (Mitigations page); plain = the run itself")
    if variant == mitigations.PLAIN:
        return name, summary
    return f"{name} · {variant}", mitigations.with_variant(summary, cache.q(name, "variant_bin_summary", variant))


run, info = widgets.current_run()
st.title("Compare runs")
others = [r for r in list_runs() if r != run]
if not others:
    widgets.fail("Only one run is available: build a second run to compare.", info=True)
run_b = st.selectbox("Compare with", others, key="run_b")
info_b = widgets.open_run(run_b)
a, b = cache.q(run, "bin_summary", info["k"]), cache.q(run_b, "bin_summary", info_b["k"])

left, right = st.columns(2)
widgets.run_card(info, left.container(border=True))
widgets.run_card(info_b, right.container(border=True))
name_a, a = variant_ui(run, a, "variant", left)
name_b, b = variant_ui(run_b, b, "variant_b", right)
if (name_a, name_b) != (run, run_b):
    st.caption("For a variant, PPL kNN-LM, mean gain, share harmed and mean p_kNN are the variant's; hit rates, "
               "contamination and PQ error stay the run's own (plain index).")

st.subheader("Does the long-tail crisis hold in each setting?")
for name, inf, df in ((name_a, info, a), (name_b, info_b, b)):
    _, sentence = findings.crisis_holds(df)
    st.markdown(f"- **{name}** ({inf.get('eval_domain') or 'setting not stated'}): the crisis {sentence}.")
crisis = pd.merge(findings.crisis_by_bin(a), findings.crisis_by_bin(b), on=["freq_bin", "bin"], how="outer",
                  suffixes=(f" [{name_a}]", f" [{name_b}]"))
st.dataframe(crisis, hide_index=True)
st.caption("Rare bins: 1 ≤ freq < 1,000 in the datastore. `delta_ppl` = PPL kNN-LM − PPL LM of the bin's tokens.")

names = (name_a, name_b)
c1, c2 = st.columns(2)
c1.plotly_chart(figures.compare_bins(a, b, "ppl_knnlm", names, "PPL kNN-LM per bin", log_y=True))
c2.plotly_chart(figures.compare_bins(a, b, "mean_gain", names, "Mean gain per bin (nats)"))
c1.plotly_chart(figures.compare_bins(a, b, "share_harmed", names, "Share harmed (gain < 0)", percent=True))
hit = "hit_16" if "hit_16" in a and "hit_16" in b else "hit_1"
c2.plotly_chart(figures.compare_bins(a, b, hit, names, hit.replace("_", "@"), percent=True))
c1.plotly_chart(figures.compare_bins(a, b, "mean_contamination", names, "Mean contamination of the bin's types"))
c2.plotly_chart(figures.compare_bins(a, b, "mean_pq_error", names, "Mean PQ error of the bin's types"))

merged = pd.merge(a, b, on=["freq_bin", "bin"], how="outer", suffixes=(f" [{name_a}]", f" [{name_b}]"))
st.dataframe(merged, hide_index=True)
widgets.csv_button(merged, f"compare-{run}-vs-{run_b}")
