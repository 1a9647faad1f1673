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
Steps are saved as they finish (`mitigate.parts/`): a resumed run redoes at most the step it was in.
Outputs: `mitigations.npz` (per evaluation position) and `mitigations.json` (variants, fitted rules).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from knnlm_core import adaptive, neighbours, whatif
from knnlm_core.knn import interpolate, p_knn_of, p_knn_weighted
from precompute.runner import Run, load_npy, load_npz, save_json, save_npz, stage_shards

TAU_GRID = 2.0 ** (np.arange(-8, 57) / 4)  # 0.25 … 16,384, 4 per octave: raw GPT-2 to whitened distance scales
ROWS = 4096  # block rows scored at a time
VARIANT_LABELS = {
    "plain": "plain kNN-LM (the run)", "tau": "τ from validation", "idf": "IDF weighting",
    "adaptive-nn": "adaptive λ by nearest-neighbour distance", "adaptive-entropy": "adaptive λ by LM entropy",
    "zipfian": "Zipfian whitening", "entries": "entry whitening",
}


def tau_grid(run_tau: float) -> np.ndarray:
    """TAU_GRID with the run's own τ added: a τ chosen on validation is never worse there than the run's."""
    return np.unique(np.append(TAU_GRID, run_tau))


def score(run: Run, split: str, index_name: str, targets: np.ndarray, taus: np.ndarray,
          idf: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """p_kNN (T, G) float64 for each τ of `taus` from the block (split, index_name), the nearest
    neighbour's distance nn_dist (T,) (the run's distance source), and with `idf` p_knn_idf (T,) at taus[0]."""
    cfg = run.cfg
    block = neighbours.open_block(neighbours.block_dir(run.run_dir, split, index_name))
    column = "dist_exact" if cfg.distance_source == "exact" else "dist_pq"
    t = len(targets)
    out = {"p_knn": np.empty((t, len(taus))), "nn_dist": np.empty(t)}
    if idf is not None:
        out["p_knn_idf"] = np.empty(t)
    with tqdm(total=t, desc=f"mitigate: {split}, {index_name}", unit="query", dynamic_ncols=True, leave=False) as bar:
        for a, b in block.row_ranges(ROWS):
            d, vals, tg = block.rows(column, a, b), block.rows("values", a, b), targets[a:b]
            for g, tau in enumerate(taus):
                out["p_knn"][a:b, g] = p_knn_of(d, vals, tg, float(tau))
            out["nn_dist"][a:b] = adaptive.nn_distance(d)
            if idf is not None:
                out["p_knn_idf"][a:b] = p_knn_weighted(d, vals, tg, float(taus[0]), idf)
            bar.update(b - a)
    return out


def inputs(run: Run) -> dict[str, np.ndarray]:
    ev, va = np.asarray(load_npy(run.path("eval_ids.npy"))), np.asarray(load_npy(run.path("valid_ids.npy")))
    return {
        "eval_y": ev[1:].astype(np.int64), "eval_p_lm": load_npz(run.path("eval_lm.npz"))["p_lm"],
        "eval_entropy": np.asarray(load_npy(run.path("eval_entropy.npy")), np.float64),
        "eval_p_knn": load_npz(run.path("search.npz"))["p_knn"], "valid_y": va[1:].astype(np.int64),
        "valid_p_lm": load_npz(run.path("valid_lm.npz"))["p_lm"],
        "valid_entropy": np.asarray(load_npy(run.path("valid_entropy.npy")), np.float64),
    }


def valid_ppls(run: Run, p_lm: np.ndarray, p_knn: np.ndarray) -> np.ndarray:
    """Validation kNN-LM PPL at the run's λ of each column (τ) of p_knn (T, G)."""
    return np.array([whatif.overall_ppl(interpolate(p_lm, p_knn[:, g], run.cfg.lam)) for g in range(p_knn.shape[1])])


def plain_step(run: Run, data: dict, taus: np.ndarray) -> dict[str, np.ndarray]:
    """The plain index on validation (τ grid, λ features) and on evaluation (IDF, chosen τ)."""
    cfg = run.cfg
    values = run.values()
    freq = np.bincount(values, minlength=int(max(values.max(), data["eval_y"].max(), data["valid_y"].max())) + 1)
    idf = whatif.idf(freq, len(values))
    grid = np.concatenate([[cfg.temperature], taus])
    va = score(run, "valid", "plain", data["valid_y"], grid, idf)
    valid_ppl = valid_ppls(run, data["valid_p_lm"], va["p_knn"])
    tau = float(taus[int(np.argmin(valid_ppl[1:]))])  # first minimiser: ties keep the smaller τ
    ev = score(run, "eval", "plain", data["eval_y"], np.array([cfg.temperature, tau]), idf)
    return {"tau": np.array(tau), "valid_p_knn": va["p_knn"][:, 0], "valid_nn_dist": va["nn_dist"],
            "valid_ppl_by_tau": valid_ppl[1:], "valid_p_knn_idf": va["p_knn_idf"],
            "eval_p_knn_tau": ev["p_knn"][:, 1], "eval_p_knn_idf": ev["p_knn_idf"], "eval_nn_dist": ev["nn_dist"],
            "eval_p_knn_rescored": ev["p_knn"][:, 0]}


def whiten_step(run: Run, kind: str, data: dict, taus: np.ndarray) -> dict[str, np.ndarray]:
    """A whitened index's τ chosen on validation, and the evaluation p_kNN at that τ."""
    record = run.info["whiten"][kind]
    va = score(run, "valid", kind, data["valid_y"], taus)
    valid_ppl = valid_ppls(run, data["valid_p_lm"], va["p_knn"])
    best = int(np.argmin(valid_ppl))
    ev = score(run, "eval", kind, data["eval_y"], taus[best : best + 1])
    return {"tau": np.array(float(taus[best])), "valid_ppl_by_tau": valid_ppl, "eval_p_knn": ev["p_knn"][:, 0],
            "eps": np.array(record["eps"]), "fit_seconds": np.array(record["fit_seconds"]),
            "build_seconds": np.array(record["build_seconds"])}


def stage_mitigate(run: Run, key: str) -> dict:
    cfg = run.cfg
    taus = tau_grid(cfg.temperature)
    data = inputs(run)
    parts = stage_shards(run, "mitigate", key, "mitigate.parts")
    steps = ["plain", *cfg.whiten_kinds]
    for i, step in enumerate(steps):
        if not parts.done(i):
            parts.save(i, **(plain_step(run, data, taus) if step == "plain" else whiten_step(run, step, data, taus)))
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
               "p_knn_plain_rescored": plain["eval_p_knn_rescored"]}  # verify: the block reproduces p_knn
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
