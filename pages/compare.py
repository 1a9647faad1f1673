"""Compare runs: two runs side by side per frequency bin (PPL, gain, harmed share, hit rates,
contamination, PQ error), each run's setting (in- / out-of-domain) and, per bin, whether the
long-tail crisis (kNN-LM harming rare bins) holds in each. A run built with mitigations
(SPEC §9) can be compared as one of its variants instead of plain."""

import pandas as pd
import streamlit as st

from knnlm_core import intervals, mitigations
from ui import cache, ci, figures, findings, widgets
from ui.params import list_runs, parse_choice


def variant_ui(name: str, summary: pd.DataFrame, key: str, where) -> tuple[str, pd.DataFrame]:
    """Variant selectbox of a run with mitigation tables (none otherwise): (display name, its bin summary)."""
    if not cache.q(name, "has_mitigations"):
        return name, summary
    options = list(cache.q(name, "mitigation_variants")["variant"])
    asked = widgets.url_param(key, lambda raw: parse_choice(key, raw, options, options[0]))
    variant = widgets.settle(key, asked, where.selectbox(
        f"Variant of {name}", options, key=key, bind="query-params",
        help="a mitigation the run was built with (Mitigations page); plain = the run itself"))
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
st.caption("Rare bins: 1 ≤ freq < 1,000 in the datastore. `delta_ppl` = PPL kNN-LM − PPL LM of the bin's tokens; "
           "`kNN-LM` is the verdict of `ppl_change`'s paired interval within each run. " + ci.METHOD)

st.subheader(f"{name_a} vs {name_b}, per bin")
variant_a = name_a[len(run) + 3:] if name_a != run else mitigations.PLAIN
variant_b = name_b[len(run_b) + 3:] if name_b != run_b else mitigations.PLAIN
diff = intervals.run_difference(cache.q(run, "doc_bin_sums", variant_a), info,
                                cache.q(run_b, "doc_bin_sums", variant_b), info_b)
paired = intervals.same_documents(info, info_b)
st.caption(
    f"`ppl_knnlm_a_vs_b` = PPL kNN-LM of {name_a} / that of {name_b} − 1 per bin (and the same for the LM). "
    + ("Both runs were evaluated on the same text: the intervals are **paired** (the same documents drawn for both)."
       if paired else "The runs were evaluated on **different text**: the intervals resample each run's documents "
       "independently (unpaired), so they are wider than a paired comparison would be.")
)
st.plotly_chart(figures.bin_bars(diff, {"ppl_knnlm_a_vs_b": "kNN-LM", "ppl_lm_a_vs_b": "LM"},
                                 f"PPL of {name_a} relative to {name_b}", "relative change", percent=True))
st.dataframe(diff, hide_index=True)
widgets.csv_button(diff, f"compare-{run}-vs-{run_b}-difference")

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
