"""Key extraction (SPEC §1) on CPU or GPU, with the LM's p(target) when asked.

The key of a position is the input of the last block's feed-forward module, captured by a
pre-hook. With keys only, the forward stops right there (the hook raises `_StopForward`):
the last FFN, the final norm and the LM head are never computed. With p_LM, the head runs
on the owned positions only, in chunks, so memory does not grow with batch × window × V.

Recomputation is bit-identical (SPEC §1): a key, query or p_LM depends on its batch alone,
never on the shard size, a resume, the thread count or thread settings other code left.
- Batches lie on one grid over the run's windows (`batch_size` consecutive windows, split
  where the window length changes: only the last window is shorter), and shards hold whole
  batches of that grid (`shard_windows`), so the shard size never changes a batch.
- On CPU each op runs on one thread and `threads` batches run at once, one per worker.
  Intra-op threads would cut every elementwise op at numel / threads, and torch computes a
  chunk's tail with the scalar function, which differs from the vectorised one in the last
  bit for SiLU, sigmoid, both GELUs and softplus (Llama, Mistral, Gemma, GPT-BigCode ... keys
  and p_LM changed with the thread count and, at 3 threads, with the batch composition).
  Whole batches per thread are also faster on a shared 2-core machine (no barrier waits).

On CUDA the device-to-host copies overlap the next batch's forward: keys go as fp16 into
pinned host buffers with non-blocking copies, and a writer thread waits on each copy's
event and stores it into the (memmapped) output while the GPU runs on.

`heap_allocations` lets a model stage's forward passes reuse heap memory instead of the
pipeline's 1 MiB mmap threshold, under which every activation was a fresh, page-faulted map.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from knnlm_core.model import LoadedModel, batch_windows, capture_keys
from knnlm_core.windows import Window
from precompute.runner import return_freed_memory

HEAD_CHUNK = 1024  # positions per LM-head chunk: logits of (1024, V) float32 at a time
# The shard layout, folded into the model stages' shard keys: a folder of shards cut another way
# (before shards held whole batches) is removed, never resumed.
SHARD_LAYOUT = "whole-batches"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for the mmap threshold (64-bit)
HEAP_TRIM_THRESHOLD = 64 << 20  # keep freed activations for the next batch instead of returning them
DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's default, what the pipeline runs with outside forward passes


class _StopForward(Exception):
    """Raised by the key hook to end a keys-only forward pass early."""


@dataclass
class LMOutputs:
    """Per-position LM results of the owned positions, filled in place: p_lm (n,), top ids / p (n, top),
    and the entropy (n,) in nats of the LM's next-token distribution when `entropy` is given."""

    p_lm: np.ndarray
    top_ids: np.ndarray
    top_p: np.ndarray
    entropy: np.ndarray | None = None


def shard_windows(windows: list[Window], shard_size: int, batch_size: int) -> list[list[Window]]:
    """The plan's windows in shards of whole batches (`batch_size` windows from a multiple of `batch_size`).

    A batch belongs to the shard its first owned position falls in ([k·shard_size, (k+1)·shard_size)):
    a shard owns about shard_size positions (less than one batch more), as many shards as positions
    cut into shard_size pieces when a batch owns fewer than shard_size positions.
    """
    groups: dict[int, list[Window]] = {}
    for a in range(0, len(windows), batch_size):
        groups.setdefault(windows[a].first_pos // shard_size, []).extend(windows[a : a + batch_size])
    return list(groups.values())


def shard_key(stage_key: str) -> str:
    """The key a model stage's shard folder is tagged with: its stage key and the shard layout."""
    return f"{stage_key}+{SHARD_LAYOUT}"


def owned_rows(group: list[Window]) -> tuple[int, int]:
    """Global positions [lo, hi) owned by consecutive windows (contiguous by construction)."""
    return group[0].first_pos, group[-1].end - 1


class HostWriter:
    """Copies device tensors into rows of a host array without blocking the device stream.

    `submit(rows_lo, tensor)` enqueues a non-blocking copy into one of `slots` pinned buffers
    and returns at once; a thread waits for that copy and writes the rows. On CPU tensors
    the write happens inline.
    """

    def __init__(self, out: np.ndarray, device: torch.device, slots: int = 3):
        self.out, self.cuda = out, device.type == "cuda"
        self.error: BaseException | None = None
        if self.cuda:
            self.free: queue.Queue[int] = queue.Queue()
            self.work: queue.Queue = queue.Queue()
            self.buffers: list[torch.Tensor | None] = [None] * slots
            for i in range(slots):
                self.free.put(i)
            self.thread = threading.Thread(target=self._drain, daemon=True)
            self.thread.start()

    def submit(self, row_lo: int, tensor: torch.Tensor) -> None:
        if not self.cuda:
            self.out[row_lo : row_lo + len(tensor)] = tensor.numpy()
            return
        if self.error is not None:
            raise self.error
        slot = self.free.get()
        buf = self.buffers[slot]
        if buf is None or buf.shape[0] < tensor.shape[0] or buf.dtype != tensor.dtype:
            buf = self.buffers[slot] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        buf[: len(tensor)].copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.work.put((slot, row_lo, len(tensor), event))

    def _drain(self) -> None:
        while (item := self.work.get()) is not None:
            slot, row_lo, n, event = item
            try:
                event.synchronize()
                self.out[row_lo : row_lo + n] = self.buffers[slot][:n].numpy()
            except BaseException as err:  # surfaced on the next submit / close
                self.error = err
            self.free.put(slot)

    def close(self) -> None:
        if self.cuda:
            self.work.put(None)
            self.thread.join()
            if self.error is not None:
                raise self.error


def _gather_owned(hidden: torch.Tensor, batch: list[Window]) -> torch.Tensor:
    """Rows of the owned positions of each window of the batch, in position order: (n_owned, d)."""
    parts = [hidden[i, w.first_pos - w.begin : w.end - 1 - w.begin] for i, w in enumerate(batch)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def lm_head_logits(model: torch.nn.Module, final_hidden: torch.Tensor) -> torch.Tensor:
    """float32 LM logits (n, V) of final hidden states (n, d), with the family's logit scaling / capping."""
    logits = model.get_output_embeddings()(final_hidden).float()
    cfg = model.config
    if getattr(cfg, "logit_scale", None) and cfg.model_type.startswith("cohere"):
        logits = logits * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def extract(
    lm: LoadedModel,
    ids: np.ndarray,
    windows: list[Window],
    keys_out: np.ndarray,
    batch_size: int,
    lm_out: LMOutputs | None = None,
    progress: Callable[[int], None] | None = None,
    threads: int = 1,
) -> None:
    """Keys of every position owned by `windows` into keys_out (rows from windows[0].first_pos).

    With `lm_out`, also p_LM(target) and the LM's top predictions of those positions
    (same row numbering). keys_out is (n_owned, d) float16; ids the corpus token stream.
    `windows` start on the batch grid (a shard of `shard_windows`); on CPU `threads` batches
    run at once, each op single-threaded (the module docstring says why).
    """
    model = lm.model
    device = next(model.parameters()).device
    stop_early = lm_out is None
    captured = threading.local()  # each worker's last FFN input

    def sink(hidden: torch.Tensor) -> None:
        captured.hidden = hidden
        if stop_early:
            raise _StopForward

    row0 = windows[0].first_pos
    body = getattr(model, model.base_model_prefix)

    @torch.inference_mode()
    def run_batch(batch: list[Window]) -> int:
        x = torch.from_numpy(np.stack([ids[w.begin : w.end] for w in batch]).astype(np.int64))  # (B, L)
        x = x.to(device, non_blocking=True)
        try:
            out = body(input_ids=x, use_cache=False)
        except _StopForward:
            out = None
        lo = batch[0].first_pos - row0
        hidden = captured.hidden.reshape(x.shape[0], x.shape[1], -1)  # (B, L, d); OPT's fc1 sees (B * L, d)
        writer.submit(lo, _gather_owned(hidden, batch).to(torch.float16))
        if lm_out is not None:
            _score(model, _gather_owned(out.last_hidden_state, batch), ids, batch, lm_out, lo)
        return sum(w.n_owned for w in batch)

    writer = HostWriter(keys_out, device)
    handle = capture_keys(model, sink)
    try:  # on CUDA in this thread: its device and stream are the ones the copies' events are recorded on
        with (batch_workers(threads) if device.type == "cpu" else nullcontext()) as pool:
            for n in (pool.map if pool else map)(run_batch, batch_windows(windows, batch_size)):
                if progress:
                    progress(n)
    finally:
        handle.remove()
        writer.close()


@contextmanager
def batch_workers(n: int) -> Iterator[ThreadPoolExecutor]:
    """n worker threads whose torch ops run single-threaded; the caller's thread setting is restored after.

    torch.set_num_threads is process-wide for MKL and new threads, so it is set to 1 for the
    workers' lifetime and back to this thread's value (what the run configured) when they end.
    """
    restore = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, queued batches are dropped, running ones end
        torch.set_num_threads(restore)


@contextmanager
def heap_allocations() -> Iterator[None]:
    """Forward passes inside reuse freed heap memory; after, the pipeline's allocator policy again.

    The pipeline fixes glibc's mmap threshold at 1 MiB (runner.return_freed_memory) so that
    freed arrays return to the OS; under it every activation of a forward pass was a fresh
    mmap, zeroed page by page (~55 page faults per key for the demo GPT-2: the datastore
    stage ran at 56% of bench/extract.py's rate). Inside, allocations up to 32 MiB come from
    the heap and freed ones stay for the next batch; on exit the heap is trimmed and the
    pipeline's policy restored. No-op where mallopt is unavailable.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
        return_freed_memory()


def _libc():
    """glibc through ctypes, or None where it (or mallopt) is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _score(model, final_hidden: torch.Tensor, ids: np.ndarray, batch: list[Window], lm_out: LMOutputs,
           row_lo: int) -> None:
    """p_LM(target) and top-k of owned positions, the LM head applied HEAD_CHUNK rows at a time."""
    first, last = batch[0].first_pos, batch[-1].end - 1
    targets = torch.from_numpy(ids[first + 1 : last + 1].astype(np.int64)).to(final_hidden.device)  # (n,)
    top = lm_out.top_ids.shape[1]
    for a in range(0, len(targets), HEAD_CHUNK):
        b = min(a + HEAD_CHUNK, len(targets))
        logits = lm_head_logits(model, final_hidden[a:b])  # (c, V) float32
        # log softmax without materialising it: log p = logit - logsumexp (SPEC §1, float32)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (c, 1)
        p = (logits.gather(1, targets[a:b, None]) - lse)[:, 0].double().exp()
        values, indices = torch.topk(logits, top, dim=-1)
        rows = slice(row_lo + a, row_lo + b)
        lm_out.p_lm[rows] = p.cpu().numpy()
        lm_out.top_ids[rows] = indices.cpu().numpy()
        lm_out.top_p[rows] = (values - lse).exp().cpu().numpy()
        if lm_out.entropy is not None:  # H = lse - Σ p·logit (nats), one more pass over the (c, V) logits
            p_all = (logits - lse).exp_()
            lm_out.entropy[rows] = (lse[:, 0] - (p_all * logits).sum(-1)).cpu().numpy()
