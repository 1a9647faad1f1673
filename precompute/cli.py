"""Shared command-line plumbing for every entry point (precompute, verify, plan, train_lm, bench).

Bad input ends with exit code 2 and exactly one stderr line `error: ...`; an unexpected
internal error ends with exit code 1, one line naming the exception and the path of a log
file that holds its traceback. No torch or faiss import here: entry points validate their
arguments before importing the heavy modules, so bad input is refused in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
LOG_DIR_ENV = "KNNLM_LOG_DIR"  # where tracebacks of internal errors go (default: <tmp>/knnlm-logs)

# Exceptions that mean "the input is wrong, and the message says how to fix it", by qualified name, so
# that this module needs no import of the (torch-importing) modules that define them.
USER_ERRORS = (
    "knnlm_core.config.ConfigError", "knnlm_core.corpus.CorpusError", "knnlm_core.factory.FactoryError",
    "knnlm_core.keystore.KeyStoreError", "knnlm_core.model.ModelError", "knnlm_core.store.RunSchemaError",
    "precompute.runner.RunError", "precompute.cli.UsageError",
    "precompute.knn_transformers.format.DatastoreError",
)


class UsageError(ValueError):
    """A command-line argument out of range or inconsistent; the message names the flag and the fix."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one `error:` line (argparse's usage block is left out)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def one_line(text: object) -> str:
    """`text` on one line: newlines and runs of whitespace become single spaces."""
    return re.sub(r"\s+", " ", str(text)).strip()


def say(line: str) -> None:
    """Print one line to stderr, whatever bytes it holds (undecodable path bytes are escaped, not fatal)."""
    data = (line + "\n").encode("utf-8", "backslashreplace")
    sys.stderr.flush()
    sys.stderr.buffer.write(data) if hasattr(sys.stderr, "buffer") else sys.stderr.write(data.decode())
    sys.stderr.flush()


def is_user_error(err: BaseException, extra: Iterable[type] = ()) -> bool:
    """Whether `err` is bad input (one of USER_ERRORS or `extra`) rather than a bug."""
    if isinstance(err, tuple(extra)):
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(err).__mro__)


def write_log(prog: str) -> Path | None:
    """Write the current exception's traceback to a fresh log file; its path, or None if none could be written."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "knnlm-logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{' '.join(sys.argv)}\n\n{traceback.format_exc()}")
        return Path(name)
    except OSError:
        return None


def run_cli(body: Callable[[], int | None], prog: str, extra_user_errors: Iterable[type] = ()) -> int:
    """Run an entry point's `body` and turn what it raises into the exit codes above."""
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        say("interrupted: rerun the same command to resume (finished work is kept)")
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - every error ends as one line, never a traceback
        if is_user_error(err, extra_user_errors):
            say(f"error: {one_line(err)}")
            return EXIT_BAD_INPUT
        log = write_log(prog)
        where = f"traceback in {log}" if log else "no log could be written"
        say(f"error: internal error {type(err).__name__}: {one_line(err)[:300]} ({where}; please report it)")
        return EXIT_INTERNAL


# ---------------------------------------------------------------- argument types

def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (either bound optional)."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = " and ".join(b for b in (lo is not None and f">= {lo}", hi is not None and f"<= {hi}") if b)
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {bounds})")
        return value
    parse.__name__ = "integer"
    return parse


def float_arg(text: str) -> float:
    """argparse type: a finite float (nan and inf are refused here; ranges are the config's)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


float_arg.__name__ = "number"


def path_arg(text: str) -> Path:
    """argparse type: a non-empty path (`''` would silently mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not allowed (give a directory or file name)")
    if "\x00" in text:
        raise argparse.ArgumentTypeError("a path cannot contain NUL characters")
    return Path(text)


path_arg.__name__ = "path"
