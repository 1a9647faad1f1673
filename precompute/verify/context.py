"""Loading a run for the checks: its tables, files and keys, the sampled positions and their fresh search."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from knnlm_core.keystore import open_keys

from .common import RunData
from .search import search_reference


def load(con, run_dir: Path, sample: int, type_sample: int, seed: int, exact_sample: int) -> RunData:
    """RunData of the run at run_dir read through `con` (read-only); keys in either layout, through the one reader."""
    run = con.execute("SELECT * FROM run").fetchdf().iloc[0]
    ev = con.execute("SELECT * FROM eval_tokens ORDER BY pos").fetchdf()
    tt = con.execute("SELECT * FROM token_types ORDER BY token_id").fetchdf()
    dt = con.execute("SELECT token_id FROM datastore_tokens ORDER BY pos").fetchnumpy()["token_id"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    values = np.load(run_dir / "values.npy")
    keys = open_keys(run_dir, n=len(values))
    queries = np.load(run_dir / "queries.npy", mmap_mode="r")
    ev_ids, ds_ids = np.load(run_dir / "eval_ids.npy"), np.load(run_dir / "datastore_ids.npy")
    index = faiss.read_index(str(run_dir / "index.faiss"))
    freq = np.zeros(max(int(values.max()), int(ev_ids.max())) + 1, dtype=np.int64)
    np.add.at(freq, values, 1)
    t = len(ev_ids) - 1
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(t, size=min(sample, t), replace=False))
    q = np.asarray(queries[pos], dtype=np.float32)  # (S, d)
    ref = search_reference(index, keys, values, q, ev_ids[1:][pos], run)
    return RunData(run_dir=run_dir, con=con, run=run, ev=ev, tt=tt, dt=dt, manifest=manifest, values=values,
                   keys=keys, queries=queries, ev_ids=ev_ids, ds_ids=ds_ids, index=index, freq=freq, rng=rng,
                   pos=pos, q=q, ref=ref, exact_sample=exact_sample, type_sample=type_sample)
