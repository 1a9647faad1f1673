"""Neighbour inspector (`?pos=`): one evaluation position's context (its last L_t tokens marked as
occurring in the datastore), p_LM / p_kNN / p_kNNLM, the ∞-gram estimate, LM vs kNN top predictions,
and its stored neighbours with their datastore contexts, each neighbour's context overlap with the
query highlighted and copy neighbours marked (SPEC §12)."""

import numpy as np
import streamlit as st

from knnlm_core import infgram, read
from ui import cache, figures, links, show, widgets
from ui.params import Parsed, parse_float, parse_int
from ui.render import context_html, fmt_p, neighbour_context_html, show_token

NEIGHBOUR_WIDTH = 128  # datastore tokens shown before one chosen neighbour's entry

run, info = widgets.current_run()
st.title("Neighbour inspector")
last = max(int(info["n_eval"]) - 1, 0)
first = min(cache.q(run, "default_position"), last)  # no ?pos=: an informative first view, not position 0
asked = widgets.url_param("pos", lambda raw: parse_int("pos", raw, 0, last, first, f"position {first}"))
# A float input: Streamlit's int number_input seeds itself from the URL with int(float(value)), which
# raises OverflowError on ?pos=inf; the float one treats a non-finite value as invalid.
pos = int(widgets.settle("pos", asked, st.number_input("Evaluation position", 0.0, float(last), float(first), 1.0,
                                                         "%.0f", key="pos", bind="query-params")))
if not st.query_params.get_all("pos") and pos == first:
    st.caption(f"Opened on position {first}: without `?pos=`, the inspector shows the position whose rare target "
               "(datastore frequency 1–999) kNN-LM changes most (largest |gain|) among positions with a full "
               f"{read.inspector.CONTEXT_WIDTH}-token context.")

row = cache.q(run, "eval_row", pos)
if not row:
    widgets.fail(f"Position {pos} is not in this run's evaluation set.")
ctx = cache.q(run, "eval_context", pos, read.inspector.CONTEXT_WIDTH)
match_len = int(row["ctx_match_len"])
st.markdown(context_html(list(ctx["token"].fillna("?")), row["token"], match_len), unsafe_allow_html=True)
st.caption(
    f"Target {show_token(row['token'])} (id {row['token_id']}, datastore freq {row['freq']:,}); "
    f"last context token freq {row['context_freq']:,}. Underlined in green: the last L_t = {match_len} context tokens, "
    "the longest context suffix that occurs in the datastore's token stream."
)

c = st.columns(5)
c[0].metric("p_LM", fmt_p(row["p_lm"]))
c[1].metric("p_kNN", fmt_p(row["p_knn"]))
c[2].metric("p_kNN-LM", fmt_p(row["p_knnlm"]))
c[3].metric("gain (nats)", f"{row['gain']:+.3f}")
c[4].metric("query PQ error", f"{row['query_pq_error']:.4g}")
c = st.columns(4)
c[0].metric("context match length L_t", f"{match_len}")
c[1].metric("p_∞ (∞-gram)", fmt_p(row["p_inf"]))
c[2].metric("∞-gram suffix |s| · count(s ·)", f"{int(row['inf_suffix_len'])} · {int(row['inf_count']):,}")
share = row["copy_share"]
c[3].metric("copy share of p_kNN", "n/a (p_kNN = 0)" if share is None or share != share else f"{share:.1%}")
st.caption(
    f"SPEC §12: p_∞ = count(s y) / count(s ·) for the longest context suffix s followed by a token in the datastore "
    f"(|s| = 0: the unigram over the entries' values). Copy share: the share of p_kNN carried by neighbours whose "
    f"context overlaps the query's by ≥ {infgram.COPY_MIN_OVERLAP} tokens, over all k = {info['k']} neighbours."
)
rank = row["target_rank"]
st.caption(
    f"Target rank among the k = {info['k']} neighbours: {'none' if rank is None or rank != rank else int(rank)}; "
    f"neighbours carrying it: {row['n_target']}."
)

lm, knn_top = cache.q(run, "top_predictions", pos, "lm"), cache.q(run, "top_predictions", pos, "knn")
st.plotly_chart(figures.top_predictions(lm, knn_top, row["token"]))

nb = cache.q(run, "neighbors", pos, 12).copy()
if nb.empty:
    widgets.fail("No neighbours stored for this position (store_neighbors = 0).", info=True)
dist = nb["distance_pq" if info["distance_source"] == "pq" else "distance_exact"].to_numpy(np.float64)
nb.insert(4, "hit", nb["token_id"] == row["token_id"])
# Exact weight in the run's p_kNN: the search stage stored log Σ_j exp(-d_j/τ) over all k neighbours.
nb["weight_in_p_knn"] = np.exp(-dist / float(info["temperature"]) - float(row["knn_log_z"]))
st.subheader(f"Stored neighbours ({len(nb)} of k = {info['k']})")
st.caption(
    f"`weight_in_p_knn` = exp(−d/τ − log Z): each neighbour's share of the run's p_kNN over all k = {info['k']} "
    f"neighbours ({info['distance_source']} distances, τ = {info['temperature']}). The hit rows' weights over all "
    f"k sum to p_kNN = {fmt_p(row['p_knn'])}."
)
ranks = [int(r) for r in nb["rank"]]


def open_neighbour() -> None:  # on_select callback: runs before the next script run, so the `nbr` input takes it
    rows = [r for r in links.selected_rows(st.session_state.get("nbr_table")) if r < len(ranks)]
    if rows:
        st.session_state["nbr"] = float(ranks[rows[0]])


st.caption("Select a row to show that neighbour's datastore entry and its longer context below.")
show.table(
    nb,
    hide_index=True,
    column_config={
        "weight_in_p_knn": st.column_config.ProgressColumn(
            format="%.4f", min_value=0.0, max_value=float(max(nb["weight_in_p_knn"].max(), 1e-12))
        )
    },
    on_select=open_neighbour,
    selection_mode="single-row",
    key="nbr_table",
)
widgets.csv_button(nb, f"{run}-pos-{pos}-neighbours")

st.subheader("A neighbour's datastore entry")


def parse_rank(raw: list[str]) -> Parsed[int]:
    """`nbr`: a whole neighbour rank; '4.0' is taken too (the float input below writes its value so)."""
    got = parse_float("nbr", raw, ranks[0], ranks[-1], ranks[0], f"neighbour {ranks[0]}")
    if got.value != int(got.value):
        return Parsed(ranks[0], f"URL parameter `nbr` is not a whole number; using neighbour {ranks[0]}.")
    return Parsed(int(got.value), got.note)


asked_nbr = widgets.url_param("nbr", parse_rank)
nbr = int(widgets.settle("nbr", asked_nbr, st.number_input(
    "Neighbour (rank)", float(ranks[0]), float(ranks[-1]), float(ranks[0]), 1.0, "%.0f", key="nbr",
    bind="query-params")))
one = nb[nb["rank"] == nbr]
if one.empty:
    st.info(f"No neighbour of rank {nbr} is stored for this position.")
else:
    r = one.iloc[0]
    wide = cache.q(run, "neighbor_context_tokens", pos, NEIGHBOUR_WIDTH)
    toks = wide.loc[wide["rank"] == nbr, "tokens"]
    st.caption(f"Datastore entry {int(r['entry']):,} (neighbour {nbr}): its value {show_token(r['token'])} "
               f"(id {int(r['token_id'])}{', the target' if r['hit'] else ''}), PQ distance {r['distance_pq']:.4g}, "
               f"exact distance {r['distance_exact']:.4g}, weight in p_kNN {r['weight_in_p_knn']:.4f}; the last "
               f"{NEIGHBOUR_WIDTH} tokens of the datastore text before it, the {int(r['overlap'])} it shares with "
               "the query highlighted.")
    if not toks.empty:
        st.markdown(neighbour_context_html(nbr, list(toks.iloc[0]), r["overlap"], r["token"], bool(r["copy"])),
                    unsafe_allow_html=True)

st.subheader("Context overlap with the query")
width = min(infgram.MAX_LEN, max(16, int(nb["overlap"].max()) + 4))
contexts = cache.q(run, "neighbor_context_tokens", pos, width).merge(nb[["rank", "token", "copy"]], on="rank")
st.caption(
    f"Each neighbour's last {width} context tokens; highlighted: the tokens its context shares with the query's "
    f"(the longest common suffix, `overlap`). A **copy** neighbour overlaps by ≥ {infgram.COPY_MIN_OVERLAP} tokens: "
    f"it was likely retrieved because its context repeats the query's. Copy neighbours here: "
    f"{int(nb['copy'].sum())} of {len(nb)}."
)
st.markdown("".join(neighbour_context_html(r.rank, list(r.tokens), r.overlap, r.token, r.copy)
                    for r in contexts.itertuples()), unsafe_allow_html=True)

if cache.q(run, "has_exact"):
    ex = cache.q(run, "exact_neighbors", pos, 12).copy()
    ex.insert(4, "hit", ex["token_id"] == row["token_id"])
    x_rank = row["exact_target_rank"]
    st.subheader(f"Exact neighbours ({len(ex)} of k = {info['k']})")
    st.caption(
        f"Brute-force search over all stored keys (SPEC §8). recall@16 of the index here: "
        f"{fmt_p(row['recall_16'])}; target rank among the exact neighbours: "
        f"{'none' if x_rank is None or x_rank != x_rank else int(x_rank)}. p_kNN with the exact neighbours: "
        f"{fmt_p(row['p_knn_exact'])} (index: {fmt_p(row['p_knn_ivf_pq'])} with PQ distances, "
        f"{fmt_p(row['p_knn_ivf_exact'])} with exact distances). `in_index_top`: the index also returned this "
        f"entry among its first {len(nb)}."
    )
    left, right = st.columns(2)
    left.markdown("**Index (IVFPQ)**")
    show.table(nb[["rank", "entry", "token", "hit", "distance_exact", "context"]], where=left, hide_index=True)
    right.markdown("**Exact**")
    show.table(ex[["rank", "entry", "token", "hit", "distance_exact", "in_index_top", "context"]], where=right,
               hide_index=True)
    widgets.csv_button(ex, f"{run}-pos-{pos}-exact-neighbours")
widgets.copy_link("neighbors", pos=pos, nbr=nbr)
