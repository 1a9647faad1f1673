"""Tests of knnlm_core.corpus (SPEC §1): reading (.gz) corpora and tokenizing with the real GPT-2 tokenizer."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from knnlm_core.config import REPO_ROOT
from knnlm_core.corpus import CorpusError, file_sha256, load_tokenizer, read_text, tokenize_file, tokenize_text

TOKENIZER_DIR = REPO_ROOT / "data" / "models" / "demo-gpt2"  # the GPT-2 BPE files ship with the demo LM
CORPORA = REPO_ROOT / "data" / "corpora"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZER_DIR))


# ---------------------------------------------------------------- reading


def test_read_plain_and_gz(tmp_path):
    text = "first line\nsecond líne ünïcode\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    assert read_text(tmp_path / "a.txt") == text
    assert read_text(tmp_path / "a.txt.gz") == text
    assert read_text(str(tmp_path / "a.txt.gz")) == text


def test_read_shipped_corpus():
    text = read_text(CORPORA / "wikitext2-valid.raw.gz")
    assert len(text) > 10000 and "\n" in text


def test_read_missing(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_text(tmp_path / "nope.txt")
    assert issubclass(CorpusError, ValueError)


@pytest.mark.parametrize("content", [b"", b"  \n\n\t \n"])
def test_read_empty(tmp_path, content):
    (tmp_path / "e.txt").write_bytes(content)
    (tmp_path / "e.txt.gz").write_bytes(gzip.compress(content))
    for name in ("e.txt", "e.txt.gz"):
        with pytest.raises(CorpusError, match="empty"):
            read_text(tmp_path / name)


def test_file_sha256(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # several 1 MiB blocks
    (tmp_path / "b.bin").write_bytes(data)
    assert file_sha256(tmp_path / "b.bin") == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- tokenizing


def test_tokenizer_is_gpt2(tokenizer):
    assert len(tokenizer) == 50257


def test_hello_world(tokenizer):
    ids = tokenize_text("Hello world", tokenizer)
    assert ids.dtype == np.int32 and ids.shape == (2,)
    np.testing.assert_array_equal(ids, [15496, 995])


def test_lines_tokenized_separately_and_concatenated(tokenizer):
    ids = tokenize_text("Hello world\n\nHello world\n", tokenizer)
    # newline is GPT-2 id 198; each line keeps its newline, the blank line is "\n" on its own
    np.testing.assert_array_equal(ids, [15496, 995, 198, 198, 15496, 995, 198])
    lines = "Hello world\n\nHello world\n".splitlines(keepends=True)
    per_line = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines]
    np.testing.assert_array_equal(ids, np.concatenate(per_line))


def test_batching_does_not_change_ids(tokenizer):
    text = "\n".join(f"line {i} of the test corpus, with words." for i in range(25)) + "\n"
    a = tokenize_text(text, tokenizer, batch_lines=2048)
    b = tokenize_text(text, tokenizer, batch_lines=3)
    np.testing.assert_array_equal(a, b)
    assert tokenizer.decode(a.tolist()) == text  # byte-level BPE round-trips


def test_empty_text(tokenizer):
    ids = tokenize_text("", tokenizer)
    assert ids.dtype == np.int32 and ids.shape == (0,)


def test_tokenize_file_limit_and_too_short(tmp_path, tokenizer):
    path = tmp_path / "c.txt.gz"
    path.write_bytes(gzip.compress(b"Hello world\nHello world\n"))
    np.testing.assert_array_equal(tokenize_file(path, tokenizer), [15496, 995, 198, 15496, 995, 198])
    np.testing.assert_array_equal(tokenize_file(path, tokenizer, limit_tokens=3), [15496, 995, 198])
    with pytest.raises(CorpusError, match="fewer than 2 tokens"):
        tokenize_file(path, tokenizer, limit_tokens=1)
    (tmp_path / "one.txt").write_text("Hello")
    with pytest.raises(CorpusError, match="fewer than 2 tokens"):
        tokenize_file(tmp_path / "one.txt", tokenizer)


def test_bare_bpe_folder_loads_the_same_tokenizer(tmp_path, tokenizer):
    """A folder with only vocab.json + merges.txt (no tokenizer_config.json) gives the GPT-2 tokenizer."""
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / name, tmp_path / name)
    bare = load_tokenizer(str(tmp_path))
    text = " = Valkyria Chronicles III = \n Senjō no Valkyria 3 : Unrecorded Chronicles\n"
    assert len(bare) == len(tokenizer) == 50257
    assert tokenize_text(text, bare).tolist() == tokenize_text(text, tokenizer).tolist()
