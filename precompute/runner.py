"""The stage runner: run state, stage keys, atomic file I/O and per-shard resume.

A stage has a key (hash of the config fields and upstream keys it depends on), recorded
in `stages.json` with its outputs' byte sizes when it finishes; a rerun skips a stage whose
key matches and whose outputs are complete (present, of the recorded size, whole by their
own framing), and rebuilds it otherwise. A heavy stage is a map over fixed-size shards plus a reduce: each shard's
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
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from knnlm_core import neighbours
from knnlm_core.config import RunConfig, resolve_path
from knnlm_core.keystore import SHARD_LIST, KeyStoreError, open_keys, read_shard_list

FAULT_ENV = "KNNLM_FAULT_AFTER_SHARD"  # "<stage>" or "<stage>:<n>": SIGKILL self after n shards (tests)
# "<stage>" or "<stage>:<n>": a Ray worker exits (os._exit) after saving n shards of the stage, once per run
# (a marker file in the run directory), so the retried task and the restarted worker then finish the stage.
WORKER_FAULT_ENV = "KNNLM_FAULT_WORKER_EXIT"
IN_WORKER = False  # set by a Ray worker process: faults then follow WORKER_FAULT_ENV, not FAULT_ENV


SPLIT_FILES = {"eval": ("queries.npy", "eval_ids.npy"), "valid": ("valid_queries.npy", "valid_ids.npy")}


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
    pending_config: dict[str, Any] | None = None  # run_config.json to write once a stage has succeeded
    corpora: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> path, sha256, limit (stage keys)
    fresh: dict[str, np.ndarray] = field(default_factory=dict)  # token streams read in validation, to persist
    _lm: Any = None
    _tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """What travels to a Ray worker: config, paths, facts; never the model, executor or caches."""
        return {**self.__dict__, "executor": None, "memo": {}, "fresh": {}, "_lm": None, "_tokenizer": None}

    def cached(self, name: Any, make: Callable[[], Any]) -> Any:
        """`make()` once per process and name (a worker keeps its index, keys and shard folders)."""
        if name not in self.memo:
            self.memo[name] = make()
        return self.memo[name]

    def path(self, name: str) -> Path:
        return self.run_dir / name

    def write_pending_config(self) -> None:
        """Record this run's config in run_config.json (once), claiming the directory for it."""
        if self.pending_config is not None:
            save_json(self.path("run_config.json"), self.pending_config)
            self.pending_config = None

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

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(queries (T, d) float16 memmap, targets (T,) int64) of the query split "eval" or "valid"."""
        q_file, ids_file = SPLIT_FILES[name]
        targets = np.asarray(load_npy(self.path(ids_file)))[1:].astype(np.int64)
        return load_npy(self.path(q_file), (len(targets), self.info["dim"]), np.float16), targets


def model_source(name: str) -> str | Path:
    """A local directory (resolved against the repo root) when one exists, else the hub name."""
    p = resolve_path(name)
    return p if p.is_dir() else name


def resolve_device(requested: str) -> str:
    """"auto" -> cuda when a CUDA GPU is visible, else cpu; "cuda" without one is a RunError."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RunError("device = cuda but no CUDA GPU is visible here (use device = auto or cpu, or install a "
                       "CUDA build of torch)")
    return requested


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
    """Run `body(key)` unless stages.json records `name` with the same key and its outputs are complete.

    Complete means: present, of the byte size recorded when the stage finished, and whole by their
    own framing (`artifact_problem`); anything less rebuilds the stage instead of trusting it.
    """
    key = digest(key_parts)
    done = run.stages.get(name)
    if done and done.get("key") == key:
        problems = [f"{o} {p}" for o in outputs if (p := output_problem(run, o, done.get("sizes")))]
        if not problems:
            tqdm.write(f"[{name}] up to date, skipped")
            run.info.update(done.get("info", {}))
            return key
        tqdm.write(f"[{name}] output {problems[0]}: rebuilding the stage")
    t0 = time.time()
    info = body(key) or {}
    run.stages[name] = {"key": key, "seconds": round(time.time() - t0, 2), "outputs": outputs, "info": info,
                        "sizes": output_sizes(run, outputs)}
    run.info.update(info)
    save_json(run.path("stages.json"), run.stages)
    run.write_pending_config()  # the new config's first finished stage: the directory is now this config's
    tqdm.write(f"[{name}] done in {time.time() - t0:.1f} s")
    return key


# ---------------------------------------------------------------- artifact completeness

def _with_shards(run: Run, outputs: list[str]) -> list[str]:
    """`outputs` plus the key shard files that a `keys/shards.json` output lists."""
    out = list(outputs)
    for rel in outputs:
        if rel.endswith(SHARD_LIST) and run.path(rel).is_file():
            try:
                out += [str(Path(rel).parent / e["file"]) for e in read_shard_list(run.path(rel).parent.parent)]
            except KeyStoreError:
                pass
        elif rel.startswith(f"{neighbours.ROOT}/") and rel.endswith(neighbours.LISTING):
            try:  # a neighbour block: every shard file its listing names
                n = len(json.loads(run.path(rel).read_text())["shards"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            folder = Path(rel).parent
            out += [str(folder / neighbours.shard_file(Path(""), i, c)) for i in range(n) for c in neighbours.COLUMNS]
    return out


def output_sizes(run: Run, outputs: list[str]) -> dict[str, int]:
    """Byte size of every output (and listed key shard) as the stage leaves it: the completeness record."""
    return {rel: run.path(rel).stat().st_size for rel in _with_shards(run, outputs) if run.path(rel).is_file()}


def output_problem(run: Run, rel: str, sizes: dict[str, int] | None) -> str | None:
    """Why output `rel` (and, for keys/shards.json, each listed shard) cannot be trusted, or None."""
    if not run.path(rel).exists():
        return "is missing"
    for part in _with_shards(run, [rel]):
        path = run.path(part)
        if not path.is_file():
            return f"lists {part}, which is missing"
        if sizes and part in sizes and path.stat().st_size != sizes[part]:
            return f"{'' if part == rel else f'({part}) '}has {path.stat().st_size:,} bytes, {sizes[part]:,} when written"
        if problem := artifact_problem(path):
            return f"{'' if part == rel else f'({part}) '}is {problem}"
    return None


def artifact_problem(path: Path) -> str | None:
    """Why a finished file is incomplete by its own framing, or None: .npy data vs its header's shape,
    .npz / zip central directory, .json parse, .duckdb open with its tables."""
    try:
        if path.suffix == ".npy":
            return npy_problem(path)
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                return None if z.namelist() else "an empty archive"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".duckdb":
            return duckdb_problem(path)
        elif path.stat().st_size == 0:
            return "empty"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        return f"truncated or corrupt ({type(err).__name__})"
    return None


def npy_problem(path: Path) -> str | None:
    """Whether an .npy file holds exactly the bytes its header announces (a killed write holds fewer)."""
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        if dtype.hasobject:
            return None
        expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    return None if size == expected else f"truncated ({size:,} bytes, its header describes {expected:,})"


def duckdb_problem(path: Path) -> str | None:
    """Whether a run database opens read-only and every data block of every table in it can be read."""
    import duckdb

    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as err:
        return f"unreadable ({str(err).splitlines()[0][:120]})"
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_type = 'BASE TABLE'").fetchall()]
        if "run" not in tables:
            return "without its run table"
        for t in tables:
            con.execute(f'SELECT sum(hash(COLUMNS(*))) FROM "{t}"').fetchall()  # count(*) reads no data block
    except duckdb.Error as err:
        return f"garbled ({str(err).splitlines()[0][:120]})"
    finally:
        con.close()
    return None


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
        """Whether shard i is finished: present and whole (a truncated one is deleted, to be redone)."""
        path = self.path(i)
        if not path.exists():
            return False
        if artifact_problem(path) is None:
            return True
        path.unlink(missing_ok=True)
        return False

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
    """Whether a fault spec "<stage>[:<n>]" (or several, comma-separated) fires after `saved` shards of `stage`."""
    for one in filter(None, spec.split(",")):
        name, _, count = one.partition(":")
        if name == stage and saved >= int(count or 1):
            return True
    return False


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
