"""The eval_tokens columns derived from p_LM and the token streams, on every position (stage `eval_lm`;
SPEC §2-§4): positions and targets, frequencies and bins, the interpolation, NLLs, gain and the run's PPLs.
p_LM needs the model and is taken as stored; everything derived from it is recomputed."""

from __future__ import annotations

import numpy as np

from .common import Check, RunData, close, digit_bin, equal

STAGE = "eval_lm"


def applies(ctx: RunData) -> bool:
    return True


def check(ctx: RunData) -> list[Check]:
    """Cheap eval_tokens columns on every position, and the run's perplexities."""
    ev, ev_ids, freq, run, lam = ctx.ev, ctx.ev_ids, ctx.freq, ctx.run, ctx.lam
    t, targets = len(ev_ids) - 1, ev_ids[1:]
    checks = [
        equal("eval_tokens.pos = 0..T-1", ev["pos"].to_numpy(), np.arange(t)),
        equal("eval_tokens.token_id = eval token pos+1", ev["token_id"].to_numpy(), targets),
        equal("eval_tokens.freq", ev["freq"].to_numpy(), freq[targets]),
        equal("eval_tokens.freq_bin", ev["freq_bin"].to_numpy(), digit_bin(freq[targets])),
        equal("eval_tokens.context_freq", ev["context_freq"].to_numpy(), freq[ev_ids[:-1]]),
    ]
    p_lm, p_knn = ev["p_lm"].to_numpy(dtype=np.float64), ev["p_knn"].to_numpy(dtype=np.float64)
    p_mix = lam * p_knn + (1 - lam) * p_lm
    with np.errstate(divide="ignore"):
        checks += [
            close("p_knnlm = λ p_knn + (1-λ) p_lm", ev["p_knnlm"], p_mix, 1e-12),
            close("nll_lm = -ln p_lm", ev["nll_lm"], -np.log(p_lm), 1e-9),
            close("nll_knnlm = -ln p_knnlm", ev["nll_knnlm"], -np.log(p_mix), 1e-9),
            close("gain = ln p_knnlm - ln p_lm", ev["gain"], np.log(p_mix) - np.log(p_lm), 1e-9),
            close("run.ppl_lm", run["ppl_lm"], np.exp(np.mean(-np.log(p_lm))), 0, 1e-9),
            close("run.ppl_knnlm", run["ppl_knnlm"], np.exp(np.mean(-np.log(p_mix))), 0, 1e-9),
        ]
    return checks
