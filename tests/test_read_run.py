"""knnlm_core.read.run against a real tiny run: the run row and the hit@k cut-offs it defines."""

from __future__ import annotations

from knnlm_core import read, store


def test_run_info(cur):
    info = read.run.run_info(cur)
    assert info["schema_version"] == store.SCHEMA_VERSION
    assert info["config"]["k"] == info["k"]
    assert read.run.hit_ks_for(info["k"]) == tuple(k for k in store.HIT_KS if k <= info["k"])
