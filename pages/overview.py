"""Overview: the run card, overall perplexity, PPL per frequency bin, and the paper's
findings (SPEC §6, §8) and the context-novelty rows (SPEC §12) checked on this run."""

import streamlit as st

from knnlm_core import read
from ui import cache, ci, figures, show, widgets

MARKS = {True: "⚠", False: "✗", None: "–"}  # a note on a finding that holds is a caveat; "≈": not significant
CI_COLUMNS = ("freq_bin", "bin", "n_tokens", "n_docs", "ppl_lm", "ppl_knnlm", "ppl_change", "knnlm_vs_lm", "ci_note")
run, info = widgets.current_run()
st.title("kNN-LM long-tail diagnostics")
st.caption(
    "Reproducing Nishida et al. 2025, *Long-Tail Crisis in Nearest Neighbor Language Models*. "
    "Pick the run in the sidebar (URL `?run=`)."
)

with st.container(border=True):
    widgets.run_card(info, st)
    st.markdown(
        f"**Setting:** {widgets.setting(info)}. Datastore `{info.get('datastore_corpus')}`, evaluation "
        f"`{info.get('eval_corpus')}`. The paper leaves open whether the long-tail crisis holds in- and out-of-domain: "
        "the Compare page sets two runs side by side per bin."
    )

k = info["k"]
bins = cache.q(run, "bin_summary", k)
tot = cache.q(run, "overall")
c1, c2, c3, c4 = st.columns(4)
c1.metric("PPL LM", f"{tot['ppl_lm']:.2f}")
c2.metric(
    "PPL kNN-LM", f"{tot['ppl_knnlm']:.2f}", delta=f"{tot['ppl_knnlm'] - tot['ppl_lm']:+.2f}", delta_color="inverse"
)
c3.metric("evaluation tokens", f"{int(tot['n_tokens']):,}")
c4.metric("tokens harmed (gain < 0)", f"{100 * tot['share_harmed']:.1f}%")
st.caption(ci.overall_ci_caption(tot))

st.plotly_chart(figures.ppl_by_bin(bins, "Perplexity per target-frequency bin: LM vs kNN-LM"))
with st.expander("Per-bin perplexity with 95% intervals"):
    per_bin = bins[[c for c in bins.columns if c.split("_ci_")[0] in CI_COLUMNS]]
    show.table(per_bin, hide_index=True)
    widgets.csv_button(per_bin, f"{run}-ppl-by-bin")

st.subheader("The paper's findings on this run")
exact = cache.q(run, "exact_bin_summary", k, float(info["lambda"])) if cache.q(run, "has_exact") else None
checks = read.findings.evaluate(
    bins, k, cache.q(run, "corr_pq_error_gain"), cache.q(run, "corr_context_freq"), cache.q(run, "corr_freq_pq_error"),
    exact, cache.q(run, "novelty_findings"),
)
table = read.findings.to_frame(checks)
n_ok = sum(f.ok is True for f in checks)
n_eval = sum(f.ok is not None for f in checks)
n_ns = sum(f.ns for f in checks)
st.markdown(f"**{n_ok} of {n_eval}** checkable findings hold on this run" +
            (f"; {n_ns} show no significant difference (≈)." if n_ns else "."))
st.caption("Per-bin claims are decided by 95% block-bootstrap intervals over evaluation documents (SPEC §11): ✓ / ✗ "
           "only when the interval of the difference excludes 0. Contamination is a per-type mean without an "
           f"interval; a correlation counts only with p < {read.findings.ALPHA} (≈ otherwise). Each row's `rule` column "
           "says how its verdict is decided. The last two rows test the context-novelty reading of "
           "the crisis (SPEC §12, Context novelty page): L_t is the length of the longest context suffix found in the "
           "datastore, and the share of the gain is decided by its own interval (> 50%).")
show.table(table, hide_index=True, height="content",  # every row: no scrolling window of ten
             column_config={"verdict": st.column_config.TextColumn(width="small"),
                            "rule": st.column_config.TextColumn(help="how the verdict is decided")})
for f in checks:
    if f.note:
        st.markdown(f"- {'≈' if f.ns else MARKS[f.ok]} {f.note}")
widgets.csv_button(table, f"{run}-findings")
