"""Train the shipped demo LM: a small GPT-2-architecture causal LM on WikiText-2 train.

`python -m precompute.train_lm --config configs/demo-lm.toml` trains with the real GPT-2
tokenizer, checkpoints every `checkpoint_every` steps (resumes from the last one when
rerun), measures sliding-window validation perplexity every half epoch, and exports an
fp16 Hugging Face folder (safetensors + tokenizer + model card) to `out_dir`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import get_type_hints

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TrainConfig:
    """Everything the demo LM's training depends on; written into the model card."""

    train_corpus: str = "data/corpora/wikitext2-train.tokens.gz"  # text the LM learns from
    valid_corpus: str = "data/corpora/wikitext2-valid.raw.gz"  # raw WikiText-2 valid for PPL
    tokenizer: str = "data/models/demo-gpt2"  # GPT-2 BPE files (vocab.json + merges.txt)
    out_dir: str = "data/models/demo-gpt2"  # exported HF model folder
    work_dir: str = "data/models/.demo-gpt2-work"  # checkpoints (not shipped)
    n_layer: int = 4
    n_embd: int = 192  # multiple of 64 so PQ64 splits it evenly
    n_head: int = 6
    n_positions: int = 512  # longest context the model can see
    block_size: int = 512  # training sequence length
    batch_size: int = 8  # sequences per step
    epochs: float = 2.0
    lr: float = 2e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0
    bf16: bool = True  # bf16 autocast on CPU (AMX) or GPU
    seed: int = 1234
    threads: int = 2
    checkpoint_every: int = 25  # steps between checkpoints
    val_tokens: int = 60000  # tokens of valid used for the half-epoch curve (0 = all)
    eval_stride: int = 256  # sliding-window stride for validation PPL

    @classmethod
    def from_toml(cls, path: Path) -> TrainConfig:
        """Load from a TOML file: unknown keys, wrong types (from the annotations) and out-of-range
        values are one-line ConfigErrors."""
        from knnlm_core.config import ConfigError, Rule, read_toml, type_ok

        data = read_toml(Path(path))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown keys in {path}: {unknown} (known: {sorted(known)})")
        hints = get_type_hints(cls)
        for name, value in data.items():
            rule = TRAIN_RULES.get(name, Rule())
            if not type_ok(value, hints[name]) or (not isinstance(value, (str, bool)) and not rule.ok(value)):
                allowed = f"{hints[name].__name__}" + (f", {rule.allowed()}" if name in TRAIN_RULES else "")
                raise ConfigError(f"invalid config: {name} = {value!r} (from {path}): allowed {allowed}; fix: write "
                                  f"it like the default, {name} = {getattr(cls, name)!r}")
        cfg = cls(**{k: float(v) if hints[k] is float else v for k, v in data.items()})
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"invalid config: n_embd = {cfg.n_embd} is not divisible by n_head = {cfg.n_head} "
                              f"(from {path}); fix: choose n_head dividing n_embd")
        return cfg


def _train_rules() -> dict:
    """Ranges of TrainConfig's numbers (types come from its annotations)."""
    from knnlm_core.config import Rule

    positive = ("n_layer", "n_embd", "n_head", "n_positions", "block_size", "batch_size", "epochs", "lr", "threads",
                "checkpoint_every", "eval_stride")
    rules = {name: Rule(lo=0, lo_open=True) for name in positive}
    rules.update({name: Rule(lo=0) for name in ("warmup_steps", "weight_decay", "grad_clip", "val_tokens", "seed")})
    rules.update(min_lr_ratio=Rule(lo=0, hi=1), dropout=Rule(lo=0, hi=1))
    rules["threads"] = Rule(lo=1, hi=1024)
    return rules


TRAIN_RULES = _train_rules()


def resolve(path: str) -> Path:
    """Relative config paths are relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def epoch_chunks(n_tokens: int, block: int, epoch: int, seed: int) -> np.ndarray:
    """Start offsets of the shuffled, non-overlapping training chunks of one epoch."""
    rng = np.random.default_rng([seed, epoch])
    shift = int(rng.integers(0, block))  # a new chunk alignment every epoch
    starts = np.arange(shift, n_tokens - block - 1, block)
    return rng.permutation(starts)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sliding_ppl(model, ids: np.ndarray, max_context: int, stride: int, bf16: bool) -> float:
    """Token-level perplexity of `ids` with the SPEC §1 sliding windows (each target once)."""
    import torch

    from knnlm_core.windows import plan_windows

    model.eval()
    total_nll, total_n = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for w in plan_windows(len(ids), max_context, stride):
            x = torch.from_numpy(ids[w.begin : w.end].astype(np.int64))[None]
            logits = model(x).logits[0].float()  # (L, V)
            lo = w.first_pos - w.begin
            logp = torch.log_softmax(logits[lo : w.end - 1 - w.begin], dim=-1)
            tgt = x[0, lo + 1 : w.end - w.begin]
            total_nll -= logp.gather(1, tgt[:, None]).sum().item()
            total_n += len(tgt)
    model.train()
    return math.exp(total_nll / total_n)


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename (an interrupted save leaves the old file)."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(model, tokenizer, cfg: TrainConfig, history: dict) -> Path:
    """Write the fp16 HF folder + tokenizer + model card to out_dir (via a temp dir)."""
    import shutil

    import torch

    out = resolve(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16).save_pretrained(tmp)
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp)
    # Ship the BPE files (1.5 MB) instead of tokenizer.json (3.5 MB): AutoTokenizer rebuilds the
    # same tokenizer from them and tokenizer_config.json, and data/ must stay small.
    (tmp / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(resolve(cfg.tokenizer) / name, tmp / name)
    (tmp / "training.json").write_text(json.dumps({"config": asdict(cfg), **history}, indent=2))
    (tmp / "README.md").write_text(model_card(cfg, history))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def model_card(cfg: TrainConfig, history: dict) -> str:
    """Markdown model card: architecture, data, steps, time and the validation curve."""
    rows = "\n".join(
        f"| {v['step']} | {v['epoch']:.2f} | {v['tokens_seen']:,} | {v['ppl']:.1f} |" for v in history["val_curve"]
    )
    final = history.get("final_val_ppl")
    return f"""# demo-gpt2: a small GPT-2 trained on WikiText-2 for the kNN-LM long-tail workbench

A GPT-2-architecture causal LM trained from scratch on this machine, because no pretrained LM
can be downloaded here. It exists so the workbench runs end to end offline; real studies
point the same pipeline at `gpt2-xl` or any Hugging Face causal LM.

- Architecture: GPT-2 (`GPT2LMHeadModel`), {cfg.n_layer} layers, hidden {cfg.n_embd}, {cfg.n_head} heads,
  context {cfg.n_positions}, tied input/output embeddings, {history['n_params']:,} parameters, stored in fp16.
- Tokenizer: the original GPT-2 byte-level BPE (50,257 tokens, MIT).
- Data: WikiText-2 train, tokenized release with `<unk>` (`{cfg.train_corpus}`, CC BY-SA 3.0),
  {history['n_train_tokens']:,} GPT-2 tokens. Validation: WikiText-2 valid (raw).
- Training: {history['steps']} steps of {cfg.batch_size} x {cfg.block_size} tokens ({cfg.epochs} epochs),
  AdamW (lr {cfg.lr}, cosine to {cfg.lr * cfg.min_lr_ratio:g}, warmup {cfg.warmup_steps}, weight decay
  {cfg.weight_decay}), bf16 autocast={cfg.bf16}, seed {cfg.seed}, {cfg.threads} CPU threads.
- Wall time: {history['train_seconds'] / 60:.1f} min ({history['tokens_per_second']:.0f} tokens/s).
- Final validation perplexity (token level, whole WikiText-2 valid raw, sliding window
  {cfg.n_positions}/{cfg.eval_stride}): **{final:.1f}**.

Validation curve (first {cfg.val_tokens or 'all'} tokens of valid, same sliding window):

| step | epoch | tokens seen | valid PPL |
|---:|---:|---:|---:|
{rows}

Rebuild: `python -m precompute.train_lm --config configs/demo-lm.toml`.
"""


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training and export the model; returns the output folder."""
    import torch
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    from knnlm_core.corpus import load_tokenizer, tokenize_file

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(str(resolve(cfg.tokenizer)))
    work = resolve(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "train_ids.npy"
    if cache.exists():
        train_ids = np.load(cache)
    else:
        train_ids = tokenize_file(resolve(cfg.train_corpus), tokenizer)
        np.save(work / "train_ids.tmp.npy", train_ids)
        os.replace(work / "train_ids.tmp.npy", cache)
    valid_ids = tokenize_file(resolve(cfg.valid_corpus), tokenizer)
    curve_ids = valid_ids[: cfg.val_tokens] if cfg.val_tokens else valid_ids

    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=False,
    )
    chunks_per_epoch = len(epoch_chunks(len(train_ids), cfg.block_size, 0, cfg.seed))
    steps_per_epoch = chunks_per_epoch // cfg.batch_size
    total_steps = int(steps_per_epoch * cfg.epochs)
    half_epoch = max(1, steps_per_epoch // 2)
    history = {"val_curve": [], "train_seconds": 0.0, "loss_curve": []}
    step = 0
    ckpt_path = work / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, history = ckpt["step"], ckpt["history"]
        print(f"resuming from step {step}/{total_steps}", file=sys.stderr)

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.time() - history["train_seconds"]
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        starts = epoch_chunks(len(train_ids), cfg.block_size, epoch, cfg.seed)
        batch_starts = starts[in_epoch * cfg.batch_size : (in_epoch + 1) * cfg.batch_size]
        batch = np.stack([train_ids[s : s + cfg.block_size] for s in batch_starts]).astype(np.int64)
        x = torch.from_numpy(batch)  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        history["loss_curve"].append([step, round(loss.item(), 4)])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step, total_steps, cfg):.2e}")
        if step % half_epoch == 0 or step == total_steps:
            ppl = sliding_ppl(model, curve_ids, cfg.n_positions, cfg.eval_stride, cfg.bf16)
            history["val_curve"].append(
                {"step": step, "epoch": step / steps_per_epoch, "tokens_seen": step * cfg.batch_size * cfg.block_size,
                 "ppl": ppl}
            )
            tqdm.write(f"step {step}: valid PPL (first {len(curve_ids):,} tokens) = {ppl:.1f}")
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            history["train_seconds"] = time.time() - t0
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history},
                        ckpt_path)
    bar.close()
    history["train_seconds"] = time.time() - t0
    history.update(
        steps=total_steps, n_train_tokens=int(len(train_ids)), n_params=sum(p.numel() for p in model.parameters()),
        tokens_per_second=total_steps * cfg.batch_size * cfg.block_size / max(history["train_seconds"], 1e-9),
    )
    print("measuring final validation perplexity on the whole valid set ...", file=sys.stderr)
    history["final_val_ppl"] = sliding_ppl(model, valid_ids, cfg.n_positions, cfg.eval_stride, cfg.bf16)
    history["final_val_tokens"] = int(len(valid_ids))
    out = export(model, tokenizer, cfg, history)
    print(f"final valid PPL {history['final_val_ppl']:.1f}; model written to {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    from precompute.cli import Parser, path_arg, run_cli

    def body() -> int:
        parser = Parser(prog="python -m precompute.train_lm", description=__doc__.splitlines()[0])
        parser.add_argument("--config", required=True, type=path_arg, help="TOML file with TrainConfig fields")
        args = parser.parse_args(argv)
        train(TrainConfig.from_toml(args.config))
        return 0

    return run_cli(body, "train_lm")


if __name__ == "__main__":
    sys.exit(main())
