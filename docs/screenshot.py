"""Refresh docs/screenshot.png: the shipped demo's Overview in headless Chromium (issue 21).

`python -m docs.screenshot` starts `streamlit run app.py` on a free port (data/runs, read-only),
waits for its health check, opens `/?run=demo` (the Overview is the default page) in Debian's
Chromium through Playwright (`executable_path=/usr/bin/chromium`, never a browser download), waits
for the metrics, a chart and the navigation bar, and writes a palette-quantised PNG. It fails when the
sidebar lists raw page files, or when the page shows an exception or an error box.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "screenshot.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1250}
TIMEOUT_MS = 120_000
COLOURS = 128  # palette size of the written PNG (keeps it well under 300 KB)


def page_titles() -> list[str]:
    """The titles of the st.Page entries of app.py (read from its source, without running it)."""
    tree = ast.parse((REPO / "app.py").read_text(encoding="utf-8"))
    return [kw.value.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "Page" for kw in node.keywords if kw.arg == "title"]


def free_port() -> int:
    """An unused localhost TCP port."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    """`streamlit run app.py` on `port`, returned once /_stcore/health answers ok (RuntimeError otherwise)."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.port", str(port),
           "--server.headless", "true", "--server.address", "localhost", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "viewer"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "KNNLM_RUNS_DIR": str(REPO / "data" / "runs")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2).read() == b"ok":
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"streamlit did not start: {proc.stdout.read().decode()[-2000:]}")


def capture(url: str, titles: list[str]) -> bytes:
    """PNG bytes of the page at `url` once its metrics, a chart and the navigation bar are drawn."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.get_by_text("PPL kNN-LM").first.wait_for(timeout=TIMEOUT_MS)
            page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=TIMEOUT_MS)
            nav = page.locator('[data-testid^="stTopNav"]')  # the navigation bar (app.py: position="top")
            nav.get_by_text(titles[1], exact=True).first.wait_for(timeout=TIMEOUT_MS)
            raw = page.locator('[data-testid^="stSidebarNavLink"]').count()
            if raw:  # folder mode's raw file names (issue 21 item 4)
                raise RuntimeError(f"{url} shows {raw} sidebar file link(s)")
            page.wait_for_timeout(2000)  # let the chart finish its transition
            shown = page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]').count()
            if shown:
                raise RuntimeError(f"{url} shows {shown} exception / error box(es)")
            return page.screenshot(full_page=False)
        finally:
            browser.close()


def quantise(png: bytes, colours: int = COLOURS) -> bytes:
    """The screenshot as an adaptive-palette PNG (Pillow comes with streamlit)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colours, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="demo", help="run to show (default: demo)")
    p.add_argument("--out", type=Path, default=OUT, help="PNG to write (default: docs/screenshot.png)")
    args = p.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} not found: apt-get install chromium", file=sys.stderr)
        return 2
    port = free_port()
    proc = start_server(port)
    try:
        png = quantise(capture(f"http://localhost:{port}/?run={args.run}", page_titles()))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    args.out.write_bytes(png)
    print(f"{args.out}: {len(png) / 1e3:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
