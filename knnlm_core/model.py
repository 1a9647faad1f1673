"""Model loading and key extraction (SPEC §1). Imports torch: the dashboard never imports it.

The key of a position is the input of the last transformer block's MLP (the output of
its second LayerNorm), captured with a forward pre-hook. The hook point comes from a
per-family table keyed by `config.model_type`; an unknown family is a clear error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from knnlm_core.windows import Window

# model_type -> (attribute path of the decoder layer list, name of the MLP in a layer)
HOOK_POINTS: dict[str, tuple[str, str]] = {
    "gpt2": ("transformer.h", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "mlp"),
    "llama": ("model.layers", "mlp"),
    "mistral": ("model.layers", "mlp"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model cannot be loaded or has no known hook point."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for key extraction, with where its keys come from."""

    model: torch.nn.Module
    hook_point: str  # e.g. "transformer.h[-1].mlp (input)"
    dim: int  # key dimension (hidden size)
    n_positions: int  # longest context the model accepts
    model_type: str


def check_family(model_type: str) -> None:
    """ModelError naming the supported families when `model_type` has no known hook point."""
    if model_type not in HOOK_POINTS:
        raise ModelError(
            f"unsupported model family '{model_type}': supported are {', '.join(sorted(HOOK_POINTS))} "
            "(add its hook point to knnlm_core.model.HOOK_POINTS)"
        )


def load_model_config(name_or_path: str):
    """The model's HF config (local directory: offline), with its family checked; no weights loaded."""
    from transformers import AutoConfig

    local = Path(name_or_path).is_dir()
    try:
        config = AutoConfig.from_pretrained(str(name_or_path), local_files_only=local)
    except (OSError, ValueError) as err:
        where = "local directory" if local else "hub name (no network? use a local directory)"
        raise ModelError(
            f"cannot load model config from {name_or_path} as a {where}: {str(err).splitlines()[0]}"
        ) from err
    check_family(config.model_type)
    return config


def hook_module(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The last block's MLP of `model` and a readable name of it; ModelError if unsupported."""
    model_type = getattr(model.config, "model_type", "?")
    check_family(model_type)
    layers_path, mlp_name = HOOK_POINTS[model_type]
    layers = model.get_submodule(layers_path)
    return getattr(layers[-1], mlp_name), f"{layers_path}[-1].{mlp_name} (input)"


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM from a hub name or local directory (local: offline) and find its hook."""
    from transformers import AutoModelForCausalLM

    load_model_config(name_or_path)  # a clear error before any weights are read
    local = Path(name_or_path).is_dir()
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], local_files_only=local)
    return wrap_model(model.to(device).eval())


def wrap_model(model: torch.nn.Module) -> LoadedModel:
    """LoadedModel for an already built causal LM (used by tests with tiny random configs)."""
    _, hook_point = hook_module(model)
    cfg = model.config
    n_positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 1024)
    return LoadedModel(model=model.eval(), hook_point=hook_point, dim=int(cfg.hidden_size),
                       n_positions=int(n_positions), model_type=cfg.model_type)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's config JSON and every parameter / buffer's bytes, in state_dict order."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batch_windows(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows grouped into batches of equal length (the last window may be shorter)."""
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
    mlp, _ = hook_module(lm.model)
    captured: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
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
    hidden = captured[-1]  # (B, L, d)
    keys, owned_logits = [], [] if with_logits else None
    for row, w in enumerate(batch):
        lo, hi = w.first_pos - w.begin, w.end - 1 - w.begin
        keys.append(hidden[row, lo:hi].float().cpu().numpy())
        if with_logits:
            owned_logits.append(logits[row, lo:hi].float())
    return keys, owned_logits
