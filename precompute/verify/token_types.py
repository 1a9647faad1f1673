"""token_types (stage `types`; SPEC §5): rows, frequencies, bins and evaluation counts of every type; the
key-space metrics (cv, PQ error, contamination) recomputed for the types with the smallest freq (where an
off-by-one in m_v = min(freq, 1024) matters most) plus a random sample. Contamination by brute force when
the run says `contamination_mode = 'exact'`, by the index when it says 'index'."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .brute_force import nearest_entries
from .common import Check, RunData, close, digit_bin, equal

STAGE = "types"
M_MAX = 1024  # m_v = min(freq(v), 1024) neighbours of the centroid for contamination (SPEC §5)
CONTAMINATION_MODES = ("exact", "index")
PER_FREQ = 10  # deterministic type check: up to this many types of each of the smallest freq values


def contamination_bounds(d2: np.ndarray, nbr_values: np.ndarray, v: int, m: int, atol: float) -> tuple[float, float]:
    """(lowest, highest) share of non-v values among the m nearest entries (d2 ascending, (K,)).

    Entries whose distance equals the m-th one within atol (float32 rounding in the run's own
    search) may be ordered either way; the bounds span every such order and nothing more.
    """
    dm = d2[m - 1]
    inside = d2 < dm - atol  # surely among the m nearest
    tied = np.abs(d2 - dm) <= atol
    foreign_inside = int(np.sum(nbr_values[inside] != v))
    free = m - int(inside.sum())  # slots the tied entries fill
    tied_foreign = int(np.sum(nbr_values[tied] != v))
    tied_own = int(tied.sum()) - tied_foreign
    lo = foreign_inside + max(0, free - tied_own)
    hi = foreign_inside + min(free, tied_foreign)
    return lo / m, hi / m


def contamination_check(name: str, got: np.ndarray, ids: np.ndarray, d2: np.ndarray, values: np.ndarray,
                        types: np.ndarray, freqs: np.ndarray, mus: np.ndarray, rtol: float = 2e-5) -> Check:
    """Stored contamination of each type (J,) inside its tie-aware bounds from neighbour lists (J, K).

    Distances within rtol x (||mu||² + ||k||²) of the m-th count as tied: the float32 rounding
    of a squared L2 computed as ||mu||² + ||k||² - 2 mu.k.
    """
    bad = []
    mu_norm = np.sqrt(np.sum(np.asarray(mus, dtype=np.float64) ** 2, axis=1))  # (J,)
    for j, (v, f) in enumerate(zip(types, freqs)):
        m = int(min(f, M_MAX))
        row = ids[j]
        ok = row >= 0
        dm = max(float(d2[j][ok][m - 1]), 0.0)
        atol = rtol * (mu_norm[j] ** 2 + (mu_norm[j] + np.sqrt(dm)) ** 2) + 1e-12
        lo, hi = contamination_bounds(d2[j][ok], values[row[ok]], int(v), m, atol)
        if not (lo - 1e-12 <= got[j] <= hi + 1e-12):  # NaN fails too
            bad.append(int(v))
    return name, not bad, f"{len(bad)} of {len(types)} types outside their bounds{f' (e.g. {bad[:5]})' if bad else ''}"


def pick_types(freq: np.ndarray, type_sample: int, rng: np.random.Generator) -> np.ndarray:
    """Types to recompute: up to PER_FREQ of each of the smallest freq values (half the budget), then random."""
    seen = np.flatnonzero(freq)
    by_freq = seen[np.lexsort((seen, freq[seen]))]  # freq ascending, then token id
    rank_in_freq = np.arange(len(by_freq)) - np.searchsorted(freq[by_freq], freq[by_freq])
    fixed = by_freq[rank_in_freq < PER_FREQ][: type_sample // 2]
    rest = np.setdiff1d(seen, fixed)
    extra = rng.choice(rest, size=min(type_sample - len(fixed), len(rest)), replace=False)
    return np.sort(np.concatenate([fixed, extra]))


def check_types(tt: pd.DataFrame, keys, values: np.ndarray, freq: np.ndarray, eval_count: np.ndarray, index,
                run: pd.Series, type_sample: int, rng: np.random.Generator) -> list[Check]:
    """token_types: rows, freq, freq_bin, eval_count of all types; cv, PQ error, contamination of picked ones."""
    tid = tt["token_id"].to_numpy()
    checks = [
        equal("token_types rows = types with freq>=1 or in eval", tid, np.flatnonzero((freq > 0) | (eval_count > 0))),
    ]
    if len(tid) != int(np.sum((freq > 0) | (eval_count > 0))) or tid.max(initial=0) >= len(freq):
        return checks
    checks += [
        equal("token_types.freq", tt["freq"].to_numpy(), freq[tid]),
        equal("token_types.freq_bin", tt["freq_bin"].to_numpy(), digit_bin(freq[tid])),
        equal("token_types.eval_count", tt["eval_count"].to_numpy(), eval_count[tid]),
    ]
    pick = pick_types(freq, type_sample, rng)
    order = np.argsort(values, kind="stable")
    starts = np.searchsorted(values[order], pick)
    cv_ref, pq_ref, pqmax_ref, mus = [], [], [], []
    for v, st in zip(pick, starts):
        kv = np.asarray(keys[np.sort(order[st : st + freq[v]])], dtype=np.float32)  # (freq, d)
        mu = kv.astype(np.float64).mean(axis=0)
        r = np.sqrt(np.sum((kv - mu.astype(np.float32)) ** 2, axis=1, dtype=np.float64))
        cv_ref.append(r.std() / r.mean() if len(r) >= 2 and r.mean() > 0 else np.nan)
        err = np.sum((kv - index.sa_decode(index.sa_encode(kv))) ** 2, axis=1)
        pq_ref.append(err.mean())
        pqmax_ref.append(err.max())
        mus.append(mu)
    got = tt.set_index("token_id").loc[pick]
    checks += [
        close("token_types.cv", got["cv"], cv_ref, 1e-4, 1e-3),
        close("token_types.pq_error_mean", got["pq_error_mean"], pq_ref, 1e-4, 1e-3),
        close("token_types.pq_error_max", got["pq_error_max"], pqmax_ref, 1e-4, 1e-3),
    ]
    mode = run.get("contamination_mode")
    checks.append(("run.contamination_mode is 'exact' or 'index'", mode in CONTAMINATION_MODES, f"{mode!r}"))
    mus32 = np.array(mus, dtype=np.float32)  # (J, d): the run searches float32 centroids
    kk = int(min(M_MAX, len(keys)))
    stored = got["contamination"].to_numpy(dtype=np.float64)
    if mode == "exact":
        ids, d2 = nearest_entries(keys, mus32, kk)
        checks.append(contamination_check("token_types.contamination (brute force)", stored, ids, d2, values,
                                          pick, freq[pick], mus32))
    elif mode == "index":
        dist, ids = index.search(mus32, min(kk + 32, len(keys)))
        checks.append(contamination_check("token_types.contamination (index re-search)", stored, ids,
                                          np.where(ids >= 0, dist.astype(np.float64), np.inf), values,
                                          pick, freq[pick], mus32))
    return checks


def applies(ctx: RunData) -> bool:
    return True


def check(ctx: RunData) -> list[Check]:
    """Every type's counts; the key-space metrics of `ctx.type_sample` picked types (drawn from ctx.rng)."""
    eval_count = np.bincount(ctx.ev_ids[1:], minlength=len(ctx.freq))
    return check_types(ctx.tt, ctx.keys, ctx.values, ctx.freq, eval_count, ctx.index, ctx.run, ctx.type_sample,
                       ctx.rng)
