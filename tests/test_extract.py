"""Tests of precompute/extract.py and precompute/exact.py against independent references.

Keys and p_LM of the sharded, chunked, early-stopping extraction are compared with a plain
full forward pass of the HF model (hook on the FFN's own input, logits from
`model(...).logits`), for several families; the exact search with brute-force numpy. The
CUDA tests run only where a GPU exists and compare with the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import build_model as build_family

from knnlm_core.model import hook_module, wrap_model
from knnlm_core.windows import plan_windows
from precompute.exact import exact_knn, exact_knn_torch
from precompute.extract import LMOutputs, extract, owned_rows, shard_windows

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(model, ids: np.ndarray, windows) -> tuple[np.ndarray, np.ndarray]:
    """Keys (n, d) and p(target) (n,) from full HF forward passes, one window at a time."""
    module, _ = hook_module(model)
    keys, p = [], []
    seen = []
    handle = module.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        for w in windows:
            x = torch.from_numpy(ids[w.begin : w.end].astype(np.int64))[None]
            logits = model(input_ids=x).logits[0].float()  # (L, V)
            lo, hi = w.first_pos - w.begin, w.end - 1 - w.begin
            keys.append(seen[-1].reshape(1, x.shape[1], -1)[0, lo:hi].float().numpy())
            logp = torch.log_softmax(logits[lo:hi], -1)
            p.append(logp.gather(1, x[0, lo + 1 : hi + 1, None])[:, 0].exp().double().numpy())
    handle.remove()
    return np.concatenate(keys), np.concatenate(p)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "gpt_bigcode", "falcon", "opt", "llama", "qwen2", "gemma2", "olmo2", "mpt"])
def test_keys_and_p_lm_equal_plain_forward(family):
    model = build_family(family).eval()
    lm = wrap_model(model)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 300).astype(np.int32)
    windows = plan_windows(len(ids), 64, 32)
    want_keys, want_p = reference(model, ids, windows)
    n = len(ids) - 1
    keys = np.empty((n, lm.dim), np.float16)
    out = LMOutputs(np.empty(n), np.empty((n, 5), np.int32), np.empty((n, 5), np.float32))
    extract(lm, ids, windows, keys, batch_size=3, lm_out=out)
    np.testing.assert_allclose(keys.astype(np.float32), want_keys, rtol=1e-2, atol=2e-3)
    np.testing.assert_allclose(out.p_lm, want_p, rtol=1e-4, atol=1e-9)
    assert (out.top_p[:, 0] >= out.top_p[:, 1]).all() and (out.p_lm <= out.top_p[:, 0] + 1e-6).all()
    body_only = np.empty_like(keys)  # keys-only path: stops at the hook, no LM head
    extract(lm, ids, windows, body_only, batch_size=3)
    np.testing.assert_array_equal(body_only, keys)


def test_error_in_a_worker_reaches_the_caller_with_threads_restored():
    lm = wrap_model(build_family("gpt2").eval())
    ids = np.random.default_rng(0).integers(0, lm.model.config.vocab_size, 600).astype(np.int32)
    ids[400] = lm.model.config.vocab_size  # no such token: the embedding lookup of that batch fails
    windows = plan_windows(len(ids), 64, 32)
    torch.set_num_threads(2)
    with pytest.raises(IndexError):
        extract(lm, ids, windows, np.empty((len(ids) - 1, lm.dim), np.float16), batch_size=2, threads=3)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("shard_size", "batch_size"), [(100, 1), (100, 3), (250, 4), (40, 2), (10**6, 8)])
def test_shard_windows_are_whole_batches_partitioning_positions(shard_size, batch_size):
    windows = plan_windows(1000, 64, 32)
    groups = shard_windows(windows, shard_size, batch_size)
    assert [w for g in groups for w in g] == windows
    rows = [owned_rows(g) for g in groups]
    assert rows[0][0] == 0 and rows[-1][1] == 999
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    starts = np.cumsum([0] + [len(g) for g in groups[:-1]])
    assert all(s % batch_size == 0 for s in starts)  # shards begin on the batch grid: the run's own batches
    # each batch sits in the shard of its first position, [k * shard_size, (k + 1) * shard_size): one shard per k
    cells = [{g[a].first_pos // shard_size for a in range(0, len(g), batch_size)} for g in groups]
    assert all(len(c) == 1 for c in cells)
    assert len(groups) == len({windows[a].first_pos // shard_size for a in range(0, len(windows), batch_size)})
    most = max(sum(w.n_owned for w in windows[a : a + batch_size]) for a in range(0, len(windows), batch_size))
    assert all(hi - lo < shard_size + most for lo, hi in rows)


def brute_force_ids(q: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    d2 = ((q[:, None, :].astype(np.float64) - keys[None, :, :].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(d2, axis=1, kind="stable")[:, :k], np.sort(d2, axis=1)[:, :k]


@pytest.mark.parametrize("impl", ["faiss", "torch"])
def test_exact_knn_equals_brute_force(impl):
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((3000, 16)).astype(np.float16)
    q = rng.standard_normal((37, 16)).astype(np.float32)
    ids = exact_knn(q, keys, 20) if impl == "faiss" else exact_knn_torch(q, keys, 20, "cpu", block=700,
                                                                        query_block=10)
    want_ids, want_d = brute_force_ids(q, keys.astype(np.float32), 20)
    got_d = ((q[:, None, :] - keys.astype(np.float32)[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-4)  # same distances (ties may swap ids)
    assert (ids == want_ids).mean() > 0.99


@cuda
def test_cuda_extraction_equals_cpu():
    model = build_family("gpt2").eval()
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 400).astype(np.int32)
    windows = plan_windows(len(ids), 64, 32)
    n = len(ids) - 1
    results = {}
    for device in ("cpu", "cuda"):
        lm = wrap_model(model.to(device))
        keys = np.empty((n, lm.dim), np.float16)
        out = LMOutputs(np.empty(n), np.empty((n, 5), np.int32), np.empty((n, 5), np.float32))
        extract(lm, ids, windows, keys, batch_size=4, lm_out=out)
        results[device] = keys.astype(np.float32), out.p_lm
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], rtol=1e-2, atol=2e-3)
    np.testing.assert_allclose(results["cuda"][1], results["cpu"][1], rtol=1e-3)


@cuda
def test_cuda_exact_knn_equals_cpu():
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((5000, 32)).astype(np.float16)
    q = rng.standard_normal((50, 32)).astype(np.float32)
    got = exact_knn(q, keys, 64, "cuda")
    want = exact_knn(q, keys, 64, "cpu")
    assert (got == want).mean() > 0.99
