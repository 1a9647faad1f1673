"""Checks that run before anything is written (and before torch or faiss are imported).

The run directory must be creatable and writable; a directory holding a run with another
config needs --overwrite; the model's config and weight files must be complete; every
corpus must be readable UTF-8 text; the index factory must fit the key dimension. Each
failure is a RunError / ModelError-like one-line message naming the fix, so a bad command
leaves the file system as it found it.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from knnlm_core.config import RunConfig, check_import, resolve_path
from knnlm_core.corpus import read_text
from knnlm_core.factory import FactoryError, check_factory_dim
from precompute.runner import RunError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
DIM_KEYS = ("hidden_size", "n_embd", "d_model", "dim")  # where HF configs keep the key dimension


# ---------------------------------------------------------------- run directory

def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor or ".")


def check_run_dir_writable(run_dir: Path) -> None:
    """RunError unless `run_dir` is (or can be created as) a writable directory. Leaves nothing behind."""
    text = str(run_dir)
    if not text.strip() or text == ".":
        raise RunError("--run-dir is empty (give the directory of the run, e.g. data/runs/my-run)")
    path = Path(os.path.abspath(run_dir))
    limit = _name_max(nearest_existing(path))
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise RunError(f"--run-dir has a path component of {len(os.fsencode(part))} bytes, over this file "
                           f"system's limit of {limit} (choose a shorter name)")
    if len(os.fsencode(str(path))) >= 4096:
        raise RunError("--run-dir is longer than the 4,096-byte path limit (choose a shorter path)")
    base = nearest_existing(path)
    if base == path and not path.is_dir():
        raise RunError(f"--run-dir {run_dir} is an existing file, not a directory (choose another path)")
    if base != path and not base.is_dir():
        raise RunError(f"--run-dir {run_dir} cannot be created: {base} is a file, not a directory (choose another "
                       "path)")
    try:  # the only sure test of writability (read-only mounts, /proc, permissions, quotas)
        fd, probe = tempfile.mkstemp(prefix=".knnlm-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunError(f"--run-dir {run_dir} cannot be written: {base} refuses new files ({err.strerror or err}); "
                       "choose a writable location") from None


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder if folder.is_dir() else folder.parent, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run directory was built with (run_config.json, else manifest.json), None if no run."""
    for name, pick in (("run_config.json", lambda d: d), ("manifest.json", lambda d: d.get("config", {}))):
        path = run_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                return dict(pick(data))
            except (OSError, ValueError, TypeError, AttributeError) as err:
                raise RunError(f"{path} is unreadable ({type(err).__name__}): delete it and rerun, or choose "
                               "another --run-dir") from None
    return None


def check_run_dir(run_dir: Path, cfg: RunConfig, overwrite: bool) -> None:
    """Refuse a run directory that holds a run with another config unless overwrite is set."""
    previous = recorded_config(run_dir) if run_dir.is_dir() else None
    if previous is None:
        return
    current = json.loads(json.dumps(cfg.to_dict()))
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if changed and not overwrite:
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise RunError(f"{run_dir} holds a run with a different config ({detail}); pass --overwrite to rebuild "
                       "it (unchanged stages are reused) or choose another --run-dir")


# ---------------------------------------------------------------- model files

def local_model_dir(name: str) -> Path | None:
    """The local directory a model name resolves to, or None for a hub name."""
    p = resolve_path(name)
    return p if p.is_dir() else None


def model_dim(cfg: RunConfig) -> int | None:
    """Key dimension from a local model's config.json (checked to be a JSON object); None for hub models."""
    folder = local_model_dir(cfg.model)
    if folder is None:
        return None
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"model directory {folder} has no config.json (give the directory of a saved Hugging Face "
                       "model)") from None
    except (OSError, ValueError) as err:
        raise RunError(f"model config {path} is unreadable or not JSON ({type(err).__name__}): restore the model "
                       "files") from None
    if not isinstance(data, dict):
        raise RunError(f"model config {path} is not a JSON object: restore the model files")
    dims = [data[k] for k in DIM_KEYS if isinstance(data.get(k), int) and not isinstance(data.get(k), bool)]
    return dims[0] if dims and dims[0] > 0 else None


def check_model_files(cfg: RunConfig) -> None:
    """RunError unless every weight file of a local model is complete (nothing loaded, torch not imported)."""
    folder = local_model_dir(cfg.model)
    if folder is None:
        return
    # A directory without weight files is refused later, after its family is checked (the clearer message).
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    for path in weights:
        if problem := weight_file_problem(path):
            raise RunError(f"model weights {path} are {problem}: restore the file (re-save or re-download the "
                           "model); nothing was written")


def weight_file_problem(path: Path) -> str | None:
    """Why a weight file is incomplete ("truncated ...", "corrupt ..."), or None if its framing is whole.

    safetensors: an 8-byte header length, a JSON header, then data up to the largest end offset.
    .bin: a zip archive (torch.save), whose central directory sits at the end of the file.
    """
    size = path.stat().st_size
    if path.suffix == ".bin":
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"truncated or corrupt ({one(err)})"
        return None
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100 << 20:
                return f"truncated or corrupt (header of {n:,} bytes in a file of {size:,})"
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as err:
        return f"truncated or corrupt (unreadable header: {type(err).__name__})"
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"truncated or corrupt ({size:,} bytes, the header describes {expected:,})"
    return None


def one(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# ---------------------------------------------------------------- corpora and index

def check_corpora(cfg: RunConfig) -> None:
    """CorpusError unless every corpus of the config is a readable, non-empty UTF-8 (or gzip) file."""
    for rel in (cfg.datastore_corpus, cfg.eval_corpus, cfg.valid_corpus):
        if rel:
            try:
                read_text(resolve_path(rel))
            except OSError as err:
                raise RunError(f"corpus {rel} cannot be read ({err.strerror or type(err).__name__}); check the path "
                               "and its permissions") from None


def check_index_dim(cfg: RunConfig, dim: int | None) -> None:
    """RunError when the index factory does not fit the model's key dimension (when that is known here)."""
    if dim is None:
        return
    try:
        check_factory_dim(cfg.index_factory, dim)
    except FactoryError as err:
        raise RunError(str(err)) from None


def preflight(cfg: RunConfig, run_dir: Path, overwrite: bool) -> None:
    """Every check that needs neither torch nor faiss, in the order a user would fix them."""
    check_run_dir_writable(run_dir)
    check_run_dir(Path(run_dir), cfg, overwrite)
    check_import(cfg)
    dim = model_dim(cfg)
    check_model_files(cfg)
    check_index_dim(cfg, dim)
    check_corpora(cfg)
