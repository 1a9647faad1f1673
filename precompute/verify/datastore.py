"""Run-level facts and the datastore stream (stage `datastore`; SPEC §1, §7): sizes in the run table and
the manifest, values = datastore token i + 1, the `datastore_tokens` table = the datastore stream."""

from __future__ import annotations

from .common import Check, RunData, equal

STAGE = "datastore"


def applies(ctx: RunData) -> bool:
    return True


def check(ctx: RunData) -> list[Check]:
    """Sizes, the manifest's parameters, values.npy and datastore_tokens against the token streams."""
    run, manifest, d = ctx.run, ctx.manifest, ctx.keys.shape[1]
    n, t = len(ctx.values), len(ctx.ev_ids) - 1
    checks = [
        equal("run.n_entries / n_eval / dim", [run["n_entries"], run["n_eval"], run["dim"]], [n, t, d]),
        equal("manifest agrees with run table",
              [manifest["n_entries"], manifest["n_eval"], manifest["parameters"]["k"]], [n, t, ctx.k]),
        equal("queries.npy shape = (T, d)", list(ctx.queries.shape), [t, d]),
        equal("values = datastore token i+1", ctx.values, ctx.ds_ids[1:]),
        equal("datastore_tokens = datastore stream", ctx.dt, ctx.ds_ids),
    ]
    if "contamination_search" in manifest:
        checks.append(equal("run.contamination_mode = manifest contamination_search",
                            [str(run.get("contamination_mode"))], [str(manifest["contamination_search"])]))
    return checks
