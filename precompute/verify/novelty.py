"""Context novelty and the ∞-gram columns (stage `suffix`; SPEC §12) against direct scans of the datastore
token stream on a smaller sample, `neighbors.overlap` by comparing contexts token by token, and the
NULL rule of `copy_share`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .common import Check, RunData, close, equal

STAGE = "suffix"


def scan_infgram(ds: np.ndarray, ev: np.ndarray, t: int, max_len: int) -> tuple[int, int, int, float]:
    """(L_t, ∞-gram suffix length, count(s ·), p_∞(target)) of evaluation position t by a direct scan of the
    datastore stream: the occurrences of E[t-n+1..t] in D, grown one token to the left at a time."""
    ends = np.flatnonzero(ds == ev[t])  # end offsets in D of the matches of the last n context tokens (n = 1)
    match_len, suffix = 0, (0, ds[1:])  # the empty suffix: every entry's value follows it
    n = 1
    while len(ends) and n <= max_len:
        match_len = n
        followed = ends[ends < len(ds) - 1]
        if len(followed):
            suffix = (n, ds[followed + 1])
        if n == max_len or t - n < 0:
            break
        ends = ends[(ends - n >= 0)]
        ends = ends[ds[ends - n] == ev[t - n]]
        n += 1
    length, followers = suffix
    return match_len, length, len(followers), float(np.mean(followers == ev[t + 1])) if len(followers) else 0.0


def common_suffix(ds: np.ndarray, ev: np.ndarray, t: int, entry: int, max_len: int) -> int:
    """Longest common suffix of E[..t] and D[..entry], capped at max_len: a direct token-by-token comparison."""
    n = 0
    while n < max_len and t - n >= 0 and entry - n >= 0 and ev[t - n] == ds[entry - n]:
        n += 1
    return n


def check_novelty(con, ev: pd.DataFrame, pos: np.ndarray, ds: np.ndarray, ev_ids: np.ndarray,
                  max_len: int) -> list[Check]:
    """SPEC §12 columns of sampled positions against direct scans of the datastore stream."""
    got = ev.iloc[pos]
    want = np.array([scan_infgram(ds, ev_ids, int(t), max_len) for t in pos])  # (S, 4)
    checks = [equal("ctx_match_len (scan of the datastore stream)", got["ctx_match_len"].to_numpy(), want[:, 0]),
              equal("inf_suffix_len (scan)", got["inf_suffix_len"].to_numpy(), want[:, 1]),
              equal("inf_count (scan)", got["inf_count"].to_numpy(), want[:, 2]),
              close("p_inf (scan)", got["p_inf"].to_numpy(), want[:, 3], 1e-12, 1e-9)]
    nb = con.execute("SELECT pos, entry, overlap FROM neighbors WHERE pos = ANY(?)", [pos.tolist()]).fetchdf()
    direct = np.array([common_suffix(ds, ev_ids, int(p), int(e), max_len) for p, e in zip(nb["pos"], nb["entry"])])
    checks.append(equal("neighbors.overlap (contexts compared)", nb["overlap"].to_numpy(), direct))
    share = got["copy_share"].to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isnan(share) == (got["p_knn"].to_numpy() == 0)
    checks.append(("copy_share NULL exactly where p_knn = 0, else in [0, 1]", bool(ok.all() and np.all(
        (share[~np.isnan(share)] >= 0) & (share[~np.isnan(share)] <= 1 + 1e-12))), f"{int((~ok).sum())} wrong"))
    return checks


def applies(ctx: RunData) -> bool:
    return "ctx_match_len" in ctx.ev.columns


def check(ctx: RunData) -> list[Check]:
    """The scans on the first exact_sample sampled positions, at the run's ctx_max_len (default 64)."""
    run = ctx.run
    cfg = json.loads(run["config_json"]) if isinstance(run.get("config_json"), str) else {}
    return check_novelty(ctx.con, ctx.ev, ctx.pos[ctx.few()], ctx.ds_ids, ctx.ev_ids, int(cfg.get("ctx_max_len", 64)))
