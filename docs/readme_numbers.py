"""The README's numbers about the shipped runs, written from their databases (issue 21).

`python -m docs.readme_numbers` rewrites every block of README.md between
`<!-- numbers:begin NAME -->` and `<!-- numbers:end -->` from data/runs/demo and
data/runs/demo-shakespeare (opened read-only); `--check` writes nothing and exits 1 listing every
number that differs. Every figure comes from the functions the dashboard calls (knnlm_core.read: its
SQL, intervals and verdicts by feature; knnlm_core.mitigations), so the README states what the dashboard shows.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python docs/readme_numbers.py` as well as `python -m docs.readme_numbers`
    sys.path.insert(0, str(REPO))

from knnlm_core import adaptive, read, store  # noqa: E402

README = REPO / "README.md"
RUNS = {"demo": REPO / "data" / "runs" / "demo", "demo-shakespeare": REPO / "data" / "runs" / "demo-shakespeare"}
IN, OUT = "demo", "demo-shakespeare"
BLOCK = re.compile(r"(<!-- numbers:begin ([\w-]+) -->\n)(.*?)(<!-- numbers:end -->)", re.S)
NUMBER = re.compile(r"[+\-−]?\d+(?:,\d{3})*(?:\.\d+)?%?")
MARK = {True: "✓", False: "✗", None: "–"}


# --------------------------------------------------------------------------- reading the runs


@dataclass
class Run:
    """Everything the README quotes about one shipped run, as the dashboard's query functions return it."""

    name: str
    info: dict
    size_mb: float
    bins: pd.DataFrame  # read.bins.bin_summary
    tot: dict  # read.bins.overall
    exact: pd.DataFrame | None  # read.exact.exact_bin_summary (None without exact search)
    exact_tot: dict | None  # read.exact.exact_overall
    words: pd.DataFrame | None  # read.words.word_bin_summary
    words_tot: dict | None  # read.words.word_overall
    nov: dict  # read.novelty.novelty_findings
    by_ctx: pd.DataFrame  # read.novelty.novelty_summary(by_freq=False)
    variants: pd.DataFrame  # read.mitigations.mitigation_variants
    totals: dict[str, dict]  # read.mitigations.variant_overall per variant
    groups: dict[str, pd.DataFrame]  # read.mitigations.variant_group_changes per variant, oracle_group_changes


def load(name: str, run_dir: Path) -> Run:
    """Query one run read-only (store.open_readonly, as the dashboard opens it)."""
    con = store.open_readonly(run_dir / "metrics.duckdb")
    try:
        cur = con.cursor()
        info = read.run.run_info(cur)
        k, lam = info["k"], float(info["lambda"])
        has_exact, has_words = read.exact.has_exact(cur), read.words.has_words(cur)
        variants = read.mitigations.mitigation_variants(cur)
        names = [v for v in variants["variant"] if v != read.mitigations.PLAIN]
        groups = {v: read.mitigations.variant_group_changes(cur, v) for v in names}
        groups[adaptive.ORACLE_LABEL] = read.mitigations.oracle_group_changes(cur)
        return Run(
            name=name, info=info, size_mb=(run_dir / "metrics.duckdb").stat().st_size / 1e6,
            bins=read.bins.bin_summary(cur, k), tot=read.bins.overall(cur),
            exact=read.exact.exact_bin_summary(cur, k, lam) if has_exact else None,
            exact_tot=read.exact.exact_overall(cur, lam) if has_exact else None,
            words=read.words.word_bin_summary(cur) if has_words else None,
            words_tot=read.words.word_overall(cur) if has_words else None,
            nov=read.novelty.novelty_findings(cur), by_ctx=read.novelty.novelty_summary(cur, k, by_freq=False),
            variants=variants, totals={v: read.mitigations.variant_overall(cur, v) for v in variants["variant"]},
            groups=groups)
    finally:
        con.close()


# --------------------------------------------------------------------------- formatting


def pct(x: float) -> str:
    """A relative change as the dashboard writes it: '+14.3%'."""
    return f"{100 * x:+.1f}%"


def ci(value: float, lo: float | None, hi: float | None) -> str:
    """'+14.3% [+13.0, +15.5]' (relative changes) or '+14.3% [no interval]'."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{pct(value)} [no interval]"
    return f"{pct(value)} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def row_ci(r, col: str) -> str:
    """ci() of a table row's (or dict's) `col` and its `col_ci_lo` / `col_ci_hi`."""
    get = r.get if isinstance(r, dict) else (lambda c: getattr(r, c))
    return ci(get(col), get(f"{col}_ci_lo"), get(f"{col}_ci_hi"))


def ppl(x: float) -> str:
    """A perplexity: two decimals below 1,000, whole numbers with thousands separators above."""
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"


def corpus(path: str) -> str:
    """A corpus path as the README names it."""
    return f"`{path}`"


def bold_if(text: str, verdict: str) -> str:
    """Bold a figure whose interval excludes 0 (a helps / harms / hurts verdict)."""
    return f"**{text}**" if verdict in ("helps", "harms", "hurts") else text


# --------------------------------------------------------------------------- blocks


def block_runs(runs: dict[str, Run]) -> str:
    """What ships: one row per shipped run, from its run table and config."""
    lines = ["| path | what |", "|---|---|"]
    for r in runs.values():
        i, c = r.info, r.info["config"]
        role = "the demo run (in-domain)" if r.name == IN else "its out-of-domain twin"
        exact = "with exact search beside the index (SPEC §8)" if i.get("exact_search") else \
            "without exact search (bounds the shipped data's rebuild time)"
        shared = f"; its datastore token table is read from `{i['datastore_tokens_from']}`" \
            if i.get("datastore_tokens_from") else ""
        lines.append(
            f"| `data/runs/{r.name}/` | {role}: `{i['model']}` over {corpus(i['datastore_corpus'])} "
            f"({i['n_entries']:,} entries), `{i['index_factory']}`, nprobe {i['nprobe']}, k = {i['k']}, "
            f"τ = {i['temperature']:g}, λ = {i['lambda']:g}, evaluated on the first {c['eval_limit_tokens']:,} tokens "
            f"of {corpus(i['eval_corpus'])} ({i['n_eval']:,} positions in {i['n_docs']} {i['doc_mode']}), {exact}, "
            f"word-level metrics (§10) and the mitigations of §9 fitted on the first {c['valid_limit_tokens']:,} "
            f"tokens of {corpus(c['valid_corpus'])}; only `manifest.json` and `metrics.duckdb` "
            f"({r.size_mb:.1f} MB) are in git{shared} |")
    return "\n".join(lines)


def block_headline(runs: dict[str, Run]) -> str:
    """The measured table of the shipped runs: PPL LM / kNN-LM with intervals, kNN-LM with exact search."""
    lines = ["| run | evaluation | tokens (documents) | PPL LM | PPL kNN-LM | change | kNN-LM, exact search |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in runs.values():
        t = r.tot
        exact = ppl(r.exact_tot["ppl_exact"]) if r.exact_tot else "not run"
        lines.append(
            f"| `{r.name}` ({r.info['eval_domain']}) | {corpus(r.info['eval_corpus'])} | {int(t['n_tokens']):,} "
            f"({int(t['n_docs'])}) | {ppl(t['ppl_lm'])} | {ppl(t['ppl_knnlm'])} | {row_ci(t, 'ppl_change')} | {exact} |")
    return "\n".join(lines)


def block_documents(runs: dict[str, Run]) -> str:
    """How many resampling units each shipped run has (why the intervals are optimistic)."""
    a, b = runs[IN].info, runs[OUT].info
    return (f"**Read the shipped runs' intervals as optimistic:** the demo's {a['n_eval']:,} positions come from only "
            f"{a['n_docs']} {a['doc_mode']}, the Shakespeare run's from {b['n_docs']} {b['doc_mode']} of "
            f"{b['doc_block_tokens']:,} positions.")


def _bin_list(bins: pd.DataFrame) -> str:
    """'1–9 -49.4% [-65.0, -18.1]; …' over the seen bins (the verdicts follow in _bins_by_verdict)."""
    return "; ".join(f"{r.bin} {row_ci(r, 'ppl_change')}" for r in bins.itertuples())


def _bins_by_verdict(bins: pd.DataFrame) -> str:
    """'kNN-LM lowers PPL significantly in …, raises it in …, no significant difference in …'."""
    parts = []
    for verdict, words in (("helps", "lowers perplexity significantly in"), ("harms", "raises it significantly in"),
                           ("no significant difference", "makes no significant difference in"),
                           ("no interval", "has no interval in")):
        names = list(bins.loc[bins["knnlm_vs_lm"] == verdict, "bin"])
        if names:
            parts.append(f"{words} {', '.join(names)}")
    return "kNN-LM " + "; ".join(parts) if parts else "no seen bin"


def _token_bullet(r: Run, title: str) -> str:
    seen, unseen = r.bins[r.bins["freq_bin"] >= 0], r.bins[r.bins["freq_bin"] < 0]
    t = r.tot
    out = (f"- **{title}** (`{r.name}`): kNN-LM changes perplexity overall by {row_ci(t, 'ppl_change')} "
           f"({t['knnlm_vs_lm']}). Per seen frequency bin: {_bin_list(seen)}. {_bins_by_verdict(seen)}.")
    if len(unseen):
        u = unseen.iloc[0]
        exact = (1 - float(r.info["lambda"])) ** -1 - 1
        why = f", exactly (1 − λ)⁻¹ − 1 = {pct(exact)} since p_kNN = 0 there" if abs(u.ppl_change - exact) < 1e-9 else ""
        out += (f" In the unseen bin (targets that never occur as a datastore value; {int(u.n_tokens):,} tokens) the "
                f"change is {row_ci(u, 'ppl_change')}{why}.")
    holds, _ = read.findings.crisis_holds(r.bins)  # the Compare page's rule
    crisis = {True: "holds", False: "does not hold", None: "is not significant in every rare bin"}[holds]
    first = read.findings.helps_high_hurts_low(r.bins)
    out += (f" So the long-tail crisis (kNN-LM raising perplexity in every rare bin, 1 ≤ freq < 1,000) {crisis} "
            f"on this run; the findings row \"helps frequent, hurts rare\" reads {MARK[first.ok] if not first.ns else '≈'}.")
    return out


def block_token_bins(runs: dict[str, Run]) -> str:
    """The in- and out-of-domain bullets: overall and per-bin change with intervals and verdicts."""
    return "\n".join([_token_bullet(runs[IN], "In domain"), _token_bullet(runs[OUT], "Out of domain")])


def block_exact(runs: dict[str, Run]) -> str:
    """Exact search vs the index on the run that has it (SPEC §8)."""
    parts = []
    for r in runs.values():
        if r.exact is None:
            parts.append(f"`{r.name}` was built without exact search")
            continue
        e = r.exact
        ns = e["exact_vs_ivf_pq"] == "no significant difference"
        other = "; ".join(f"{x.bin} {row_ci(x, 'change_exact_vs_ivf_pq')} ({x.exact_vs_ivf_pq})"
                          for x in e[~ns].itertuples())
        recall = ", ".join(f"{x.bin} {x.recall_16:.2f}" for x in e.itertuples())
        t = r.exact_tot
        parts.append(
            f"on `{r.name}` kNN-LM's PPL is {ppl(t['ppl_ivf_pq'])} with the index's neighbours and PQ distances, "
            f"{ppl(t['ppl_ivf_exact'])} with their exact distances and {ppl(t['ppl_exact'])} with exact search; the "
            f"paired change of exact search vs IVFPQ + PQ has an interval containing 0 in {int(ns.sum())} of "
            f"{len(e)} bins" + (f" (elsewhere: {other})" if other else "") + f"; recall@16 per bin: {recall}")
    return "- **Exact search** (SPEC §8, the Exact vs PQ page): " + "; ".join(parts) + "."


def block_words(runs: dict[str, Run]) -> str:
    """Word-level PPL (SPEC §10) of the shipped runs, per word-frequency bin."""
    parts = []
    for r in runs.values():
        if r.words is None:
            continue
        w = r.words_tot
        per_bin = "; ".join(f"{x.bin} {row_ci(x, 'ppl_change')} ({x.knnlm_vs_lm})" for x in r.words.itertuples())
        parts.append(f"`{r.name}`: word PPL {ppl(w['ppl_lm'])} → {ppl(w['ppl_knnlm'])} with kNN-LM over "
                     f"{int(w['n_words']):,} words; per word-frequency bin {per_bin}")
    return "- **Word level** (SPEC §10, Frequency bins with `level=word`): " + ". ".join(parts) + "."


def _ctx_list(by_ctx: pd.DataFrame) -> str:
    return "; ".join(f"L_t = {x.L_t}: {row_ci(x, 'ppl_change')} ({x.knnlm_vs_lm}, {int(x.n_tokens):,} tokens)"
                     for x in by_ctx.itertuples())


def _novelty_bullet(r: Run, title: str) -> str:
    nov = r.nov
    m, n_max = nov["min_len"], nov["novel_max_len"]
    found = nov["found"]
    share = read.novelty.gains_from_found_contexts(nov)
    rare = read.novelty.novel_rare_harmed(nov)
    if found:
        gain = (f"{100 * found['token_share']:.1f}% of positions have L_t ≥ {m} and carry "
                f"{100 * found['share_of_gain']:.1f}% [{100 * found['share_of_gain_ci_lo']:.1f}, "
                f"{100 * found['share_of_gain_ci_hi']:.1f}] of kNN-LM's total NLL gain"
                if pd.notna(found.get("share_of_gain_ci_lo")) else
                f"{100 * found['token_share']:.1f}% of positions have L_t ≥ {m}")
    else:
        gain = f"no position has L_t ≥ {m}"
    nr = nov["novel_rare"]
    rare_text = (f"rare targets (1 ≤ freq < 1,000) in novel contexts (L_t ≤ {n_max}; {int(nr['n_tokens']):,} tokens): "
                 f"{row_ci(nr, 'ppl_change')} ({nr['knnlm_vs_lm']})" if nr else "no rare target in a novel context")
    copy = r.by_ctx[r.by_ctx["n_copy_share"] > 0]
    copy_text = ", ".join(f"L_t = {x.L_t}: {100 * x.mean_copy_share:.1f}%" for x in copy.itertuples()
                          if pd.notna(x.mean_copy_share))
    return (f"- {title} (`{r.name}`): {gain} (findings row: {'≈' if share.ns else MARK[share.ok]}). kNN-LM's change "
            f"per L_t bin: {_ctx_list(r.by_ctx)}. {rare_text[0].upper() + rare_text[1:]} (findings row \"rare targets "
            f"are still harmed in novel contexts\": {'≈' if rare.ns else MARK[rare.ok]}). Mean copy share of p_kNN "
            f"(neighbours whose context overlaps the query's by ≥ {m} tokens): {copy_text or 'none'}.")


def block_novelty(runs: dict[str, Run]) -> str:
    """Rare target or novel context (SPEC §12) on both runs."""
    return "\n".join([_novelty_bullet(runs[IN], "In domain"), _novelty_bullet(runs[OUT], "Out of domain")])


def block_infgram(runs: dict[str, Run]) -> str:
    """The ∞-gram baseline against kNN-LM on both runs (the mitigation tables' `infgram` variant)."""
    parts = []
    for r in runs.values():
        v = r.variants.set_index("variant")
        if read.novelty.INFGRAM not in v.index:
            continue
        inf, plain = r.totals[read.novelty.INFGRAM]["ppl"], r.totals[read.mitigations.PLAIN]["ppl"]
        side = "below" if inf < plain else "above"
        parts.append(f"on `{r.name}` PPL {ppl(inf)} (λ_∞ = {v.loc[read.novelty.INFGRAM, 'lam']:g}), {side} kNN-LM's "
                     f"{ppl(plain)}")
    return ("- **The ∞-gram baseline** (λ_∞ p_∞ + (1 − λ_∞) p_LM over the same datastore text, λ_∞ chosen on "
            "validation; the Mitigations and Context novelty pages): " + "; ".join(parts) + ".")


def block_mitigation_ppl(runs: dict[str, Run]) -> str:
    """Overall evaluation PPL of every variant of both runs (read.mitigations.variant_overall, the Mitigations table)."""
    r0 = runs[IN]
    v0 = r0.variants
    head = "| variant | τ | " + " | ".join(f"`{r.name}` PPL" for r in runs.values()) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(runs)]
    for row in v0.itertuples():
        tau = "—" if pd.isna(row.tau) else f"{row.tau:.3g}"
        cells = " | ".join(ppl(r.totals[row.variant]["ppl"]) for r in runs.values())
        lines.append(f"| {row.label} | {tau} | {cells} |")
    return "\n".join(lines)


def _group_cell(g: pd.DataFrame, grp: str) -> str:
    row = g[g["grp"] == grp]
    if row.empty:
        return "—"
    r = row.iloc[0]
    text = ci(r["change_vs_plain"], r["change_vs_plain_ci_lo"], r["change_vs_plain_ci_hi"])
    return bold_if(text, r["vs_plain"]) + (" (n.s.)" if r["vs_plain"] == "no significant difference" else "")


def block_mitigation_groups(runs: dict[str, Run]) -> str:
    """Pooled rare / frequent changes vs plain with intervals (read.mitigations.variant_group_changes and
    oracle_group_changes, the Mitigations page's sentences), both runs."""
    labels = dict(zip(runs[IN].variants["variant"], runs[IN].variants["label"]))
    labels[adaptive.ORACLE_LABEL] = f"{adaptive.ORACLE_LABEL} per-bin λ"
    cols = " | ".join(f"`{r.name}` rare | `{r.name}` frequent" for r in runs.values())
    lines = [f"| variant | {cols} |", "|---|" + "---|" * (2 * len(runs))]
    for v in runs[IN].groups:
        cells = " | ".join(f"{_group_cell(r.groups[v], 'rare')} | {_group_cell(r.groups[v], 'frequent')}"
                           for r in runs.values())
        lines.append(f"| {labels.get(v, v)} | {cells} |")
    return "\n".join(lines)


def _significant(r: Run, grp: str, verdict: str) -> list[str]:
    labels = dict(zip(r.variants["variant"], r.variants["label"]))
    labels[adaptive.ORACLE_LABEL] = f"the {adaptive.ORACLE_LABEL} per-bin λ"
    return [labels.get(v, v) for v, g in r.groups.items() if (g.loc[g["grp"] == grp, "vs_plain"] == verdict).any()]


def block_mitigation_summary(runs: dict[str, Run]) -> str:
    """Which variants significantly help or hurt the pooled bins, per run (from the table above)."""
    out = []
    for r in runs.values():
        parts = []
        for grp, what in (("rare", "the rare bins"), ("frequent", "the frequent bins")):
            helps, hurts = _significant(r, grp, "helps"), _significant(r, grp, "hurts")
            parts.append(f"{what}: helped significantly by {', '.join(helps) or 'none'}; hurt by "
                         f"{', '.join(hurts) or 'none'}")
        v = r.variants.set_index("variant")
        tau = ""
        if "tau" in v.index:
            chosen, own = float(v.loc["tau", "tau"]), float(r.info["temperature"])
            tau = f" τ from validation is {chosen:.3g}" + (", the run's own." if chosen == own else f" (the run's: {own:g}).")
        out.append(f"- `{r.name}`: " + "; ".join(parts) + "." + tau)
    return "\n".join(out)


BLOCKS = {
    "runs": block_runs, "headline": block_headline, "documents": block_documents, "token-bins": block_token_bins,
    "exact": block_exact, "words": block_words, "novelty": block_novelty, "infgram": block_infgram,
    "mitigation-ppl": block_mitigation_ppl, "mitigation-groups": block_mitigation_groups,
    "mitigation-summary": block_mitigation_summary,
}


# --------------------------------------------------------------------------- writing and checking


def generate(runs: dict[str, Run] | None = None) -> dict[str, str]:
    """{block name: markdown} for every block, from the shipped runs."""
    runs = runs or {name: load(name, path) for name, path in RUNS.items()}
    return {name: fn(runs).rstrip("\n") for name, fn in BLOCKS.items()}


def rewrite(text: str, blocks: dict[str, str]) -> str:
    """The README text with every marked block's body replaced; ValueError for an unknown or missing block."""
    found = [m.group(2) for m in BLOCK.finditer(text)]
    unknown, missing = set(found) - set(blocks), set(blocks) - set(found)
    if unknown or missing:
        raise ValueError(f"README blocks: unknown {sorted(unknown)}, missing {sorted(missing)}")
    return BLOCK.sub(lambda m: m.group(1) + blocks[m.group(2)] + "\n" + m.group(4), text)


def differences(text: str, blocks: dict[str, str]) -> list[str]:
    """One line per number of a README block that differs from the generated one (and per other text change)."""
    out = []
    current = {m.group(2): m.group(3).rstrip("\n") for m in BLOCK.finditer(text)}
    for name in sorted(set(blocks) - set(current)):
        out.append(f"block {name!r}: missing from the README")
    for name, body in current.items():
        if name not in blocks:
            out.append(f"block {name!r}: not a generated block")
            continue
        if body == blocks[name]:
            continue
        have, want = NUMBER.findall(body), NUMBER.findall(blocks[name])
        ops = difflib.SequenceMatcher(a=have, b=want, autojunk=False).get_opcodes()
        numeric = [(tag, i1, i2, j1, j2) for tag, i1, i2, j1, j2 in ops if tag != "equal"]
        for _, i1, i2, j1, j2 in numeric:
            out.append(f"block {name!r}: README has {' '.join(have[i1:i2]) or '(nothing)'} where the database gives "
                       f"{' '.join(want[j1:j2]) or '(nothing)'}")
        if not numeric:
            out.append(f"block {name!r}: text differs (numbers agree); regenerate it")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 listing every number that differs")
    p.add_argument("--readme", type=Path, default=README, help="the README to rewrite or check")
    args = p.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    blocks = generate()
    if args.check:
        diff = differences(text, blocks)
        for line in diff:
            print(line)
        print(f"{args.readme}: {len(diff)} difference(s) from the shipped runs" if diff else
              f"{args.readme}: every generated number matches the shipped runs")
        return 1 if diff else 0
    new = rewrite(text, blocks)
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: {len(blocks)} blocks written" + ("" if new != text else " (unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
