"""Mitigations (SPEC §9, issue 10): every variant the run was built with (τ from validation, IDF
weighting, adaptive λ, Zipfian / entry whitening) per frequency bin beside the plain run — PPL,
share harmed, mean p_kNN and the change vs plain — plus the fitted target-free λ rules and the
oracle per-frequency-bin λ, labelled as the upper bound it is."""

import streamlit as st

from knnlm_core import adaptive, mitigations, read
from ui import cache, ci, figures, show, widgets

ORACLE = adaptive.ORACLE_LABEL
run, info = widgets.current_run()
st.title("Mitigations")
if not cache.q(run, "has_mitigations"):
    widgets.fail(
        "This run has no mitigation tables: they are built only with a validation corpus. Add "
        '`valid_corpus = "data/corpora/wikitext2-valid.raw.gz"` and `whiten = "zipfian,entries"` to the run\'s '
        "config and rebuild it: `python -m precompute --config ... --run-dir ... --overwrite` reuses every finished "
        "stage and adds them.",
        info=True,
    )
variants = cache.q(run, "mitigation_variants")
try:
    with st.spinner("Summarising every variant per bin…"):
        per_variant = {v: cache.q(run, "variant_bin_summary", v) for v in variants["variant"]}
        totals = {v: cache.q(run, "variant_overall", v) for v in variants["variant"]}
        per_variant[ORACLE] = cache.q(run, "oracle_bin_summary")
except read.mitigations.MitigationError as err:
    widgets.fail(f"The run's mitigation tables are inconsistent: {err}")
compared = mitigations.compare_to_plain(per_variant)
names = {**dict(zip(variants["variant"], variants["label"])), ORACLE: ORACLE}

st.caption(
    "**τ**: the plain index with the softmax temperature chosen on the validation corpus. **IDF weighting**: "
    "neighbour j weighs exp(−d_j/τ) · idf(v_j), idf(v) = ln(1 + N / freq(v)), renormalised over the k neighbours."
)
st.caption(
    "**Zipfian whitening** (Yokoi et al. 2024): keys and queries become (x − μ_Z) V S⁻¹, from the frequency-weighted "
    "mean and covariance of the type centroids plus εI; the index is rebuilt on the whitened keys, with its own τ. "
    "**Entry whitening** uses the mean and covariance over all datastore entries instead."
)
st.caption(
    "**Adaptive λ**: λ per equal-population bin of the nearest neighbour's distance (Drozdov et al. 2022) or of the "
    "LM's entropy, both known at test time. Every τ and λ rule was chosen on the validation corpus, never on the "
    f"evaluation tokens. The **{ORACLE}** per-frequency-bin λ is fitted on the evaluation targets' own bins, which "
    "are unknown at test time: a bound on what any bin-wise λ could do, not a mitigation."
)
st.caption(
    "**∞-gram interpolation** (SPEC §12, a baseline, not a kNN-LM variant): λ_∞ p_∞ + (1 − λ_∞) p_LM, p_∞ the "
    "∞-gram estimate from the datastore's own text (Liu et al. 2024), λ_∞ chosen on the validation corpus; no "
    "neighbour search and no τ. Per context-match-length bin on the Context novelty page."
)

table = mitigations.variants_table(variants, totals, per_variant[ORACLE], info["temperature"])
show.table(table, hide_index=True)
stale = [v for v, s in zip(variants["variant"], variants["ppl"]) if s > 0 and abs(totals[v]["ppl"] / s - 1) > 1e-5]
if stale:
    st.warning(f"Stored evaluation PPL differs from the recomputed one for: {', '.join(stale)} (shown: recomputed).")

st.plotly_chart(figures.variant_change_by_bin(compared, names))
st.subheader("Per bin, beside the plain run")
groups = {v: cache.q(run, "variant_group_changes", v) for v in variants["variant"] if v != mitigations.PLAIN}
groups[ORACLE] = cache.q(run, "oracle_group_changes")
st.markdown("\n".join(f"- {mitigations.rare_bin_verdict(compared, v, names[v], groups[v])}"
                      for v in per_variant if v != mitigations.PLAIN))
st.caption("Verdict per bin (SPEC §11): `helps` / `hurts` only when the 95% interval of the PPL change vs plain "
           "excludes 0, else `no significant difference`; error bars and `*_ci_lo` / `*_ci_hi` are those intervals. "
           "The sentences pool the rare bins (1 ≤ freq < 1,000) and the frequent ones (≥ 10k). " + ci.METHOD)
show.table(compared, hide_index=True)
widgets.csv_button(compared, f"{run}-mitigations")

st.subheader("Fitted adaptive-λ rules (validation corpus)")
rules = cache.q(run, "adaptive_rules")
if rules.empty:
    st.caption("This run has no adaptive-λ variant.")
else:
    st.caption("λ of each equal-population bin of the validation feature (lo ≤ feature < hi); evaluation positions "
               "outside the validation range fall into the end bins. n_valid: validation positions in the bin.")
    show.table(rules, hide_index=True)
