"""Probe (SPEC §13): score any text with the run's own model, index and settings, token by token; a token
strip coloured by the NLL change, the per-token table (eval_tokens columns, CSV), a chosen token's
neighbours with their datastore contexts, and What-if controls that re-score without searching again."""

import pandas as pd
import streamlit as st

from knnlm_core import infgram
from precompute import probe as lib
from ui import cache, widgets
from ui import probe as ui
from ui.render import context_html, fmt_p, md_code, neighbour_context_html, show_token

run, info = widgets.current_run()
st.title("Probe")
run_dir = cache.db_path(run).parent
if why := ui.blockers(run_dir):
    widgets.fail(why, info=True)

examples = {**ui.eval_examples(info.get("config") or {}), **ui.FIXED_EXAMPLES}
pick = st.selectbox("Example", ["(your own text)", *examples], key="probe_example")
with st.form("probe_form"):
    text = st.text_area(f"Text to score (at most {lib.MAX_TOKENS:,} tokens)", examples.get(pick, ""), height=160,
                        max_chars=40 * lib.MAX_TOKENS, key=f"probe_text_{pick}")
    asked = st.form_submit_button("Score", type="primary")
st.caption(
    "The text is tokenized and windowed like the run's evaluation text (windows of the run's max_context, its "
    "stride), its queries searched on the run's index (k, nprobe, τ, λ, distance source of the run). Scored on its "
    "own, the text's context starts at the text: its first token is not scored and the next ones see less context "
    "than inside the run's evaluation text. A passage that starts where the run's evaluation text starts gets the "
    "run's own values (docs/PROBE.md)."
)
if asked:
    try:
        with st.spinner("Scoring…"):
            st.session_state["probe_result"] = (run, cache.probe(run).score(text))
    except lib.ProbeError as err:
        widgets.fail(" ".join(str(err).split()), info="empty" in str(err) or "fewer than" in str(err))
    except (OSError, RuntimeError, ValueError) as err:  # model / index files that cannot be read
        widgets.fail(f"The run could not be loaded for probing: {md_code(' '.join(str(err).split())[:300])}")
held = st.session_state.get("probe_result")
if not held or held[0] != run:
    widgets.fail("Paste a text (or pick an example) and press **Score**.", info=True)
base = held[1]
p = cache.probe(run)

st.subheader("What-if (no new search)")
chosen = ui.whatif_ui(base.settings, info)
res = lib.rescore(p, base, **chosen)
tokens = res.tokens
st.caption(f"Re-scored from the {base.settings['k_max']:,} neighbours the probe searched (nprobe "
           f"{base.settings['nprobe']}); λ, τ, k and the distance source change p_kNN and p_kNN-LM, never the search.")
c = st.columns(4)
c[0].metric("tokens scored", f"{len(tokens):,}")
c[1].metric("PPL LM", f"{ui.ppl(tokens['nll_lm']):,.2f}")
c[2].metric("PPL kNN-LM", f"{ui.ppl(tokens['nll_knnlm']):,.2f}")
c[3].metric("helped / hurt", f"{int((tokens['gain'] > 0).sum())} / {int((tokens['gain'] < 0).sum())}")

st.subheader("Token by token")
st.markdown(ui.token_strip_html(list(tokens["token"]), tokens["gain"].to_numpy(), p.decode(res.ids[:1])[0]),
            unsafe_allow_html=True)
st.caption("Colour: the NLL change ln p_kNN-LM − ln p_LM (green: retrieval helped, red: it hurt; full colour at "
           "2 nats). Hover a token for its position.")
st.dataframe(ui.shown_table(tokens), hide_index=True)
widgets.csv_button(tokens, f"{run}-probe")

st.subheader("A token's neighbours")
worst = int(tokens["gain"].abs().idxmax())
pos = st.selectbox("Position", list(range(len(tokens))), index=worst, key="probe_pos",
                   format_func=lambda i: f"{i}: {show_token(tokens['token'].iloc[i])}")
row = tokens.iloc[pos]
ctx = p.decode(res.ids[max(0, pos - 31): pos + 1])
st.markdown(context_html(ctx, row["token"], int(row["ctx_match_len"])), unsafe_allow_html=True)
rank = row["target_rank"]
st.caption(f"Target {md_code(row['token'])} (datastore freq {int(row['freq']):,}): p_LM {fmt_p(row['p_lm'])}, "
           f"p_kNN {fmt_p(row['p_knn'])}, p_∞ {fmt_p(row['p_inf'])}, L_t = {int(row['ctx_match_len'])}, target rank "
           f"{'none' if pd.isna(rank) else int(rank)} of k = {res.settings['k']:,}.")
nb = lib.neighbour_table(p, res, pos)
st.dataframe(nb.drop(columns="tokens"), hide_index=True)
st.markdown("".join(neighbour_context_html(r.rank, list(r.tokens), r.overlap, r.token, r.copy)
                    for r in nb.itertuples()), unsafe_allow_html=True)
st.caption(f"Highlighted: each neighbour's context tokens shared with the probed context; a copy neighbour overlaps "
           f"it by ≥ {infgram.COPY_MIN_OVERLAP} tokens. `weight_in_p_knn`: its share of this table's p_kNN.")
