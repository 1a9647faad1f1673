"""Stage: the mitigations of SPEC §9, evaluated beside the plain run and fitted on validation text.

Every choice is made on the validation corpus (config `valid_corpus`, its queries from the
`valid_lm` stage) and applied unchanged to the evaluation tokens:
- `tau`: the plain index with τ from `TAU_GRID` minimising validation kNN-LM PPL (at the run's λ);
- `idf`: IDF-weighted p_kNN over the plain index's neighbours at the run's τ;
- `adaptive-nn` / `adaptive-entropy`: λ per equal-population bin of the nearest neighbour's
  distance / the LM's entropy (`knnlm_core.adaptive.fit`), with the run's own p_kNN;
- `zipfian` / `entries` (config `whiten`): a whitening fitted on the datastore keys
  (`knnlm_core.whiten`, streamed, float64), a new index of the run's factory trained and
  filled on the whitened keys (the same keys: no second forward pass), queries whitened with
  the same transform, and τ chosen on validation.
Steps are saved as they finish (`mitigate.parts/`): a resumed run redoes at most the step it
was in (and a whitened index's encoding resumes per key shard). Outputs: `mitigations.npz`
(per evaluation position), `mitigations.json` (variants and fitted rules), and per whitening
`index_<kind>.faiss` + `whiten_<kind>.npz`; with a small enough run, every neighbour of every
position in `neighbors_all.parquet` (knnlm_core.whatif) for an exact τ / k What-if.
"""

from __future__ import annotations

import json
import time

import numpy as np
from tqdm import tqdm

from knnlm_core import adaptive, whatif, whiten
from knnlm_core.index import search, set_nprobe
from knnlm_core.knn import PAD, interpolate, p_knn_of, p_knn_weighted
from precompute.runner import (
    Run,
    digest,
    load_npy,
    load_npz,
    read_index,
    save_json,
    save_npz,
    stage_shards,
    write_index,
)
from precompute.stages.index import build_index
from precompute.stages.search import neighbour_sq_dists, open_index

TAU_GRID = 2.0 ** (np.arange(-8, 57) / 4)  # 0.25 … 16,384, 4 per octave: raw GPT-2 to whitened distance scales
ALL_NEIGHBOURS_MAX = 64_000_000  # positions × k up to which every neighbour is kept (~0.5 GB in memory)
VARIANT_LABELS = {
    "plain": "plain kNN-LM (the run)", "tau": "τ from validation", "idf": "IDF weighting",
    "adaptive-nn": "adaptive λ by nearest-neighbour distance", "adaptive-entropy": "adaptive λ by LM entropy",
    "zipfian": "Zipfian whitening", "entries": "entry whitening",
}


def tau_grid(run_tau: float) -> np.ndarray:
    """TAU_GRID with the run's own τ added: a τ chosen on validation is never worse there than the run's."""
    return np.unique(np.append(TAU_GRID, run_tau))


class WhitenedKeys:
    """Whitened view of the datastore keys: rows are transformed (float32) as they are read."""

    def __init__(self, keys, transform: whiten.Whitening):
        self.keys, self.transform = keys, transform
        self.shape = keys.shape
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return self.transform.apply(np.asarray(self.keys[rows]).reshape(-1, self.shape[1]))


def score(run: Run, index, queries, targets: np.ndarray, taus: np.ndarray, keys, transform=None,
          idf: np.ndarray | None = None, keep_all: bool = False, desc: str = "") -> dict[str, np.ndarray]:
    """Search `queries` (T, d) (whitened first when `transform`) and score each τ of `taus`.

    Returns p_knn (T, G) float64 per τ, nn_dist (T,) the nearest neighbour's distance (the
    run's distance source), and with `idf` p_knn_idf (T,) at taus[0]; with `keep_all` the
    neighbours' values (T, k) int32 and PQ / exact distances (T, k) float32 as well.
    """
    cfg = run.cfg
    t = len(targets)
    out = {"p_knn": np.empty((t, len(taus))), "nn_dist": np.empty(t)}
    if idf is not None:
        out["p_knn_idf"] = np.empty(t)
    if keep_all:
        out["values"] = np.empty((t, cfg.k), np.int32)
        out["dist_pq"] = np.empty((t, cfg.k), np.float32)
        out["dist_exact"] = np.empty((t, cfg.k), np.float32) if cfg.distance_source == "exact" else None
    values = run.values()
    with tqdm(total=t, desc=desc, unit="query", dynamic_ncols=True, leave=False) as bar:
        for a in range(0, t, cfg.search_batch):
            b = min(a + cfg.search_batch, t)
            q = np.asarray(queries[a:b], dtype=np.float32)
            if transform is not None:
                q = transform.apply(q)
            d_pq, ids = search(index, q, cfg.k)
            d = neighbour_sq_dists(q, keys, ids) if cfg.distance_source == "exact" else d_pq
            vals = np.where(ids >= 0, values[np.maximum(ids, 0)], PAD)
            tg = targets[a:b]
            for g, tau in enumerate(taus):
                out["p_knn"][a:b, g] = p_knn_of(d, vals, tg, float(tau))
            out["nn_dist"][a:b] = adaptive.nn_distance(d)
            if idf is not None:
                out["p_knn_idf"][a:b] = p_knn_weighted(d, vals, tg, float(taus[0]), idf)
            if keep_all:
                out["values"][a:b], out["dist_pq"][a:b] = vals, d_pq
                if out["dist_exact"] is not None:
                    out["dist_exact"][a:b] = d
            bar.update(b - a)
    return out


def inputs(run: Run) -> dict[str, np.ndarray]:
    ev, va = np.asarray(load_npy(run.path("eval_ids.npy"))), np.asarray(load_npy(run.path("valid_ids.npy")))
    return {
        "eval_q": load_npy(run.path("queries.npy")), "eval_y": ev[1:].astype(np.int64),
        "eval_p_lm": load_npz(run.path("eval_lm.npz"))["p_lm"],
        "eval_entropy": np.asarray(load_npy(run.path("eval_entropy.npy")), np.float64),
        "eval_p_knn": load_npz(run.path("search.npz"))["p_knn"],
        "valid_q": load_npy(run.path("valid_queries.npy")), "valid_y": va[1:].astype(np.int64),
        "valid_p_lm": load_npz(run.path("valid_lm.npz"))["p_lm"],
        "valid_entropy": np.asarray(load_npy(run.path("valid_entropy.npy")), np.float64),
    }


def plain_step(run: Run, data: dict, taus: np.ndarray) -> dict[str, np.ndarray]:
    """The plain index on validation (τ grid, λ features) and on evaluation (IDF, chosen τ, side file)."""
    cfg = run.cfg
    index = open_index(run)
    set_nprobe(index, cfg.nprobe)
    keys, values = run.keys(), run.values()
    freq = np.bincount(values, minlength=int(max(values.max(), data["eval_y"].max(), data["valid_y"].max())) + 1)
    idf = whatif.idf(freq, len(values))
    grid = np.concatenate([[cfg.temperature], taus])
    va = score(run, index, data["valid_q"], data["valid_y"], grid, keys, idf=idf, desc="mitigate: validation, plain")
    valid_ppl = np.array([whatif.overall_ppl(interpolate(data["valid_p_lm"], va["p_knn"][:, g], cfg.lam)) for g in range(len(grid))])
    tau = float(taus[int(np.argmin(valid_ppl[1:]))])  # first minimiser: ties keep the smaller τ
    keep_all = len(data["eval_y"]) * cfg.k <= ALL_NEIGHBOURS_MAX
    ev = score(run, index, data["eval_q"], data["eval_y"], np.array([cfg.temperature, tau]), keys, idf=idf,
               keep_all=keep_all, desc="mitigate: evaluation, plain")
    if keep_all:
        whatif.save_all_neighbours(run.path(whatif.ALL_NEIGHBOURS), ev["values"], ev["dist_pq"], ev["dist_exact"])
    return {"tau": np.array(tau), "valid_p_knn": va["p_knn"][:, 0], "valid_nn_dist": va["nn_dist"],
            "valid_ppl_by_tau": valid_ppl[1:], "valid_p_knn_idf": va["p_knn_idf"], "eval_p_knn_tau": ev["p_knn"][:, 1], "eval_p_knn_idf": ev["p_knn_idf"],
            "eval_nn_dist": ev["nn_dist"], "eval_p_knn_rescored": ev["p_knn"][:, 0]}


def whitened_index_key(run: Run, kind: str) -> str:
    """What a whitened index depends on: the datastore's keys (its stage key), the whitening and the index
    settings; τ and λ choices are not part of it, so changing them reuses the index."""
    cfg = run.cfg
    return digest({"datastore": run.stages["datastore"]["key"], "kind": kind, "eps": cfg.whiten_eps,
                   "factory": cfg.index_factory, "train_size": cfg.train_size, "seed": cfg.seed,
                   "shard": cfg.shard_size})


def whiten_step(run: Run, key: str, kind: str, data: dict, taus: np.ndarray) -> dict[str, np.ndarray]:
    """Fit a whitening, build its index on the whitened keys, choose τ on validation, score evaluation."""
    cfg = run.cfg
    keys, values = run.keys(), run.values()
    built = whitened_index_key(run, kind)
    files = [run.path(f) for f in (f"whiten_{kind}.npz", f"index_{kind}.faiss", f"index_{kind}.json")]
    if all(f.exists() for f in files) and json.loads(files[2].read_text()).get("key") == built:
        # the same keys, kind, ε and index settings: reuse the fit and the index (only τ / λ choices changed)
        transform, index = whiten.Whitening.load(files[0]), read_index(files[1])
        meta = json.loads(files[2].read_text())
        fit_s, build_s = meta["fit_seconds"], meta["build_seconds"]
        view = WhitenedKeys(keys, transform)
    else:
        t0 = time.time()
        transform = whiten.fit(kind, keys, values, cfg.whiten_eps)
        fit_s = time.time() - t0
        transform.save(files[0])
        view = WhitenedKeys(keys, transform)
        shards = stage_shards(run, "mitigate", f"{built}-{kind}", f"index_{kind}.shards")
        t0 = time.time()
        index, _, _ = build_index(view, cfg.index_factory, cfg.train_size, cfg.seed, cfg.shard_size, shards)
        build_s = time.time() - t0
        write_index(index, files[1])
        shards.remove()
        save_json(files[2], {"key": built, "fit_seconds": round(fit_s, 2), "build_seconds": round(build_s, 2)})
    set_nprobe(index, cfg.nprobe)
    va = score(run, index, data["valid_q"], data["valid_y"], taus, view, transform,
               desc=f"mitigate: validation, {kind}")
    valid_ppl = np.array([whatif.overall_ppl(interpolate(data["valid_p_lm"], va["p_knn"][:, g], cfg.lam)) for g in range(len(taus))])
    best = int(np.argmin(valid_ppl))
    ev = score(run, index, data["eval_q"], data["eval_y"], taus[best : best + 1], view, transform,
               desc=f"mitigate: evaluation, {kind}")
    return {"tau": np.array(float(taus[best])), "valid_ppl_by_tau": valid_ppl, "eval_p_knn": ev["p_knn"][:, 0],
            "eps": np.array(transform.eps), "fit_seconds": np.array(fit_s), "build_seconds": np.array(build_s)}


def stage_mitigate(run: Run, key: str) -> dict:
    cfg = run.cfg
    taus = tau_grid(cfg.temperature)
    data = inputs(run)
    parts = stage_shards(run, "mitigate", key, "mitigate.parts")
    steps = ["plain", *cfg.whiten_kinds]
    for i, step in enumerate(steps):
        if not parts.done(i):
            parts.save(i, **(plain_step(run, data, taus) if step == "plain" else
                             whiten_step(run, key, step, data, taus)))
            run.memo.clear()
    plain = parts.load(0)
    whitened = {step: parts.load(i) for i, step in enumerate(steps) if step != "plain"}
    rules = {
        "adaptive-nn": adaptive.fit(plain["valid_nn_dist"], data["valid_p_lm"], plain["valid_p_knn"],
                                    "nn_distance", cfg.adaptive_bins),
        "adaptive-entropy": adaptive.fit(data["valid_entropy"], data["valid_p_lm"], plain["valid_p_knn"],
                                         "lm_entropy", cfg.adaptive_bins),
    }
    per_pos = {"p_knn_tau": plain["eval_p_knn_tau"], "p_knn_idf": plain["eval_p_knn_idf"],
               **{f"p_knn_{kind}": w["eval_p_knn"] for kind, w in whitened.items()},
               "lam_nn": rules["adaptive-nn"].apply(plain["eval_nn_dist"]),
               "lam_entropy": rules["adaptive-entropy"].apply(data["eval_entropy"]),
               "nn_dist": plain["eval_nn_dist"], "lm_entropy": data["eval_entropy"],
               "p_knn_plain_rescored": plain["eval_p_knn_rescored"]}  # verify: the re-search reproduces p_knn
    variants = describe(run, data, plain, whitened, rules, per_pos)
    save_npz(run.path("mitigations.npz"), **per_pos)
    save_json(run.path("mitigations.json"), {
        "valid_corpus": cfg.valid_corpus, "n_valid": len(data["valid_y"]), "tau_grid": taus.tolist(),
        "variants": variants,
        "rules": {name: {"feature": r.feature, "edges": r.edges.tolist(), "lam": r.lam.tolist(),
                         "n_valid": r.n_fit.tolist()} for name, r in rules.items()},
    })
    parts.remove()
    return {"mitigation_variants": [v["variant"] for v in variants]}


def describe(run: Run, data: dict, plain: dict, whitened: dict, rules: dict, per_pos: dict) -> list[dict]:
    """One row per variant: τ, λ, where its p_kNN / λ live, and its validation and evaluation PPL."""
    cfg = run.cfg
    lam, p_lm, vp_lm = cfg.lam, data["eval_p_lm"], data["valid_p_lm"]
    n_valid = len(data["valid_y"])
    where = f"validation: {cfg.valid_corpus} ({n_valid:,} tokens)"
    grid_note = f"τ grid 2^-2 … 2^14 (4 per octave) and the run's τ, chosen on {where}"
    valid_plain = whatif.overall_ppl(interpolate(vp_lm, plain["valid_p_knn"], lam))

    def row(variant, family, tau, p_col, lam_col, valid_ppl, notes, eps=None):
        p_knn = data["eval_p_knn"] if p_col is None else per_pos[p_col]
        lam_v = lam if lam_col is None else per_pos[lam_col]
        return {"variant": variant, "label": VARIANT_LABELS[variant], "family": family, "tau": float(tau),
                "lam": None if lam_col else lam, "p_knn_column": p_col, "lam_column": lam_col, "eps": eps,
                "valid_ppl_lm": whatif.overall_ppl(vp_lm), "valid_ppl": valid_ppl, "ppl": whatif.overall_ppl(interpolate(p_lm, p_knn, lam_v)),
                "notes": notes}

    tau = float(plain["tau"])
    rows = [
        row("plain", "baseline", cfg.temperature, None, None, valid_plain, "the run's own settings"),
        row("tau", "temperature", tau, "p_knn_tau", None, float(plain["valid_ppl_by_tau"].min()), grid_note),
        row("idf", "weighting", cfg.temperature, "p_knn_idf", None,
            whatif.overall_ppl(interpolate(vp_lm, plain["valid_p_knn_idf"], lam)), "neighbour weight exp(-d/τ)·ln(1 + N/freq(v)), renormalised; run's τ"),
    ]
    for name, col, feature in (("adaptive-nn", "lam_nn", plain["valid_nn_dist"]),
                               ("adaptive-entropy", "lam_entropy", data["valid_entropy"])):
        r = rules[name]
        rows.append(row(name, "adaptive λ", cfg.temperature, None, col,
                        whatif.overall_ppl(interpolate(vp_lm, plain["valid_p_knn"], r.apply(feature))),
                        f"{r.n_bins} equal-population bins of {r.feature} fitted on {where}; λ grid 0…1 step 0.01"))
    for kind, w in whitened.items():
        rows.append(row(kind, "whitening", float(w["tau"]), f"p_knn_{kind}", None, float(w["valid_ppl_by_tau"].min()),
                        f"{grid_note}; index {cfg.index_factory} trained and filled on the whitened keys",
                        eps=float(w["eps"])))
        # timings go to mitigations.json and the manifest only: the tables stay deterministic
        rows[-1].update(fit_seconds=round(float(w["fit_seconds"]), 2), build_seconds=round(float(w["build_seconds"]), 2))
    return rows
