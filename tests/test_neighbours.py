"""Tests of knnlm_core/neighbours.py (the SPEC §7 neighbour block) and of searching once.

Unit: shards written and read back across shard boundaries, a truncated or missing shard refused
with one line, the runner's output check seeing a truncated shard. Pipeline: a full build with a
validation corpus, both whitenings and exact search searches every query of every split once per
index (counted), and the blocks equal a fresh `index.search` of the same queries.
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from conftest import MITIGATIONS, build_tiny_run

from knnlm_core import neighbours, whiten
from knnlm_core.neighbours import BlockError


def random_block(rng, t: int, k: int) -> dict[str, np.ndarray]:
    ids = rng.integers(-1, 1000, (t, k))
    return {"ids": ids, "values": np.where(ids < 0, -1, ids % 50), "dist_pq": rng.random((t, k)),
            "dist_exact": rng.random((t, k))}


def write(folder, arrays, ranges):
    for i, (lo, hi) in enumerate(ranges):
        neighbours.write_shard(folder, i, lo, **{n: a[lo:hi] for n, a in arrays.items()})
    neighbours.finish(folder, ranges, arrays["ids"].shape[1])


def test_rows_across_shards_equal_the_arrays(tmp_path):
    arrays = random_block(np.random.default_rng(0), 250, 7)
    ranges = [(0, 100), (100, 200), (200, 250)]
    folder = tmp_path / "eval-plain"
    folder.mkdir()
    write(folder, arrays, ranges)
    block = neighbours.open_block(folder)
    assert (block.n_rows, block.k) == (250, 7)
    for name, want in arrays.items():
        got = block.rows(name, 0, 250)
        assert got.dtype == neighbours.COLUMNS[name]
        np.testing.assert_array_equal(got, want.astype(got.dtype))
        np.testing.assert_array_equal(block.rows(name, 95, 205, cols=3), want[95:205, :3].astype(got.dtype))
        np.testing.assert_array_equal(block.column(name)[150:160], want[150:160].astype(got.dtype))
    # each shard file alone reads with numpy.load(mmap_mode="r") (SPEC §7)
    assert np.load(neighbours.shard_file(folder, 1, "ids"), mmap_mode="r").shape == (100, 7)
    assert block.row_ranges(64) == [(0, 64), (64, 100), (100, 164), (164, 200), (200, 250)]


@pytest.mark.parametrize("damage", ["truncate", "delete", "marker"])
def test_a_damaged_shard_is_refused_in_one_line(tmp_path, damage):
    arrays = random_block(np.random.default_rng(1), 60, 4)
    folder = tmp_path / "valid-zipfian"
    folder.mkdir()
    write(folder, arrays, [(0, 30), (30, 60)])
    target = neighbours.shard_file(folder, 1, "dist_exact")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-40])
    elif damage == "delete":
        target.unlink()
    else:
        neighbours.shard_marker(folder, 1).write_text(json.dumps({"lo": 30, "hi": 59}))
    assert not neighbours.shard_done(folder, 1, 30, 60, 4)
    with pytest.raises(BlockError, match="shard 1 .*rerun precompute") as err:
        neighbours.open_block(folder)
    assert "\n" not in str(err.value)
    with pytest.raises(BlockError, match="shard 1"):
        neighbours.finish(folder, [(0, 30), (30, 60)], 4)


def test_no_listing_is_refused(tmp_path):
    with pytest.raises(BlockError, match="no readable block.json"):
        neighbours.open_block(tmp_path)
    assert neighbours.find_block(tmp_path, "eval", "plain") is None


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory, tiny_model):
    """A full build (validation corpus, both whitenings, exact search) with every index search counted."""
    import precompute.search

    searched: list[tuple[int, int]] = []  # (rows, index.ntotal) per call of the one search function
    original = precompute.search.search_into

    def counting(index, q, k, dists, ids):
        searched.append((len(q), index.ntotal))
        return original(index, q, k, dists, ids)

    mp = pytest.MonkeyPatch()
    mp.setattr(precompute.search, "search_into", counting)
    try:
        run = build_tiny_run(tmp_path_factory.mktemp("counted") / "run", tiny_model, exact_search="on", **MITIGATIONS)
    finally:
        mp.undo()
    return run, searched


def test_each_index_is_searched_once_per_query(counted_run):
    run, searched = counted_run
    n_eval = len(np.load(run / "eval_ids.npy")) - 1
    n_valid = len(np.load(run / "valid_ids.npy")) - 1
    n_indexes = 3  # plain, zipfian, entries
    assert sum(rows for rows, _ in searched) == n_indexes * (n_eval + n_valid)
    blocks = sorted(p.name for p in (run / neighbours.ROOT).iterdir())
    assert blocks == ["eval-entries", "eval-exact", "eval-plain", "eval-zipfian", "valid-entries", "valid-plain",
                      "valid-zipfian"]


def test_blocks_equal_a_fresh_search(counted_run):
    run, _ = counted_run
    cfg = json.loads((run / "run_config.json").read_text())
    values = np.load(run / "values.npy")
    for split, q_file in (("eval", "queries.npy"), ("valid", "valid_queries.npy")):
        queries = np.load(run / q_file).astype(np.float32)
        for name in ("plain", "zipfian", "entries"):
            index = faiss.read_index(str(run / ("index.faiss" if name == "plain" else f"index_{name}.faiss")))
            faiss.extract_index_ivf(index).nprobe = cfg["nprobe"]
            q = queries if name == "plain" else whiten.Whitening.load(run / f"whiten_{name}.npz").apply(queries)
            dist, ids = index.search(q, cfg["k"])
            block = neighbours.open_block(neighbours.block_dir(run, split, name))
            got_ids, got_d = block.rows("ids"), block.rows("dist_pq")
            swapped = got_ids != ids  # near-ties may swap between batch sizes: then the distances agree
            assert swapped.mean() < 0.01, (split, name)
            np.testing.assert_allclose(got_d[swapped], dist[swapped], rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(block.rows("values"), np.where(got_ids < 0, -1, values[got_ids]))


def test_a_truncated_block_shard_rebuilds_the_search(counted_run, tiny_model, capsys):
    run, _ = counted_run
    shard = neighbours.shard_file(neighbours.block_dir(run, "valid", "entries"), 0, "dist_pq")
    shard.write_bytes(shard.read_bytes()[:-100])
    build_tiny_run(run, tiny_model, exact_search="on", **MITIGATIONS)
    said = capsys.readouterr()
    log = said.out + said.err
    assert "[search] output" in log and "rebuilding the stage" in log and "[index] up to date" in log
    assert "499/499" in log  # only the damaged shard is searched again (search.npz of this key is kept)
    assert neighbours.open_block(neighbours.block_dir(run, "valid", "entries")).n_rows > 0
