"""knnlm_core.read.run against a real tiny run: the run row and the hit@k cut-offs it defines."""

from __future__ import annotations

import pytest

from knnlm_core import read, store


@pytest.fixture(scope="module")
def cur(tiny_run):
    con = store.open_readonly(tiny_run / store.DB_NAME)
    yield con.cursor()
    con.close()


@pytest.fixture(scope="module")
def ev(cur):
    return cur.execute("SELECT * FROM eval_tokens ORDER BY pos").df()


def test_run_info(cur):
    info = read.run.run_info(cur)
    assert info["schema_version"] == store.SCHEMA_VERSION
    assert info["config"]["k"] == info["k"]
    assert read.run.hit_ks_for(info["k"]) == tuple(k for k in store.HIT_KS if k <= info["k"])
