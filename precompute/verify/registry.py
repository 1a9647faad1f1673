"""Which verify module checks the outputs of which precompute stage, in the pipeline's stage order.

Keyed by the stage names of `precompute.stages.STAGES`; `verify_run` iterates `STAGE_NAMES` and runs each
stage's modules whose `applies(ctx)` holds. A stage with no own table (its outputs are checked through a
later one: the tokenize stages through the token streams, the index through the re-search) maps to ().
Adding a stage: its verify module (STAGE, applies, check) and one entry here.
"""

from __future__ import annotations

from types import ModuleType

from precompute.stages import stage_names

from . import (
    datastore,
    documents,
    eval_tokens,
    exact,
    mitigations,
    novelty,
    schema,
    search,
    token_types,
    whitening,
    words,
)

STAGE_NAMES = tuple(stage_names())  # the pipeline's stage list (names only: no code of the stages is shared)

MODULES: tuple[ModuleType, ...] = (datastore, eval_tokens, whitening, search, token_types, exact, novelty, mitigations,
                        words, documents, schema)

CHECKS: dict[str, tuple[ModuleType, ...]] = {name: tuple(m for m in MODULES if m.STAGE == name)
                                  for name in STAGE_NAMES}
