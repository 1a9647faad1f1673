"""Retrieval columns, the `neighbors` table and the (eval, plain) neighbour block (stage `search`; SPEC §2,
§4, §7): consistency on every position, and a fresh `index.search` of a sample of positions."""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd

from knnlm_core import neighbours
from knnlm_core.schema import HIT_KS

from .blocks import check_block
from .common import Check, RunData, close, equal, hit_matches, stored_rank

STAGE = "search"


def search_reference(index, keys, values: np.ndarray, q: np.ndarray, y: np.ndarray, run: pd.Series) -> dict:
    """Re-searched p_kNN, log Z, target rank (-1 = none), n_target and neighbour lists of queries q (S, d)."""
    k, tau = int(run["k"]), float(run["temperature"])
    try:
        faiss.extract_index_ivf(index).nprobe = int(run["nprobe"])
    except RuntimeError:
        pass
    dist, ids = index.search(q, k)  # (S, k)
    nbr_val = np.where(ids >= 0, values[np.maximum(ids, 0)], -1)
    if run["distance_source"] == "exact":
        d_use = np.stack([np.where(row >= 0, np.sum((np.asarray(keys[np.maximum(row, 0)], np.float32) - qq) ** 2,
                                                    axis=1), np.inf) for row, qq in zip(ids, q)])
    else:
        d_use = np.where(ids >= 0, dist.astype(np.float64), np.inf)
    p, rank, n_target, log_z = [], [], [], []
    for drow, vrow, target in zip(d_use, nbr_val, y):
        ok = vrow >= 0
        logits = -drow[ok] / tau
        w = np.exp(logits - logits.max())
        log_z.append(logits.max() + np.log(w.sum()))
        p.append(w[vrow[ok] == target].sum() / w.sum())
        hits = np.flatnonzero(vrow == target)
        rank.append(hits[0] + 1 if len(hits) else -1)
        n_target.append(len(hits))
    return {"dist": dist, "ids": ids, "d_use": d_use, "p_knn": np.array(p), "log_z": np.array(log_z),
            "rank": np.array(rank), "n_target": np.array(n_target)}


def check_rank_consistency(ev: pd.DataFrame, k: int) -> list[Check]:
    """On every position: target_rank NULL iff n_target = 0, rank in 1..k, hit_k = rank <= k."""
    rank, n_target = stored_rank(ev["target_rank"]), ev["n_target"].to_numpy(dtype=np.int64)
    valid = np.where(n_target > 0, (rank >= 1) & (rank <= k), rank == -1)
    checks = [("target_rank NULL iff n_target = 0, else in 1..k (all positions)", bool(valid.all()),
               f"{int((~valid).sum())} bad of {len(rank)}")]
    for hk in HIT_KS:
        if hk <= k:
            ok = hit_matches(ev[f"hit_{hk}"], (rank >= 1) & (rank <= hk))
            checks.append((f"hit_{hk} = target_rank <= {hk} (all positions)", bool(ok.all()),
                           f"{int((~ok).sum())} mismatches over {len(ok)}"))
    return checks


def rank_check(stored: np.ndarray, want: np.ndarray, dist: np.ndarray) -> Check:
    """target_rank vs the re-searched rank; a difference is a (near-)tie when the re-searched distances
    at both ranks agree to 1e-5 relative: faiss's float32 PQ distances differ in their last bits
    between batch sizes (measured: 63.818417 vs 63.81847), which can swap two nearly equal neighbours."""
    diff = np.flatnonzero(stored != want)
    tie = np.array([s >= 1 and w >= 1 and np.isclose(dist[i, s - 1], dist[i, w - 1], rtol=1e-5, atol=1e-5)
                    for i, s, w in zip(diff, stored[diff], want[diff])], dtype=bool)
    return ("target_rank (re-searched)", bool(tie.all()),
            f"{len(diff)} differ over {len(want)}, {int(tie.sum())} of them at tied distances")


def check_retrieval(sub: pd.DataFrame, ref: dict, q: np.ndarray, index, k: int) -> list[Check]:
    """Sampled positions' retrieval columns against a fresh search."""
    checks = [close("p_knn (re-searched)", sub["p_knn"], ref["p_knn"], 1e-6, 1e-4)]
    if "knn_log_z" in sub.columns:
        # float32 PQ distances differ in their last bits between faiss batch sizes: ~1e-4 in log Z.
        checks.append(close("knn_log_z (re-searched)", sub["knn_log_z"], ref["log_z"], 1e-4, 1e-5))
    checks.append(rank_check(stored_rank(sub["target_rank"]), ref["rank"], ref["dist"]))
    checks.append(equal("n_target (re-searched)", sub["n_target"].to_numpy(), ref["n_target"]))
    for hk in HIT_KS:
        col = sub[f"hit_{hk}"]
        if hk <= k:
            ok = hit_matches(col, (ref["rank"] >= 1) & (ref["rank"] <= hk))
            checks.append((f"hit_{hk} (re-searched)", bool(ok.all()), f"{int((~ok).sum())} mismatches over {len(ok)}"))
        else:
            checks.append(equal(f"hit_{hk} is NULL (k={k})", col.isna().to_numpy(), np.ones(len(sub), bool)))
    recon = index.sa_decode(index.sa_encode(q))
    checks.append(close("query_pq_error", sub["query_pq_error"], np.sum((q - recon) ** 2, axis=1), 1e-4, 1e-4))
    return checks


def check_neighbors(nb: pd.DataFrame, ref: dict, pos: np.ndarray, q: np.ndarray, keys, values: np.ndarray,
                    s: int) -> list[Check]:
    """Stored first-s neighbours of the sampled positions against the fresh search."""
    dist, ids = ref["dist"], ref["ids"]
    want_entries = np.concatenate([row[:s][row[:s] >= 0] for row in ids])
    want_dist = np.concatenate([drow[:s][row[:s] >= 0] for drow, row in zip(dist, ids)])
    got_entries = nb["entry"].to_numpy()
    checks = []
    if len(got_entries) == len(want_entries):
        # Equal (tied) distances may come back in another order: a swap is fine when the
        # stored distance at that rank equals the re-searched one.
        swapped = got_entries != want_entries
        tie = np.isclose(nb["distance_pq"].to_numpy()[swapped], want_dist[swapped], rtol=1e-5, atol=1e-4)
        checks.append(("neighbors.entry (re-searched)", bool(tie.all()),
                       f"{int(swapped.sum())} tie swaps, {int((~tie).sum())} mismatches over {len(want_entries)}"))
        checks.append(close("neighbors.distance_pq", nb["distance_pq"], want_dist, 1e-3, 1e-4))
    else:
        checks.append(equal("neighbors.entry (re-searched)", got_entries, want_entries))
    checks.append(equal("neighbors.token_id = values[entry]", nb["token_id"].to_numpy(), values[got_entries]))
    qpos = np.searchsorted(pos, nb["pos"].to_numpy())
    exact = np.sum((np.asarray(keys[got_entries], dtype=np.float32) - q[qpos]) ** 2, axis=1)
    checks.append(close("neighbors.distance_exact", nb["distance_exact"], exact, 1e-3, 1e-4))
    return checks


def applies(ctx: RunData) -> bool:
    return True


def check(ctx: RunData) -> list[Check]:
    """Rank consistency on every position; the sample's columns, neighbors rows and plain block re-searched."""
    pos, ref = ctx.pos, ctx.ref
    checks = check_rank_consistency(ctx.ev, ctx.k)
    checks += check_retrieval(ctx.ev.iloc[pos], ref, ctx.q, ctx.index, ctx.k)
    nb = ctx.con.execute("SELECT * FROM neighbors WHERE pos = ANY(?) ORDER BY pos, rank", [pos.tolist()]).fetchdf()
    checks += check_neighbors(nb, ref, pos, ctx.q, ctx.keys, ctx.values, ctx.store_neighbors)
    if (block := neighbours.find_block(ctx.run_dir, "eval", "plain")) is not None:
        checks += check_block("eval-plain", block, pos, ref["ids"], ref["dist"], ctx.q, ctx.keys, ctx.values)
    return checks
