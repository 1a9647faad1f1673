"""Token explorer: find a token type by text or id, compare its cv / contamination / PQ error
with its frequency bin, list its evaluation occurrences and open one in the neighbour inspector.
A word of the evaluation text (SPEC §10) shows its word-level row and the tokens it splits
into; any other text is tokenized with the run's tokenizer. Each token opens its type. `?bin=` (a bar of
the Frequency bins or Context novelty charts links here) restricts the types to those bins and, without a query,
lists the bin's evaluation targets."""

import pandas as pd
import streamlit as st

from knnlm_core import read
from knnlm_core.bins import bin_label
from ui import cache, figures, links, show, widgets
from ui.params import parse_choice, parse_text
from ui.render import md_code, show_token

run, info = widgets.current_run()
st.title("Token explorer")
asked = widgets.url_param("token", lambda raw: parse_text("token", raw))
query = widgets.settle("token", asked, st.text_input(
    "Token, word or text", key="token", bind="query-params", placeholder="e.g.  the  or  262  or  Boulter"
))
bins = cache.q(run, "bin_list")
with st.sidebar:
    lo, hi = widgets.bin_range(bins)
in_bins = (lo, hi) != (bins[0], bins[-1]) if bins else False  # the whole range is no filter
span = bin_label(lo) if lo == hi else f"{bin_label(lo)} … {bin_label(hi)}"
bin_state = ([bin_label(lo)] if lo == hi else [bin_label(lo), bin_label(hi)]) if in_bins else None  # `bin` of this view's link


def bin_types() -> None:
    """The evaluation targets' types in bins lo..hi, most frequent target first; a row opens its type."""
    every = cache.q(run, "type_gain", bin_lo=lo, bin_hi=hi)
    types = every.sort_values(["n_eval", "token_id"], ascending=[False, True]).head(500).reset_index(drop=True)
    st.subheader(f"Evaluation targets in frequency bin {span}")
    if types.empty:
        widgets.fail(f"No evaluation target falls in frequency bin {span}.", info=True)

    def open_type() -> None:  # on_select callback: runs before the next script run, so the bound input takes it
        rows = links.selected_rows(st.session_state.get("token_bin_types"))
        if rows and rows[0] < len(types):
            st.session_state["token"] = str(int(types.at[rows[0], "token_id"]))

    st.caption(f"{len(every):,} token type(s) are evaluation targets in bin {span}; showing {len(types):,}, most "
               "evaluation occurrences (`n_eval`) first. Select a row to open its type, or type a token above to "
               "search within these bins.")
    show.table(types, hide_index=True, on_select=open_type, selection_mode="single-row", key="token_bin_types")
    widgets.csv_button(types, f"{run}-bin-{lo}-{hi}-types")


if not query.strip():
    if in_bins:
        bin_types()
        widgets.copy_link("tokens", token=query or None, bin=bin_state)
        st.stop()
    widgets.fail("Type a token (text, matched case-insensitively as a substring), a token id, a word of the "
                 "evaluation text or any text, or pick frequency bins in the sidebar.", info=True)


def token_links(tokens, label: str) -> None:
    """One button per token that opens its type on this page."""
    st.markdown(label)
    cols = st.columns(min(len(tokens), 8) or 1)
    for i, (tid, text) in enumerate(tokens):
        cols[i % len(cols)].page_link(
            "pages/tokens.py", label=f"{md_code(show_token(text))} · {tid}",
            query_params={"run": run, "token": str(tid)},
        )


words = cache.q(run, "find_words", query, 20) if cache.q(run, "has_words") else None
if words is not None and not words.empty:
    st.subheader("As a word of the evaluation text")
    show.table(words, hide_index=True)
    first = words.iloc[0]
    parts = cache.q(run, "word_tokens", int(first["first_pos"]), int(first["n_tokens"]))
    token_links(list(zip(parts["token_id"], parts["token"], strict=True)),
                f"{md_code(first['word'])} splits into {len(parts)} token(s) (first occurrence, position "
                f"{int(first['first_pos'])}); open one:")
    show.table(parts, hide_index=True)

matches = cache.q(run, "find_types", query, 50)
if in_bins and not matches.empty:
    shown = matches[matches["freq_bin"].between(lo, hi)]
    st.caption(f"Token types restricted to frequency bin {span}: {len(shown)} of the {len(matches)} best matches.")
    if shown.empty:
        widgets.fail(f"No token type matching {md_code(query)} is in frequency bin {span}: widen the bins in the "
                     "sidebar.", info=True)
    matches = shown.reset_index(drop=True)
if matches.empty:
    if words is not None and not words.empty:
        st.stop()
    tok = cache.tokenizer(info)
    if tok is None:
        widgets.fail(f"No token type or evaluation word matches {md_code(query)} in this run.", info=True)
    enc = tok.encode(query)
    token_links([(int(t), tok.decode([int(t)])) for t in enc.ids],
                f"{md_code(query)} is not a token type or a word of the evaluation text; the run's tokenizer splits "
                f"it into {len(enc.ids)} token(s):")
    st.stop()
st.subheader("As a token type")
choice = st.selectbox(
    f"{len(matches)} matching type(s)",
    matches.index,
    key="token_pick",
    format_func=lambda i: (
        f"{show_token(matches.at[i, 'token'])} · id {matches.at[i, 'token_id']} · freq {matches.at[i, 'freq']:,}"
    ),
)
row = matches.loc[choice].to_dict()
tid = int(row["token_id"])

c = st.columns(5)
c[0].metric("token", show_token(row["token"]))
c[1].metric("datastore freq", f"{row['freq']:,}", help=f"bin {bin_label(int(row['freq_bin']))}")
c[2].metric("evaluation occurrences", f"{row['eval_count']:,}")
c[3].metric("cv", "n/a" if pd.isna(row["cv"]) else f"{row['cv']:.3f}")
c[4].metric("contamination", "n/a" if pd.isna(row["contamination"]) else f"{100 * row['contamination']:.1f}%")

if row["freq"] >= 1:
    st.subheader(f"Against its bin ({bin_label(int(row['freq_bin']))})")
    pct = cache.q(run, "type_percentiles", tid)
    left, right = st.columns([2, 3])
    show.table(pct, where=left, hide_index=True)
    with left:
        widgets.csv_button(pct, f"{run}-token-{tid}-vs-bin")
    right.plotly_chart(
        figures.type_vs_bin(cache.q(run, "bin_type_metrics", int(row["freq_bin"])), row, read.tokens.TYPE_METRICS)
    )
else:
    st.info("This type never occurs as a datastore value (freq 0): it has no cv, contamination or PQ error.")

st.subheader("Evaluation occurrences")
sorts = list(read.tokens.OCCURRENCE_SORTS)
asked_sort = widgets.url_param("token_sort", lambda raw: parse_choice("token_sort", raw, sorts, sorts[0]))
sort = widgets.settle("token_sort", asked_sort, st.selectbox("Sort by", sorts, key="token_sort", bind="query-params"))
occ = cache.q(run, "occurrences", tid, info["k"], sort, 500)
if occ.empty:
    widgets.fail("This type is never an evaluation target.", info=True)
st.caption(f"Showing {len(occ):,} of {row['eval_count']:,}. Select a row to open it in the neighbour inspector.")
event = show.table(occ, hide_index=True, on_select="rerun", selection_mode="single-row", key="token_occ")
target = links.row_target(event, occ["pos"].tolist())
if target is not None:  # only the unbound `pos`: the run stays the sidebar's (ui.links)
    st.switch_page(links.NEIGHBORS_PAGE, query_params={"pos": str(target)})
first = int(occ.iloc[0]["pos"])
st.page_link(
    "pages/neighbors.py",
    label=f"Inspect position {first} (first row)",
    icon=":material/hub:",
    query_params={"run": run, "pos": first},
)
widgets.csv_button(occ, f"{run}-token-{tid}-occurrences")
widgets.copy_link("tokens", token=query or None, bin=bin_state, token_sort=None if sort == sorts[0] else sort)
