"""Tests of knnlm_core.documents (SPEC §11 resampling units), the database stage's doc_id, and the
refusal of a run database of an older schema."""

from __future__ import annotations

import gzip
import shutil

import duckdb
import numpy as np
import pytest
from conftest import TOKENIZER_DIR

from knnlm_core import documents, store
from knnlm_core.config import REPO_ROOT
from knnlm_core.corpus import load_tokenizer, tokenize_text


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZER_DIR))


def test_headings():
    assert documents.heading_title(" = Robert Boulter = \n") == "Robert Boulter"
    assert documents.heading_title(" = = Career = = \n") is None  # a section, not an article
    assert documents.heading_title(" = = = 2000 – 2005 = = = \n") is None
    assert documents.heading_title(" The = sign = here\n") is None
    assert documents.heading_title(" = Kiss You ( One Direction song ) = ") == "Kiss You ( One Direction song )"


def test_articles_by_hand(tokenizer):
    """Two articles and a preamble: positions map to the article of their target token (hand-checked)."""
    text = " \n = A = \n x y\n = = S = = \n z\n = B = \n w\n"
    ids = tokenize_text(text, tokenizer)
    docs = documents.for_eval_tokens(text, tokenizer, ids, 2048)
    lines = text.splitlines(keepends=True)
    counts = [len(tokenize_text(line, tokenizer)) for line in lines]
    start_b = sum(counts[:5])  # token offset of " = B = "
    assert docs.mode == documents.MODE_ARTICLES and docs.titles == ["A", "B"]
    want = (np.arange(len(ids) - 1) + 1 >= start_b).astype(np.int32)  # target t + 1 decides
    np.testing.assert_array_equal(docs.doc_id, want)
    frame = documents.to_frame(docs)
    assert list(frame["first_pos"]) == [0, start_b - 1] and frame["n_positions"].sum() == len(ids) - 1


def test_blocks_without_articles(tokenizer):
    text = "To be, or not to be: that is the question.\n" * 40
    ids = tokenize_text(text, tokenizer)
    docs = documents.for_eval_tokens(text, tokenizer, ids, 100)
    assert docs.mode == documents.MODE_BLOCKS and docs.block_tokens == 100
    np.testing.assert_array_equal(docs.doc_id, np.arange(len(ids) - 1) // 100)
    assert docs.titles[1] == "positions 100–199"


def test_one_heading_is_not_enough(tokenizer):
    """Text with a single article (e.g. a short prefix of WikiText) is cut into blocks instead: one
    document would leave no interval at all."""
    text = " = Only = \n" + "some words here .\n" * 50
    ids = tokenize_text(text, tokenizer)
    assert documents.for_eval_tokens(text, tokenizer, ids, 64).mode == documents.MODE_BLOCKS


def test_wikitext2_test_articles(tokenizer):
    text = gzip.decompress((REPO_ROOT / "data/corpora/wikitext2-test.raw.gz").read_bytes()).decode()
    ids = tokenize_text(text, tokenizer)
    docs = documents.for_eval_tokens(text, tokenizer, ids, 2048)
    assert docs.mode == documents.MODE_ARTICLES and len(docs.titles) == 62 and docs.titles[0] == "Robert Boulter"
    assert np.all(np.diff(docs.doc_id) >= 0) and docs.doc_id[-1] == 61
    from precompute.verify import reference_doc_ids  # the verifier's independent scan agrees

    np.testing.assert_array_equal(reference_doc_ids(text, tokenizer, len(ids) - 1, 2048), docs.doc_id)


def test_text_that_does_not_match_the_run_is_refused(tokenizer):
    ids = tokenize_text("one two three\n", tokenizer)
    with pytest.raises(ValueError, match="does not tokenize"):
        documents.for_eval_tokens("one two four\n", tokenizer, ids, 2048)


def test_run_database_has_documents(tiny_run):
    """The database stage stores doc_id, the documents relation and doc_bin_stats, consistent with eval_tokens."""
    con = store.open_readonly(tiny_run / store.DB_NAME)
    n_docs, mode = con.execute("SELECT n_docs, doc_mode FROM run").fetchone()
    docs = con.execute("SELECT * FROM documents ORDER BY doc_id").fetchdf()
    ev = con.execute("SELECT doc_id, freq_bin, nll_lm FROM eval_tokens ORDER BY pos").fetchdf()
    stats = con.execute("SELECT * FROM doc_bin_stats").fetchdf()
    con.close()
    assert len(docs) == n_docs and mode in (documents.MODE_ARTICLES, documents.MODE_BLOCKS)
    np.testing.assert_array_equal(np.repeat(docs["doc_id"], docs["n_positions"]), ev["doc_id"])
    want = ev.groupby(["doc_id", "freq_bin"])["nll_lm"].agg(["size", "sum"])
    got = stats.set_index(["doc_id", "freq_bin"]).loc[want.index]
    np.testing.assert_array_equal(got["n_tokens"], want["size"])
    np.testing.assert_allclose(got["sum_nll_lm"], want["sum"], rtol=1e-12)


def test_a_run_of_an_older_schema_is_refused_with_the_rebuild(tmp_path, tiny_run):
    """The app reads schema 4 only (SPEC §12 columns, neighbour blocks): an older run database gets one line
    naming its version and the command that rebuilds it (finished stages are reused)."""
    db = tmp_path / store.DB_NAME
    shutil.copyfile(tiny_run / store.DB_NAME, db)
    con = duckdb.connect(str(db))
    con.execute("UPDATE run SET schema_version = 3")
    con.close()
    with pytest.raises(store.RunSchemaError, match="schema version 3, this app reads 4: rebuild") as err:
        store.open_readonly(db)
    assert "\n" not in str(err.value) and "reused" in str(err.value)
