"""The word table (stage `words`; SPEC §10) against the token table: each word's NLL is the sum of its
tokens' NLLs, its bin follows its frequency, and the words are disjoint and in text order."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import Check, RunData, close, digit_bin, equal

STAGE = "words"


def check_words(words: pd.DataFrame, ev: pd.DataFrame) -> list[Check]:
    """eval_words: NLL = sum of its tokens' NLLs, bins from freq, words disjoint and in order."""
    if words.empty:
        return [("eval_words present", False, "no word rows")]
    csum = {c: np.r_[0.0, np.cumsum(ev[c].to_numpy(np.float64))] for c in ("nll_lm", "nll_knnlm")}
    a, b = words["first_pos"].to_numpy(), words["first_pos"].to_numpy() + words["n_tokens"].to_numpy()
    checks = [close(f"eval_words.{c} = sum of token {c}", words[c], csum[c][b] - csum[c][a], 1e-6, 1e-9)
              for c in ("nll_lm", "nll_knnlm")]
    checks.append(equal("eval_words.freq_bin", words["freq_bin"].to_numpy(), digit_bin(words["freq"].to_numpy())))
    checks.append(("eval_words disjoint, in text order", bool((a[1:] >= b[:-1]).all() and (b <= len(ev)).all()),
                   f"{len(words)} words"))
    return checks


def applies(ctx: RunData) -> bool:
    return True


def check(ctx: RunData) -> list[Check]:
    return check_words(ctx.con.execute("SELECT * FROM eval_words ORDER BY word_idx").fetchdf(), ctx.ev)
