"""Word level (SPEC §10): word spans on a hand-written text, NLL sums, frequencies, and the
eval_words table of a real run checked against the token table and an independent count."""

from __future__ import annotations

from collections import Counter

import duckdb
import numpy as np
from conftest import TINY_RUN_CONFIG, TOKENIZER_DIR

from knnlm_core.corpus import light_tokenizer, load_tokenizer, read_text, tokenize_text, tokenize_with_offsets
from knnlm_core.words import complete_words, token_word_index, word_nll

TEXT = " = Robert Boulter = \n\n Robert Boulter is an English actor , he's.\n Zyxqv!\n"


def test_words_of_a_hand_written_text():
    tok = load_tokenizer(str(TOKENIZER_DIR))
    ids, offsets = tokenize_with_offsets(TEXT, tok)
    np.testing.assert_array_equal(ids, tokenize_text(TEXT, tok))  # the same stream as the pipeline's
    pieces = [tok.decode([i]) for i in ids]
    words = complete_words(TEXT, offsets)
    # token 0 (" =") is context only, so the first word is left out
    assert words.text == ["Robert", "Boulter", "=", "Robert", "Boulter", "is", "an", "English", "actor", ",",
                          "he's.", "Zyxqv!"]
    n = dict(zip(range(len(words.text)), words.n_tokens.tolist(), strict=True))
    assert n[1] == 3 and n[4] == 3  # " B" "oul" "ter"
    assert n[10] == 3  # " he" "'s" "." : punctuation stays in its whitespace word
    for w, first, count in zip(words.text, words.first_pos, words.n_tokens, strict=True):
        # position p predicts token p + 1: the word's tokens, joined, are the word (plus its leading space)
        assert "".join(pieces[first + 1 : first + 1 + count]).strip() == w
    word_of, _ = token_word_index(TEXT, offsets)
    whitespace_only = [p for p, piece in zip(range(len(pieces)), pieces, strict=True) if not piece.strip()]
    assert whitespace_only and (word_of[whitespace_only] == -1).all()  # " ", "\n\n", "\n" belong to no word


def test_a_word_cut_by_the_token_limit_is_left_out():
    tok = load_tokenizer(str(TOKENIZER_DIR))
    _, offsets = tokenize_with_offsets(TEXT, tok)
    cut = complete_words(TEXT, offsets[:4])  # " =", " Robert", " B", "oul": Boulter is incomplete
    assert cut.text == ["Robert"]


def test_word_nll_sums_each_words_tokens():
    nll = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    np.testing.assert_array_equal(word_nll(np.array([0, 3]), np.array([2, 2]), nll), [3.0, 24.0])
    np.testing.assert_array_equal(word_nll(np.array([4]), np.array([1]), nll), [16.0])  # ends at the last token
    assert len(word_nll(np.zeros(0, np.int64), np.zeros(0, np.int64), nll)) == 0


def test_light_tokenizer_matches_the_pipelines():
    text = read_text(TINY_RUN_CONFIG["eval_corpus"])[:20000]
    light = light_tokenizer(str(TOKENIZER_DIR))
    assert light.encode(text).ids == tokenize_text(text, load_tokenizer(str(TOKENIZER_DIR))).tolist()


def test_eval_words_table_of_a_run(tiny_run):
    con = duckdb.connect(str(tiny_run / "metrics.duckdb"), read_only=True)
    words = con.execute("SELECT * FROM eval_words ORDER BY word_idx").df()
    tokens = con.execute("SELECT pos, nll_lm, nll_knnlm FROM eval_tokens ORDER BY pos").df()
    con.close()
    assert len(words) > 100
    # NLL of each word = sum of its tokens' NLLs, recomputed from the token table
    for _, w in words.sample(50, random_state=0).iterrows():
        span = tokens.iloc[w.first_pos : w.first_pos + w.n_tokens]
        assert np.isclose(w.nll_lm, span.nll_lm.sum(), rtol=1e-12)
        assert np.isclose(w.nll_knnlm, span.nll_knnlm.sum(), rtol=1e-12)
    # frequency = exact whitespace-split count in the datastore text (the decoded, limited prefix here)
    tok = load_tokenizer(str(TOKENIZER_DIR))
    ds_text = tok.decode(np.load(tiny_run / "datastore_ids.npy").tolist())
    counts = Counter(ds_text.split())
    assert (words["freq"].to_numpy() == np.array([counts.get(w, 0) for w in words["word"]])).all()
    assert (words.loc[words["freq"] == 0, "freq_bin"] == -1).all() and (words["freq"] == 0).any()
    # words never overlap and come in text order
    assert (words["first_pos"].diff().dropna() >= words["n_tokens"].shift().dropna()).all()
