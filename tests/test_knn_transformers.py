"""Tests of precompute/knn_transformers/ against an independent writer of knn-transformers' format.

The writer below re-implements, in plain numpy / torch / faiss, what neulab/knn-transformers (commit
5b370d2) does: `run_clm.py`'s `group_texts` (lines tokenized and concatenated per `datasets.map` batch,
the remainder past a multiple of block_size dropped, sliding windows of block_size advancing by
stride, labels of already scored tokens set to -100), `KNNSaver.post_forward_hook` (keys = input of
the last block's MLP at [:, :-1], values = labels[:, 1:] where not -100, raw fp16 / int32 memmaps) and
`KNNSaver.build_index` (IndexIVFPQ(IndexFlatL2(d), d, nlist, M, 8), add_with_ids(arange)), with a tiny
random GPT-2 and small nlist / M. Every bad case is refused with a one-line error before anything is
written; export of the session's tiny run is read back the way knnlm.py reads it.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import transformers
from conftest import REPO, TINY_RUN_CONFIG, make_tiny_model

from knnlm_core.corpus import load_tokenizer, tokenize_file
from knnlm_core.keystore import open_keys as open_run_keys
from knnlm_core.model import load_model
from precompute import knn_transformers as kt

SOURCE = REPO / "data/corpora/wikitext2-valid.raw.gz"
OTHER_SOURCE = REPO / "data/corpora/wikitext2-test.raw.gz"
N_LINES = 40  # corpus lines the writer reads (~3.6k GPT-2 tokens)
LIMIT = 6000  # tokens of the corpus the check tokenizes (more than the writer used)
BLOCK, STRIDE = 128, 64  # the tiny model's n_positions; the project's default stride = max_context // 2


# ---------------------------------------------------------------- the independent writer

def corpus_lines(path: Path, n: int = N_LINES) -> list[str]:
    return gzip.open(path, "rt", encoding="utf-8").read().splitlines(keepends=True)[:n]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes and faiss k-means run fastest single-threaded on a shared machine."""
    threads, omp = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(omp)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A corpus file of the first 80 lines of WikiText-2 valid (the writer reads the first 40)."""
    path = tmp_path_factory.mktemp("corpus") / "valid-head.txt"
    path.write_text("".join(corpus_lines(SOURCE, 2 * N_LINES)), encoding="utf-8")
    return path


def group_texts(ids: list[int], block: int, stride: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """run_clm.py's group_texts for one map batch: (input_ids, labels), each (W, block)."""
    total = len(ids)
    if total >= block:
        total = (total // block) * block
    inputs, labels = [], []
    for i in range(0, total, stride):
        begin, end = max(i + stride - block, 0), min(i + stride, total)
        trg = end - i
        cur = list(ids[begin:end])
        lab = list(cur)
        lab[:-trg] = [-100] * (len(lab) - trg)
        if len(cur) < block:
            cur += [pad] * (block - len(cur))
            lab += [-100] * (block - len(lab))
        inputs.append(cur)
        labels.append(lab)
    return np.array(inputs, dtype=np.int64), np.array(labels, dtype=np.int64)


def peer_rows(model_dir: Path, lines: list[str], block: int, stride: int, group_lines: int):
    """(keys (N, d) float16, values (N,) int32) as KNNSaver saves them over the Trainer's evaluation."""
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(model_dir))
    model = transformers.GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    # The Trainer also passes labels through the LM head and loss; keys do not depend on them: body only.
    captured = []
    hook = model.transformer.h[-1].mlp.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    keys, values = [], []
    with torch.no_grad():
        for g in range(0, len(lines), group_lines):  # datasets.map(batched=True) batches
            ids = [t for row in tok(lines[g:g + group_lines])["input_ids"] for t in row]
            x, lab = group_texts(ids, block, stride, tok.eos_token_id)
            for b in range(0, len(x), 4):  # per_device_eval_batch_size 4
                xb, lb = torch.from_numpy(x[b:b + 4]), torch.from_numpy(lab[b:b + 4])
                model.transformer(input_ids=xb, attention_mask=torch.ones_like(xb))
                k = captured[-1][:, :-1].flatten(0, 1)
                v = lb[:, 1:].flatten(0, 1)
                keys.append(k[v != -100].numpy().astype(np.float16))
                values.append(v[v != -100].numpy().astype(np.int32))
    hook.remove()
    return np.concatenate(keys), np.concatenate(values)


def write_peer(folder: Path, keys: np.ndarray, values: np.ndarray, model_type: str = "gpt2",
               index: bool = True, with_keys: bool = True, shards: int = 1) -> Path:
    """Raw memmaps and the IVFPQ index exactly as knnlm.py names and writes them."""
    n, d = keys.shape
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"dstore_{model_type}_{n}_{d}"
    if with_keys:
        mk = np.memmap(f"{prefix}_keys.npy", dtype=np.float16, mode="w+", shape=(n, d))
        mk[:] = keys
        mk.flush()
    mv = np.memmap(f"{prefix}_vals.npy", dtype=np.int32, mode="w+", shape=(n, 1))
    mv[:] = values[:, None]
    mv.flush()
    if index:
        trained = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, 8, 8, 8)
        np.random.seed(1)
        sample = np.random.choice(np.arange(n), size=min(1000000, n), replace=False)
        trained.train(keys[sample].astype(np.float32))
        name = folder / f"index_{model_type}_{n}_{d}.indexed"
        bounds = np.linspace(0, n, shards + 1).astype(int)
        for s in range(shards):  # a fork's shards: each file holds its rows with ids 0..n_s-1
            part = faiss.clone_index(trained)
            lo, hi = bounds[s], bounds[s + 1]
            local = np.arange(lo, hi) - (lo if shards > 1 else 0)
            part.add_with_ids(keys[lo:hi].astype(np.float32), local)
            faiss.write_index(part, str(name) + (f".{s}" if shards > 1 else ""))
    return folder


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def lines() -> list[str]:
    return corpus_lines(SOURCE)


@pytest.fixture(scope="module")
def rows_a(tiny_model, lines):
    """The peer's rows from the session's tiny model, one map batch, windows 128 / 64."""
    return peer_rows(tiny_model, lines, BLOCK, STRIDE, group_lines=1000)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model))


@pytest.fixture(scope="module")
def stream(tiny_model, corpus) -> np.ndarray:
    return tokenize_file(corpus, load_tokenizer(str(tiny_model)), LIMIT)


@pytest.fixture(scope="module")
def vocab(tiny_model) -> int:
    return len(load_tokenizer(str(tiny_model)))


@pytest.fixture(scope="module")
def good(tmp_path_factory, rows_a) -> Path:
    return write_peer(tmp_path_factory.mktemp("peer") / "good", *rows_a)


def snapshot(folder: Path) -> dict:
    """Name -> (size, mtime_ns) of every file under `folder` (to show nothing was written)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check(folder: Path, lm, vocab, stream, **kw):
    return kt.check_datastore(kt.find_datastore(folder), lm, vocab, stream, "wikitext2-valid", sample=48, **kw)


def refused(folder: Path, lm, vocab, stream, match: str, **kw) -> str:
    """The check refuses `folder` with a one-line error containing `match`, writing nothing."""
    before = snapshot(folder.parent)
    with pytest.raises(kt.DatastoreError, match=match) as err:
        check(folder, lm, vocab, stream, **kw)
    assert "\n" not in str(err.value)
    assert snapshot(folder.parent) == before
    return str(err.value)


def variant(good: Path, tmp_path: Path, name: str = "ds") -> Path:
    dst = tmp_path / name
    shutil.copytree(good, dst)
    return dst


# ---------------------------------------------------------------- the datastore belongs to the model

def test_writer_is_the_peers_datastore(rows_a, stream):
    """Sanity of the writer itself: one row per token but the first, value = next token of the stream."""
    keys, values = rows_a
    n = len(values)
    assert keys.dtype == np.float16 and values.dtype == np.int32 and keys.shape == (n, 64)
    assert np.array_equal(values, stream[1:n + 1])
    assert (values > 32767).any()  # the int16 case below is a real one


def test_good_datastore_passes_every_check(good, lm, vocab, stream, rows_a):
    report, index = check(good, lm, vocab, stream)
    n = len(rows_a[1])
    assert (report.size, report.dim, report.has_keys, report.segments) == (n, 64, True, 1)
    assert report.rule == "contiguous: values[i] == stream[i + 1]"
    assert report.keys["method"] == "stored keys" and report.keys["share_ok"] == 1.0
    assert report.keys["worst"] < 2e-3  # fp16 storage: about 5e-4 relative
    assert index.ntotal == n
    assert np.array_equal(report.alignment.key_positions(np.arange(n)), np.arange(n))  # row i's key at pos i
    assert "alignment" not in report.to_dict()


def test_files_are_memory_mapped_where_they_lie(good):
    ds = kt.find_datastore(good)
    values, keys = kt.open_values(ds), kt.open_keys(ds)
    assert isinstance(keys, np.memmap) and Path(keys.filename) == ds.keys_path.resolve()
    assert np.shares_memory(values, values.base) and Path(values.base.filename) == ds.values_path.resolve()


def test_keys_absent_self_retrieval(good, tmp_path, lm, vocab, stream):
    folder = variant(good, tmp_path)
    next(folder.glob("*_keys.npy")).unlink()
    report, _ = check(folder, lm, vocab, stream)
    assert report.keys["method"] == "index self-retrieval" and report.keys["share_ok"] >= kt.SELF_SHARE


def test_block_grouping_rule(tmp_path, tiny_model, lines, lm, vocab, stream):
    """stride == block_size (HF's own group_texts): each block's first token has no key; found and named."""
    keys, values = peer_rows(tiny_model, lines, BLOCK, BLOCK, group_lines=1000)
    report, _ = check(write_peer(tmp_path / "blocks", keys, values, index=False), lm, vocab, stream)
    assert report.rule.startswith("blocks of 128 tokens") and report.keys["share_ok"] == 1.0
    i = np.arange(len(values))  # the rule, recomputed independently
    assert np.array_equal(values, stream[1 + (i // 127) * 128 + i % 127])


def test_map_batch_groups_rule(tmp_path, tiny_model, lines, lm, vocab, stream):
    """Groups of lines with their remainders dropped (run_clm.py's map batches): segments, keys still match."""
    keys, values = peer_rows(tiny_model, lines, BLOCK, STRIDE, group_lines=10)
    report, _ = check(write_peer(tmp_path / "groups", keys, values, index=False), lm, vocab, stream)
    assert report.segments == 4 and report.skipped_tokens > 0 and report.keys["share_ok"] == 1.0
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(tiny_model))
    expected, start = [], 0  # key positions from the groups' own token counts
    for g in range(0, len(lines), 10):
        n = sum(len(r) for r in tok(lines[g:g + 10])["input_ids"])
        kept = (n // BLOCK) * BLOCK if n >= BLOCK else n
        expected.append(np.arange(start, start + kept - 1))
        start += n
    positions = kt.align(values, stream).key_positions(np.arange(len(values)))
    assert np.array_equal(positions, np.concatenate(expected))


def test_sharded_index_with_shard_local_ids(good, tmp_path, rows_a, lm, vocab, stream):
    keys, values = rows_a
    folder = write_peer(tmp_path / "sharded", keys, values, with_keys=False, shards=3)
    assert len(kt.find_datastore(folder).index_paths) == 3
    report, index = check(folder, lm, vocab, stream)
    assert report.keys["share_ok"] >= kt.SELF_SHARE
    single = faiss.read_index(str(next(good.glob("*.indexed"))))  # same trained quantizer, one file
    single.nprobe = 32
    q = keys[:20].astype(np.float32)
    assert np.array_equal(index.search(q, 5)[1], single.search(q, 5)[1])


# ---------------------------------------------------------------- bad cases, each refused before writing

def test_size_not_matching_the_name(good, tmp_path, lm, vocab, stream):
    folder = variant(good, tmp_path)
    n = kt.find_datastore(folder).size
    for p in folder.iterdir():
        p.rename(folder / p.name.replace(f"_{n}_", f"_{n + 7}_"))
    msg = refused(folder, lm, vocab, stream, "its name says")
    assert f"holds exactly {n:,} rows" in msg


def test_truncated_keys(good, tmp_path, lm, vocab, stream):
    folder = variant(good, tmp_path)
    path = next(folder.glob("*_keys.npy"))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    refused(folder, lm, vocab, stream, "truncated")


def test_int16_overflowed_values(good, tmp_path, lm, vocab, stream):
    folder = variant(good, tmp_path)
    ds = kt.find_datastore(folder)
    vals = np.memmap(ds.values_path, dtype=np.int32, mode="r+", shape=(ds.size, 1))
    vals[:] = vals.astype(np.int16).astype(np.int32)  # what an int16 writer read back as int32 gives
    vals.flush()
    del vals
    refused(folder, lm, vocab, stream, "overflowed int16")


def test_values_beyond_the_vocabulary(good, tmp_path, lm, vocab, stream):
    folder = variant(good, tmp_path)
    ds = kt.find_datastore(folder)
    vals = np.memmap(ds.values_path, dtype=np.int32, mode="r+", shape=(ds.size, 1))
    vals[5] = vocab
    vals.flush()
    del vals
    refused(folder, lm, vocab, stream, "1 too large")


@pytest.mark.parametrize("what", ["dimension", "size"])
def test_index_of_another_dimension_or_size(good, tmp_path, rows_a, lm, vocab, stream, what):
    folder = variant(good, tmp_path)
    keys = rows_a[0]
    path = next(folder.glob("*.indexed"))
    other = keys[:, :32] if what == "dimension" else keys[:-10]
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(other.shape[1]), other.shape[1], 8, 8, 8)
    index.train(other.astype(np.float32))
    index.add_with_ids(other.astype(np.float32), np.arange(len(other)))
    faiss.write_index(index, str(path))
    refused(folder, lm, vocab, stream, "index dimension 32" if what == "dimension" else r"holds [0-9,]+ entries, the datastore")


def test_keys_from_another_model(tmp_path, lines, lm, vocab, stream):
    other = make_tiny_model(tmp_path / "other-model", seed=1)
    folder = write_peer(tmp_path / "other", *peer_rows(other, lines, BLOCK, STRIDE, 1000))
    msg = refused(folder, lm, vocab, stream, "do not belong to this model: 0% of 48")
    assert "median relative key difference" in msg
    next(folder.glob("*_keys.npy")).unlink()  # without keys: the index decides
    refused(folder, lm, vocab, stream, "do not belong to this model")


def test_values_from_another_text(tmp_path, tiny_model, lm, vocab, stream):
    folder = write_peer(tmp_path / "text", *peer_rows(tiny_model, corpus_lines(OTHER_SOURCE), BLOCK, STRIDE, 1000))
    refused(folder, lm, vocab, stream, "occur nowhere in the [0-9,]+-token stream")


def test_model_type_in_the_name(good, tmp_path, lm, vocab, stream):
    folder = variant(good, tmp_path)
    for p in folder.iterdir():
        p.rename(folder / p.name.replace("_gpt2_", "_llama_"))
    refused(folder, lm, vocab, stream, "name model type 'llama'")


# ---------------------------------------------------------------- CLI and export round trip

def test_cli_check_exit_codes(good, tmp_path, tiny_model, corpus, capsys):
    args = ["check", "--dir", str(good), "--model", str(tiny_model), "--corpus", str(corpus),
            "--limit-tokens", str(LIMIT), "--sample", "16"]
    assert kt.main([*args, "--json", str(tmp_path / "r.json")]) == 0
    assert "contiguous" in capsys.readouterr().out and (tmp_path / "r.json").exists()
    bad = variant(good, tmp_path, "bad")
    next(bad.glob("*_vals.npy")).write_bytes(b"\0" * 12)
    assert kt.main(["check", "--dir", str(bad), "--model", str(tiny_model), "--corpus", str(corpus),
                    "--json", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "bad.json").exists()


def test_export_round_trip(tiny_run, tiny_model, tmp_path, lm, vocab, capsys):
    out = tmp_path / "exported"
    assert kt.main(["export", "--run-dir", str(tiny_run), "--out", str(out)]) == 0
    assert "copied" in capsys.readouterr().out
    run_keys, run_vals = open_run_keys(tiny_run), np.load(tiny_run / "values.npy")
    n, d = run_keys.shape
    prefix = out / f"dstore_gpt2_{n}_{d}"
    peer_keys = np.memmap(f"{prefix}_keys.npy", dtype=np.float16, mode="r", shape=(n, d))  # as knnlm.py reads
    peer_vals = np.memmap(f"{prefix}_vals.npy", dtype=np.int32, mode="r", shape=(n, 1))
    assert np.array_equal(peer_keys, run_keys[:]) and np.array_equal(peer_vals[:, 0], run_vals)
    index = faiss.read_index(str(out / f"index_gpt2_{n}_{d}.indexed"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    index.nprobe = 32
    index.make_direct_map()
    assert index.ntotal == n and index.d == d
    _, ids = index.search(peer_keys[:50].astype(np.float32), 1)
    assert (ids[:, 0] == np.arange(50)).mean() > 0.5
    head = tmp_path / "head.txt"  # lines are tokenized one by one: the file's head gives the stream's head
    head.write_text("".join(corpus_lines(Path(TINY_RUN_CONFIG["datastore_corpus"]), 200)), encoding="utf-8")
    ds_stream = tokenize_file(head, load_tokenizer(str(tiny_model)), TINY_RUN_CONFIG["datastore_limit_tokens"])
    assert len(ds_stream) == n + 1
    report, _ = kt.check_datastore(kt.find_datastore(out), lm, vocab, ds_stream, sample=16)
    assert report.rule == "contiguous: values[i] == stream[i + 1]" and report.keys["share_ok"] == 1.0
    # nothing written on failure: the folder now exists and is not empty
    assert kt.main(["export", "--run-dir", str(tiny_run), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert kt.main(["export", "--run-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp*"))


def test_export_rebuilds_an_index_the_peer_cannot_load(tmp_path):
    """A run whose index is no IndexIVFPQ (here Flat) gets one trained with the peer's recipe, ids = arange."""
    run, n, d = tmp_path / "run", 1200, 16
    (run / "keys").mkdir(parents=True)  # a run in SPEC §7's layout: two key shards, values.npy, index.faiss
    keys = np.random.default_rng(0).standard_normal((n, d)).astype(np.float16)
    np.save(run / "keys" / "shard_00000.npy", keys[:700])
    np.save(run / "keys" / "shard_00001.npy", keys[700:])
    (run / "keys" / "shards.json").write_text(json.dumps(
        {"n": n, "d": d, "shards": [{"file": "shard_00000.npy", "rows": 700}, {"file": "shard_00001.npy", "rows": 500}]}))
    np.save(run / "values.npy", np.arange(n, dtype=np.int32) % 97)
    (run / "manifest.json").write_text(json.dumps({"model_type": "gpt2", "n_entries": n, "key_dim": d}))
    flat = faiss.IndexFlatL2(d)
    flat.add(keys.astype(np.float32))
    faiss.write_index(flat, str(run / "index.faiss"))
    info = kt.export_run(run, tmp_path / "out", nlist=4, m=4)
    assert "IndexIVFPQ(IndexFlatL2(16), 16, 4, 4, 8) trained anew" in info["index"]
    out = tmp_path / "out"
    index = faiss.read_index(str(out / f"index_gpt2_{n}_{d}.indexed"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    assert isinstance(index, faiss.IndexIVFPQ) and index.ntotal == n
    assert np.array_equal(np.sort(kt.index_ids(index)), np.arange(n))
    peer_keys = np.memmap(out / f"dstore_gpt2_{n}_{d}_keys.npy", dtype=np.float16, mode="r", shape=(n, d))
    peer_vals = np.memmap(out / f"dstore_gpt2_{n}_{d}_vals.npy", dtype=np.int32, mode="r", shape=(n, 1))
    assert np.array_equal(peer_keys, keys) and np.array_equal(peer_vals[:, 0], np.arange(n) % 97)
