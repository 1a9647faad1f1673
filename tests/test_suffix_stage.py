"""The suffix stage (SPEC §12) on a run directory holding real WikiText-2 token streams: its columns
equal the library's on a freshly built suffix array, a killed build or query phase resumes, and a
truncated or corrupt suffix array is refused with one line naming the file and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RUN_CONFIG, TOKENIZER_DIR

from knnlm_core import infgram as ig
from knnlm_core.config import RunConfig
from knnlm_core.corpus import load_tokenizer, read_text, tokenize_text
from precompute.runner import FAULT_ENV, Run, RunError, run_stage
from precompute.stages import suffix
from precompute.stages.suffix import OUTPUTS, SA_FILE, SA_META, stage_suffix

SHARD = 128  # positions per shard: four shards of evaluation positions


def head_ids(corpus: str, n: int) -> np.ndarray:
    """The first n tokens of a shipped corpus (tokenizing its first characters only: fast)."""
    ids = tokenize_text(read_text(Path(corpus))[: 8 * n], load_tokenizer(str(TOKENIZER_DIR)))
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="module")
def streams() -> dict[str, np.ndarray]:
    return {"datastore_ids.npy": head_ids(TINY_RUN_CONFIG["datastore_corpus"], 6000),
            "eval_ids.npy": head_ids(TINY_RUN_CONFIG["eval_corpus"], 500),
            "valid_ids.npy": head_ids(TINY_RUN_CONFIG["datastore_corpus"], 300)}  # a stretch of D itself


def make_run(run_dir: Path, streams: dict, valid: bool = False) -> Run:
    run_dir.mkdir(exist_ok=True)
    for name, ids in streams.items():
        if name != "valid_ids.npy" or valid:
            np.save(run_dir / name, ids)
    cfg = RunConfig(shard_size=SHARD, valid_corpus=TINY_RUN_CONFIG["datastore_corpus"] if valid else "")
    return Run(cfg, run_dir, run_dir.name)


def build(run: Run, max_len: int = ig.MAX_LEN) -> dict[str, np.ndarray]:
    run_stage(run, "suffix", {"max_len": max_len}, OUTPUTS, lambda key: stage_suffix(run, key, max_len))
    with np.load(run.path("infgram.npz")) as data:
        return {k: data[k] for k in data.files}


def test_columns_equal_the_library_on_every_position(tmp_path, streams):
    run = make_run(tmp_path / "run", streams, valid=True)
    got = build(run)
    ids_d = streams["datastore_ids.npy"]
    sa = np.load(run.path(SA_FILE))  # the library's suffix array (test_infgram checks it against a sort)
    np.testing.assert_array_equal(sa, ig.build_suffix_array(ids_d))
    for prefix, name in (("", "eval_ids.npy"), ("valid_", "valid_ids.npy")):
        ids_e = streams[name]
        want = ig.infgram(ig.build_suffix_array(ids_d), ids_d, ids_e, np.arange(len(ids_e) - 1))
        for col in suffix.COLUMNS:
            np.testing.assert_array_equal(got[prefix + col], getattr(want, col))
    assert (got["ctx_match_len"] >= 4).any() and (got["valid_ctx_match_len"] == ig.MAX_LEN).any()  # valid ⊂ D
    meta = json.loads(run.path(SA_META).read_text())
    assert meta["n_tokens"] == len(ids_d) and meta["library"].startswith("pydivsufsort")


def test_an_unfinished_or_stale_build_is_rebuilt(tmp_path, streams):
    run = make_run(tmp_path / "run", streams)
    want = build(run)
    sa_good = np.load(run.path(SA_FILE))
    # killed inside np.save: a partial temporary file, no array, no sidecar
    run.path(SA_FILE).unlink()
    run.path(SA_META).unlink()
    leftover = run.path(f"{SA_FILE}.tmp4242.npy")
    leftover.write_bytes(b"\x93NUMPY partial")
    run2 = make_run(tmp_path / "run", streams)
    got = build(run2)
    assert not leftover.exists()
    np.testing.assert_array_equal(np.load(run.path(SA_FILE)), sa_good)
    # killed between the array and its sidecar: an array (here a wrong one) that no sidecar vouches for
    np.save(run.path(SA_FILE), np.zeros(len(sa_good), dtype=np.int32))
    run.path(SA_META).unlink()
    build(make_run(tmp_path / "run", streams))
    np.testing.assert_array_equal(np.load(run.path(SA_FILE)), sa_good)
    # another datastore stream: the old array is stale, not damaged
    other = {**streams, "datastore_ids.npy": streams["datastore_ids.npy"][:4000]}
    build(make_run(tmp_path / "run", other))
    assert json.loads(run.path(SA_META).read_text())["n_tokens"] == 4000 and len(np.load(run.path(SA_FILE))) == 4000
    for col in suffix.COLUMNS:
        np.testing.assert_array_equal(got[col], want[col])


def test_a_killed_query_phase_resumes_at_its_first_unfinished_shard(tmp_path, streams, monkeypatch):
    run_dir = tmp_path / "run"
    make_run(run_dir, streams)
    code = ("from pathlib import Path; import sys; sys.path.insert(0, 'tests'); "
            "from test_suffix_stage import make_run_from_disk, build; build(make_run_from_disk(Path(sys.argv[1])))")
    env = {**os.environ, FAULT_ENV: "suffix:1"}
    killed = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILLed right after the first shard
    assert run_dir.joinpath(SA_META).exists() and len(list(run_dir.glob("infgram.shards/shard_*.npz"))) == 1
    computed = []

    def no_rebuild(_ids):
        raise AssertionError("the finished suffix array was rebuilt")

    def counting(sa, ids_d, ids_e, positions, *args, **kwargs):
        computed.extend(positions.tolist())
        return ig.infgram(sa, ids_d, ids_e, positions, *args, **kwargs)

    monkeypatch.setattr(suffix, "build_suffix_array", no_rebuild)
    monkeypatch.setattr(suffix, "infgram", counting)
    got = build(make_run_from_disk(run_dir))
    n = len(streams["eval_ids.npy"]) - 1
    assert computed == list(range(SHARD, n))  # shard 0 was kept, nothing else was done twice
    assert not run_dir.joinpath("infgram.shards").exists()
    monkeypatch.undo()
    fresh = build(make_run(tmp_path / "fresh", streams))
    for col in suffix.COLUMNS:
        np.testing.assert_array_equal(got[col], fresh[col])


def make_run_from_disk(run_dir: Path) -> Run:
    """A Run over a directory that already holds its streams (the killed subprocess's view)."""
    return Run(RunConfig(shard_size=SHARD), run_dir, run_dir.name)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_suffix_array_is_refused_with_one_line(tmp_path, streams, damage):
    run = make_run(tmp_path / "run", streams)
    build(run)
    path = run.path(SA_FILE)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 100]))
    else:  # same size, a valid header, two suffixes swapped: only the checksum can tell
        sa = np.load(path)
        sa[[10, 20]] = sa[[20, 10]]
        np.save(path, sa)
    with pytest.raises(RunError) as err:  # truncated: the runner sees it and reruns the body; flipped: a new key
        build(run, max_len=16 if damage == "flip" else ig.MAX_LEN)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{SA_FILE} in {run.run_dir} is ")
    assert message.endswith(f"delete {SA_FILE} and rerun")
    assert ("truncated" if damage == "truncate" else "corrupt") in message
    path.unlink()  # the fix the message names works
    build(make_run(tmp_path / "run", streams), max_len=16)
    assert run.path("infgram.npz").exists()
