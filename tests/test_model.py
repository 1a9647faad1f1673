"""Tests of knnlm_core/model.py: the generic hook point on many families, bad inputs, fingerprints."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from families import VOCAB, available_families, build_model, save_model

from knnlm_core import model as km
from knnlm_core.model import (
    HOOK_POINTS,
    ModelError,
    capture_keys,
    forward_windows,
    hook_module,
    load_model,
    load_model_config,
    looks_local,
    source_fingerprint,
    wrap_model,
)
from knnlm_core.windows import plan_windows

RESIDUAL = "residual"  # FFN input = the block's input + the post-attention norm's output (norms after sublayers)

# family -> (our readable hook point, block module whose OUTPUT is the FFN input, or RESIDUAL),
# written out from each architecture's decoder block, independently of knnlm_core.model.
REFERENCE: dict[str, tuple[str, str]] = {
    "gpt2": ("transformer.h[-1].mlp (input)", "ln_2"),
    "gptj": ("transformer.h[-1].mlp (input)", "ln_1"),  # attention and MLP in parallel on ln_1
    "gpt_neo": ("transformer.h[-1].mlp (input)", "ln_2"),
    "gpt_neox": ("gpt_neox.layers[-1].mlp (input)", "post_attention_layernorm"),  # parallel: MLP norm of its own
    "gpt_bigcode": ("transformer.h[-1].mlp (input)", "ln_2"),
    "falcon": ("transformer.h[-1].mlp (input)", "input_layernorm"),  # parallel, one shared norm
    "falcon_new": ("transformer.h[-1].mlp (input)", "ln_mlp"),  # parallel, separate MLP norm
    "opt": ("model.decoder.layers[-1].fc1 (input)", "final_layer_norm"),  # no MLP container
    "bloom": ("transformer.h[-1].mlp (input)", "post_attention_layernorm"),
    "mpt": ("transformer.blocks[-1].ffn (input)", "norm_2"),
    "llama": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),
    "mistral": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),
    "mixtral": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),  # sparse MoE
    "granitemoe": ("model.layers[-1].block_sparse_moe (input)", "post_attention_layernorm"),
    "qwen2": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),
    "qwen3": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),
    "gemma": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),
    "gemma2": ("model.layers[-1].mlp (input)", "pre_feedforward_layernorm"),  # post_attention norms attn output
    "gemma3": ("model.layers[-1].mlp (input)", "pre_feedforward_layernorm"),
    "olmo": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),  # pre-norm, non-parametric LayerNorm
    "olmo2": ("model.layers[-1].mlp (input)", RESIDUAL),  # norms after sublayers: FFN sees the residual stream
    "olmo3": ("model.layers[-1].mlp (input)", RESIDUAL),
    "phi": ("model.layers[-1].mlp (input)", "input_layernorm"),  # parallel on one norm
    "phi3": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),
    "stablelm": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),
    "starcoder2": ("model.layers[-1].mlp (input)", "post_attention_layernorm"),
}
FAMILIES = available_families()
IDS = np.arange(3, 43, dtype=np.int32)  # 40 tokens, all below VOCAB


def last_block(model: torch.nn.Module) -> torch.nn.Module:
    """The last decoder block, addressed by the reference table's path (not by knnlm_core.model)."""
    path = REFERENCE[family_of(model)][0].split("[-1]")[0]
    return model.get_submodule(path)[-1]


def family_of(model: torch.nn.Module) -> str:
    return model._test_family


@torch.inference_mode()
def reference_ffn_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FFN input of the last block ((B, L, d)) from the family's norm output, or the residual stream."""
    _, source = REFERENCE[family_of(model)]
    block = last_block(model)
    seen: list[torch.Tensor] = []
    norm = "post_attention_layernorm" if source == RESIDUAL else source
    handle = block.get_submodule(norm).register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        out = model(input_ids=x, output_hidden_states=True)
    finally:
        handle.remove()
    if source == RESIDUAL:  # input of the last block + its normed attention output
        return out.hidden_states[-2] + seen[-1]
    return seen[-1].reshape(*x.shape, -1)  # OPT norms the flattened (B * L, d) states


def tiny(family: str) -> torch.nn.Module:
    model = build_model(family)
    model._test_family = family
    return model


# ---------------------------------------------------------------- the hook point per family

def test_reference_table_covers_installed_families():
    assert set(FAMILIES) <= set(REFERENCE)
    assert {"gpt2", "gptj", "gpt_neox", "gpt_bigcode", "falcon", "opt", "llama", "mistral", "qwen2", "gemma",
            "olmo"} <= set(FAMILIES)


def test_tested_families_listed_in_model():
    types = {build_model(f).config.model_type for f in FAMILIES}
    assert types == set(km.TESTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_key_is_last_ffn_input(family):
    model = tiny(family)
    lm = wrap_model(model)
    assert lm.hook_point == REFERENCE[family][0]
    positions = 1024 if family == "bloom" else 128  # ALiBi: no limit in the config, 1024 assumed
    assert lm.dim == 64 and lm.n_positions == positions and lm.model_type == model.config.model_type
    keys, logits = forward_windows(lm, IDS, plan_windows(len(IDS), 40, 20), with_logits=False)
    expected = reference_ffn_input(model, torch.from_numpy(IDS.astype(np.int64))[None])  # (1, 40, 64)
    assert logits is None and keys[0].shape == (39, 64)
    np.testing.assert_allclose(keys[0], expected[0, :39].float().numpy(), rtol=1e-5, atol=1e-6)


def test_keys_with_logits_match_body_only():
    lm = wrap_model(tiny("opt"))
    windows = plan_windows(len(IDS), 24, 12)
    body, _ = forward_windows(lm, IDS, windows[:1], with_logits=False)
    full, logits = forward_windows(lm, IDS, windows[:1], with_logits=True)
    np.testing.assert_allclose(body[0], full[0], rtol=1e-5, atol=1e-6)
    assert logits[0].shape == (23, VOCAB)


def test_load_family_outside_the_old_table(tmp_path):
    path = save_model("qwen2", tmp_path / "qwen2")
    assert load_model_config(str(path)).model_type == "qwen2"
    lm = load_model(str(path))
    assert lm.hook_point == "model.layers[-1].mlp (input)" and lm.model_type == "qwen2"


# ---------------------------------------------------------------- no FFN, overrides

class ToyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(8, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.attn(x))


class ToyModel(torch.nn.Module):
    """A decoder-like stack whose blocks have no FFN-like child."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", num_hidden_layers=2, hidden_size=8)
        self.layers = torch.nn.ModuleList([ToyBlock(), ToyBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def test_block_without_ffn_is_a_clear_error():
    with pytest.raises(ModelError) as err:
        hook_module(ToyModel())
    msg = str(err.value)
    assert "unsupported model family 'toy'" in msg and "layers[-1] (ToyBlock, children: attn, proj)" in msg
    assert all(name in msg for name in ("mlp", "feed_forward", "ffn", "fc1"))
    assert "HOOK_POINTS['toy'] = ('layers', '<module name>')" in msg


def test_override_table(monkeypatch):
    toy = ToyModel()
    monkeypatch.setitem(HOOK_POINTS, "toy", ("layers", "proj"))
    module, name = hook_module(toy)
    assert module is toy.layers[-1].proj and name == "layers[-1].proj (input)"
    seen, expected = [], []
    handle = capture_keys(toy, seen.append)
    ref = toy.layers[-1].attn.register_forward_hook(lambda _m, _a, out: expected.append(out))
    toy(torch.randn(2, 5, 8))
    handle.remove()
    ref.remove()
    torch.testing.assert_close(seen[-1], expected[-1])


def test_override_wins_over_generic_and_is_checked(monkeypatch):
    model = build_model("gpt2")
    monkeypatch.setitem(HOOK_POINTS, "gpt2", ("transformer.h", "ln_2"))
    assert hook_module(model) == (model.transformer.h[-1].ln_2, "transformer.h[-1].ln_2 (input)")
    monkeypatch.setitem(HOOK_POINTS, "gpt2", ("transformer.h", "nope"))
    with pytest.raises(ModelError, match=r"HOOK_POINTS\['gpt2'\] = \('transformer.h', 'nope'\) does not resolve"):
        hook_module(model)


def test_config_of_non_decoder_family_is_refused(tmp_path):
    import transformers

    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(bert)
    with pytest.raises(ModelError, match=r"unsupported model family 'bert'.*HOOK_POINTS\['bert'\]"):
        load_model_config(str(bert))
    t5 = tmp_path / "t5"
    transformers.T5Config(d_model=64, num_layers=1, num_heads=2).save_pretrained(t5)
    with pytest.raises(ModelError, match="unsupported model family 't5': not a causal LM"):
        load_model_config(str(t5))


# ---------------------------------------------------------------- bad paths and hub names

@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Work in an empty directory holding only `models/`."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name,local", [
    ("gpt2-xl", False), ("openai-community/gpt2", False), ("EleutherAI/pythia-70m", False),
    ("/no/such/dir", True), ("./nope", True), ("../nope", True), ("~/no-such-model", True),
    ("data/models/nope", True), ("models/nope", True), (".", True),
])
def test_looks_local(in_tmp, name, local):
    assert looks_local(name) is local


@pytest.mark.parametrize("name", ["/no/such/model-dir", "./nope", "../nope", "~/no-such-model-xyz",
                                  "data/models/nope", "models/nope"])
def test_missing_local_directory(in_tmp, name):
    expected = f"no such model directory: {name} (check the path, or give a hub name like gpt2-xl)"
    for call in (load_model_config, load_model, source_fingerprint):
        with pytest.raises(ModelError) as err:
            call(name)
        assert str(err.value) == expected


@pytest.mark.parametrize("name", ["no-such-model-xyz", "no-such-org-xyz/no-such-model"])
def test_hub_name_offline_keeps_hub_message(in_tmp, monkeypatch, name):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    with pytest.raises(ModelError) as err:
        load_model_config(name)
    assert f"cannot load model config from {name} as a hub name" in str(err.value)
    assert "no such model directory" not in str(err.value)


# ---------------------------------------------------------------- source fingerprints

def test_source_fingerprint_follows_the_weights(tmp_path):
    model = build_model("gpt2")
    path = tmp_path / "m"
    model.save_pretrained(path)
    before = source_fingerprint(str(path))
    model.save_pretrained(path)  # unchanged save
    assert source_fingerprint(str(path)) == before
    shutil.copytree(path, tmp_path / "copy")
    assert source_fingerprint(str(tmp_path / "copy")) == before  # the files, not the path
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3  # "retrained in place"
    model.save_pretrained(path)
    assert source_fingerprint(str(path)) != before


def test_source_fingerprint_needs_weights(tmp_path):
    build_model("gpt2").config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="needs config.json and weight files"):
        source_fingerprint(str(tmp_path))


def test_source_fingerprint_of_hub_name_uses_the_cache(in_tmp, monkeypatch):
    import huggingface_hub

    local = save_model("llama", in_tmp / "models" / "tiny")
    cache = in_tmp / "hf-cache"
    commit = "0" * 40
    repo = cache / "models--tiny-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(local, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert source_fingerprint("tiny-org/tiny-llama") == source_fingerprint(str(local))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        source_fingerprint("tiny-org/not-cached")
