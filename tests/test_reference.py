"""An independent reference for key and p_LM extraction (SPEC §1), checked against the tiny run.

The tiny GPT-2 is loaded with plain transformers (float32); the sliding windows are written
here, not imported (no knnlm_core.windows, no knnlm_core.model); the key is captured by a
forward hook on `transformer.h[-1].ln_2` (its output is the last block's MLP input), and
p_LM(target) = softmax(logits)[target] in float32. Keys, queries, eval_tokens.p_lm and the
run's PPL LM must agree with what the pipeline stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from knnlm_core.keystore import open_keys


def score_corpus(model, ids: np.ndarray, max_context: int, stride: int, with_head: bool) -> tuple[np.ndarray, np.ndarray]:
    """(keys (n-1, d) float32, p_LM of token t+1 at position t (n-1,) or NaN without the head).

    Windows of at most max_context tokens advance by stride; position t (predicting token t+1)
    is scored by the first window holding tokens t and t+1, i.e. with the longest context.
    """
    n, d = len(ids), model.config.n_embd
    keys = np.full((n - 1, d), np.nan, dtype=np.float32)  # (n-1, d)
    p_lm = np.full(n - 1, np.nan, dtype=np.float32)  # (n-1,)
    times = np.zeros(n - 1, dtype=np.int64)  # how often each position was scored
    captured: list[torch.Tensor] = []
    handle = model.transformer.h[-1].ln_2.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        begin, done = 0, 0  # positions < done are scored
        while done < n - 1:
            end = min(begin + max_context, n)
            x = torch.from_numpy(ids[begin:end].astype(np.int64))[None]  # (1, L)
            with torch.no_grad():
                if with_head:
                    logits = model(input_ids=x).logits[0]  # (L, V)
                else:
                    model.transformer(input_ids=x)  # body only: the hook still fires
            hidden = captured.pop()[0]  # (L, d)
            own = np.arange(done, end - 1)  # positions first reached by this window
            keys[own] = hidden[own - begin].float().numpy()
            if with_head:
                probs = torch.softmax(logits[own - begin].float(), dim=-1)  # (n_own, V)
                p_lm[own] = probs[torch.arange(len(own)), torch.from_numpy(ids[own + 1].astype(np.int64))].numpy()
            times[own] += 1
            done = end - 1
            begin = min(begin + stride, done)  # the next window must still hold position `done`
    finally:
        handle.remove()
    assert np.all(times == 1), "every position must be scored exactly once"
    return keys, p_lm


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_run) -> dict[str, np.ndarray]:
    """Keys and p_LM of the tiny run's corpora, with and without the LM head."""
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    max_context, stride = int(manifest["max_context"]), int(manifest["stride"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, local_files_only=True).eval()
    assert model.config.model_type == "gpt2"
    out = {}
    for name in ("eval", "datastore"):
        ids = np.load(tiny_run / f"{name}_ids.npy")
        out[f"{name}_keys"], out[f"{name}_p_lm"] = score_corpus(model, ids, max_context, stride, with_head=True)
        out[f"{name}_body_keys"], _ = score_corpus(model, ids, max_context, stride, with_head=False)
    return out


def run_table(run_dir: Path, sql: str):
    con = duckdb.connect(str(run_dir / "metrics.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchdf()
    finally:
        con.close()


def test_windows_cover_more_than_one_window(tiny_run):
    """The tiny corpora are longer than one window, so stride and ownership are exercised."""
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["stride"] < manifest["max_context"] < len(np.load(tiny_run / "eval_ids.npy"))


def test_datastore_keys_match_reference(tiny_run, reference):
    keys = open_keys(tiny_run)  # keys.npy or keys/ shards
    assert keys.shape == reference["datastore_keys"].shape and keys.dtype == np.float16
    np.testing.assert_allclose(np.asarray(keys, dtype=np.float32), reference["datastore_keys"], atol=2e-2, rtol=1e-2)


def test_queries_match_reference(tiny_run, reference):
    queries = np.load(tiny_run / "queries.npy", mmap_mode="r")
    assert queries.shape == reference["eval_keys"].shape and queries.dtype == np.float16
    np.testing.assert_allclose(np.asarray(queries, dtype=np.float32), reference["eval_keys"], atol=2e-2, rtol=1e-2)


def test_p_lm_matches_reference(tiny_run, reference):
    p_lm = run_table(tiny_run, "SELECT p_lm FROM eval_tokens ORDER BY pos")["p_lm"].to_numpy()
    assert p_lm.shape == reference["eval_p_lm"].shape
    np.testing.assert_allclose(p_lm, reference["eval_p_lm"], rtol=1e-4, atol=0)


def test_ppl_lm_matches_reference(tiny_run, reference):
    ppl_lm = float(run_table(tiny_run, "SELECT ppl_lm FROM run")["ppl_lm"].iloc[0])
    want = float(np.exp(np.mean(-np.log(reference["eval_p_lm"].astype(np.float64)))))
    assert ppl_lm == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("corpus", ["eval", "datastore"])
def test_body_only_keys_equal_keys_with_head(reference, corpus):
    """Running the transformer body alone (no LM head) captures the same keys."""
    np.testing.assert_allclose(reference[f"{corpus}_body_keys"], reference[f"{corpus}_keys"], rtol=0, atol=1e-6)
