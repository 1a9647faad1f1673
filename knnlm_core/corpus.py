"""Corpus reading and tokenization (SPEC §1: documents are tokenized and concatenated).

A corpus is a UTF-8 text file, optionally gzip-compressed (`.gz`). Each line (with its
newline) is one document; lines are tokenized in batches and the ids concatenated, so
the stream is deterministic for a given tokenizer and file. `transformers` is imported
lazily: the dashboard imports this package without it.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np


class CorpusError(ValueError):
    """A corpus file is missing, empty or unreadable."""


def read_text(path: Path) -> str:
    """Text of a corpus file (`.gz` is decompressed); raises CorpusError if missing/empty."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path} (check the path in the config)")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise CorpusError(f"corpus file {path} is not valid gzip ({err}); re-download or decompress it") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus file is not UTF-8 text: {path} (byte {err.start}: {err.reason}); convert it, "
                          "e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise CorpusError(f"corpus file is empty: {path} (point the config at a non-empty text file)")
    return text


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenize_text(text: str, tokenizer, batch_lines: int = 2048) -> np.ndarray:
    """Token ids (int32, shape (n,)) of `text`, tokenized line by line and concatenated."""
    lines = text.splitlines(keepends=True)
    chunks: list[np.ndarray] = []
    for start in range(0, len(lines), batch_lines):
        batch = lines[start : start + batch_lines]
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        chunks.extend(np.asarray(ids, dtype=np.int32) for ids in encoded if ids)
    if not chunks:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(chunks)


def tokenize_with_offsets(text: str, tokenizer, batch_lines: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int32, character spans (n, 2) int64 in `text`): `tokenize_text` with offsets.

    Needs a fast tokenizer (offset mapping); raises CorpusError naming the fix otherwise.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise CorpusError("word-level metrics need a fast tokenizer (offset mapping); install `tokenizers` or "
                          "use a model whose tokenizer has a fast version")
    lines = text.splitlines(keepends=True)
    line_start = np.cumsum([0] + [len(line) for line in lines])
    ids, spans = [], []
    for start in range(0, len(lines), batch_lines):
        batch = lines[start : start + batch_lines]
        encoded = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True)
        for j, (line_ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)):
            if line_ids:
                ids.append(np.asarray(line_ids, dtype=np.int32))
                spans.append(np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + line_start[start + j])
    if not ids:
        return np.zeros(0, dtype=np.int32), np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(ids), np.concatenate(spans)


def tokenize_file(path: Path, tokenizer, limit_tokens: int | None = None) -> np.ndarray:
    """Token ids of a corpus file, cut to the first `limit_tokens` if given."""
    ids = tokenize_text(read_text(path), tokenizer)
    if limit_tokens is not None:
        ids = ids[:limit_tokens]
    if len(ids) < 2:
        raise CorpusError(f"corpus {path} has fewer than 2 tokens (use a longer text or a larger limit)")
    return ids


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer from a hub name or local directory; rejects an empty vocabulary."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    path = Path(name_or_path)
    local = path.is_dir()
    if local and not (path / "tokenizer_config.json").exists() and (path / "vocab.json").exists():
        # A bare vocab.json + merges.txt folder (GPT-2 style): AutoTokenizer would yield an empty one.
        tokenizer = GPT2TokenizerFast.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local)
    if len(tokenizer) == 0:
        raise CorpusError(f"tokenizer at {name_or_path} is empty (the folder needs its vocab files)")
    return tokenizer


def light_tokenizer(name_or_path: str):
    """A `tokenizers.Tokenizer` for a local tokenizer directory without importing transformers
    (the dashboard must not import torch): `tokenizer.json`, or GPT-2 style `vocab.json` +
    `merges.txt`. None when neither is there (e.g. a hub name)."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    path = Path(name_or_path)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    return None
