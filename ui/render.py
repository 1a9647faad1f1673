"""Small HTML / text renderers for the dashboard (pure: no streamlit import)."""

from __future__ import annotations

import html
import re

_TOKEN_STYLE = "white-space:pre-wrap;font-family:monospace;line-height:1.8"
_TARGET_STYLE = "background:#ffd54f;border:1px solid #f57f17;border-radius:3px;padding:0 2px"
_OVERLAP_STYLE = "background:#c8e6c9;border-bottom:2px solid #2e7d32"
OVERLAP_TITLE = "overlaps the query's context"  # title of each highlighted neighbour-context token (tests count them)
MATCH_TITLE = "occurs in the datastore"  # title of each of the query context's last L_t tokens


def _escaped(token: str | None, newline: str) -> str:
    """A token as HTML text with each newline written as `newline`: a ⏎ before any line break, so that no
    blank line can end the markdown HTML block the token sits in."""
    return html.escape(token or "").replace("\n", newline)


def _marked(tokens: list[str], n_last: int, title: str, newline: str) -> str:
    """Escaped tokens, the last n_last each in a highlighted span titled `title`."""
    cut = len(tokens) - min(max(int(n_last), 0), len(tokens))
    shown = [_escaped(t, newline) for t in tokens]
    marked = [f'<span title="{title}" style="{_OVERLAP_STYLE}">{t}</span>' for t in shown[cut:]]
    return "".join(shown[:cut] + marked)


def context_html(context_tokens: list[str], target: str, matched: int = 0) -> str:
    """The left context followed by the highlighted target token, as escaped HTML; the last `matched`
    context tokens (the context match length L_t, SPEC §12) are marked as occurring in the datastore."""
    ctx = _marked(list(context_tokens), matched, MATCH_TITLE, "⏎\n")
    tgt = _escaped(target, "⏎\n")
    return f'<div style="{_TOKEN_STYLE}">{ctx}<span title="target" style="{_TARGET_STYLE}">{tgt}</span></div>'


def neighbour_context_html(rank: int, tokens: list[str], overlap: int, value: str, copy: bool) -> str:
    """One neighbour's left context with its last `overlap` tokens (those equal to the query's last
    tokens, SPEC §12) highlighted, then its value token; a copy neighbour is marked."""
    label = f"#{int(rank)} · overlap {int(overlap)}" + (" · <b>copy</b>" if copy else "")
    more = "…" if overlap > len(tokens) else ""
    return (f'<div title="neighbour {int(rank)}" style="{_TOKEN_STYLE}"><small>{label}</small> {more}'
            f'{_marked(list(tokens), overlap, OVERLAP_TITLE, "⏎")} → <span style="{_TARGET_STYLE}">'
            f'{_escaped(value, "⏎")}</span></div>')


def show_token(token: str | None) -> str:
    """A token made visible: quotes, leading spaces as '␣', newlines as '⏎'."""
    if token is None:
        return "∅"
    return "'" + token.replace(" ", "␣").replace("\n", "⏎") + "'"


def fmt_p(p: float | None) -> str:
    """A probability / share, compact: 0.1234 or 1.2e-05."""
    if p is None or p != p:
        return "n/a"
    return f"{p:.4f}" if abs(p) >= 1e-3 or p == 0 else f"{p:.2e}"


def visible(text: str) -> str:
    """`text` with every non-printable character (control, format, separator other than ' ')
    written as a Python escape, so newlines, null bytes and bidi overrides show as what they are."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def md_code(text: str) -> str:
    """`text` as a Markdown inline code span that Streamlit shows literally: no link, HTML, emphasis,
    math or `:color[...]` directive can come alive inside a code span (CommonMark §6.1). The fence
    is one backtick longer than the longest backtick run in `text`; an empty text shows as ∅."""
    shown = visible(text)
    if not shown:
        return "∅"
    fence = "`" * (max((len(run) for run in re.findall(r"`+", shown)), default=0) + 1)
    edge = shown[0] in "` " or shown[-1] in "` "
    pad = " " if edge and shown.strip() else ""  # one space each side is stripped again (not from all-space text)
    return f"{fence}{pad}{shown}{pad}{fence}"
