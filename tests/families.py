"""Tiny random causal LMs of many families (hidden 64, 2 layers, 128 positions) for model tests.

`FAMILY_SPECS` names each family's transformers config and model class and the config
arguments that make it tiny; a family whose classes the installed transformers lacks is
left out of `available_families()`. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 1024  # small vocabulary: fast to build, and every test id stays below it
HIDDEN = 64
LAYERS = 2
POSITIONS = 128
# Special token ids inside the small vocabulary (some defaults, e.g. Phi-3's pad 32000, are not).
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# Arguments shared by the families that use the Llama-style config names.
LLAMA_LIKE = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 2 * HIDDEN, "max_position_embeddings": POSITIONS}
GPT2_LIKE = {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 2, "n_positions": POSITIONS}

# family -> (config class, causal LM class, config arguments besides the vocabulary and token ids)
FAMILY_SPECS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2_LIKE),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**GPT2_LIKE, "rotary_dim": 16}),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                {"hidden_size": HIDDEN, "num_layers": LAYERS, "num_heads": 2, "max_position_embeddings": POSITIONS,
                 "attention_types": [[["global", "local"], 1]], "window_size": 16}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
                  "intermediate_size": 4 * HIDDEN, "max_position_embeddings": POSITIONS}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", GPT2_LIKE),
    "falcon": ("FalconConfig", "FalconForCausalLM",  # falcon-7b style: parallel attention + MLP, one norm
               {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
                "max_position_embeddings": POSITIONS}),
    "falcon_new": ("FalconConfig", "FalconForCausalLM",  # falcon-40b style: separate ln_attn / ln_mlp
                   {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_kv_heads": 2,
                    "new_decoder_architecture": True, "max_position_embeddings": POSITIONS}),
    "opt": ("OPTConfig", "OPTForCausalLM",
            {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "ffn_dim": 2 * HIDDEN,
             "word_embed_proj_dim": HIDDEN, "max_position_embeddings": POSITIONS}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": 2}),
    "mpt": ("MptConfig", "MptForCausalLM", {"d_model": HIDDEN, "n_layers": LAYERS, "n_heads": 2, "max_seq_len": POSITIONS}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA_LIKE, "head_dim": 32}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**LLAMA_LIKE, "head_dim": 32}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**LLAMA_LIKE, "head_dim": 32}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**LLAMA_LIKE, "head_dim": 32}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", LLAMA_LIKE),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", LLAMA_LIKE),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", LLAMA_LIKE),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**LLAMA_LIKE, "num_local_experts": 4}),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {**LLAMA_LIKE, "num_local_experts": 4}),
    "phi": ("PhiConfig", "PhiForCausalLM", LLAMA_LIKE),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", LLAMA_LIKE),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", LLAMA_LIKE),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", LLAMA_LIKE),
}


def available_families() -> list[str]:
    """The families of FAMILY_SPECS whose config and model classes the installed transformers has."""
    import transformers

    return [f for f, (cfg, cls, _) in FAMILY_SPECS.items() if hasattr(transformers, cfg) and hasattr(transformers, cls)]


def build_model(family: str, seed: int = 0):
    """A tiny randomly initialised causal LM of `family` (float32, eval mode, CPU)."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = FAMILY_SPECS[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **TOKEN_IDS, **kwargs)
    return getattr(transformers, model_cls)(config).eval()


def save_model(family: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random model of `family` (config + safetensors weights, no tokenizer) to `path`."""
    build_model(family, seed).save_pretrained(path)
    return path
