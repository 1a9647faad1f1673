"""Word level (SPEC §10): whitespace-delimited words of the evaluation text and their NLL.

A word's tokens are the tokens whose first non-whitespace character lies inside it
(whitespace-only tokens belong to no word). A word's NLL is the sum of its tokens' NLLs;
a word counts only when every one of its tokens is scored (the first token of the text
never is, and an evaluation cut by a token limit may end inside a word). A word's
frequency is its number of exact occurrences in the whitespace-split datastore text.
Pure numpy / stdlib: the dashboard imports nothing from here but the aggregation.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class EvalWords:
    """The complete words of an evaluation text, each a run of consecutive scored positions."""

    text: list[str]  # (W,) the word as written
    first_pos: np.ndarray  # (W,) int64 first target position (eval_tokens.pos) of the word's tokens
    n_tokens: np.ndarray  # (W,) int32 number of tokens


def token_word_index(text: str, offsets: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(word index per token (n,) int64, -1 for whitespace-only tokens; word spans [(start, end)]).

    offsets (n, 2): each token's [start, end) character span in `text`.
    """
    spans = [m.span() for m in _WORD.finditer(text)]
    if not spans:
        return np.full(len(offsets), -1, dtype=np.int64), spans
    starts = np.array([a for a, _ in spans], dtype=np.int64)
    ends = np.array([b for _, b in spans], dtype=np.int64)
    # first non-whitespace character of each token (end if it has none)
    first = np.array([_first_non_space(text, int(a), int(b)) for a, b in offsets], dtype=np.int64)
    word = np.searchsorted(starts, first, side="right") - 1  # last word starting at or before `first`
    inside = (word >= 0) & (first < offsets[:, 1]) & (first < ends[np.maximum(word, 0)])
    return np.where(inside, word, -1), spans


def _first_non_space(text: str, start: int, end: int) -> int:
    """Index of the first non-whitespace character of text[start:end], or end if none."""
    piece = text[start:end]
    stripped = len(piece) - len(piece.lstrip())
    return start + stripped if stripped < len(piece) else end


def complete_words(text: str, offsets: np.ndarray) -> EvalWords:
    """Words whose tokens are all targets: token 0 is context only, so position p is token p + 1."""
    word_of_token, spans = token_word_index(text, offsets)
    n = len(word_of_token)
    if n < 2 or not spans:
        return EvalWords([], np.zeros(0, np.int64), np.zeros(0, np.int32))
    w = word_of_token
    in_word = np.flatnonzero(w >= 0)
    # runs of equal word index among tokens; a word's tokens are consecutive by construction
    bounds = np.flatnonzero(np.r_[True, w[in_word][1:] != w[in_word][:-1]])
    first_tok = in_word[bounds]
    count = np.diff(np.r_[bounds, len(in_word)])
    ids = w[first_tok]
    last_tok = first_tok + count - 1
    # complete: not token 0, and the word's text is covered up to its end (not cut by a limit)
    covered_end = offsets[last_tok, 1]
    word_end = np.array([spans[i][1] for i in ids], dtype=np.int64)
    keep = (first_tok >= 1) & (covered_end >= word_end)
    texts = [text[spans[i][0] : spans[i][1]] for i in ids[keep]]
    return EvalWords(texts, (first_tok[keep] - 1).astype(np.int64), count[keep].astype(np.int32))


def word_counts(text: str) -> Counter:
    """Occurrences of each whitespace-delimited word (exact match)."""
    return Counter(text.split())


def word_nll(first_pos: np.ndarray, n_tokens: np.ndarray, token_nll: np.ndarray) -> np.ndarray:
    """Sum of token NLLs over each word's positions [first_pos, first_pos + n_tokens) (W,)."""
    if len(first_pos) == 0:
        return np.zeros(0)
    bounds = np.empty(2 * len(first_pos), dtype=np.int64)
    bounds[0::2], bounds[1::2] = first_pos, first_pos + n_tokens
    padded = np.r_[np.asarray(token_nll, dtype=np.float64), 0.0]  # a word may end at the last position
    return np.add.reduceat(padded, bounds)[0::2]


def pack_strings(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(utf-8 bytes (B,) uint8, end offsets (W,) int64): strings in an .npz without pickling."""
    encoded = [t.encode() for t in texts]
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), np.cumsum([len(b) for b in encoded], dtype=np.int64)


def unpack_strings(data: np.ndarray, ends: np.ndarray) -> list[str]:
    raw = data.tobytes()
    starts = np.r_[0, ends[:-1]]
    return [raw[a:b].decode() for a, b in zip(starts, ends, strict=True)]
