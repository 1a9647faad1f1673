"""Small HTML / text renderers for the dashboard (pure: no streamlit import)."""

from __future__ import annotations

import html
import re

_TOKEN_STYLE = "white-space:pre-wrap;font-family:monospace;line-height:1.8"
_TARGET_STYLE = "background:#ffd54f;border:1px solid #f57f17;border-radius:3px;padding:0 2px"


def context_html(context_tokens: list[str], target: str) -> str:
    """The left context followed by the highlighted target token, as escaped HTML."""
    ctx = "".join(html.escape(t or "") for t in context_tokens)
    tgt = html.escape(target or "")
    return f'<div style="{_TOKEN_STYLE}">{ctx}<span title="target" style="{_TARGET_STYLE}">{tgt}</span></div>'


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
