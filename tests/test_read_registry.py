"""knnlm_core.read.REGISTRY: every query name a page or ui module passes to ui.cache.q resolves to a read function
(a static scan of the sources: a misspelt name would otherwise fail only when its page is drawn)."""

from __future__ import annotations

import re
from pathlib import Path

from knnlm_core import read

REPO = Path(__file__).resolve().parent.parent
CALL = re.compile(r'cache\.q\(\s*[^,()]+,\s*"(\w+)"')  # cache.q(run, "name", ...)


def unknown_names(sources: dict[str, str]) -> dict[str, set[str]]:
    """{file: names passed to cache.q that are not in read.REGISTRY} over {file: text}."""
    out = {f: {n for n in CALL.findall(text) if n not in read.REGISTRY} for f, text in sources.items()}
    return {f: names for f, names in out.items() if names}


def test_every_cached_query_name_is_registered():
    sources = {str(p.relative_to(REPO)): p.read_text() for d in ("pages", "ui") for p in sorted((REPO / d).glob("*.py"))}
    used = {n for text in sources.values() for n in CALL.findall(text)}
    assert len(used) >= 30  # the scan sees the pages' queries (bin_summary, novelty_summary, ...)
    assert unknown_names(sources) == {}
    assert unknown_names({"pages/x.py": 'cache.q(run, "bin_sumary", 64)'}) == {"pages/x.py": {"bin_sumary"}}
    for name, fn in read.REGISTRY.items():  # each entry is the function of that name in a read module
        assert fn.__name__ == name and fn.__module__.startswith("knnlm_core.read.")
        assert getattr(read, fn.__module__.rsplit(".", 1)[1]).__dict__[name] is fn
