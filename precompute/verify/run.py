"""verify_run: every check of every stage (registry.CHECKS, in the pipeline's stage order) on one run."""

from __future__ import annotations

from pathlib import Path

from knnlm_core import store

from .common import Check
from .context import load
from .registry import CHECKS, STAGE_NAMES


def verify_run(run_dir: Path, sample: int = 2000, type_sample: int = 300, seed: int = 0,
               exact_sample: int = 200) -> list[Check]:
    """List of (check, passed, detail) for the run at run_dir, stage by stage (registry.CHECKS).

    KeyStoreError if its keys are unreadable, RunSchemaError if its database is absent or outdated, its subclass
    store.CorruptRunError if damaged (a block failing its checksum on a later read included).
    """
    run_dir = Path(run_dir)
    path = run_dir / store.DB_NAME
    con = store.open_readonly(path)  # attaches a shared datastore_tokens table
    try:
        with store.corruption_is_bad_input(path):  # a block failing its checksum on a later read: CorruptRunError
            ctx = load(con, run_dir, sample, type_sample, seed, exact_sample)
            checks: list[Check] = []
            for stage in STAGE_NAMES:
                for module in CHECKS[stage]:
                    if module.applies(ctx):
                        checks += module.check(ctx)
        return checks
    finally:
        con.close()
