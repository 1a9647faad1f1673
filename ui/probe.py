"""Helpers of the Probe page (SPEC §13): what a run or install lacks, example texts, the token strip,
the table shown and the What-if controls. The token strip builder is pure (HTML, every token escaped);
the `*_ui` functions draw widgets and return the user's choice. No torch import: the page calls
`precompute.probe` (which imports torch inside its load / score functions) only through ui.cache.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from knnlm_core.bins import bin_label
from knnlm_core.config import resolve_path
from knnlm_core.corpus import CorpusError, read_text
from precompute import probe as lib
from ui.render import md_code

EXAMPLE_CHARS = 1500  # characters of each example taken from the evaluation text (a few hundred tokens)
FIXED_EXAMPLES = {
    "A rare name": "The envoy Quetzalina Mbeki-Fairweather arrived in Ouagadougou on Tuesday, and Mbeki-Fairweather "
                   "spoke first.",
    "Code": "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Another domain (verse)": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
                              "The slings and arrows of outrageous fortune,\n",
}
SHOWN = ["pos", "token", "freq", "bin", "p_lm", "p_knn", "p_knnlm", "gain", "target_rank", "hit_16", "ctx_match_len",
         "p_inf", "copy_share"]
REBUILD = "python -m precompute --config configs/demo.toml --run-dir data/runs/demo-full"


def blockers(run_dir: Path) -> str | None:
    """Why this run cannot be probed here, in Markdown (packages first: one command adds them), or None."""
    if missing := lib.missing_packages():
        return (f"The Probe runs the run's model and searches its index: it needs {', '.join(missing)}, which the "
                f"dashboard's light install leaves out. Add them with {md_code(lib.INSTALL)} and restart the "
                "dashboard; every other page works without them.")
    if missing := lib.missing_files(run_dir):
        return (f"This run cannot be probed: its directory {md_code(str(run_dir))} lacks "
                f"{', '.join(md_code(m) for m in missing)}. The shipped runs keep only `manifest.json` and "
                "`metrics.duckdb` (the rest is over the repository's size budget); probing them is not yet available "
                f"for shipped runs. Build a run of your own that keeps them, e.g. {md_code(REBUILD)} (the same "
                "model and corpora as `demo`, in a new directory: the shipped run is left untouched), and pick it "
                "in the sidebar (runs are read from `$KNNLM_RUNS_DIR`, default `data/runs`).")
    return None


def eval_examples(cfg: dict) -> dict[str, str]:
    """Two passages of the run's evaluation text (whole lines, as the corpus is tokenized): its start (the
    probe then gives the run's eval_tokens values) and the lines after it (scored alone). {} without the file."""
    try:
        lines = read_text(resolve_path(str(cfg.get("eval_corpus", "")))).splitlines(keepends=True)
    except (CorpusError, OSError):
        return {}
    parts, current, size = [], [], 0
    for line in lines:
        if size + len(line) > EXAMPLE_CHARS and current:
            parts.append("".join(current))
            current, size = [], 0
            if len(parts) == 2:
                break
        current.append(line)
        size += len(line)
    names = ["Start of the run's evaluation text (gives the run's numbers)",
             "The evaluation text's next lines, scored alone (context starts at the text)"]
    return {name: text for name, text in zip(names, parts) if text.strip()}


def token_strip_html(tokens: list[str], gains: np.ndarray, first: str) -> str:
    """The probed text as a strip of tokens, each coloured by its NLL change (green: kNN-LM helped, red: hurt;
    full colour at |gain| >= 2 nats) and titled with its position and gain; `first` (the text's first token,
    never scored) plain. Every token is escaped; a newline shows as ⏎ before the line break."""
    spans = [f'<span title="not scored (no context)">{_shown(first)}</span>']
    for pos, (token, gain) in enumerate(zip(tokens, np.asarray(gains, dtype=np.float64))):
        alpha = min(abs(gain) / 2.0, 1.0) if np.isfinite(gain) else 1.0
        rgb = "46,125,50" if gain >= 0 else "198,40,40"
        spans.append(f'<span title="pos {pos} · gain {gain:+.3f} nats" '
                     f'style="background:rgba({rgb},{alpha * 0.6:.3f})">{_shown(token)}</span>')
    return ('<div style="white-space:pre-wrap;font-family:monospace;line-height:1.9">' + "".join(spans) + "</div>")


def _shown(token: str) -> str:
    """A token as literal HTML text: escaped, control characters as Python escapes, newline as ⏎ + break."""
    text = "".join(ch if ch.isprintable() or ch in " \n" else ascii(ch)[1:-1] for ch in token or "")
    return html.escape(text).replace("\n", "⏎\n")


def shown_table(tokens: pd.DataFrame) -> pd.DataFrame:
    """The per-token columns the page shows (the CSV has them all), the bin as its label."""
    out = tokens.assign(bin=[bin_label(int(b)) for b in tokens["freq_bin"]])
    return out[[c for c in SHOWN if c in out.columns]]


def whatif_ui(settings: dict, run_info: dict) -> dict:
    """λ, τ, k and distance-source controls (defaults: the run's); returns the chosen settings."""
    c = st.columns(4)
    lam = c[0].slider("λ", 0.0, 1.0, float(run_info["lambda"]), 0.01, key="probe_lam")
    tau = c[1].number_input("τ", min_value=1e-3, max_value=1e6, value=float(run_info["temperature"]),
                            key="probe_tau", format="%g")
    k = c[2].number_input(f"k (≤ {settings['k_max']:,} searched)", 1, int(settings["k_max"]),
                          int(min(run_info["k"], settings["k_max"])), key="probe_k")
    source = c[3].radio("distances", list(lib.SOURCES), index=list(lib.SOURCES).index(run_info["distance_source"]),
                        key="probe_source", horizontal=True)
    return {"lam": float(lam), "tau": float(tau), "k": int(k), "source": str(source)}


def ppl(nll: pd.Series) -> float:
    """exp(mean NLL) of a probe's scored tokens."""
    return float(np.exp(nll.to_numpy(np.float64).mean()))
