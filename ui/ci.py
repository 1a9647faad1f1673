"""Sentences about SPEC §11 intervals for the pages (pure: no streamlit import)."""

from __future__ import annotations

import math

from knnlm_core import bootstrap as bs

METHOD = (f"95% intervals: block bootstrap over evaluation documents (B = {bs.N_BOOT:,} resamples, percentile, "
          f"seed {bs.SEED}); differences on the same tokens are paired. A bin with < {bs.MIN_TOKENS} tokens or "
          f"< {bs.MIN_DOCS} documents has no interval.")


def interval(value: float, lo: float, hi: float, fmt: str = "{:.2f}") -> str:
    """'v [lo, hi]' or 'v [no interval]'."""
    return bs.ci_text(value, lo if lo is not None else math.nan, hi if hi is not None else math.nan, fmt)


def overall_ci_caption(tot: dict) -> str:
    """One line under the overall metrics: both PPLs and kNN-LM's change with their intervals and n."""
    if "ppl_lm_ci_lo" not in tot:
        return "No interval: this run has no documents table (rebuild or `python -m precompute.upgrade`)."
    change = interval(100 * tot["ppl_change"], 100 * tot["ppl_change_ci_lo"], 100 * tot["ppl_change_ci_hi"], "{:+.1f}")
    return (f"PPL LM {interval(tot['ppl_lm'], tot['ppl_lm_ci_lo'], tot['ppl_lm_ci_hi'])}, kNN-LM "
            f"{interval(tot['ppl_knnlm'], tot['ppl_knnlm_ci_lo'], tot['ppl_knnlm_ci_hi'])}; change {change}% "
            f"(**{tot['knnlm_vs_lm']}**), n = {int(tot['n_tokens']):,} tokens in {int(tot['n_docs'])} documents. "
            + METHOD)
