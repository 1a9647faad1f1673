"""Datastores in knn-transformers' format: read them where they lie, check them, export a run (SPEC §13).

One module per idea:
- `format`: the peer's files (neulab/knn-transformers `knnlm.py` at commit 5b370d2): names, sizes,
  memmaps, the index (shards included) and their checks (SPEC §13 a).
- `align`: where each value lies in the token stream of the named corpus, and the rule it follows (§13 c).
- `check`: values within the vocabulary (§13 b), keys of a sample recomputed with the model (§13 d),
  and `check_datastore`, which runs every check in order.
- `export`: a run's datastore and index written in the peer's format.
- `command`: the CLI.

CLI: `python -m precompute.knn_transformers check --dir DIR --model M --corpus C [--sample N]` and
`python -m precompute.knn_transformers export --run-dir R --out DIR`; exit 2 with one line on bad input.
"""

from __future__ import annotations

from .align import Alignment, align
from .check import SELF_SHARE, CheckReport, KeyCheck, check_datastore
from .command import main
from .export import export_run
from .format import (
    PEER,
    PEER_COMMIT,
    DatastoreError,
    PeerDatastore,
    check_file_sizes,
    find_datastore,
    index_ids,
    open_index,
    open_keys,
    open_values,
    read_index_file,
)

__all__ = [
    "PEER", "PEER_COMMIT", "SELF_SHARE", "Alignment", "CheckReport", "DatastoreError", "KeyCheck",
    "PeerDatastore", "align", "check_datastore", "check_file_sizes", "export_run", "find_datastore",
    "index_ids", "main", "open_index", "open_keys", "open_values", "read_index_file",
]
