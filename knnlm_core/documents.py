"""Evaluation documents, the resampling units of the confidence intervals (SPEC §11).

A document is a WikiText article: it starts at a top-level heading line ` = Title = `
(sub-headings ` = = Section = = ` do not start one). Text with fewer than two such headings
is cut into blocks of `block_tokens` consecutive evaluation positions instead. Tokens before
the first heading belong to the first article. Evaluation position t scores token t + 1 of
the stream, so its document is that token's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

HEADING = re.compile(r"^ = (?!=)(.*[^=\s].*?) = $")  # " = Title = " (not " = = Section = = ")
MODE_ARTICLES = "articles"
MODE_BLOCKS = "blocks"


@dataclass(frozen=True)
class Documents:
    """Per-position document ids and what each document is."""

    doc_id: np.ndarray  # (T,) int32, 0-based, non-decreasing
    first_pos: np.ndarray  # (D,) int64: first evaluation position of each document
    titles: list[str]  # (D,) article title, or "positions a–b" for a block
    mode: str  # MODE_ARTICLES | MODE_BLOCKS
    block_tokens: int  # block size used in MODE_BLOCKS (recorded either way)


def heading_title(line: str) -> str | None:
    """The title of a WikiText top-level heading line, else None."""
    m = HEADING.match(line.rstrip("\r\n"))
    return m.group(1).strip() if m else None


def article_starts(line_token_counts: list[int], lines: list[str]) -> tuple[np.ndarray, list[str]]:
    """(token offsets where an article heading starts, their titles) in the stream of the lines' tokens."""
    offsets = np.concatenate([[0], np.cumsum(line_token_counts, dtype=np.int64)])[:-1]
    starts, titles = [], []
    for line, off, n in zip(lines, offsets, line_token_counts, strict=True):
        title = heading_title(line) if n else None
        if title is not None:
            starts.append(int(off))
            titles.append(title)
    return np.asarray(starts, dtype=np.int64), titles


def from_starts(n_positions: int, starts: np.ndarray, titles: list[str], block_tokens: int) -> Documents:
    """Documents of T = n_positions evaluation positions from article starts (token offsets in the stream).

    With fewer than two article starts inside the scored tokens, fixed blocks of block_tokens positions.
    """
    if block_tokens < 1:
        raise ValueError(f"doc_block_tokens must be >= 1, got {block_tokens}")
    pos_starts = np.maximum(starts - 1, 0)  # token s is the target of position s - 1 (token 0 of none)
    keep = pos_starts < n_positions
    pos_starts, kept_titles = pos_starts[keep], [t for t, k in zip(titles, keep, strict=True) if k]
    if len(pos_starts) >= 2:
        pos_starts[0] = 0  # text before the first heading joins the first article
        doc_id = np.searchsorted(pos_starts, np.arange(n_positions), side="right") - 1
        return Documents(doc_id.astype(np.int32), pos_starts.astype(np.int64), kept_titles, MODE_ARTICLES,
                         block_tokens)
    first = np.arange(0, n_positions, block_tokens, dtype=np.int64)
    titles_b = [f"positions {a:,}–{min(a + block_tokens, n_positions) - 1:,}" for a in first]
    doc_id = (np.arange(n_positions) // block_tokens).astype(np.int32)
    return Documents(doc_id, first, titles_b, MODE_BLOCKS, block_tokens)


def from_text(text: str, tokenizer, n_positions: int, block_tokens: int) -> tuple[Documents, np.ndarray]:
    """(documents, token stream) of an evaluation text tokenized line by line as knnlm_core.corpus does.

    The caller checks that the stream's first n_positions + 1 tokens are the run's evaluation tokens.
    """
    lines = text.splitlines(keepends=True)
    counts, ids = [], []
    for start in range(0, len(lines), 2048):
        for line_ids in tokenizer(lines[start : start + 2048], add_special_tokens=False)["input_ids"]:
            counts.append(len(line_ids))
            ids.extend(line_ids)
    starts, titles = article_starts(counts, lines)
    return from_starts(n_positions, starts, titles, block_tokens), np.asarray(ids, dtype=np.int32)


def for_eval_tokens(text: str, tokenizer, eval_ids: np.ndarray, block_tokens: int) -> Documents:
    """Documents of a run's evaluation positions (T = len(eval_ids) − 1) from its evaluation text;
    ValueError when the text does not tokenize to the run's evaluation tokens."""
    docs, stream = from_text(text, tokenizer, len(eval_ids) - 1, block_tokens)
    if len(stream) < len(eval_ids) or not np.array_equal(stream[: len(eval_ids)], eval_ids):
        raise ValueError("the evaluation text does not tokenize to the run's evaluation tokens (another corpus file "
                         "or tokenizer?): rebuild the run from its config")
    return docs


def to_frame(docs: Documents) -> pd.DataFrame:
    """The `documents` relation: doc_id, first_pos, n_positions, title."""
    n_pos = np.diff(np.append(docs.first_pos, len(docs.doc_id)))
    return pd.DataFrame({"doc_id": np.arange(len(docs.first_pos), dtype=np.int32),
                         "first_pos": docs.first_pos.astype(np.int32), "n_positions": n_pos.astype(np.int32),
                         "title": docs.titles})
