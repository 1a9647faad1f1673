"""URL query parameters of the dashboard: widget keys equal these names (STYLE §11), and the
one parser per type (int, float, choice, text, bin range) that every page reads them with.

A default of None means "the run's own value" (k, τ, λ) or "the whole range" (bin). Pure: no
streamlit import (ui.widgets.url_value shows the parsers' notes and applies their values).
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from ui.render import md_code

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_ENV = "KNNLM_RUNS_DIR"  # overrides the directory that holds the runs

URL_PARAMS: dict[str, object] = {
    "run": "demo",  # run directory name under the runs root (sidebar picker)
    "bin": None,  # (low, high) frequency-bin range on the bins page and the Token explorer (one label: that bin)
    "pos": 0,  # evaluation position on the neighbour inspector
    "nbr": 1,  # neighbour rank whose datastore entry the neighbour inspector shows in full
    "token": "",  # token text or id, a word or any text on the token explorer
    "level": "token",  # token | word level on the bins page
    "bins_tokens": "",  # token texts or ids (comma-separated) the bins page is restricted to
    "bins_outcome": "all",  # all | helped | harmed tokens on the bins page
    "token_sort": "position",  # order of the Token explorer's occurrences (knnlm_core.read.tokens.OCCURRENCE_SORTS)
    "novelty_metric": None,  # the Context novelty heatmap's colour (default: the PPL change, kNN-LM vs LM)
    "k": None,  # what-if k (default: min(run.k, stored neighbours))
    "tau": None,  # what-if temperature (default: the run's)
    "lam": None,  # what-if λ (default: the run's)
    "variant": "plain",  # mitigation variant of the first run on the compare page
    "variant_b": "plain",  # mitigation variant of the second run on the compare page
}

def runs_root() -> Path:
    """Directory holding the runs: $KNNLM_RUNS_DIR, else <repo>/data/runs."""
    env = os.environ.get(RUNS_ENV)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data" / "runs"


def list_runs(root: Path | None = None) -> list[str]:
    """Names of the directories under the root that hold a metrics.duckdb, sorted."""
    root = runs_root() if root is None else root
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "metrics.duckdb").is_file())


def default_run(runs: list[str]) -> str | None:
    """The URL default run when present, else the first run, else None."""
    if not runs:
        return None
    return URL_PARAMS["run"] if URL_PARAMS["run"] in runs else runs[0]


# --------------------------------------------------------------------------- parsing URL values
# One parser per type. Each takes the raw values of one parameter as Streamlit hands them over
# (st.query_params.get_all: [] when absent, several when repeated) and returns the value to use
# plus, when the URL's value was not used, one line saying what was used instead and why.

MAX_TEXT = 200  # longest token / word / text query taken from a URL (characters)
MAX_SHOWN = 40  # longest excerpt of a rejected value quoted back in a message
_INT = re.compile(r"[+-]?[0-9]+")  # ASCII only: int() also takes '٣' and '1_0', a URL should not
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # no nan / inf / 1_0


@dataclass(frozen=True)
class Parsed(Generic[T]):
    """A URL parameter's value to use, and `note` (one line) when the URL's value was replaced."""

    value: T
    note: str | None = None


def _quoted(name: str, raw: str) -> str:
    """`name=raw` for a message, raw cut to MAX_SHOWN characters and made literal (ui.render.md_code)."""
    shown = raw if len(raw) <= MAX_SHOWN else raw[:MAX_SHOWN] + "…"
    return md_code(f"{name}={shown}")


def _single(name: str, raw: list[str], default: T, default_text: str) -> tuple[str | None, Parsed[T] | None]:
    """The one raw value of a parameter, or the default (with a note when it was repeated or empty)."""
    if not raw:
        return None, Parsed(default)
    if len(raw) > 1:
        return None, Parsed(default, f"URL parameter `{name}` is given {len(raw)} times; using {default_text}.")
    if raw[0] == "":
        return None, Parsed(default, f"URL parameter `{name}` is empty; using {default_text}.")
    return raw[0], None


def parse_int(name: str, raw: list[str], low: int, high: int, default: int, default_text: str = "") -> Parsed[int]:
    """An integer in [low, high] written in ASCII digits; else `default` with a note."""
    use = default_text or f"{name} = {default:,}"
    text, done = _single(name, raw, default, use)
    if done is not None:
        return done
    if len(text) > 30 or not _INT.fullmatch(text):  # 30 digits: far beyond any range, and int() stays cheap
        return Parsed(default, f"{_quoted(name, text)} is not an integer; using {use}.")
    value = int(text)
    if not low <= value <= high:
        return Parsed(default, f"{_quoted(name, text)} is out of range ({low:,}…{high:,}); using {use}.")
    return Parsed(value)


def parse_float(name: str, raw: list[str], low: float, high: float, default: float,
                default_text: str = "") -> Parsed[float]:
    """A finite decimal number in [low, high] (ASCII, no nan / inf); else `default` with a note."""
    use = default_text or f"{name} = {default:g}"
    text, done = _single(name, raw, default, use)
    if done is not None:
        return done
    if len(text) > 40 or not _FLOAT.fullmatch(text):
        return Parsed(default, f"{_quoted(name, text)} is not a number; using {use}.")
    value = float(text)
    if not (math.isfinite(value) and low <= value <= high):
        return Parsed(default, f"{_quoted(name, text)} is out of range ({low:g}…{high:g}); using {use}.")
    return Parsed(value)


def parse_choice(name: str, raw: list[str], choices: Sequence[str], default: str) -> Parsed[str]:
    """One of `choices`, exactly; else `default` with a note naming the choices."""
    use = f"{name} = {default}"
    text, done = _single(name, raw, default, use)
    if done is not None:
        return done
    if text not in choices:
        listed = ", ".join(choices[:10]) + (", …" if len(choices) > 10 else "")
        return Parsed(default, f"{_quoted(name, text)} is not one of: {listed}; using {use}.")
    return Parsed(text)


def parse_text(name: str, raw: list[str], default: str = "") -> Parsed[str]:
    """Free text: control characters (null bytes, newlines, …) removed, at most MAX_TEXT characters."""
    use = "an empty query" if default == "" else f"{name} = {default}"
    if len(raw) > 1:
        return Parsed(default, f"URL parameter `{name}` is given {len(raw)} times; using {use}.")
    text = raw[0] if raw else default
    clean = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cs"))
    if len(clean) > MAX_TEXT:
        return Parsed(clean[:MAX_TEXT], f"URL parameter `{name}` is {len(clean):,} characters long; "
                                        f"using its first {MAX_TEXT}.")
    if clean != text:
        return Parsed(clean, f"URL parameter `{name}` holds control characters; using it without them.")
    return Parsed(text)


def parse_range(name: str, raw: list[str], labels: Sequence[str]) -> Parsed[tuple[int, int]]:
    """A (low, high) pair of indices into `labels` given as two labels (`?bin=10–99&bin=100–999`);
    one label selects that bin alone; else the whole range with a note. Reversed pairs are ordered."""
    whole = (0, len(labels) - 1)
    use = f"all bins ({labels[0]} … {labels[-1]})"
    if not raw:
        return Parsed(whole)
    if len(raw) > 2:
        return Parsed(whole, f"URL parameter `{name}` is given {len(raw)} times (at most 2: low, high); using {use}.")
    unknown = [r for r in raw if r not in labels]
    if unknown:
        return Parsed(whole, f"{_quoted(name, unknown[0])} is not one of: {', '.join(labels)}; using {use}.")
    picked = [labels.index(r) for r in raw]
    return Parsed((min(picked), max(picked)))
