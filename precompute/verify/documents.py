"""Evaluation documents (SPEC §11; written by the `database` stage): `eval_tokens.doc_id` against a plain
re-scan of the evaluation text, the `documents` relation, and `doc_bin_stats` = sums of eval_tokens."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import Check, RunData, close, equal

STAGE = "database"


def reference_doc_ids(text: str, tokenizer, n_positions: int, block: int) -> np.ndarray:
    """doc_id of each evaluation position, recomputed by a plain scan: a line ' = Title = ' (not ' = = ')
    starts an article at its first token; position t belongs to the article of token t + 1; text before
    the first heading joins the first article; with fewer than two articles, blocks of `block` positions."""
    starts, offset = [], 0
    for line in text.splitlines(keepends=True):
        n = len(tokenizer(line, add_special_tokens=False)["input_ids"])
        bare = line.rstrip()
        if n and bare.startswith(" = ") and not bare.startswith(" = = ") and bare.endswith(" =") and len(bare) > 4:
            starts.append(max(offset - 1, 0))
        offset += n
    starts = [p for p in starts if p < n_positions]
    if len(starts) < 2:
        return np.arange(n_positions) // block
    doc = np.zeros(n_positions, dtype=np.int64)
    for s in starts[1:]:
        doc[s:] += 1
    return doc


def check_documents(con, ev: pd.DataFrame, run: pd.Series, manifest: dict, ev_ids: np.ndarray) -> list[Check]:
    """eval_tokens.doc_id against reference_doc_ids, the documents relation, and doc_bin_stats = sums of eval_tokens."""
    from knnlm_core.config import resolve_path
    from knnlm_core.corpus import load_tokenizer, read_text

    text = read_text(resolve_path(manifest["corpora"]["eval"]["path"]))
    want = reference_doc_ids(text, load_tokenizer(str(resolve_path(manifest["tokenizer"]))), len(ev_ids) - 1,
                             int(run["doc_block_tokens"]))
    docs = con.execute("SELECT * FROM documents ORDER BY doc_id").fetchdf()
    stats = con.execute("SELECT doc_id, freq_bin, n_tokens, sum_nll_knnlm FROM doc_bin_stats").fetchdf()
    grouped = ev.groupby(["doc_id", "freq_bin"])["nll_knnlm"].agg(["size", "sum"])
    got = stats.set_index(["doc_id", "freq_bin"]).reindex(grouped.index)
    return [
        equal("eval_tokens.doc_id (evaluation text re-scanned)", ev["doc_id"].to_numpy(), want),
        equal("documents: n_docs rows, first_pos / n_positions of doc_id",
              [len(docs), *docs["first_pos"], *docs["n_positions"]],
              [int(run["n_docs"]), *np.flatnonzero(np.diff(np.r_[-1, want])), *np.bincount(want)]),
        equal("doc_bin_stats.n_tokens = rows per (doc, bin)", got["n_tokens"].to_numpy(), grouped["size"].to_numpy()),
        close("doc_bin_stats.sum_nll_knnlm", got["sum_nll_knnlm"], grouped["sum"], 1e-9, 1e-9),
    ]


def applies(ctx: RunData) -> bool:
    return True


def check(ctx: RunData) -> list[Check]:
    return check_documents(ctx.con, ctx.ev, ctx.run, ctx.manifest, ctx.ev_ids)
