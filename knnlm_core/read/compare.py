"""Comparing two runs or two variants (SPEC §11): per-document sums per bin, whether two runs share their
evaluation documents, and the per-bin PPL difference between them with paired or unpaired intervals."""

from __future__ import annotations

import duckdb
import pandas as pd

from knnlm_core import bootstrap as bs
from knnlm_core.read.ci import doc_sums, label
from knnlm_core.read.mitigations import PLAIN, _variant_positions


def doc_bin_sums(cur: duckdb.DuckDBPyConnection, variant: str = PLAIN) -> pd.DataFrame:
    """Per (doc_id, freq_bin): n_tokens, nll_lm and nll_knnlm sums (the variant's kNN-LM NLL for a variant)."""
    if variant == PLAIN:
        return doc_sums(cur, {"nll_lm": "nll_lm", "nll_knnlm": "nll_knnlm"})
    positions, params = _variant_positions(cur, variant)
    return doc_sums(cur, {"nll_lm": "nll_lm", "nll_knnlm": "nll_v"}, source=positions, params=params)


def same_documents(info_a: dict, info_b: dict) -> bool:
    """Whether two runs were evaluated on the same text (corpus, limit, positions, documents): then a
    comparison between them resamples the same documents on both sides (paired)."""
    ca, cb = info_a.get("config") or {}, info_b.get("config") or {}
    return (ca.get("eval_corpus") == cb.get("eval_corpus") and ca.get("eval_limit_tokens") == cb.get("eval_limit_tokens")
            and info_a.get("n_eval") == info_b.get("n_eval") and info_a.get("n_docs") == info_b.get("n_docs"))


def run_difference(frame_a: pd.DataFrame, info_a: dict, frame_b: pd.DataFrame, info_b: dict) -> pd.DataFrame:
    """Per bin present in both runs: PPL kNN-LM of run a relative to run b (`ppl_knnlm_a_vs_b`) and the
    same for the LM, with intervals (paired when same_documents, else unpaired) and the verdict."""
    paired = same_documents(info_a, info_b)
    args = (frame_a, int(info_a["n_docs"]), frame_b, int(info_b["n_docs"]))
    knn = bs.two_run_change(*args, bs.ppl("a", "nll_knnlm"), bs.ppl("b", "nll_knnlm"), "ppl_knnlm_a_vs_b", paired)
    lm = bs.two_run_change(*args, bs.ppl("a", "nll_lm"), bs.ppl("b", "nll_lm"), "ppl_lm_a_vs_b", paired)
    out = label(knn.merge(lm, on="freq_bin"))
    out["a_vs_b"] = [bs.verdict(lo, hi, "a lower", "a higher") for lo, hi in
                     zip(out["ppl_knnlm_a_vs_b_ci_lo"], out["ppl_knnlm_a_vs_b_ci_hi"], strict=True)]
    out["resampling"] = "paired (same documents)" if paired else "unpaired (different evaluation text)"
    return out
