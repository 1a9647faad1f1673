"""Model loading and key extraction (SPEC §1). Imports torch: the dashboard never imports it.

The key of a position is the input of the last decoder block's feed-forward module (FFN),
captured with a forward pre-hook. The hook point is found generically, for any causal LM:
the decoder layer list is the `ModuleList` of `num_hidden_layers` blocks (the heaviest if
several), and the FFN is the last block's child named one of `FFN_NAMES` (`mlp`,
`feed_forward`, ...) or, for blocks without an FFN container (OPT), its first linear
`fc1`, whose input is the FFN input. `HOOK_POINTS` overrides this per `config.model_type`.
A model without a recognisable FFN input is a `ModelError` saying how to add an override.

`source_fingerprint` hashes a model's files (config + weights) without loading it;
`fingerprint` hashes a loaded model's parameters.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm_core.windows import Window

# Override table: model_type -> (attribute path of the decoder layer list, FFN module name in a
# block, dotted if nested), e.g. HOOK_POINTS["bert"] = ("bert.encoder.layer", "intermediate").
# Families not listed are found generically (see the module docstring).
HOOK_POINTS: dict[str, tuple[str, str]] = {}

# Children of a decoder block that are the FFN container, in order of preference.
FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "mlp_block")
# Children that are the FFN's first linear, for blocks with no container (OPT): same input.
FFN_FIRST_LINEAR_NAMES = ("fc1",)
# Families whose hook point tests/test_model.py checks against an independent reference.
TESTED_FAMILIES = ("gpt2", "gptj", "gpt_neo", "gpt_neox", "gpt_bigcode", "falcon", "opt", "bloom", "mpt",
                   "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                   "olmo2", "olmo3", "phi", "phi3", "stablelm", "starcoder2", "granitemoe")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/name"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
BLOCK_BYTES = 1 << 20  # source_fingerprint reads files in 1 MiB blocks


class ModelError(ValueError):
    """The model cannot be found or loaded, or has no recognisable key hook point."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for key extraction, with where its keys come from."""

    model: torch.nn.Module
    hook_point: str  # e.g. "transformer.h[-1].mlp (input)"
    dim: int  # key dimension (hidden size)
    n_positions: int  # longest context the model accepts
    model_type: str


# ---------------------------------------------------------------- where the model is

def looks_local(name: str) -> bool:
    """True when `name` reads as a filesystem path rather than a hub id like `gpt2-xl` or `org/name`."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~", f".{os.sep}", f"..{os.sep}")):
        return True
    if os.sep in name or "/" in name:
        return not HUB_ID.fullmatch(name) or Path(name).parent.is_dir()
    return False


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(name or directory, is_local); ModelError for a local-looking path that is no directory."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ModelError(f"not a model directory: {name_or_path} is a file (give the directory holding config.json)")
    if looks_local(str(name_or_path)):
        raise ModelError(f"no such model directory: {name_or_path} (check the path, or give a hub name like gpt2-xl)")
    return str(name_or_path), False


def load_model_config(name_or_path: str):
    """The model's HF config (local directory: offline), checked structurally; no weights loaded."""
    from transformers import AutoConfig

    source, local = resolve_source(str(name_or_path))
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        where = "local directory" if local else "hub name (no network? use a local directory)"
        raise ModelError(
            f"cannot load model config from {name_or_path} as a {where}: {str(err).splitlines()[0]}"
        ) from err
    check_structure(config)
    return config


def check_structure(config) -> None:
    """ModelError when `config` is no causal LM, or the model built from it on the meta device has no hook point."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"unsupported model family '{config.model_type}': not a causal LM "
                         "(transformers has no AutoModelForCausalLM class for it)")
    try:
        with torch.device("meta"):  # structure only: no memory, no weights
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # a model that cannot be built on meta is checked when its weights are loaded
        return
    hook_module(skeleton)


# ---------------------------------------------------------------- the hook point

def n_layers(config) -> int | None:
    """Number of decoder blocks the config declares, or None."""
    for attr in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(path, list) of the decoder blocks: a ModuleList of num_hidden_layers blocks, heaviest first."""
    n = n_layers(getattr(model, "config", None))
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod)]
    if not lists:
        raise ModelError(f"no decoder layer list (torch.nn.ModuleList) in {type(model).__name__}")
    return max(lists, key=lambda item: (len(item[1]) == n, sum(p.numel() for p in item[1].parameters())))


def ffn_name(block: torch.nn.Module) -> str | None:
    """Name of the block's child whose input is the FFN input, or None."""
    children = dict(block.named_children())
    return next((name for name in FFN_NAMES + FFN_FIRST_LINEAR_NAMES if name in children), None)


def no_hook_error(model_type: str, layers_path: str, block: torch.nn.Module) -> ModelError:
    """The error for a block with no recognisable FFN: what was looked for and how to override."""
    children = ", ".join(name for name, _ in block.named_children())
    return ModelError(
        f"unsupported model family '{model_type}': no feed-forward module in {layers_path}[-1] "
        f"({type(block).__name__}, children: {children}); looked for a child named one of "
        f"{', '.join(FFN_NAMES)} (FFN) or {', '.join(FFN_FIRST_LINEAR_NAMES)} (its first linear). "
        f"Tested families: {', '.join(TESTED_FAMILIES)}. To add one, name the module whose input is the "
        f"FFN input: knnlm_core.model.HOOK_POINTS['{model_type}'] = ('{layers_path}', '<module name>')"
    )


def override_hook(model: torch.nn.Module, model_type: str) -> tuple[torch.nn.Module, str]:
    """The hook module named by HOOK_POINTS[model_type]; ModelError if the names do not resolve."""
    layers_path, name = HOOK_POINTS[model_type]
    try:
        module = model.get_submodule(layers_path)[-1].get_submodule(name)
    except (AttributeError, IndexError, TypeError) as err:
        raise ModelError(f"HOOK_POINTS['{model_type}'] = ('{layers_path}', '{name}') does not resolve in "
                         f"{type(model).__name__}: {err}") from err
    return module, f"{layers_path}[-1].{name} (input)"


def hook_module(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module whose input is the last block's FFN input, and a readable name of it; ModelError if none."""
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    if model_type in HOOK_POINTS:
        return override_hook(model, model_type)
    layers_path, layers = decoder_layers(model)
    name = ffn_name(layers[-1])
    if name is None:
        raise no_hook_error(model_type, layers_path, layers[-1])
    return getattr(layers[-1], name), f"{layers_path}[-1].{name} (input)"


def module_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a module was called with: first positional argument, else `hidden_states`/first kwarg."""
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(iter(kwargs.values()), None))


def capture_keys(model: torch.nn.Module, sink: Callable[[torch.Tensor], Any]) -> torch.utils.hooks.RemovableHandle:
    """Register a pre-hook passing each FFN input of the last block to `sink`; returns its handle.

    The input is (B, L, d), or (B * L, d) for families that flatten it (OPT's `fc1`).
    """
    module, _ = hook_module(model)
    return module.register_forward_pre_hook(lambda _m, args, kwargs: sink(module_input(args, kwargs)),
                                            with_kwargs=True)


# ---------------------------------------------------------------- loading

def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM from a hub name or local directory (local: offline) and find its hook."""
    from transformers import AutoModelForCausalLM

    load_model_config(name_or_path)  # a clear error before any weights are read
    source, local = resolve_source(str(name_or_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=local)
    except Exception as err:  # noqa: BLE001 - safetensors, torch and hub errors have no common base
        first = str(err).splitlines()[0] if str(err) else ""
        raise ModelError(f"cannot load the weights of {name_or_path} ({type(err).__name__}: {first[:200]}): restore "
                         "or re-save the model files") from err
    return wrap_model(model.to(device).eval())


def context_length(config) -> int:
    """Longest context the config allows (1024 when it names none)."""
    for attr in ("n_positions", "max_position_embeddings", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def wrap_model(model: torch.nn.Module) -> LoadedModel:
    """LoadedModel for an already built causal LM (used by tests with tiny random configs)."""
    _, hook_point = hook_module(model)
    cfg = model.config
    return LoadedModel(model=model.eval(), hook_point=hook_point, dim=int(cfg.hidden_size),
                       n_positions=context_length(cfg), model_type=cfg.model_type)


# ---------------------------------------------------------------- fingerprints

def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's config JSON and every parameter / buffer's bytes, in state_dict order."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def source_directory(name_or_path: str) -> Path:
    """The local directory holding the model's files: the path itself, or the hub name's cached snapshot."""
    source, local = resolve_source(str(name_or_path))
    if local:
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as err:  # any hub / cache failure means "not resolvable offline"
        raise ModelError(f"cannot fingerprint {name_or_path}: not a local directory and not in the local "
                         f"Hugging Face cache ({type(err).__name__})") from err


def source_fingerprint(name_or_path: str) -> str:
    """sha256 of config.json and the weight files (*.safetensors, *.bin; names and bytes, sorted) of a model.

    Reads files only, never loads the model: a model retrained in place gets a new fingerprint.
    """
    directory = source_directory(name_or_path)
    weights = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not (directory / "config.json").is_file() or not weights:
        raise ModelError(f"cannot fingerprint {name_or_path}: {directory} needs config.json and weight files "
                         f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for path in [directory / "config.json", *weights]:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(BLOCK_BYTES):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- forward passes

def batch_windows(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows grouped into batches of `batch_size` equal-length windows (the last window may be
    shorter: a batch of its own). Counted from windows[0]: a shard that starts on a multiple of
    batch_size of the plan gets the run's own batches (precompute.extract.shard_windows)."""
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or (w.end - w.begin) != (batch[0].end - batch[0].begin)):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.inference_mode()
def forward_windows(
    lm: LoadedModel, ids: np.ndarray, batch: list[Window], with_logits: bool
) -> tuple[list[np.ndarray], list[torch.Tensor] | None]:
    """Keys (float32, (n_owned, d) per window) and optionally float32 logits of owned positions.

    Without logits only the transformer body runs (no LM head): the expensive vocabulary
    projection is skipped when only keys are needed.
    """
    captured: list[torch.Tensor] = []
    handle = capture_keys(lm.model, captured.append)
    device = next(lm.model.parameters()).device
    try:
        x = torch.from_numpy(np.stack([ids[w.begin : w.end] for w in batch]).astype(np.int64)).to(device)  # (B, L)
        if with_logits:
            logits = lm.model(input_ids=x).logits  # (B, L, V)
        else:
            body = getattr(lm.model, lm.model.base_model_prefix)
            body(input_ids=x)
            logits = None
    finally:
        handle.remove()
    hidden = captured[-1].reshape(*x.shape, -1)  # (B, L, d); OPT's fc1 sees it flattened to (B * L, d)
    keys, owned_logits = [], [] if with_logits else None
    for row, w in enumerate(batch):
        lo, hi = w.first_pos - w.begin, w.end - 1 - w.begin
        keys.append(hidden[row, lo:hi].float().cpu().numpy())
        if with_logits:
            owned_logits.append(logits[row, lo:hi].float())
    return keys, owned_logits
