"""Index factory strings parsed before faiss sees them (SPEC §2): no faiss import.

faiss's `index_factory` aborts the process on some strings (`IVF0,PQ8` is a segmentation
fault) and answers others with multi-line C++ traces, so the run checks a factory here
first: its form must be one the run can build and encode once per key (a standalone codec),
its list count >= 1, its sub-quantizers must divide the key dimension and its code bits
must exist. `check_factory_form` needs no dimension; `check_factory_dim` adds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUPPORTED_FORMS = ("IVF<nlist>,PQ<m> (the paper's), IVF<nlist>,PQ<m>x<bits>, IVF<nlist>,Flat, IVF<nlist>,SQ8, "
                   "PQ<m>, Flat, SQ8, OPQ<m>,IVF<nlist>,PQ<m>")
MIN_POINTS_PER_CENTROID = 39  # faiss k-means warns below this many training points per list
MAX_NLIST = 1 << 24  # far above any datastore's useful list count; keeps k-means allocations sane
SQ_KINDS = ("SQ4", "SQ6", "SQ8", "SQfp16", "SQbf16")

_PRE = re.compile(r"OPQ(?P<opq>\d+)(?:_(?P<opq_out>\d+))?")
_IVF = re.compile(r"IVF(?P<nlist>\d+)")
_CODEC = re.compile(r"Flat|SQ(?:4|6|8|fp16|bf16)|PQ(?P<m>\d+)(?:x(?P<bits>\d+))?(?P<np>np)?")


class FactoryError(ValueError):
    """An index factory string the run cannot build; the message lists the supported forms."""


@dataclass(frozen=True)
class FactorySpec:
    """The parts of a factory string: optional OPQ rotation, optional IVF, one codec."""

    opq: int | None  # OPQ sub-quantizer count (the rotation's own PQ)
    opq_out: int | None  # OPQ output dimension (OPQ<m>_<d>), None = the input dimension
    nlist: int | None  # inverted lists, None = no IVF
    codec: str  # "Flat", "SQ8", ..., or "PQ"
    pq_m: int | None  # PQ sub-quantizers
    pq_bits: int  # bits per PQ code (8 unless PQ<m>x<bits>)


def _fail(factory: str, why: str) -> FactoryError:
    return FactoryError(f"index_factory '{factory}': {why}; use one of: {SUPPORTED_FORMS}")


def parse_factory(factory: str) -> FactorySpec:
    """Parse `factory` into a FactorySpec; FactoryError (one line) for an unsupported or invalid one."""
    if not isinstance(factory, str) or not factory.strip():
        raise _fail(str(factory), "empty")
    parts = [p.strip() for p in factory.split(",")]
    opq = opq_out = nlist = None
    if parts and (m := _PRE.fullmatch(parts[0])):
        opq, opq_out = int(m["opq"]), int(m["opq_out"]) if m["opq_out"] else None
        parts = parts[1:]
    if parts and (m := _IVF.fullmatch(parts[0])):
        nlist = int(m["nlist"])
        parts = parts[1:]
    if len(parts) != 1 or not (m := _CODEC.fullmatch(parts[0])):
        if any(p.startswith(("HNSW", "NSG", "LSH")) for p in factory.split(",")):
            raise _fail(factory, "a graph / hashing index has no standalone codec (faiss sa_encode), which the "
                                 "run needs to encode each key once and to measure quantization error")
        raise _fail(factory, "not a form this run can build")
    spec = FactorySpec(opq=opq, opq_out=opq_out, nlist=nlist, codec="PQ" if m["m"] else parts[0],
                       pq_m=int(m["m"]) if m["m"] else None, pq_bits=int(m["bits"]) if m["bits"] else 8)
    _check_counts(factory, spec)
    return spec


def _check_counts(factory: str, spec: FactorySpec) -> None:
    """Counts that faiss would crash on or reject: lists, sub-quantizers, code bits."""
    if spec.nlist is not None and not 1 <= spec.nlist <= MAX_NLIST:
        raise _fail(factory, f"IVF list count {spec.nlist} must be in [1, {MAX_NLIST:,}] (e.g. IVF4096)")
    if spec.pq_m is not None and spec.pq_m < 1:
        raise _fail(factory, f"PQ sub-quantizer count {spec.pq_m} must be >= 1 (e.g. PQ64)")
    if spec.opq is not None and spec.opq < 1:
        raise _fail(factory, f"OPQ sub-quantizer count {spec.opq} must be >= 1")
    if spec.opq_out is not None and spec.opq_out < 1:
        raise _fail(factory, f"OPQ output dimension {spec.opq_out} must be >= 1")
    if not 1 <= spec.pq_bits <= 16:
        raise _fail(factory, f"PQ code bits {spec.pq_bits} must be in [1, 16] (8 is the paper's)")


def check_factory_dim(factory: str, dim: int) -> FactorySpec:
    """Parse `factory` and check it against key dimension `dim` (sub-quantizers must divide it)."""
    spec = parse_factory(factory)
    inner = spec.opq_out or dim  # what the PQ after an OPQ rotation sees
    for name, m, d in (("OPQ", spec.opq, inner), ("PQ", spec.pq_m, inner)):
        if m is not None and (m > d or d % m):
            options = [s for s in (8, 16, 32, 48, 64, 96, 128) if d % s == 0]
            raise FactoryError(
                f"key dimension {d} is not divisible by the {name} sub-quantizer count {m} in '{factory}' "
                f"(use {name}{options[-1] if options else 1} or another divisor of {d}: {options})")
    return spec


def training_problem(factory: str, n_train: int) -> str | None:
    """Why `n_train` keys cannot train `factory`'s IVF (with the IVF size that fits), or None."""
    spec = parse_factory(factory)
    if spec.nlist is None or n_train >= MIN_POINTS_PER_CENTROID * spec.nlist:
        return None
    needed = MIN_POINTS_PER_CENTROID * spec.nlist
    suggest = 1 << max(0, (max(1, n_train // MIN_POINTS_PER_CENTROID)).bit_length() - 1)  # largest power of 2 that fits
    return (f"'{factory}' needs at least {needed:,} training keys ({MIN_POINTS_PER_CENTROID} x nlist {spec.nlist}) "
            f"but only {n_train:,} are available (use IVF{suggest} or a larger datastore)")
