"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except empty / None ones (their help text explains them)."""

    def _get_help_string(self, action):
        if action.default in (None, "", False):
            return action.help
        return super()._get_help_string(action)


class BenchParser(argparse.ArgumentParser):
    """ArgumentParser of the benchmarks: defaults in --help; bad arguments are one `error:` line, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelp)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        from precompute.cli import EXIT_BAD_INPUT, one_line, say

        say(f"error: {one_line(message)} (see {self.prog} --help)")
        sys.exit(EXIT_BAD_INPUT)


def count(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, repeats, threads, k)."""
    from precompute.cli import int_in

    return int_in(1)(text)


def size(text: str) -> int:
    """argparse type: an integer >= 0 (0 meaning "auto" or "all" where the help says so)."""
    from precompute.cli import int_in

    return int_in(0)(text)


def factory(text: str) -> str:
    """argparse type: an index factory string the run can build (parsed before faiss sees it)."""
    from knnlm_core.factory import FactoryError, parse_factory

    try:
        parse_factory(text)
    except FactoryError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def write_config(base: Path, out: Path, **values) -> Path:
    """`base` TOML with `values` replaced, written to `out` (flat keys only, as the presets are)."""
    data = {**tomllib.loads(base.read_text()), **values}
    lines = [f"{k} = {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
             for k, v in data.items()]
    out.write_text("\n".join(lines) + "\n")
    return out
