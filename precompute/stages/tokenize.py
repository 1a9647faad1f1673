"""Stages: persist a corpus's token stream (tokenized during validation) as an .npy file."""

from __future__ import annotations

from knnlm_core.config import resolve_path
from knnlm_core.corpus import tokenize_file
from precompute.runner import Run, save_npy


def stage_tokenize(run: Run, role: str) -> dict:
    """Write `<role>_ids.npy`: the stream validation read (`run.fresh`), else the corpus tokenized now."""
    name = f"{role}_ids.npy"
    ids = run.fresh.pop(name, None)
    if ids is None:  # the record matched but the file was damaged: tokenize again
        cfg = run.cfg
        limit = cfg.datastore_limit_tokens if role == "datastore" else cfg.eval_limit_tokens
        ids = tokenize_file(resolve_path(run.corpora[role]["path"]), run.tokenizer, limit or None)
    save_npy(run.path(name), ids)
    return {}


def stage_tokenize_datastore(run: Run, _key: str) -> dict:
    return stage_tokenize(run, "datastore")


def stage_tokenize_eval(run: Run, _key: str) -> dict:
    return stage_tokenize(run, "eval")
