"""Token explorer: find a token type by text or id, compare its cv / contamination / PQ error
with its frequency bin, list its evaluation occurrences and open one in the neighbour inspector.
A word of the evaluation text (SPEC §10) shows its word-level row and the tokens it splits
into; any other text is tokenized with the run's tokenizer. Each token opens its type."""

import streamlit as st

from knnlm_core import queries
from knnlm_core.bins import bin_label
from ui import cache, figures, widgets
from ui.params import parse_text
from ui.render import md_code, show_token

run, info = widgets.current_run()
st.title("Token explorer")
asked = widgets.url_param("token", lambda raw: parse_text("token", raw))
query = widgets.settle("token", asked, st.text_input(
    "Token, word or text", key="token", bind="query-params", placeholder="e.g.  the  or  262  or  Boulter"
))
if not query.strip():
    widgets.fail("Type a token (text, matched case-insensitively as a substring), a token id, a word of the "
                 "evaluation text or any text.", info=True)


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
    st.dataframe(words, hide_index=True)
    first = words.iloc[0]
    parts = cache.q(run, "word_tokens", int(first["first_pos"]), int(first["n_tokens"]))
    token_links(list(zip(parts["token_id"], parts["token"], strict=True)),
                f"{md_code(first['word'])} splits into {len(parts)} token(s) (first occurrence, position "
                f"{int(first['first_pos'])}); open one:")
    st.dataframe(parts, hide_index=True)

matches = cache.q(run, "find_types", query, 50)
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
c[3].metric("cv", "n/a" if row["cv"] is None or row["cv"] != row["cv"] else f"{row['cv']:.3f}")
c[4].metric(
    "contamination", "n/a" if row["contamination"] != row["contamination"] else f"{100 * row['contamination']:.1f}%"
)

if row["freq"] >= 1:
    st.subheader(f"Against its bin ({bin_label(int(row['freq_bin']))})")
    pct = cache.q(run, "type_percentiles", tid)
    left, right = st.columns([2, 3])
    left.dataframe(pct, hide_index=True)
    with left:
        widgets.csv_button(pct, f"{run}-token-{tid}-vs-bin")
    right.plotly_chart(
        figures.type_vs_bin(cache.q(run, "bin_type_metrics", int(row["freq_bin"])), row, queries.TYPE_METRICS)
    )
else:
    st.info("This type never occurs as a datastore value (freq 0): it has no cv, contamination or PQ error.")

st.subheader("Evaluation occurrences")
sort = st.selectbox("Sort by", list(queries.OCCURRENCE_SORTS), key="token_sort")
occ = cache.q(run, "occurrences", tid, info["k"], sort, 500)
if occ.empty:
    widgets.fail("This type is never an evaluation target.", info=True)
st.caption(f"Showing {len(occ):,} of {row['eval_count']:,}. Select a row to open it in the neighbour inspector.")
event = st.dataframe(occ, hide_index=True, on_select="rerun", selection_mode="single-row", key="token_occ")
picked = event.selection.rows if event is not None else []
if picked:
    st.switch_page("pages/neighbors.py", query_params={"run": run, "pos": int(occ.iloc[picked[0]]["pos"])})
first = int(occ.iloc[0]["pos"])
st.page_link(
    "pages/neighbors.py",
    label=f"Inspect position {first} (first row)",
    icon=":material/hub:",
    query_params={"run": run, "pos": first},
)
widgets.csv_button(occ, f"{run}-token-{tid}-occurrences")
