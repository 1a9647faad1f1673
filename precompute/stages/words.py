"""Stage: the evaluation text's words and their datastore frequency (SPEC §10).

The evaluation text is tokenized again with character offsets (the same line-by-line
tokenization as `eval_ids.npy`, which it must reproduce), split into whitespace words,
and each complete word is mapped to its run of target positions. Word frequency counts
exact whitespace-split occurrences in the datastore text (the part of it the datastore
used). The NLLs are summed per word by the database stage.
"""

from __future__ import annotations

import numpy as np

from knnlm_core.config import resolve_path
from knnlm_core.corpus import read_text, tokenize_with_offsets
from knnlm_core.words import complete_words, pack_strings, word_counts
from precompute.runner import Run, RunError, load_npy, save_npz


def datastore_text(run: Run) -> str:
    """The datastore text the entries came from: the whole corpus, or the decoded prefix when limited."""
    if run.cfg.datastore_limit_tokens:
        return run.tokenizer.decode(np.asarray(load_npy(run.path("datastore_ids.npy"))).tolist())
    return read_text(resolve_path(run.cfg.datastore_corpus))


def stage_words(run: Run, key: str) -> dict:
    eval_ids = np.asarray(load_npy(run.path("eval_ids.npy")))
    text = read_text(resolve_path(run.cfg.eval_corpus))
    ids, offsets = tokenize_with_offsets(text, run.tokenizer)
    ids, offsets = ids[: len(eval_ids)], offsets[: len(eval_ids)]
    if not np.array_equal(ids, eval_ids):
        raise RunError("re-tokenizing the evaluation text with offsets does not reproduce eval_ids.npy (the "
                       "tokenizer changed?): rerun with --overwrite to rebuild the run")
    words = complete_words(text, offsets)
    counts = word_counts(datastore_text(run))
    data, ends = pack_strings(words.text)
    save_npz(run.path("words.npz"), first_pos=words.first_pos, n_tokens=words.n_tokens,
             freq=np.array([counts.get(w, 0) for w in words.text], dtype=np.int64), text_utf8=data, text_ends=ends)
    return {"n_words": len(words.text)}
