"""Independent recomputation of a run's stored columns from the run's own files.

`python -m precompute.verify --run-dir DIR [--sample 2000]` re-derives, from keys.npy,
values.npy, queries.npy, eval_ids.npy, datastore_ids.npy and index.faiss, every SPEC §7
column of metrics.duckdb, with straightforward numpy code that shares nothing with the
pipeline's metric functions, and prints one line per check. p_LM needs the model and is
taken as stored; everything derived from it (p_kNNLM, NLL, gain, PPL) is recomputed.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb
import faiss
import numpy as np

HIT_KS = (1, 8, 16, 64, 256, 1024)


def _close(name: str, got, want, atol: float, rtol: float = 1e-5) -> tuple[str, bool, str]:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    both_nan = np.isnan(got) & np.isnan(want)
    ok = bool(np.all(both_nan | np.isclose(got, want, atol=atol, rtol=rtol)))
    err = np.nanmax(np.abs(got - want)) if got.size else 0.0
    return name, ok, f"max |diff| {err:.3g} over {got.size}"


def _equal(name: str, got, want) -> tuple[str, bool, str]:
    got, want = np.asarray(got), np.asarray(want)
    ok = got.shape == want.shape and bool(np.all(got == want))
    return name, ok, f"{int(np.sum(got != want)) if got.shape == want.shape else 'shape'} mismatches over {want.size}"


def brute_force_contamination(keys, values, mus: np.ndarray, types: np.ndarray, freqs: np.ndarray,
                              block: int = 131072) -> np.ndarray:
    """Share of the min(freq, 1024) keys nearest each centroid whose value differs, by a full scan."""
    m = np.minimum(freqs, 1024)
    best_d = np.full((len(mus), 0), np.inf)
    best_i = np.zeros((len(mus), 0), dtype=np.int64)
    for start in range(0, len(keys), block):
        kb = np.asarray(keys[start : start + block], dtype=np.float32)
        d2 = ((mus[:, None, :] - kb[None, :, :]) ** 2).sum(-1) if len(mus) * len(kb) < 2e6 else (
            (mus**2).sum(1)[:, None] + (kb**2).sum(1)[None, :] - 2 * mus @ kb.T)
        cat_d = np.concatenate([best_d, d2], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(kb)), d2.shape)], axis=1)
        keep = np.argpartition(cat_d, min(1023, cat_d.shape[1] - 1), axis=1)[:, :1024]
        best_d, best_i = np.take_along_axis(cat_d, keep, 1), np.take_along_axis(cat_i, keep, 1)
    order = np.argsort(best_d, axis=1)
    best_i = np.take_along_axis(best_i, order, 1)
    return np.array([np.mean(values[best_i[j, : m[j]]] != t) for j, t in enumerate(types)])


def verify_run(run_dir: Path, sample: int = 2000, type_sample: int = 300, seed: int = 0) -> list[tuple[str, bool, str]]:
    """List of (check, passed, detail) for the run at run_dir."""
    run_dir = Path(run_dir)
    con = duckdb.connect(str(run_dir / "metrics.duckdb"), read_only=True)
    run = con.execute("SELECT * FROM run").fetchdf().iloc[0]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    keys = np.load(run_dir / "keys.npy", mmap_mode="r")
    values = np.load(run_dir / "values.npy")
    queries = np.load(run_dir / "queries.npy", mmap_mode="r")
    ev_ids = np.load(run_dir / "eval_ids.npy")
    ds_ids = np.load(run_dir / "datastore_ids.npy")
    index = faiss.read_index(str(run_dir / "index.faiss"))
    k, tau, lam = int(run["k"]), float(run["temperature"]), float(run["lambda"])
    n, t = len(values), len(ev_ids) - 1
    checks = [
        _equal("run.n_entries / n_eval / dim", [run["n_entries"], run["n_eval"], run["dim"]], [n, t, keys.shape[1]]),
        _equal("manifest agrees with run table", [manifest["n_entries"], manifest["n_eval"], manifest["parameters"]["k"]],
               [n, t, k]),
        _equal("values = datastore token i+1", values, ds_ids[1:]),
    ]
    freq = np.zeros(max(int(values.max()), int(ev_ids.max())) + 1, dtype=np.int64)
    np.add.at(freq, values, 1)

    # ---- eval_tokens: all positions for cheap columns, a sample for retrieval ones
    ev = con.execute("SELECT * FROM eval_tokens ORDER BY pos").fetchdf()
    targets = ev_ids[1:]
    checks.append(_equal("eval_tokens.pos = 0..T-1", ev["pos"].to_numpy(), np.arange(t)))
    checks.append(_equal("eval_tokens.token_id = eval token pos+1", ev["token_id"].to_numpy(), targets))
    checks.append(_equal("eval_tokens.freq", ev["freq"].to_numpy(), freq[targets]))
    expect_bin = np.array([len(str(f)) - 1 if f > 0 else -1 for f in freq[targets]])
    checks.append(_equal("eval_tokens.freq_bin", ev["freq_bin"].to_numpy(), expect_bin))
    checks.append(_equal("eval_tokens.context_freq", ev["context_freq"].to_numpy(), freq[ev_ids[:-1]]))
    p_lm, p_knn = ev["p_lm"].to_numpy(), ev["p_knn"].to_numpy()
    p_mix = lam * p_knn + (1 - lam) * p_lm
    checks.append(_close("p_knnlm = λ p_knn + (1-λ) p_lm", ev["p_knnlm"], p_mix, 1e-12))
    checks.append(_close("nll_lm = -ln p_lm", ev["nll_lm"], -np.log(p_lm), 1e-9))
    checks.append(_close("nll_knnlm = -ln p_knnlm", ev["nll_knnlm"], -np.log(p_mix), 1e-9))
    checks.append(_close("gain = ln p_knnlm - ln p_lm", ev["gain"], np.log(p_mix) - np.log(p_lm), 1e-9))
    checks.append(_close("run.ppl_lm", run["ppl_lm"], np.exp(np.mean(-np.log(p_lm))), 0, 1e-9))
    checks.append(_close("run.ppl_knnlm", run["ppl_knnlm"], np.exp(np.mean(-np.log(p_mix))), 0, 1e-9))

    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(t, size=min(sample, t), replace=False))
    q = np.asarray(queries[pos], dtype=np.float32)
    try:
        faiss.extract_index_ivf(index).nprobe = int(run["nprobe"])
    except RuntimeError:
        pass
    dist, ids = index.search(q, k)
    nbr_val = np.where(ids >= 0, values[np.maximum(ids, 0)], -1)
    if run["distance_source"] == "exact":
        d_use = np.array([[np.sum((keys[i].astype(np.float32) - qq) ** 2) if i >= 0 else np.inf for i in row]
                          for row, qq in zip(ids, q)])
    else:
        d_use = np.where(ids >= 0, dist.astype(np.float64), np.inf)
    p_ref, rank_ref, ntar_ref, logz_ref = [], [], [], []
    for drow, vrow, y in zip(d_use, nbr_val, targets[pos]):
        ok = vrow >= 0
        logits = -drow[ok] / tau
        w = np.exp(logits - logits.max())
        logz_ref.append(logits.max() + np.log(w.sum()))
        w /= w.sum()
        p_ref.append(w[vrow[ok] == y].sum())
        hits = np.flatnonzero(vrow == y)
        rank_ref.append(hits[0] + 1 if len(hits) else 0)
        ntar_ref.append(len(hits))
    sub = ev.iloc[pos]
    checks.append(_close("p_knn (re-searched)", sub["p_knn"], p_ref, 1e-6, 1e-4))
    # float32 PQ distances differ in their last bits between faiss batch sizes: ~1e-4 in log Z.
    checks.append(_close("knn_log_z (re-searched)", sub["knn_log_z"], logz_ref, 1e-4, 1e-5))
    rank_got = sub["target_rank"].fillna(0).to_numpy(dtype=np.int64)
    checks.append(_equal("target_rank (re-searched)", rank_got, rank_ref))
    checks.append(_equal("n_target (re-searched)", sub["n_target"].to_numpy(), ntar_ref))
    for hk in HIT_KS:
        col = sub[f"hit_{hk}"]
        if hk <= k:
            want = (np.array(rank_ref) > 0) & (np.array(rank_ref) <= hk)
            checks.append(_equal(f"hit_{hk}", col.to_numpy(dtype=bool), want))
        else:
            checks.append(_equal(f"hit_{hk} is NULL (k={k})", col.isna().to_numpy(), np.ones(len(pos), bool)))
    recon = index.sa_decode(index.sa_encode(q))
    checks.append(_close("query_pq_error", sub["query_pq_error"], np.sum((q - recon) ** 2, axis=1), 1e-4, 1e-4))

    # ---- neighbors of the sampled positions
    s = int(run["store_neighbors"])
    nb = con.execute("SELECT * FROM neighbors WHERE pos = ANY(?) ORDER BY pos, rank", [pos.tolist()]).fetchdf()
    want_entries = np.concatenate([row[:s][row[:s] >= 0] for row in ids])
    want_dist = np.concatenate([drow[:s][row[:s] >= 0] for drow, row in zip(dist, ids)])
    got_entries = nb["entry"].to_numpy()
    if len(got_entries) == len(want_entries):
        # Equal (tied) distances may come back in another order: a swap is fine when the
        # stored distance at that rank equals the re-searched one.
        swapped = got_entries != want_entries
        tie = np.isclose(nb["distance_pq"].to_numpy()[swapped], want_dist[swapped], rtol=1e-5, atol=1e-4)
        checks.append(("neighbors.entry (re-searched)", bool(tie.all()),
                       f"{int(swapped.sum())} tie swaps, {int((~tie).sum())} mismatches over {len(want_entries)}"))
    else:
        checks.append(_equal("neighbors.entry (re-searched)", got_entries, want_entries))
    checks.append(_equal("neighbors.token_id = values[entry]", nb["token_id"].to_numpy(), values[nb["entry"].to_numpy()]))
    want_pq = np.concatenate([drow[:s][row[:s] >= 0] for drow, row in zip(dist, ids)])
    checks.append(_close("neighbors.distance_pq", nb["distance_pq"], want_pq, 1e-3, 1e-4))
    qpos = np.searchsorted(pos, nb["pos"].to_numpy())
    exact = np.sum((keys[nb["entry"].to_numpy()].astype(np.float32) - q[qpos]) ** 2, axis=1)
    checks.append(_close("neighbors.distance_exact", nb["distance_exact"], exact, 1e-3, 1e-4))

    # ---- token_types on a sample of types
    tt = con.execute("SELECT * FROM token_types ORDER BY token_id").fetchdf()
    seen = np.flatnonzero(freq)
    eval_count = np.bincount(targets, minlength=len(freq))
    checks.append(_equal("token_types rows = types with freq>=1 or in eval",
                         tt["token_id"].to_numpy(), np.flatnonzero((freq > 0) | (eval_count > 0))))
    checks.append(_equal("token_types.freq", tt["freq"].to_numpy(), freq[tt["token_id"].to_numpy()]))
    checks.append(_equal("token_types.eval_count", tt["eval_count"].to_numpy(), eval_count[tt["token_id"].to_numpy()]))
    pick = rng.choice(seen, size=min(type_sample, len(seen)), replace=False)
    order = np.argsort(values, kind="stable")
    starts = np.searchsorted(values[order], pick)
    cv_ref, pq_ref, pqmax_ref, mus = [], [], [], []
    contamination_exact = run["contamination_mode"] == "exact"
    for v, st in zip(pick, starts):
        rows = order[st : st + freq[v]]
        kv = np.asarray(keys[np.sort(rows)], dtype=np.float32)
        mu = kv.astype(np.float64).mean(axis=0)
        r = np.sqrt(np.sum((kv - mu.astype(np.float32)) ** 2, axis=1, dtype=np.float64))
        cv_ref.append(r.std() / r.mean() if len(r) >= 2 and r.mean() > 0 else np.nan)
        err = np.sum((kv - index.sa_decode(index.sa_encode(kv))) ** 2, axis=1)
        pq_ref.append(err.mean())
        pqmax_ref.append(err.max())
        mus.append(mu)
    got = tt.set_index("token_id").loc[pick]
    checks.append(_close("token_types.cv", got["cv"], cv_ref, 1e-4, 1e-3))
    checks.append(_close("token_types.pq_error_mean", got["pq_error_mean"], pq_ref, 1e-4, 1e-3))
    checks.append(_close("token_types.pq_error_max", got["pq_error_max"], pqmax_ref, 1e-4, 1e-3))
    if contamination_exact:
        cont_ref = brute_force_contamination(keys, values, np.array(mus, dtype=np.float32), pick, freq[pick])
        # Ties at the m-th distance may swap one neighbour: allow one entry of slack per type.
        slack = 1.0 / np.minimum(freq[pick], 1024)
        diff = np.abs(got["contamination"].to_numpy() - np.array(cont_ref))
        checks.append(("token_types.contamination (brute force)", bool(np.all(diff <= slack + 1e-12)),
                       f"max |diff| {diff.max():.3g} over {len(pick)}"))
    # ---- datastore_tokens
    dt = con.execute("SELECT token_id FROM datastore_tokens ORDER BY pos").fetchnumpy()["token_id"]
    checks.append(_equal("datastore_tokens = datastore stream", dt, ds_ids))
    con.close()
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precompute.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--sample", type=int, default=2000, help="evaluation positions re-searched")
    parser.add_argument("--type-sample", type=int, default=300, help="token types recomputed")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.duckdb").exists():
        print(f"error: no metrics.duckdb in {args.run_dir} (build the run first)", file=sys.stderr)
        return 2
    missing = [f for f in ("keys.npy", "values.npy", "queries.npy", "index.faiss") if not (args.run_dir / f).exists()]
    if missing:
        print(f"error: {args.run_dir} lacks {missing}: rebuild them with `python -m precompute --config ... "
              f"--run-dir {args.run_dir}`", file=sys.stderr)
        return 2
    checks = verify_run(args.run_dir, args.sample, args.type_sample)
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    failed = sum(not ok for _, ok, _ in checks)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
