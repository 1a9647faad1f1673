"""knnlm_core.read.inspector (one evaluation position and its neighbours) against a real tiny run: contexts,
overlaps and the default position recomputed from the tables."""

from __future__ import annotations

from knnlm_core import infgram, read


def test_eval_position_views(cur, ev):
    pos = 10
    row = read.inspector.eval_row(cur, pos)
    assert row["token_id"] == ev.at[pos, "token_id"]
    assert read.inspector.eval_row(cur, 10**9) == {}
    ctx = read.inspector.eval_context(cur, pos, 5)
    assert ctx["token_id"].tolist() == ev.loc[pos - 4 : pos, "context_token_id"].tolist()
    lm = read.inspector.top_predictions(cur, pos, "lm")
    assert lm["rank"].tolist() == sorted(lm["rank"]) and lm["p"].is_monotonic_decreasing


def test_neighbor_contexts_match_datastore(cur):
    pos, width = 7, 6
    nb = read.inspector.neighbors(cur, pos, width)
    ref = cur.execute("SELECT * FROM neighbors WHERE pos = ? ORDER BY rank", [pos]).df()
    assert nb["entry"].tolist() == ref["entry"].tolist()
    ds = cur.execute("SELECT token_id FROM datastore_tokens ORDER BY pos").df()["token_id"].to_numpy()
    vocab = dict(cur.execute("SELECT token_id, token FROM vocab").fetchall())
    for entry, ctx, value in zip(nb["entry"], nb["context"], nb["token_id"], strict=True):
        assert ctx == "".join(vocab[t] for t in ds[max(0, entry - width + 1) : entry + 1])
        assert ds[entry + 1] == value  # the neighbour's value follows its context


def test_neighbor_overlap_and_context_tokens(cur, ev):
    """neighbors() carries each neighbour's overlap (checked by walking both contexts back here) and its copy
    flag; neighbor_context_tokens() lists the entry's decoded left context."""
    ds = cur.execute("SELECT token_id FROM datastore_tokens ORDER BY pos").df()["token_id"].to_numpy()
    e = ev["context_token_id"].to_numpy()
    vocab = dict(cur.execute("SELECT token_id, token FROM vocab").fetchall())
    pos = int(cur.execute("SELECT pos FROM neighbors ORDER BY overlap DESC, pos LIMIT 1").fetchone()[0])
    nb = read.inspector.neighbors(cur, pos)
    for entry, overlap, copy in zip(nb["entry"], nb["overlap"], nb["copy"], strict=True):
        n = 0
        while n < min(pos, entry) + 1 and n < 64 and e[pos - n] == ds[entry - n]:
            n += 1
        assert overlap == n and copy == (n >= infgram.COPY_MIN_OVERLAP)
    assert nb["overlap"].max() >= 1
    width = 9
    ctx = read.inspector.neighbor_context_tokens(cur, pos, width)
    assert ctx["rank"].tolist() == nb["rank"].tolist() and ctx["overlap"].tolist() == nb["overlap"].tolist()
    for entry, tokens in zip(nb["entry"], ctx["tokens"], strict=True):
        assert list(tokens) == [vocab[t] for t in ds[max(0, entry - width + 1) : entry + 1]]


def test_default_position(cur, ev):
    """The inspector's first view: the largest |gain| among positions with a full 64-token context whose target
    is rare (1 <= freq < 1,000), recomputed with pandas; 0 when no position has a full context."""
    full = ev[ev["pos"] >= read.inspector.CONTEXT_WIDTH - 1].assign(rare=lambda d: d["freq_bin"].between(0, 2),
                                                              mag=lambda d: d["gain"].abs())
    want = int(full.sort_values(["rare", "mag", "pos"], ascending=[False, False, True])["pos"].iloc[0])
    assert read.inspector.default_position(cur) == want
    assert ev.loc[want, "freq"] < 1000 or not (full["freq_bin"].between(0, 2)).any()
    assert read.inspector.default_position(cur, width=10**9) == int(ev.assign(m=ev["gain"].abs())
                                                              .sort_values(["m", "pos"], ascending=[False, True])
                                                              ["pos"].iloc[0])
