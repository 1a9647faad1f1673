"""Word-level view (SPEC §10): per word-frequency bin word PPLs with SPEC §11 intervals, and word look-up."""

from __future__ import annotations

import duckdb
import pandas as pd

from knnlm_core import bootstrap as bs
from knnlm_core.read.ci import add_verdict, doc_sums, n_docs, with_intervals
from knnlm_core.read.run import _df, add_bin_label


def has_words(cur: duckdb.DuckDBPyConnection) -> bool:
    return bool(cur.execute("SELECT count(*) > 0 FROM eval_words").fetchone()[0])


def word_bin_summary(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Per word-frequency bin: words, word PPL of LM and kNN-LM, mean gain, share harmed, tokens per word."""
    sql = """SELECT freq_bin, count(*) AS n_words, count(DISTINCT word) AS n_word_types,
                    exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm,
                    avg(nll_lm - nll_knnlm) AS mean_gain, avg((nll_knnlm > nll_lm)::DOUBLE) AS share_harmed,
                    avg(n_tokens) AS mean_tokens_per_word
             FROM eval_words GROUP BY freq_bin ORDER BY freq_bin"""
    return with_intervals(add_bin_label(_df(cur, sql)), word_intervals(cur))


def word_intervals(cur: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Per word-frequency bin: word PPL LM / kNN-LM, share harmed and the change, resampling documents
    (a word's document is that of its first token)."""
    source = "(SELECT w.*, e.doc_id FROM eval_words w JOIN eval_tokens e ON e.pos = w.first_pos)"
    frame = doc_sums(cur, {"nll_lm": "nll_lm", "nll_knnlm": "nll_knnlm", "harmed": "(nll_knnlm > nll_lm)::INTEGER",
                           "gain": "nll_lm - nll_knnlm"}, source=source)
    figs = [bs.ppl("ppl_lm", "nll_lm"), bs.ppl("ppl_knnlm", "nll_knnlm"), bs.mean("share_harmed", "harmed"),
            bs.mean("mean_gain", "gain"), bs.ppl_change("ppl_change", "nll_knnlm", "nll_lm")]
    ci = bs.intervals(frame, figs, n_docs(cur)).rename(columns={"n_tokens": "n_words"})
    return add_verdict(ci, "ppl_change", "knnlm_vs_lm")


def word_overall(cur: duckdb.DuckDBPyConnection) -> dict:
    sql = """SELECT count(*) AS n_words, exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm,
                    avg((nll_knnlm > nll_lm)::DOUBLE) AS share_harmed FROM eval_words"""
    return _df(cur, sql).iloc[0].to_dict()


def find_words(cur: duckdb.DuckDBPyConnection, text: str, limit: int = 20) -> pd.DataFrame:
    """Evaluation words equal to `text` (exact first, then ignoring case and surrounding punctuation),
    one row per distinct word: datastore freq, bin, occurrences, word PPLs, first position, tokens."""
    text = (text or "").strip()
    if not text:
        return add_bin_label(_df(cur, "SELECT NULL::VARCHAR AS word, NULL::SMALLINT AS freq_bin LIMIT 0"))
    sql = """
    SELECT word, any_value(freq) AS freq, any_value(freq_bin) AS freq_bin, count(*) AS occurrences,
           exp(avg(nll_lm)) AS ppl_lm, exp(avg(nll_knnlm)) AS ppl_knnlm, min(first_pos) AS first_pos,
           arg_min(n_tokens, first_pos) AS n_tokens
    FROM eval_words
    WHERE word = ? OR lower(regexp_replace(word, '^\\W+|\\W+$', '', 'g')) = lower(?)
    GROUP BY word ORDER BY (word = ?) DESC, occurrences DESC, word LIMIT ?"""
    return add_bin_label(_df(cur, sql, [text, text, text, int(limit)]))


def word_tokens(cur: duckdb.DuckDBPyConnection, first_pos: int, n_tokens: int) -> pd.DataFrame:
    """The tokens of one word occurrence (positions first_pos .. first_pos + n_tokens - 1)."""
    sql = """SELECT pos, token_id, token, freq, freq_bin, p_lm, p_knn, gain FROM eval_tokens
             WHERE pos BETWEEN ? AND ? ORDER BY pos"""
    return add_bin_label(_df(cur, sql, [int(first_pos), int(first_pos) + int(n_tokens) - 1]))
