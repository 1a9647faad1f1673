"""Deterministic recomputation (SPEC §1): a key, query or p_LM computed again is bit-identical.

The datastore and LM stages run on tiny random models built here (GPT-2, and Llama, whose
SiLU is one of the ops where torch's vectorised and scalar paths differ in the last bit)
over a tiny random corpus. Keys are rebuilt 20 times after deleting them, or after deleting
one shard (a resume), under other shard sizes and thread counts and after other torch and
faiss work changed the thread settings; every rebuild must equal the first to the bit.
Before the extraction ran each op single-threaded with whole batches per thread, the Llama
keys and p_LM changed at 3 threads (chunk tails of SiLU took the scalar path).
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace

import faiss
import numpy as np
import pytest
import torch
from families import build_model

from knnlm_core.config import RunConfig
from knnlm_core.keystore import SHARD_DIR, SHARD_LIST, open_keys
from knnlm_core.model import wrap_model
from precompute.runner import Run, load_npz, save_npy
from precompute.stages.datastore import stage_datastore
from precompute.stages.eval_lm import stage_lm

N_TOKENS = 2500
CONTEXT, STRIDE = 128, 64
SHARD_SIZES = (1100, 256, 5000)  # shards of three and two batches, of one batch each, one shard
THREADS = (2, 1, 3)
REBUILDS = 20


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    return wrap_model(build_model(request.param).eval())


def scratch_run(tmp_path, lm, shard_size: int, threads: int) -> Run:
    """A run directory with a tiny random corpus as both datastore and evaluation text."""
    cfg = replace(RunConfig(), batch_size=8, threads=threads, shard_size=shard_size, lm_top=4)
    run = Run(cfg=cfg, run_dir=tmp_path, run_name="determinism", _lm=lm,
              info={"max_context": CONTEXT, "stride": STRIDE, "dim": lm.dim, "device": "cpu"})
    ids = np.random.default_rng(0).integers(0, lm.model.config.vocab_size, N_TOKENS).astype(np.int32)
    for name in ("datastore_ids.npy", "eval_ids.npy"):
        if not run.path(name).exists():
            save_npy(run.path(name), ids)
    return run


def other_torch_work(threads: int) -> None:
    """What earlier code may leave behind: other thread settings, a warm intra-op pool, another thread's ops."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(1)  # shares OpenMP's setting with torch on this stack
    a = torch.randn(300, 300)
    worker = threading.Thread(target=lambda: torch.nn.functional.silu(a @ a).sum())
    worker.start()
    worker.join()
    torch.nn.functional.gelu(a @ a)


def build_keys(tmp_path, lm, shard_size: int, threads: int, resume: bool = False) -> np.ndarray:
    """The datastore stage's keys after deleting them (or, with `resume`, one shard and the shard list)."""
    run = scratch_run(tmp_path, lm, shard_size, threads)
    if resume:
        shards = sorted(run.path(SHARD_DIR).glob("shard_*.npy"))
        shards[len(shards) // 2].unlink()
        run.path(SHARD_DIR).joinpath(SHARD_LIST).unlink()
    else:
        shutil.rmtree(run.path(SHARD_DIR), ignore_errors=True)
    stage_datastore(run, f"key-{shard_size}")  # the pipeline's key changes with the shard size
    return np.array(open_keys(tmp_path)[:])


def test_rebuilt_keys_are_bit_identical(tmp_path, lm):
    torch.set_num_threads(2)
    first = build_keys(tmp_path, lm, SHARD_SIZES[0], THREADS[0])
    assert first.shape == (N_TOKENS - 1, lm.dim) and np.isfinite(first.astype(np.float32)).all()
    for i in range(REBUILDS):
        shard_size, threads = SHARD_SIZES[i % 3], THREADS[(i // 3) % 3]
        resume = i % 3 == 0 and i > 0  # same shard size as the build before: a shard lost, the rest kept
        if i % 2:
            other_torch_work(threads=4 - threads)
        setting = torch.get_num_threads()
        keys = build_keys(tmp_path, lm, shard_size, threads, resume)
        assert torch.get_num_threads() == setting  # the extraction hands the thread setting back
        changed = (keys.view(np.uint16) != first.view(np.uint16)).any(1)
        assert not changed.any(), (f"rebuild {i} (shard size {shard_size}, {threads} threads, resume {resume}): "
                                   f"{changed.sum()} keys differ, first at position {np.flatnonzero(changed)[0]}")
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)


def lm_outputs(tmp_path, lm, shard_size: int, threads: int) -> dict[str, np.ndarray]:
    """Queries, p_LM, LM top-k and entropy of the evaluation stage, computed from scratch."""
    run = scratch_run(tmp_path, lm, shard_size, threads)
    stage_lm(run, f"key-{shard_size}")
    return {"queries": np.load(run.path("queries.npy")), "entropy": np.load(run.path("eval_entropy.npy")),
            **load_npz(run.path("eval_lm.npz"))}


def test_recomputed_queries_and_p_lm_are_bit_identical(tmp_path, lm):
    first = lm_outputs(tmp_path, lm, SHARD_SIZES[0], THREADS[0])
    assert np.isfinite(first["p_lm"]).all() and (first["p_lm"] > 0).all()
    for shard_size, threads in zip(SHARD_SIZES[1:], THREADS[1:], strict=True):
        other_torch_work(threads=4 - threads)
        again = lm_outputs(tmp_path, lm, shard_size, threads)
        for name, want in first.items():
            assert again[name].tobytes() == want.tobytes(), f"{name} differs at {threads} threads, shards {shard_size}"
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
