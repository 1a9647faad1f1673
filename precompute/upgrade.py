"""`python -m precompute.upgrade --run-dir DIR`: bring a run database of schema 2 to schema 3 in place.

Schema 3 adds the SPEC §11 documents (`eval_tokens.doc_id`, `documents`, `doc_bin_stats`,
`run.n_docs / doc_mode / doc_block_tokens`). They follow from the evaluation text and the
tokenizer alone, so a run whose datastore, index and searches took hours need not be rebuilt:
the evaluation text is tokenized again, checked to give exactly the stored evaluation tokens,
and every table is rewritten through the same writer as the database stage (temp file, then
rename: a failure leaves the old database as it was).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from knnlm_core import documents, store
from knnlm_core.config import RunConfig, resolve_path
from knnlm_core.corpus import CorpusError, load_tokenizer, read_text

FROM_VERSION = 2


class UpgradeError(ValueError):
    """The run cannot be upgraded (wrong version, text or tokenizer that do not match)."""


def read_tables(con: duckdb.DuckDBPyConnection) -> dict[str, pd.DataFrame]:
    """Every relation the writer needs, as frames (views of the compact storage read back as their columns)."""
    names = set(con.execute("SELECT table_name FROM information_schema.tables WHERE table_catalog = "
                            "current_database()").fetchdf()["table_name"])
    tables = {}
    for name, order in store.TABLE_ORDER.items():
        if name in names:
            tables[name] = con.execute(f"SELECT * FROM {name}" + (f" ORDER BY {order}" if order else "")).fetchdf()
    if set(store.OPTIONAL_TABLES) <= names:
        tables["mitigations"] = con.execute("SELECT * FROM mitigations ORDER BY ord").fetchdf().drop(columns="ord")
        tables["mitigation_tokens"] = con.execute("SELECT * FROM mitigation_tokens ORDER BY pos").fetchdf()
        tables["adaptive_lambda"] = con.execute("SELECT * FROM adaptive_lambda").fetchdf()
    return tables


def run_config(run_row: pd.Series) -> RunConfig:
    """The run's config from `run.config_json` (fields added since take their defaults)."""
    data = json.loads(run_row["config_json"])
    data["lam"] = data.pop("lambda")
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in data.items() if k in known})


def upgrade(run_dir: Path) -> documents.Documents:
    """Rewrite DIR/metrics.duckdb at schema 3; returns the documents found."""
    path = Path(run_dir) / store.DB_NAME
    if not path.is_file():
        raise UpgradeError(f"no {store.DB_NAME} in {run_dir} (point --run-dir at a run directory)")
    con = duckdb.connect(str(path), read_only=True)
    try:
        version = con.execute("SELECT schema_version FROM run").fetchone()[0]
        if version == store.SCHEMA_VERSION:
            raise UpgradeError(f"{path} is already at schema version {version}: nothing to do")
        if version != FROM_VERSION:
            raise UpgradeError(f"{path} has schema version {version}; this upgrade reads {FROM_VERSION} only: "
                               "rebuild the run with `python -m precompute --config ... --run-dir ... --overwrite`")
        shared = con.execute("SELECT datastore_tokens_from FROM run").fetchone()[0]
        if shared:
            con.execute(f"ATTACH ? AS {store.SHARED_DATASTORE} (READ_ONLY)", [str((path.parent / shared).resolve())])
        tables = read_tables(con)
    finally:
        con.close()
    run_row = tables["run"].iloc[0]
    cfg = run_config(run_row)
    ev = tables["eval_tokens"]
    eval_ids = np.concatenate([ev["context_token_id"].to_numpy()[:1], ev["token_id"].to_numpy()]).astype(np.int32)
    try:
        text = read_text(resolve_path(cfg.eval_corpus))
        docs = documents.for_eval_tokens(text, load_tokenizer(cfg.tokenizer or cfg.model), eval_ids,
                                         cfg.doc_block_tokens)
    except (CorpusError, ValueError, OSError) as err:
        raise UpgradeError(f"documents of {cfg.eval_corpus}: {err}") from err
    ev["doc_id"] = docs.doc_id
    tables["documents"] = documents.to_frame(docs)
    cfg_dict = cfg.to_dict()
    tables["run"] = tables["run"].assign(schema_version=store.SCHEMA_VERSION, n_docs=len(docs.first_pos),
                                         doc_mode=docs.mode, doc_block_tokens=docs.block_tokens,
                                         config_json=json.dumps(cfg_dict, sort_keys=True))
    store.write_database(path, tables, datastore_from=(path.parent / shared).resolve() if shared else None)
    update_json(path.parent / "manifest.json", cfg_dict, docs)
    return docs


def update_json(manifest: Path, cfg_dict: dict, docs: documents.Documents) -> None:
    """Manifest (and run_config.json, when present) record the new schema, documents and full config."""
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        data.update(schema_version=store.SCHEMA_VERSION, config=cfg_dict,
                    documents={"mode": docs.mode, "n_docs": len(docs.first_pos), "block_tokens": docs.block_tokens})
        _write_json(manifest, data)
    recorded = manifest.parent / "run_config.json"
    if recorded.is_file():
        _write_json(recorded, cfg_dict)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 upgraded, 2 bad input (one `error:` line; the database untouched), 1 internal error (+ log)."""
    from precompute.cli import Parser, path_arg, run_cli

    def body() -> int:
        parser = Parser(prog="python -m precompute.upgrade", description=__doc__.splitlines()[0])
        parser.add_argument("--run-dir", type=path_arg, required=True, help="run directory holding metrics.duckdb")
        args = parser.parse_args(argv)
        docs = upgrade(args.run_dir)
        print(f"{args.run_dir}: schema {store.SCHEMA_VERSION}, {len(docs.first_pos)} documents ({docs.mode})",
              file=sys.stderr)
        return 0

    return run_cli(body, "upgrade", extra_user_errors=(UpgradeError, duckdb.Error))


if __name__ == "__main__":
    sys.exit(main())
