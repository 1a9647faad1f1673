"""Compare runs: two runs side by side per frequency bin (PPL, gain, harmed share, hit rates,
contamination, PQ error), each run's setting (in- / out-of-domain) and, per bin, whether the
long-tail crisis (kNN-LM harming rare bins) holds in each. A run built with mitigations
(SPEC §9) can be compared as one of its variants instead of plain: then every kNN-LM figure, its
interval, verdict and sentence is the variant's (read.mitigations.variant_run_intervals)."""

import pandas as pd
import streamlit as st

from knnlm_core import mitigations, read
from ui import cache, ci, figures, show, widgets
from ui.params import list_runs, parse_choice
from ui.render import md_code


def variant_ui(name: str, info: dict, key: str, where) -> tuple[str, str, pd.DataFrame]:
    """Variant selectbox of a run with mitigation tables (none otherwise): (display name, variant, its per-bin
    table: bin_summary, with every kNN-LM figure, interval and verdict the variant's for a variant)."""
    summary = cache.q(name, "bin_summary", info["k"])
    if not cache.q(name, "has_mitigations"):
        return name, mitigations.PLAIN, summary
    options = list(cache.q(name, "mitigation_variants")["variant"])
    asked = widgets.url_param(key, lambda raw: parse_choice(key, raw, options, options[0]))
    variant = widgets.settle(key, asked, where.selectbox(
        f"Variant of {name}", options, key=key, bind="query-params",
        help="a mitigation the run was built with (Mitigations page); plain = the run itself"))
    if variant == mitigations.PLAIN:
        return name, variant, summary
    try:
        return f"{name} · {variant}", variant, mitigations.with_variant(
            summary, cache.q(name, "variant_run_intervals", variant))
    except read.mitigations.MitigationError as err:
        widgets.fail(f"The mitigation tables of {md_code(name)} are inconsistent: {err}")


def side_by_side(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    """Outer merge on the bin, every other column named `<column> [<name>]`."""
    keys = ["freq_bin", "bin"]
    a, b = (df.rename(columns={c: f"{c} [{n}]" for c in df if c not in keys}) for df, n in zip((a, b), names))
    return pd.merge(a, b, on=keys, how="outer")


def crisis_line(name: str, run: str, variant: str, inf: dict, df: pd.DataFrame) -> str:
    """'- name (setting): the crisis …' plus, for a variant, its paired change vs the plain run (pooled)."""
    _, sentence = read.findings.crisis_holds(df)
    line = f"- {md_code(name)} ({inf.get('eval_domain') or 'setting not stated'}): the crisis {sentence}."
    if variant != mitigations.PLAIN:
        groups = cache.q(run, "variant_group_changes", variant)
        line += " Against the plain run (paired): " + mitigations.rare_bin_verdict(
            pd.DataFrame(), variant, md_code(variant), groups)
    return line


run, info = widgets.current_run()
st.title("Compare runs")
others = [r for r in list_runs() if r != run]
if not others:
    widgets.fail("Only one run is available: build a second run to compare.", info=True)
run_b = st.selectbox("Compare with", others, key="run_b")
info_b = widgets.open_run(run_b)

left, right = st.columns(2)
widgets.run_card(info, left.container(border=True))
widgets.run_card(info_b, right.container(border=True))
name_a, variant_a, a = variant_ui(run, info, "variant", left)
name_b, variant_b, b = variant_ui(run_b, info_b, "variant_b", right)
any_variant = (variant_a, variant_b) != (mitigations.PLAIN, mitigations.PLAIN)
own = " (the run's own: plain index)" if any_variant else ""
if any_variant:
    st.caption("For a variant, PPL kNN-LM, mean gain, share harmed, mean p_kNN (for `infgram`: p_∞), the change vs "
               "the LM and every interval, verdict and sentence are the variant's; `change_vs_plain` / `vs_plain` "
               "pair it with its own plain run on the same tokens. Hit rates, contamination, cv and PQ error stay "
               f"the run's own (plain index): their columns are marked `{mitigations.OWN_SUFFIX.strip()}`.")

st.subheader("Does the long-tail crisis hold in each setting?")
st.markdown("\n".join(crisis_line(*side) for side in ((name_a, run, variant_a, info, a),
                                                       (name_b, run_b, variant_b, info_b, b))))
crisis = side_by_side(read.findings.crisis_by_bin(a), read.findings.crisis_by_bin(b), (name_a, name_b))
show.table(crisis, hide_index=True)
st.caption("Rare bins: 1 ≤ freq < 1,000 in the datastore. `delta_ppl` = PPL kNN-LM − PPL LM of the bin's tokens; "
           "`kNN-LM` is the verdict of `ppl_change`'s paired interval within each run (for a variant: the variant's "
           "kNN-LM vs the LM). " + ci.METHOD)

st.subheader(f"{name_a} vs {name_b}, per bin")
diff = read.compare.run_difference(cache.q(run, "doc_bin_sums", variant_a), info,
                                cache.q(run_b, "doc_bin_sums", variant_b), info_b)
paired = read.compare.same_documents(info, info_b)
st.caption(
    f"`ppl_knnlm_a_vs_b` = PPL kNN-LM of {name_a} / that of {name_b} − 1 per bin (and the same for the LM). "
    + ("Both runs were evaluated on the same text: the intervals are **paired** (the same documents drawn for both)."
       if paired else "The runs were evaluated on **different text**: the intervals resample each run's documents "
       "independently (unpaired), so they are wider than a paired comparison would be.")
)
st.plotly_chart(figures.bin_bars(diff, {"ppl_knnlm_a_vs_b": "kNN-LM", "ppl_lm_a_vs_b": "LM"},
                                 f"PPL of {name_a} relative to {name_b}", "relative change", percent=True))
show.table(diff, hide_index=True)
widgets.csv_button(diff, f"compare-{run}-vs-{run_b}-difference")

names = (name_a, name_b)
c1, c2 = st.columns(2)
c1.plotly_chart(figures.compare_bins(a, b, "ppl_knnlm", names, "PPL kNN-LM per bin", log_y=True))
c2.plotly_chart(figures.compare_bins(a, b, "mean_gain", names, "Mean gain per bin (nats)"))
c1.plotly_chart(figures.compare_bins(a, b, "share_harmed", names, "Share harmed (gain < 0)", percent=True))
hit = "hit_16" if "hit_16" in a and "hit_16" in b else "hit_1"
c2.plotly_chart(figures.compare_bins(a, b, hit, names, hit.replace("_", "@") + own, percent=True))
c1.plotly_chart(figures.compare_bins(a, b, "mean_contamination", names, "Mean contamination of the bin's types" + own))
c2.plotly_chart(figures.compare_bins(a, b, "mean_pq_error", names, "Mean PQ error of the bin's types" + own))

shown_a, shown_b = (mitigations.label_own(df) if v != mitigations.PLAIN else df
                    for df, v in ((a, variant_a), (b, variant_b)))
merged = side_by_side(shown_a, shown_b, names)
show.table(merged, hide_index=True)
widgets.csv_button(merged, f"compare-{run}-vs-{run_b}")
