"""Exact vs PQ (SPEC §8): how much of kNN-LM's effect per frequency bin survives exact search.

Three settings of p_kNN per bin: the index's neighbours with PQ distances (the paper's), the
index's neighbours with exact distances, and the exact neighbours with exact distances; plus
recall@k of the index and hit rates with and without quantization. The positions where exact
search changes the kNN-LM NLL most link into the neighbour inspector.
"""

import streamlit as st

from knnlm_core import read, schema
from knnlm_core.bins import bin_label
from ui import cache, ci, figures, links, show, widgets

run, info = widgets.current_run()
st.title("Exact vs PQ search")
if not cache.q(run, "has_exact"):
    widgets.fail(
        "This run has no exact-search comparison. Rebuild it with `exact_search = \"on\"` (or `auto`, the default, "
        "for datastores up to a few million entries): `python -m precompute --config ... --run-dir ... --overwrite` "
        "reuses every finished stage and adds it.",
        info=True,
    )
lam, k = float(info["lambda"]), info["k"]
df = cache.q(run, "exact_bin_summary", k, lam)
tot = cache.q(run, "exact_overall", lam)
st.caption(
    f"kNN-LM at the run's λ = {lam}, τ = {info['temperature']}, k = {k}, over the {int(tot['n_tokens']):,} evaluation "
    f"tokens. Exact neighbours: brute-force squared L2 over all {info['n_entries']:,} stored fp16 keys. The run's own "
    f"p_kNN uses {info['distance_source']} distances on the index's neighbours."
)
c = st.columns(4)
c[0].metric("PPL LM", f"{tot['ppl_lm']:.2f}")
c[1].metric("IVFPQ + PQ distances", f"{tot['ppl_ivf_pq']:.2f}", help="the paper's setting")
c[2].metric("IVFPQ + exact distances", f"{tot['ppl_ivf_exact']:.2f}",
            delta=f"{tot['ppl_ivf_exact'] - tot['ppl_ivf_pq']:+.2f}", delta_color="inverse")
c[3].metric("exact search", f"{tot['ppl_exact']:.2f}", delta=f"{tot['ppl_exact'] - tot['ppl_ivf_pq']:+.2f}",
            delta_color="inverse")

c1, c2 = st.columns(2)
c1.plotly_chart(figures.exact_change_by_bin(df))
c2.plotly_chart(figures.bin_bars(
    df, {"share_explained_by_distances": "PQ distances", "share_explained_by_neighbours": "IVFPQ neighbours",
         "share_explained_by_quantization": "both"},
    "kNN-LM effect explained by approximate search", "share of Δ mean NLL", percent=True))
recall_cols = {f"recall_{r}": f"recall@{r}" for r in schema.RECALL_KS if f"recall_{r}" in df}
c1.plotly_chart(figures.bin_bars(df, recall_cols, "Recall of the index's neighbours vs exact search", "recall",
                                 percent=True))
ks = read.run.hit_ks_for(k)
shown = sorted({max(kk for kk in ks if kk <= 64), ks[-1]})  # a small cut-off and the run's largest
c2.plotly_chart(figures.bin_bars(
    df, {f"hit_{kk}_{src}": f"hit@{kk} {src}" for kk in shown for src in ("index", "exact")},
    "Hit rates with the index's and with the exact neighbours", "share of tokens", percent=True))

st.markdown(
    "**Reading the shares.** Δ is the bin's mean NLL change of kNN-LM vs the LM. "
    "`share_explained_by_quantization` = (Δ IVFPQ − Δ exact) / Δ IVFPQ: 100% means exact search removes kNN-LM's "
    "whole effect on the bin, 0% that quantization plays no part, a negative share that exact search makes the "
    "effect larger. It splits into PQ distances (same neighbours, exact distances) and neighbours (the index's vs "
    f"the exact ones). Bins where |Δ| < {read.exact.MIN_EFFECT_NATS} nats have no share."
)
show.table(df, hide_index=True)
st.caption("`change_exact_vs_ivf_pq` (and `change_ivf_exact_vs_ivf_pq`): relative PPL change of exact search (exact "
           "distances) vs the paper's IVFPQ + PQ setting on the same tokens; `exact_vs_ivf_pq` its verdict. " + ci.METHOD)
widgets.csv_button(df, f"{run}-exact-vs-pq")

st.subheader("Where exact search changes the prediction most")
bins = cache.q(run, "bin_list")
pick = st.selectbox("Bin", ["all", *bins], key="exact_bin", format_func=lambda b: b if b == "all" else bin_label(b))
changes = cache.q(run, "exact_changes", lam, None if pick == "all" else int(pick), 200)
st.caption("`nll_saved_by_exact` > 0: exact search lowers the kNN-LM NLL of the target. Select a row to compare the "
           "exact neighbours with the index's in the neighbour inspector.")
event = show.table(changes, hide_index=True, on_select="rerun", selection_mode="single-row", key="exact_changes")
target = links.row_target(event, changes["pos"].tolist())
if target is not None:  # only the unbound `pos`: the run stays the sidebar's (ui.links)
    st.switch_page(links.NEIGHBORS_PAGE, query_params={"pos": str(target)})
if not changes.empty:
    first = int(changes.iloc[0]["pos"])
    st.page_link("pages/neighbors.py", label=f"Inspect position {first} (first row)", icon=":material/hub:",
                 query_params={"run": run, "pos": first})
widgets.copy_link("exact")
