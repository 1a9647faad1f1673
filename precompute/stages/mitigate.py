"""Stage: the mitigations of SPEC §9, evaluated beside the plain run and fitted on validation text.

Every choice is made on the validation corpus (config `valid_corpus`, its queries from the
`valid_lm` stage) and applied unchanged to the evaluation tokens. Nothing is searched here: the
neighbours of both splits on the plain index and on each whitened index are the search stage's
neighbour blocks (`knnlm_core.neighbours`), read by row range.
- `tau`: the plain index with τ from `TAU_GRID` minimising validation kNN-LM PPL (at the run's λ);
- `idf`: IDF-weighted p_kNN over the plain index's neighbours at the run's τ;
- `adaptive-nn` / `adaptive-entropy`: λ per equal-population bin of the nearest neighbour's
  distance / the LM's entropy (`knnlm_core.adaptive.fit`), with the run's own p_kNN;
- `zipfian` / `entries` (config `whiten`): the whitened indexes of the whiten stage, τ chosen on
  validation.
Map (`score_shard`) over the shards of each block, on the run's executor: the validation shards at
every τ of the grid, then (τ chosen on the driver) the evaluation shards at the chosen τ. Scores are
saved per shard (`mitigate.shards/`): a resumed run redoes at most one shard per worker.
Outputs: `mitigations.npz` (per evaluation position) and `mitigations.json` (variants, fitted rules).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
from tqdm import tqdm

from knnlm_core import adaptive, neighbours, whatif
from knnlm_core.knn import interpolate, p_knn_of, p_knn_weighted
from precompute.executor import Progress, ShardJob, executor_of
from precompute.runner import Run, concat_shards, load_npy, load_npz, save_json, save_npz, stage_shards
from precompute.stages import TAU_GRID, tau_grid  # noqa: F401 - TAU_GRID: re-exported (the key's grid)

ROWS = 4096  # block rows scored at a time
SCORES = "mitigate.shards"  # per (split, index): one npz of scores per block shard
CHOSEN = f"{SCORES}/chosen_tau.json"  # τ chosen on validation per index: what the evaluation shards are scored at
VARIANT_LABELS = {
    "plain": "plain kNN-LM (the run)", "tau": "τ from validation", "idf": "IDF weighting",
    "adaptive-nn": "adaptive λ by nearest-neighbour distance", "adaptive-entropy": "adaptive λ by LM entropy",
    "zipfian": "Zipfian whitening", "entries": "entry whitening",
    "infgram": "∞-gram interpolation (no kNN)",
}
LAMBDA_GRID = np.round(np.arange(101) / 100, 2)  # λ_∞ candidates (SPEC §12), as the adaptive λ's grid


def score_rows(block: neighbours.Block, column: str, lo: int, hi: int, targets: np.ndarray, taus: np.ndarray,
               idf: np.ndarray | None) -> dict[str, np.ndarray]:
    """For block rows [lo, hi): p_kNN (n, G) float64 at each τ of `taus`, the nearest neighbour's distance
    nn_dist (n,) and, with `idf`, the IDF-weighted p_kNN p_knn_idf (n,) at taus[0]."""
    out = {"p_knn": np.empty((hi - lo, len(taus))), "nn_dist": np.empty(hi - lo)}
    if idf is not None:
        out["p_knn_idf"] = np.empty(hi - lo)
    for a in range(lo, hi, ROWS):
        b = min(a + ROWS, hi)
        d, vals, tg = block.rows(column, a, b), block.rows("values", a, b), targets[a:b]
        for g, tau in enumerate(taus):
            out["p_knn"][a - lo : b - lo, g] = p_knn_of(d, vals, tg, float(tau))
        out["nn_dist"][a - lo : b - lo] = adaptive.nn_distance(d)
        if idf is not None:
            out["p_knn_idf"][a - lo : b - lo] = p_knn_weighted(d, vals, tg, float(taus[0]), idf)
    return out


def idf_weights(run: Run) -> np.ndarray:
    values = run.values()
    n_types = int(max(values.max(), run.info["vocab_size"] - 1)) + 1
    return whatif.idf(np.bincount(values, minlength=n_types), len(values))


def taus_of(run: Run, split: str, index_name: str) -> np.ndarray:
    """The τ values a block is scored at: on validation the grid (after the run's τ, for the plain
    index); on evaluation the run's τ and the validation choice (plain), or the choice alone."""
    grid = tau_grid(run.cfg.temperature)
    if split == "valid":
        return np.concatenate([[run.cfg.temperature], grid]) if index_name == "plain" else grid
    chosen = json.loads(run.path(CHOSEN).read_text())[index_name]
    return np.array([run.cfg.temperature, chosen] if index_name == "plain" else [chosen])


def score_shard(run: Run, job: ShardJob, i: int, progress: Progress, _data=None) -> int:
    """Score shard i of one block (split, index) at its τ values; saved to the block's score folder."""
    split, _, index_name = job.folder.rpartition("/")[2].partition("-")
    block = run.cached(("block", split, index_name),
                       lambda: neighbours.open_block(neighbours.block_dir(run.run_dir, split, index_name)))
    targets = run.cached(("targets", split), lambda: run.split(split)[1])
    lo, hi = block.shards[i]
    shards = stage_shards(run, "mitigate", job.key, job.folder)
    if not shards.done(i):
        idf = run.cached(("idf",), lambda: idf_weights(run)) if index_name == "plain" else None
        column = "dist_exact" if run.cfg.distance_source == "exact" else "dist_pq"
        shards.save(i, **score_rows(block, column, lo, hi, targets, taus_of(run, split, index_name), idf))
    if progress:
        progress(hi - lo)
    return hi - lo


def score_blocks(run: Run, key: str, split: str, indexes: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Every shard of the blocks (split, index) scored on the run's executor; concatenated per index."""
    out = {}
    total = len(run.split(split)[1]) * len(indexes)
    with tqdm(total=total, desc=f"mitigate: {split}", unit="query", dynamic_ncols=True, leave=False) as bar:
        for name in indexes:
            folder = f"{SCORES}/{split}-{name}"
            ranges = neighbours.open_block(neighbours.block_dir(run.run_dir, split, name)).shards
            shards = stage_shards(run, "mitigate", key, folder)
            todo = list(shards.todo(len(ranges)))
            bar.update(sum(hi - lo for j, (lo, hi) in enumerate(ranges) if j not in todo))
            executor_of(run).map(run, ShardJob("mitigate", key, score_shard, folder=folder), todo, bar.update)
            out[name] = concat_shards(shards, len(ranges))
    return out


def inputs(run: Run) -> dict[str, np.ndarray]:
    inf = load_npz(run.path("infgram.npz"))  # the suffix stage's p_∞ of both splits
    return {
        "eval_y": run.split("eval")[1], "eval_p_lm": load_npz(run.path("eval_lm.npz"))["p_lm"],
        "eval_entropy": np.asarray(load_npy(run.path("eval_entropy.npy")), np.float64),
        "eval_p_knn": load_npz(run.path("search.npz"))["p_knn"], "valid_y": run.split("valid")[1],
        "valid_p_lm": load_npz(run.path("valid_lm.npz"))["p_lm"],
        "valid_entropy": np.asarray(load_npy(run.path("valid_entropy.npy")), np.float64),
        "eval_p_inf": inf["p_inf"], "valid_p_inf": inf["valid_p_inf"],
    }


def valid_ppls(run: Run, p_lm: np.ndarray, p_knn: np.ndarray) -> np.ndarray:
    """Validation kNN-LM PPL at the run's λ of each column (τ) of p_knn (T, G)."""
    return np.array([whatif.overall_ppl(interpolate(p_lm, p_knn[:, g], run.cfg.lam)) for g in range(p_knn.shape[1])])


def fit_lambda_inf(p_lm: np.ndarray, p_inf: np.ndarray) -> tuple[float, float]:
    """(λ_∞, validation PPL) minimising the PPL of λ p_∞ + (1 − λ) p_LM over LAMBDA_GRID (first minimiser)."""
    ppl = np.array([whatif.overall_ppl(interpolate(p_lm, p_inf, lam)) for lam in LAMBDA_GRID])
    best = int(np.argmin(ppl))
    return float(LAMBDA_GRID[best]), float(ppl[best])


def stage_mitigate(run: Run, key: str) -> dict:
    cfg = run.cfg
    taus = tau_grid(cfg.temperature)
    data = inputs(run)
    indexes = ["plain", *cfg.whiten_kinds]
    stage_shards(run, "mitigate", key, SCORES, suffix=".json")  # one tag for the folder of every score shard
    valid = score_blocks(run, key, "valid", indexes)
    valid_ppl = {name: valid_ppls(run, data["valid_p_lm"], v["p_knn"]) for name, v in valid.items()}
    valid_ppl["plain"] = valid_ppl["plain"][1:]  # the plain grid starts with the run's τ (for λ fits and IDF)
    chosen = {name: float(taus[int(np.argmin(ppl))]) for name, ppl in valid_ppl.items()}  # ties: the smaller τ
    save_json(run.path(CHOSEN), chosen)
    ev = score_blocks(run, key, "eval", indexes)
    plain = {"tau": chosen["plain"], "valid_p_knn": valid["plain"]["p_knn"][:, 0],
             "valid_nn_dist": valid["plain"]["nn_dist"], "valid_ppl_by_tau": valid_ppl["plain"],
             "valid_p_knn_idf": valid["plain"]["p_knn_idf"]}
    whitened = {kind: {"tau": chosen[kind], "valid_ppl_by_tau": valid_ppl[kind], "eps": run.info["whiten"][kind]["eps"],
                       "fit_seconds": run.info["whiten"][kind]["fit_seconds"],
                       "build_seconds": run.info["whiten"][kind]["build_seconds"]} for kind in cfg.whiten_kinds}
    rules = {
        "adaptive-nn": adaptive.fit(plain["valid_nn_dist"], data["valid_p_lm"], plain["valid_p_knn"],
                                    "nn_distance", cfg.adaptive_bins),
        "adaptive-entropy": adaptive.fit(data["valid_entropy"], data["valid_p_lm"], plain["valid_p_knn"],
                                         "lm_entropy", cfg.adaptive_bins),
    }
    per_pos = {"p_knn_tau": ev["plain"]["p_knn"][:, 1], "p_knn_idf": ev["plain"]["p_knn_idf"],
               **{f"p_knn_{kind}": ev[kind]["p_knn"][:, 0] for kind in cfg.whiten_kinds},
               "lam_nn": rules["adaptive-nn"].apply(ev["plain"]["nn_dist"]),
               "lam_entropy": rules["adaptive-entropy"].apply(data["eval_entropy"]),
               "nn_dist": ev["plain"]["nn_dist"], "lm_entropy": data["eval_entropy"],
               "p_knn_plain_rescored": ev["plain"]["p_knn"][:, 0],  # verify: the block reproduces p_knn
               "p_inf": data["eval_p_inf"]}
    infgram = dict(zip(("lam", "valid_ppl"), fit_lambda_inf(data["valid_p_lm"], data["valid_p_inf"]), strict=True))
    variants = describe(run, data, plain, whitened, rules, per_pos, infgram)
    save_npz(run.path("mitigations.npz"), **per_pos)
    save_json(run.path("mitigations.json"), {
        "valid_corpus": cfg.valid_corpus, "n_valid": len(data["valid_y"]), "tau_grid": taus.tolist(),
        "variants": variants,
        "rules": {name: {"feature": r.feature, "edges": r.edges.tolist(), "lam": r.lam.tolist(),
                         "n_valid": r.n_fit.tolist()} for name, r in rules.items()},
    })
    shutil.rmtree(run.path(SCORES), ignore_errors=True)
    return {"mitigation_variants": [v["variant"] for v in variants]}


def describe(run: Run, data: dict, plain: dict, whitened: dict, rules: dict, per_pos: dict,
             infgram: dict) -> list[dict]:
    """One row per variant: τ, λ, where its p_kNN / λ live, and its validation and evaluation PPL."""
    cfg = run.cfg
    lam, p_lm, vp_lm = cfg.lam, data["eval_p_lm"], data["valid_p_lm"]
    n_valid = len(data["valid_y"])
    where = f"validation: {cfg.valid_corpus} ({n_valid:,} tokens)"
    grid_note = f"τ grid 2^-2 … 2^14 (4 per octave) and the run's τ, chosen on {where}"
    valid_plain = whatif.overall_ppl(interpolate(vp_lm, plain["valid_p_knn"], lam))

    def row(variant, family, tau, p_col, lam_col, valid_ppl, notes, eps=None, lam_fixed=lam):
        p_knn = data["eval_p_knn"] if p_col is None else per_pos[p_col]
        lam_v = lam_fixed if lam_col is None else per_pos[lam_col]
        return {"variant": variant, "label": VARIANT_LABELS[variant], "family": family,
                "tau": None if tau is None else float(tau), "lam": None if lam_col else lam_fixed, "p_knn_column": p_col, "lam_column": lam_col, "eps": eps,
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
    rows.append(row("infgram", "∞-gram baseline", None, "p_inf", None, infgram["valid_ppl"],
                    f"λ_∞ p_∞ + (1 − λ_∞) p_LM, p_∞ from the datastore text's suffix array (SPEC §12, suffix ≤ "
                    f"{cfg.ctx_max_len} tokens); λ_∞ chosen on {where}, grid 0…1 step 0.01; no neighbour search",
                    lam_fixed=infgram["lam"]))
    return rows
