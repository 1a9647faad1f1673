"""Context novelty (SPEC §12, issue 17): target-frequency bin × context-match-length bin. Separates rare
targets from novel contexts: per cell kNN-LM's PPL change vs the LM, share harmed, hit@k, mean copy
share and token counts (with SPEC §11 intervals), and the ∞-gram interpolation beside kNN-LM per L_t bin."""

import streamlit as st

from knnlm_core import infgram, read
from ui import cache, ci, figures, links, show, widgets
from ui.params import parse_choice

run, info = widgets.current_run()
k = info["k"]
st.title("Context novelty")
st.caption(
    "**L_t** (context match length): the largest n ≤ 64 such that the last n context tokens occur as a contiguous "
    "sequence in the datastore's token stream; 0 when the last context token never does. Bins: "
    f"{', '.join(infgram.CTX_BIN_LABELS)}. A rare target in a context the datastore holds can be copied from it; "
    "in a novel context (L_t ≤ 1) it cannot. **Copy share**: the share of p_kNN carried by neighbours whose context "
    f"ends with the query's last {infgram.COPY_MIN_OVERLAP}+ tokens (over all k = {k} neighbours; positions with "
    "p_kNN = 0 have none and are left out of its mean, `n_copy_share` counts the others)."
)

cells = cache.q(run, "novelty_summary", k)
by_ctx = cache.q(run, "novelty_summary", k, by_freq=False)
if cells.empty or by_ctx.empty:
    widgets.fail("This run has no evaluation token to split by context match length.", info=True)
st.markdown(read.novelty.novelty_sentence(by_ctx, cells))

ks = read.run.hit_ks_for(k)
hit_k = 16 if 16 in ks else ks[-1]
metrics = {  # label -> (column, number format, which side is better: a diverging scale)
    "PPL change, kNN-LM vs LM": ("ppl_change", "+.1%", "lower"),
    "share harmed (NLL kNN-LM > NLL LM)": ("share_harmed", ".1%", ""),
    f"hit@{hit_k}": (f"hit_{hit_k}", ".1%", ""),
    "mean copy share of p_kNN": ("mean_copy_share", ".1%", ""),
    "share of the total NLL gain": ("share_of_gain", ".1%", "higher"),
    "tokens": ("n_tokens", ",d", ""),
}
if "infgram_change" in cells:
    metrics["PPL change, ∞-gram interpolation vs LM"] = ("infgram_change", "+.1%", "lower")
    metrics["PPL change, kNN-LM vs ∞-gram interpolation"] = ("knnlm_vs_infgram_change", "+.1%", "lower")
names = list(metrics)
asked_metric = widgets.url_param("novelty_metric", lambda raw: parse_choice("novelty_metric", raw, names, names[0]))
shown = widgets.settle("novelty_metric", asked_metric, st.selectbox("Cell colour", names, key="novelty_metric",
                                                                    bind="query-params"))
col, fmt, better = metrics[shown]
freq_bins = cells.drop_duplicates("freq_bin")[["freq_bin", "bin"]]
bin_of = dict(zip(freq_bins["bin"], freq_bins["freq_bin"].astype(int), strict=True))


def open_bin() -> None:  # on_select callback: a cell's row is its target-frequency bin (ui.widgets.stage_link)
    label = links.bin_target(st.session_state.get("novelty_pick"), list(bin_of), axis="y")
    if label is not None:
        widgets.stage_link(links.TOKENS_PAGE, {"bin": (bin_of[label], bin_of[label])}, {"bin": [label, label]})


heat = figures.novelty_heatmap(cells, col, f"{shown} per target-frequency × context-match-length cell", fmt, better)
heat = links.clickable_cells(heat, "click: this target-frequency bin's token types")
st.plotly_chart(heat, on_select=open_bin, selection_mode="points", key="novelty_pick")
st.caption("Click a cell to open its target-frequency bin's token types in the Token explorer.")
show.table(cells, hide_index=True)
st.caption(
    "One row per (target-frequency bin, L_t bin) cell. `ppl_change` = PPL kNN-LM / PPL LM − 1 with its paired "
    "interval and verdict `knnlm_vs_lm`; `share_of_gain` = the cell's sum of NLL gain / the run's (blank when "
    "kNN-LM has no net gain)"
    + ("; `ppl_infgram`: the ∞-gram interpolation λ_∞ p_∞ + (1 − λ_∞) p_LM (λ_∞ chosen on the validation corpus), "
       "`knnlm_vs_infgram` the verdict of kNN-LM's paired change against it" if "infgram_change" in cells else "")
    + ". In the heatmap a change or share marked * has a 95% interval that excludes 0. Copy share is 0 wherever "
    f"L_t < {infgram.COPY_MIN_OVERLAP}: a neighbour cannot share more context with the query than the datastore "
    "holds. " + ci.METHOD
)
widgets.csv_button(cells, f"{run}-novelty-cells")

st.subheader("Per context-match-length bin")
st.plotly_chart(figures.novelty_by_ctx(by_ctx))
if "infgram_change" not in by_ctx:
    st.caption("This run has no ∞-gram baseline: it is fitted on a validation corpus (add `valid_corpus` to the "
               "run's config and rebuild with `--overwrite`).")
show.table(by_ctx, hide_index=True)
widgets.csv_button(by_ctx, f"{run}-novelty-by-context")
widgets.copy_link("novelty", novelty_metric=None if shown == names[0] else shown)
