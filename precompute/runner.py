"""The stage runner: run state, stage keys, atomic file I/O and per-shard resume.

A stage has a key (hash of the config fields and upstream keys it depends on), recorded
in `stages.json` when it finishes; a rerun skips a stage whose key matches and whose
outputs exist. A heavy stage is a map over fixed-size shards plus a reduce: each shard's
output is written under a temporary name and renamed (`Shards.save`), so after a kill the
rerun finds every finished shard complete and resumes at the first unfinished one, losing
at most the shard that was in flight. Shards written under another stage key are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from knnlm_core.config import RunConfig, resolve_path
from knnlm_core.keystore import KeyStoreError, open_keys

FAULT_ENV = "KNNLM_FAULT_AFTER_SHARD"  # "<stage>" or "<stage>:<n>": SIGKILL self after n shards (tests)
# "<stage>" or "<stage>:<n>": a Ray worker exits (os._exit) after saving n shards of the stage, once per run
# (a marker file in the run directory), so the retried task and the restarted worker then finish the stage.
WORKER_FAULT_ENV = "KNNLM_FAULT_WORKER_EXIT"
IN_WORKER = False  # set by a Ray worker process: faults then follow WORKER_FAULT_ENV, not FAULT_ENV


class RunError(RuntimeError):
    """A problem with the run directory or its files; the message names the fix."""


@dataclass
class Run:
    """State shared by the stages of one invocation."""

    cfg: RunConfig
    run_dir: Path
    run_name: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # resolved facts: dims, windows, hashes
    executor: Any = None  # precompute.executor.LocalExecutor (None) or RayExecutor: who runs shard maps
    memo: dict[Any, Any] = field(default_factory=dict)  # per-process cache: opened index, shard folders, μ
    _lm: Any = None
    _tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """What travels to a Ray worker: config, paths, facts; never the model, executor or caches."""
        return {**self.__dict__, "executor": None, "memo": {}, "_lm": None, "_tokenizer": None}

    def cached(self, name: Any, make: Callable[[], Any]) -> Any:
        """`make()` once per process and name (a worker keeps its index, keys and shard folders)."""
        if name not in self.memo:
            self.memo[name] = make()
        return self.memo[name]

    def path(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from knnlm_core.corpus import load_tokenizer

            self._tokenizer = load_tokenizer(str(model_source(self.cfg.tokenizer or self.cfg.model)))
        return self._tokenizer

    @property
    def lm(self):
        """The model, loaded on first use (only stages that run the model need it)."""
        if self._lm is None:
            from knnlm_core.model import load_model

            self._lm = load_model(str(model_source(self.cfg.model)), self.cfg.dtype, self.info["device"])
        return self._lm

    def keys(self):
        """The datastore keys (N, d) float16 (either layout of SPEC §7), checked against N and d."""
        try:
            return open_keys(self.run_dir, self.info["n_entries"], self.info["dim"])
        except KeyStoreError as err:
            raise RunError(str(err)) from err

    def values(self) -> np.ndarray:
        return np.asarray(load_npy(self.path("values.npy"), (self.info["n_entries"],), np.int32))


def model_source(name: str) -> str | Path:
    """A local directory (resolved against the repo root) when one exists, else the hub name."""
    p = resolve_path(name)
    return p if p.is_dir() else name


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def return_freed_memory() -> None:
    """Make glibc serve allocations >= 1 MiB with mmap, so freed arrays go back to the OS.

    glibc's default raises its mmap threshold after large frees, after which batch-sized
    numpy arrays come from heap arenas (one per thread) that are not returned: the search
    stage's overlapped batches then grew RSS by ~3 GB of fragmentation on WikiText-2. A
    fixed 1 MiB threshold keeps RSS at what is live. No-op where mallopt is unavailable.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- atomic writes

def tmp_name(path: Path, suffix: str = "") -> Path:
    """A temporary sibling of `path` private to this process (two attempts never share one)."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}{suffix}")


def save_npy(path: Path, array: np.ndarray) -> None:
    tmp = tmp_name(path, ".npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = tmp_name(path, ".npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_json(path: Path, obj: Any) -> None:
    tmp = tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def load_npy(path: Path, shape: tuple | None = None, dtype: Any = None, mmap: bool = True) -> np.ndarray:
    """Load an .npy (memmapped), checking shape/dtype; RunError naming the fix if corrupt."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as err:
        raise RunError(f"{path.name} in {path.parent} is truncated or corrupt ({err}): delete it and rerun "
                       "to rebuild that stage") from err
    if (shape is not None and arr.shape != shape) or (dtype is not None and arr.dtype != dtype):
        raise RunError(f"{path.name} in {path.parent} has shape {arr.shape} / {arr.dtype}, expected {shape} / "
                       f"{dtype}: delete it and rerun to rebuild that stage")
    return arr


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise RunError(f"{path.name} in {path.parent} is truncated or corrupt ({err}): delete it and rerun") from err


def read_index(path: Path, mmap: bool = False):
    import faiss

    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        raise RunError(f"index file {path} is corrupt or truncated: delete it and rerun to rebuild the index") from err


def write_index(index, path: Path) -> None:
    import faiss

    tmp = tmp_name(path)
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


# ---------------------------------------------------------------- stages and shards

def run_stage(run: Run, name: str, key_parts: dict, outputs: list[str], body: Callable[[str], dict | None]) -> str:
    """Run `body(key)` unless stages.json records `name` with the same key and its outputs exist."""
    key = digest(key_parts)
    done = run.stages.get(name)
    if done and done.get("key") == key and all(run.path(o).exists() for o in outputs):
        tqdm.write(f"[{name}] up to date, skipped")
        run.info.update(done.get("info", {}))
        return key
    t0 = time.time()
    info = body(key) or {}
    run.stages[name] = {"key": key, "seconds": round(time.time() - t0, 2), "outputs": outputs, "info": info}
    run.info.update(info)
    save_json(run.path("stages.json"), run.stages)
    tqdm.write(f"[{name}] done in {time.time() - t0:.1f} s")
    return key


def stage_shards(run: Run, stage: str, key: str, folder: str, suffix: str = ".npz") -> Shards:
    """The stage's shard folder, opened once per process (its saved-shard count drives the fault hooks)."""
    return run.cached(("shards", folder, key), lambda: Shards(run.path(folder), key, suffix, stage=stage))


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of at most `size` items covering 0..n."""
    return [(lo, min(lo + size, n)) for lo in range(0, n, max(1, size))]


class Shards:
    """Finished shard outputs of one stage in a folder, tagged with the stage key.

    `save(i, ...)` writes shard i atomically; `done(i)` says whether it exists. Opening the
    folder under another key removes what an earlier config left there.
    """

    def __init__(self, folder: Path, key: str, suffix: str = ".npz", stage: str | None = None):
        self.folder, self.key, self.suffix = Path(folder), key, suffix
        tag = self.folder / "stage_key.json"
        if self.folder.exists() and (not tag.exists() or json.loads(tag.read_text()).get("key") != key):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not tag.exists():
            save_json(tag, {"key": key})
        self.stage = stage or self.folder.name.split(".")[0]
        self.saved_now = 0

    def path(self, i: int) -> Path:
        return self.folder / f"shard_{i:05d}{self.suffix}"

    def done(self, i: int) -> bool:
        return self.path(i).exists()

    def save(self, i: int, **arrays: np.ndarray) -> None:
        save_npz(self.path(i), **arrays)
        self.after_save()

    def after_save(self) -> None:
        """Count a finished shard; fault injection for the kill/resume tests (FAULT_ENV, WORKER_FAULT_ENV)."""
        self.saved_now += 1
        if not IN_WORKER:
            driver_fault(self.stage, self.saved_now)
        elif fault_due(os.environ.get(WORKER_FAULT_ENV, ""), self.stage, self.saved_now):
            # The marker, in the run directory, makes the fault fire once: the restarted worker goes on.
            run_dir = next((p for p in (self.folder, *self.folder.parents) if (p / "run_config.json").exists()),
                           self.folder)
            marker = run_dir / f"worker_fault_{self.stage}.fired"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # a crash as Ray sees it (not a Python exception): the actor restarts, the task retries

    def load(self, i: int) -> dict[str, np.ndarray]:
        return load_npz(self.path(i))

    def todo(self, n: int) -> Iterator[int]:
        return (i for i in range(n) if not self.done(i))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fault_due(spec: str, stage: str, saved: int) -> bool:
    """Whether a fault spec "<stage>[:<n>]" fires after `saved` shards of `stage`."""
    name, _, count = spec.partition(":")
    return bool(spec) and name == stage and saved >= int(count or 1)


def driver_fault(stage: str, saved: int) -> None:
    """SIGKILL this (driver) process when FAULT_ENV says so: the kill/resume tests of either executor."""
    if fault_due(os.environ.get(FAULT_ENV, ""), stage, saved):
        os.kill(os.getpid(), signal.SIGKILL)


def remove_tmp_files(folder: Path) -> None:
    """Delete temporary files that killed attempts left in `folder` (never a finished output)."""
    for p in Path(folder).glob("*.tmp*"):
        p.unlink(missing_ok=True)


def concat_shards(shards: Shards, n: int) -> dict[str, np.ndarray]:
    """The arrays of shards 0..n-1 concatenated along axis 0."""
    parts = [shards.load(i) for i in range(n)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
