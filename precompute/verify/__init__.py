"""Independent recomputation of a run's stored columns from the run's own files (SPEC §2-§5, §7).

`python -m precompute.verify --run-dir DIR [--sample 2000]` re-derives, from the keys,
values.npy, queries.npy, eval_ids.npy, datastore_ids.npy and index.faiss, every SPEC §7
column of metrics.duckdb, with straightforward numpy code that shares nothing with the
pipeline's metric functions, and prints one line per check. Keys are read through
`knnlm_core.keystore.open_keys`, so either layout works: `keys.npy`, or shards in `keys/`
listed by `keys/shards.json`. p_LM needs the model and is taken as stored; everything
derived from it (p_kNNLM, NLL, gain, PPL) is recomputed. Exits 0 when every check passes,
1 when one fails, 2 on bad input (a missing, truncated or corrupt file: one line saying so).

One module per stage or table family (`registry.CHECKS`, in the pipeline's stage order):
datastore (run facts, the datastore stream), eval_tokens (the LM and mixture columns),
whitening, search (retrieval columns, `neighbors`, the neighbour blocks), token_types, exact
(SPEC §8), novelty (SPEC §12), mitigations (SPEC §9), words (SPEC §10), documents (SPEC §11)
and schema (the relations against knnlm_core/schema.py). Retrieval columns are re-searched on
a sample of positions and checked for internal consistency on all of them; the exact-search
and novelty columns on a smaller sample; type metrics on the types with the smallest freq plus
a random sample.
"""

from __future__ import annotations

from .command import main, run_checks
from .common import Check
from .documents import reference_doc_ids
from .registry import CHECKS, STAGE_NAMES
from .run import verify_run

__all__ = ["CHECKS", "STAGE_NAMES", "Check", "main", "reference_doc_ids", "run_checks", "verify_run"]
