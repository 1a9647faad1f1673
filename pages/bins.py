"""Frequency bins: per-bin table and charts of SPEC §6 (PPL, p, harmed share, hit@k,
non-target share, cv, contamination, PQ error) with filters, and the two correlations; or,
at word level (SPEC §10), word perplexity per word-frequency bin."""

import streamlit as st

from knnlm_core import read
from knnlm_core.bins import bin_label
from ui import cache, ci, figures, links, show, widgets
from ui.params import parse_choice, parse_text
from ui.render import md_code, show_token

run, info = widgets.current_run()
k = info["k"]
st.title("Frequency bins")
asked = widgets.url_param("level", lambda raw: parse_choice("level", raw, ["token", "word"], "token"))
level = widgets.settle("level", asked, st.segmented_control("Level", ["token", "word"], default="token",
                                                            required=True, key="level", bind="query-params"))
if level == "word":
    if not cache.q(run, "has_words"):
        widgets.fail("This run has no word-level table: rebuild it with this version of `python -m precompute` "
                     "(`--overwrite` reuses every finished stage).", info=True)
    words = cache.q(run, "word_bin_summary")
    tot = cache.q(run, "word_overall")
    c = st.columns(4)
    c[0].metric("words", f"{int(tot['n_words']):,}")
    c[1].metric("word PPL LM", f"{tot['ppl_lm']:.2f}")
    c[2].metric("word PPL kNN-LM", f"{tot['ppl_knnlm']:.2f}", delta=f"{tot['ppl_knnlm'] - tot['ppl_lm']:+.2f}",
                delta_color="inverse")
    c[3].metric("words harmed", f"{100 * tot['share_harmed']:.1f}%")
    st.caption(
        "SPEC §10: a word is a whitespace-delimited unit of the evaluation text; its NLL is the sum of its tokens' "
        "NLLs and its frequency the number of exact occurrences in the whitespace-split datastore text. Bins are "
        "those of the token level, over word frequency. Words whose tokens are not all scored (the first word) are left out."
    )
    show.table(words, hide_index=True)
    st.caption("`knnlm_vs_lm`: kNN-LM's word-PPL change per bin, judged by its paired interval. " + ci.METHOD)
    widgets.csv_button(words, f"{run}-word-bins")
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.ppl_by_bin(words, "Word perplexity per word-frequency bin"))
    c2.plotly_chart(figures.bin_bars(words, {"share_harmed": "NLL kNN-LM > NLL LM"}, "Share of words harmed",
                                     "share", percent=True))
    widgets.copy_link("bins", level="word")
    st.stop()

with st.sidebar:
    bins = cache.q(run, "bin_list")
    lo, hi = widgets.bin_range(bins)
    asked_text = widgets.url_param("bins_tokens", lambda raw: parse_text("bins_tokens", raw))
    text = widgets.settle("bins_tokens", asked_text, st.text_input(
        "Token text or id (comma-separated)", key="bins_tokens", bind="query-params"))
    asked_outcome = widgets.url_param("bins_outcome",
                                      lambda raw: parse_choice("bins_outcome", raw, read.run.OUTCOMES, "all"))
    outcome = widgets.settle("bins_outcome", asked_outcome, st.radio(
        "Tokens",
        read.run.OUTCOMES,
        horizontal=True,
        key="bins_outcome",
        help="helped: kNN-LM lowers the target's NLL (gain > 0); harmed: raises it (gain < 0). The URL holds the "
             "option as shown (a format_func would put its label there).",
        bind="query-params",
    ))

token_ids = None
if text.strip():
    found = [cache.q(run, "find_types", t.strip(), 1) for t in text.split(",") if t.strip()]
    picked = {int(f["token_id"].iloc[0]): f.iloc[0] for f in found if not f.empty}
    token_ids = sorted(picked)
    if not token_ids:
        widgets.fail(f"No token type matches {md_code(text)}.", info=True)
    st.caption("Restricted to " + ", ".join(f"{md_code(show_token(r['token']))} (id {t}, {int(r['eval_count']):,} "
                                            "evaluation targets)" for t, r in sorted(picked.items()))
               + ": each entry is the best match of the Token explorer (the form the evaluation text uses most).")

filters = dict(bin_lo=lo, bin_hi=hi, token_ids=token_ids, outcome=outcome)
df = cache.q(run, "bin_summary", k, **filters)
if df.empty:
    widgets.fail("No evaluation token matches these filters (token, bins and outcome together select nothing): "
                 "widen the bin range, pick another token or show all tokens.", info=True)

show.table(df, hide_index=True)
st.caption("`ppl_change` = PPL kNN-LM / PPL LM − 1 and `knnlm_vs_lm` its verdict (helps / harms / no significant "
           "difference); `p_knn_minus_p_lm` the paired difference of the mean probabilities. " + ci.METHOD)
widgets.csv_button(df, f"{run}-bins")



def linked(where, fig, key: str) -> None:
    """A per-bin chart whose bars / points open the Token explorer filtered to their bin (issue 24 item 4)."""
    labels = [bin_label(b) for b in bins]

    def open_bin() -> None:  # on_select callback: runs before the next script run (ui.widgets.stage_link)
        label = links.bin_target(st.session_state.get(key), labels)
        if label is not None:
            b = bins[labels.index(label)]
            widgets.stage_link(links.TOKENS_PAGE, {"bin": (b, b)}, {"bin": [label, label]})

    where.plotly_chart(fig, on_select=open_bin, selection_mode="points", key=key)


ks = read.run.hit_ks_for(k)
st.caption("Click a bar or point of the first four charts to open that bin's token types in the Token explorer.")
c1, c2 = st.columns(2)
linked(c1, figures.ppl_by_bin(df), "bins_pick_ppl")
linked(c2, figures.bin_bars(
    df,
    {"mean_p_lm": "mean p_LM", "mean_p_knn": "mean p_kNN"},
    "Mean probability of the target",
    "probability",
    log_y=True,
), "bins_pick_p")
linked(c1, figures.bin_bars(df, {"share_harmed": "gain < 0"}, "Share of tokens harmed by kNN-LM", "share",
                            percent=True), "bins_pick_harmed")
linked(c2, figures.hits_by_bin(df, ks), "bins_pick_hits")
c1.plotly_chart(
    figures.bin_bars(
        df,
        {"nontarget_share": "1 − n_target / k"},
        f"Non-target share of the k = {k} neighbours",
        "share",
        percent=True,
    )
)
c2.plotly_chart(
    figures.bin_bars(
        df,
        {"mean_cv": "cv", "mean_contamination": "contamination"},
        "Types' sparsity (cv) and contamination",
        "mean over the bin's types",
    )
)
c1.plotly_chart(
    figures.lines_by_bin(
        df,
        {"mean_pq_error": "type keys", "mean_query_pq_error": "queries"},
        "PQ reconstruction error ||x − x̂||²",
        "mean squared error",
    )
)

st.subheader("Correlations over evaluation tokens")
cg = cache.q(run, "corr_pq_error_gain", **filters)
cc = cache.q(run, "corr_context_freq", **filters)
m1, m2 = st.columns(2)
m1.metric("pq_error_mean of target type vs gain", f"r = {cg['r']:.3f}", help="paper ≈ −0.20")
m1.caption(f"n = {cg['n']:,}, p = {cg['p']:.2g}")
m2.metric("log10 context_freq vs log10 freq", f"r = {cc['r']:.3f}", help="paper −0.12 … −0.02")
m2.caption(f"n = {cc['n']:,}, p = {cc['p']:.2g} (freq ≥ 1 and context_freq ≥ 1)")

types = cache.q(run, "type_gain", **filters)
c2.plotly_chart(figures.pq_gain_scatter(types, read.bins.pearson_of(types["pq_error_mean"], types["mean_gain"])))
with st.expander(f"Per-type table ({len(types):,} types)"):
    show.table(types, hide_index=True)
    widgets.csv_button(types, f"{run}-types")
whole = (lo, hi) == (bins[0], bins[-1])
widgets.copy_link("bins", level=None, bin=None if whole else list(dict.fromkeys([bin_label(lo), bin_label(hi)])),
                  bins_tokens=text or None, bins_outcome=None if outcome == "all" else outcome)
