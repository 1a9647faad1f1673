"""The run database's schema, declared once (SPEC §7-§12; docs/SCHEMA.md is checked against it).

Every relation of `metrics.duckdb` with its columns: name, DuckDB type (as
`information_schema.columns.data_type` spells it), the SPEC section that asks for it ("ext" for
an extension of this implementation), the precompute stage whose output fills it (the stage
names of `precompute/pipeline.py`) and a one-line meaning. The writer's DDL (`ddl`, used by
`knnlm_core.store`) and the typed views (`types`) are built from it; `tests/test_schema.py`
checks docs/SCHEMA.md and the shipped runs against it. No third-party import.
"""

from __future__ import annotations

from dataclasses import dataclass

HIT_KS = (1, 8, 16, 64, 256, 1024)  # SPEC §7: hit_k columns (NULL for k > the run's k)
RECALL_KS = (16, 64, 1024)  # SPEC §8: recall@k for those <= the run's k
EXACT_SETTINGS = ("ivf_pq", "ivf_exact", "exact")  # SPEC §8: p_knn_<setting> (neighbours + distances)


@dataclass(frozen=True)
class Column:
    """One column: name, DuckDB type, SPEC section, producing stage, meaning; optional = some runs lack it."""

    name: str
    type: str
    spec: str
    stage: str
    meaning: str
    optional: bool = False


@dataclass(frozen=True)
class Relation:
    """A table (written ORDER BY `order`) or a view of the run database; optional = only with valid_corpus."""

    name: str
    kind: str  # "table" | "view"
    columns: tuple[Column, ...]
    order: str | None = None
    optional: bool = False


def _cols(spec: str, stage: str, rows: str) -> tuple[Column, ...]:
    """Columns from lines `name TYPE meaning` (all of one SPEC section and stage)."""
    out = []
    for line in rows.strip().splitlines():
        name, typ, meaning = line.split(maxsplit=2)
        out.append(Column(name, typ, spec, stage, meaning))
    return tuple(out)


RUN = Relation("run", "table", (
    *_cols("§7", "database", """
run_name VARCHAR the run's directory name
model VARCHAR the model (name or path) as configured
n_entries BIGINT datastore entries N
n_eval BIGINT evaluation positions T
dim INTEGER key dimension d
index_factory VARCHAR FAISS index factory string
nprobe INTEGER IVF lists probed per query
k INTEGER neighbours retrieved per query
temperature DOUBLE softmax temperature τ of p_kNN
lambda DOUBLE interpolation weight λ of p_kNN
distance_source VARCHAR distances p_kNN uses: 'pq' (the index's) or 'exact' (recomputed from the keys)
ppl_lm DOUBLE evaluation perplexity of the LM
ppl_knnlm DOUBLE evaluation perplexity of the kNN-LM"""),
    *_cols("ext", "database", """
schema_version INTEGER version of this schema (knnlm_core.store.SCHEMA_VERSION)
store_neighbors INTEGER neighbours per position kept in the neighbors table
hook_point VARCHAR module whose input is the key (the last block's feed-forward)
contamination_mode VARCHAR how token_types.contamination searched: 'exact' or 'index'
datastore_corpus VARCHAR datastore text (path as configured)
eval_corpus VARCHAR evaluation text (path as configured)
created_at VARCHAR build time (ISO 8601, UTC)
config_json VARCHAR the whole run configuration as JSON
eval_domain VARCHAR 'in-domain', 'out-of-domain' or '' (not stated)"""),
    Column("exact_search", "BOOLEAN", "§8", "exact", "whether the SPEC §8 columns are filled"),
    *_cols("ext", "database", """
datastore_sha256 VARCHAR sha256 of the datastore token stream as int32
datastore_tokens_from VARCHAR NULL, or the path of another run's database whose datastore_tokens this run reads"""),
    *_cols("§11", "database", """
n_docs INTEGER evaluation documents
doc_mode VARCHAR 'articles' (WikiText headings) or 'blocks' (of doc_block_tokens positions)
doc_block_tokens INTEGER positions per block document (recorded in either mode)"""),
))

EVAL_TOKENS = Relation("eval_tokens", "table", (
    Column("pos", "INTEGER", "§7", "eval_lm", "evaluation position t = 0..T-1 (the query at token t)"),
    Column("token_id", "INTEGER", "§7", "tokenize_eval", "target token id (evaluation token t + 1)"),
    Column("token", "VARCHAR", "§7", "database", "the target's decoded text"),
    Column("freq", "BIGINT", "§7", "database", "the target's count among the datastore values"),
    Column("freq_bin", "SMALLINT", "§7", "database", "floor(log10(freq)), -1 for freq 0 (SPEC §3)"),
    Column("p_lm", "DOUBLE", "§7", "eval_lm", "p_LM(target)"),
    Column("p_knn", "DOUBLE", "§7", "search", "p_kNN(target) over the k neighbours"),
    Column("p_knnlm", "DOUBLE", "§7", "database", "λ p_knn + (1 - λ) p_lm"),
    Column("nll_lm", "DOUBLE", "§7", "database", "-ln p_lm (nats)"),
    Column("nll_knnlm", "DOUBLE", "§7", "database", "-ln p_knnlm (nats)"),
    Column("gain", "DOUBLE", "§7", "database", "ln p_knnlm - ln p_lm"),
    *(Column(f"hit_{k}", "BOOLEAN", "§7", "search", f"a target-carrying neighbour among the first {k} "
             f"(NULL for k > the run's k)") for k in HIT_KS),
    Column("target_rank", "INTEGER", "§7", "search", "1-based rank of the first neighbour carrying the target "
           "(NULL if none)"),
    Column("n_target", "INTEGER", "§7", "search", "neighbours carrying the target"),
    Column("query_pq_error", "DOUBLE", "§7", "search", "squared L2 between the query and its PQ reconstruction"),
    Column("context_freq", "BIGINT", "§7", "database", "datastore count of the last context token"),
    Column("context_token_id", "INTEGER", "ext", "tokenize_eval", "evaluation token t (the last context token)"),
    Column("knn_log_z", "DOUBLE", "ext", "search", "log Σ_j exp(-d_j/τ) over the k neighbours"),
    *(Column(f"recall_{k}", "DOUBLE", "§8", "exact", f"|index top-{k} ∩ exact top-{k}| / {k} "
             f"(NULL without exact search or for k > the run's k)") for k in RECALL_KS),
    Column("p_knn_ivf_pq", "DOUBLE", "§8", "exact", "p_kNN from the index's neighbours with PQ distances"),
    Column("p_knn_ivf_exact", "DOUBLE", "§8", "exact", "p_kNN from the index's neighbours with exact distances"),
    Column("p_knn_exact", "DOUBLE", "§8", "exact", "p_kNN from the exact k nearest keys with exact distances"),
    Column("exact_target_rank", "INTEGER", "§8", "exact", "1-based rank of the first exact neighbour carrying "
           "the target (NULL if none)"),
    Column("doc_id", "INTEGER", "§11", "database", "0-based evaluation document of the target token"),
    Column("ctx_match_len", "SMALLINT", "§12", "suffix", "L_t: longest context suffix (≤ ctx_max_len) found in "
           "the datastore stream"),
    Column("p_inf", "DOUBLE", "§12", "suffix", "∞-gram estimate count(s y) / count(s ·) of the target"),
    Column("inf_suffix_len", "SMALLINT", "§12", "suffix", "length of the ∞-gram suffix s"),
    Column("inf_count", "BIGINT", "§12", "suffix", "count(s ·): occurrences of s followed by a token"),
    Column("copy_share", "DOUBLE", "§12", "database", "share of p_kNN from neighbours whose context overlaps the "
           "query's by ≥ 4 tokens (NULL when p_knn = 0)"),
), order="pos")

TOKEN_TYPES = Relation("token_types", "table", (
    Column("token_id", "INTEGER", "§7", "types", "token type v (freq ≥ 1 or seen in evaluation)"),
    Column("token", "VARCHAR", "§7", "database", "v's decoded text"),
    Column("freq", "BIGINT", "§7", "types", "count of v among the datastore values"),
    Column("freq_bin", "SMALLINT", "§7", "types", "floor(log10(freq)), -1 for freq 0"),
    Column("cv", "DOUBLE", "§7", "types", "coefficient of variation of v's keys' distances to their centroid "
           "(NULL for freq < 2)"),
    Column("contamination", "DOUBLE", "§7", "types", "share of other types among the min(freq, 1024) keys "
           "nearest v's centroid"),
    Column("pq_error_mean", "DOUBLE", "§7", "types", "mean squared PQ reconstruction error of v's keys"),
    Column("pq_error_max", "DOUBLE", "§7", "types", "largest squared PQ reconstruction error of v's keys"),
    Column("eval_count", "BIGINT", "§7", "types", "occurrences of v as an evaluation target"),
), order="token_id")

NEIGHBORS = Relation("neighbors", "table", (
    *_cols("§7", "search", """
pos INTEGER evaluation position
rank SMALLINT 1-based neighbour rank
entry BIGINT datastore entry id
token_id INTEGER value of the entry
distance_pq FLOAT PQ squared L2 (the index's)
distance_exact FLOAT exact squared L2 over the stored keys"""),
    Column("overlap", "SMALLINT", "§12", "database", "longest common suffix of the query's and the entry's "
           "contexts (≤ 64)"),
), order="pos, rank")

EXACT_NEIGHBORS = Relation("exact_neighbors", "table", _cols("§8", "exact", """
pos INTEGER evaluation position
rank SMALLINT 1-based rank among the exact neighbours
entry BIGINT datastore entry id
distance FLOAT exact squared L2"""), order="pos, rank")

EVAL_WORDS = Relation("eval_words", "table", _cols("§10", "words", """
word_idx INTEGER word number in text order
word VARCHAR the whitespace word
first_pos INTEGER position whose target is the word's first token
n_tokens SMALLINT tokens of the word
freq BIGINT exact occurrences in the whitespace-split datastore text
freq_bin SMALLINT floor(log10(freq)), -1 for freq 0
nll_lm DOUBLE sum of the word's tokens' nll_lm
nll_knnlm DOUBLE sum of the word's tokens' nll_knnlm"""), order="word_idx")

DATASTORE_TOKENS = Relation("datastore_tokens", "table", _cols("§7", "tokenize_datastore", """
pos BIGINT position in the datastore stream (entry i's last context token is at pos i)
token_id INTEGER token id"""), order="pos")

LM_TOP = Relation("lm_top", "table", _cols("ext", "eval_lm", """
pos INTEGER evaluation position
rank SMALLINT 1-based rank among the LM's top 10
token_id INTEGER token id
p_lm FLOAT its p_LM"""), order="pos, rank")

KNN_TOP = Relation("knn_top", "table", _cols("ext", "search", """
pos INTEGER evaluation position
rank SMALLINT 1-based rank among p_kNN's top 10
token_id INTEGER token id
p_knn FLOAT its p_kNN over all k neighbours"""), order="pos, rank")

VOCAB = Relation("vocab", "table", _cols("ext", "database", """
token_id INTEGER a token id that occurs in the run
token VARCHAR its decoded text"""), order="token_id")

DOCUMENTS = Relation("documents", "view", _cols("§11", "database", """
doc_id INTEGER 0-based evaluation document
first_pos INTEGER its first position
n_positions INTEGER its positions
title VARCHAR the article title, or 'positions a–b' for a block"""))

DOC_BIN_STATS = Relation("doc_bin_stats", "view", (
    *_cols("§11", "database", """
doc_id INTEGER evaluation document
freq_bin SMALLINT frequency bin
n_tokens BIGINT positions of the document in the bin
sum_nll_lm DOUBLE Σ nll_lm
sum_nll_knnlm DOUBLE Σ nll_knnlm
sum_p_lm DOUBLE Σ p_lm
sum_p_knn DOUBLE Σ p_knn
n_harmed HUGEINT positions with gain < 0"""),
    *(Column(f"n_hit_{k}", "HUGEINT", "§11", "database", f"Σ hit_{k} (NULL above the run's k)") for k in HIT_KS),
    *(Column(f"sum_recall_{k}", "DOUBLE", "§11", "database", f"Σ recall_{k}") for k in RECALL_KS),
    *(Column(f"sum_nll_{s}", "DOUBLE", "§11", "database", f"Σ -ln(λ p_knn_{s} + (1 - λ) p_lm)")
      for s in EXACT_SETTINGS),
))

MITIGATIONS = Relation("mitigations", "view", _cols("§9", "mitigate", """
ord INTEGER the variant's order (plain first)
variant VARCHAR variant name
label VARCHAR display label
family VARCHAR kind of mitigation
tau DOUBLE τ used
lam DOUBLE fixed λ (NULL when per position)
p_knn_column VARCHAR mitigation_tokens column of its p_kNN (NULL = eval_tokens.p_knn)
lam_column VARCHAR mitigation_tokens column of its λ (NULL = lam)
eps DOUBLE absolute whitening ε
valid_ppl_lm DOUBLE validation PPL of the LM
valid_ppl DOUBLE validation PPL of the variant (what τ / λ were chosen on)
ppl DOUBLE evaluation PPL of the variant
notes VARCHAR validation text and size, τ grid, bins, fit and build seconds"""), optional=True)

MITIGATION_TOKENS = Relation("mitigation_tokens", "view", (
    Column("pos", "INTEGER", "§9", "mitigate", "evaluation position"),
    Column("p_knn_tau", "FLOAT", "§9", "mitigate", "p_kNN at the validation-chosen τ (absent when that is the "
           "run's τ)", optional=True),
    Column("p_knn_idf", "FLOAT", "§9", "mitigate", "IDF-weighted p_kNN"),
    Column("p_knn_zipfian", "FLOAT", "§9", "mitigate", "p_kNN over the Zipfian-whitened index", optional=True),
    Column("p_knn_entries", "FLOAT", "§9", "mitigate", "p_kNN over the entry-whitened index", optional=True),
    Column("p_inf", "DOUBLE", "§12", "mitigate", "the ∞-gram estimate (the infgram variant's column)"),
    Column("lam_nn", "DOUBLE", "§9", "mitigate", "λ of the adaptive-nn rule"),
    Column("lam_entropy", "DOUBLE", "§9", "mitigate", "λ of the adaptive-entropy rule"),
), optional=True)

ADAPTIVE_LAMBDA = Relation("adaptive_lambda", "view", _cols("§9", "mitigate", """
variant VARCHAR adaptive variant
bin INTEGER bin number
lo DOUBLE feature lower edge (inclusive)
hi DOUBLE feature upper edge (exclusive)
lam DOUBLE λ of the bin
n_valid INTEGER validation positions in the bin"""), optional=True)

RELATIONS: tuple[Relation, ...] = (RUN, EVAL_TOKENS, TOKEN_TYPES, NEIGHBORS, EXACT_NEIGHBORS, EVAL_WORDS,
                                   DATASTORE_TOKENS, LM_TOP, KNN_TOP, VOCAB, DOCUMENTS, DOC_BIN_STATS,
                                   MITIGATIONS, MITIGATION_TOKENS, ADAPTIVE_LAMBDA)
BY_NAME = {r.name: r for r in RELATIONS}
TABLES = tuple(r for r in RELATIONS if r.kind == "table")  # created by `ddl`, filled by the writer


def quote(name: str) -> str:
    """A column name as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def ddl() -> str:
    """CREATE TABLE statements of every table (views are created by the writer from their frames / SQL)."""
    return "".join(f"CREATE TABLE {t.name} ({', '.join(f'{quote(c.name)} {c.type}' for c in t.columns)});\n"
                   for t in TABLES)


def types(name: str) -> dict[str, str]:
    """{column: DuckDB type} of relation `name`, in order."""
    return {c.name: c.type for c in BY_NAME[name].columns}


def expected_columns(name: str, present: list[str]) -> list[tuple[str, str]]:
    """[(column, type)] relation `name` must have, given the columns `present` (optional ones may be absent)."""
    return [(c.name, c.type) for c in BY_NAME[name].columns if not c.optional or c.name in present]


def markdown(name: str) -> str:
    """The docs/SCHEMA.md table of relation `name`: | column | type | SPEC | stage | meaning |."""
    rows = [f"| `{c.name}` | {c.type} | {c.spec} | {c.stage} | {c.meaning.replace('|', chr(92) + '|')}"
            f"{' (optional)' if c.optional else ''} |" for c in BY_NAME[name].columns]
    return "\n".join(["| column | type | SPEC | stage | meaning |", "|---|---|---|---|---|", *rows])


if __name__ == "__main__":  # print every relation's column table (to paste into docs/SCHEMA.md)
    for r in RELATIONS:
        print(f"### {r.name}\n\n{markdown(r.name)}\n")
