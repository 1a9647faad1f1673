"""Real-browser test: `streamlit run app.py` on a free port, headless Debian Chromium via
Playwright (never a Playwright browser download). Opens every page, goes from the token
explorer to the neighbour inspector, downloads a CSV, opens six deep links at once on a fresh
server (issue 18: concurrent cold start) and checks that a hostile URL shows no live link."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import PAGE_TITLES

# Generous: a cold Streamlit server on a loaded 2-core CI machine can take tens of seconds per page.
UI_TIMEOUT_MS = 120_000

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "data" / "runs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]
PAGES = PAGE_TITLES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _serve(runs_dir: Path):
    """Start `streamlit run app.py` on `runs_dir`; yields its base URL, stops it afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("playwright.sync_api", reason="python package playwright not installed")
    port = _free_port()
    env = {**os.environ, "KNNLM_RUNS_DIR": str(runs_dir)}
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(REPO / "app.py"),
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.address",
        "localhost",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://localhost:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(runs_root):
    """A running dashboard on the test runs."""
    yield from _serve(runs_root)


@pytest.fixture(scope="module")
def shipped_server():
    """A running dashboard on the shipped runs (data/runs: the in-domain demo and its out-of-domain twin)."""
    if not (SHIPPED / "demo" / "metrics.duckdb").exists() or not (SHIPPED / "demo-shakespeare").exists():
        pytest.skip("shipped runs not present")
    yield from _serve(SHIPPED)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
        yield context.new_page()
        browser.close()


def _open(page, url: str, heading: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name=heading).first.wait_for(timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(500)
    assert page.locator('[data-testid="stException"]').count() == 0


def test_every_page_renders(page, server):
    for path, heading in PAGES.items():
        _open(page, f"{server}/{path}?run=tiny", heading)
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0, path


def test_token_to_neighbours_and_csv(page, server, tmp_path):
    _open(page, f"{server}/tokens?run=tiny&token=the", "Token explorer")
    page.get_by_text("Inspect position").first.click()
    page.get_by_role("heading", name="Neighbour inspector").wait_for(timeout=UI_TIMEOUT_MS)
    page.get_by_text("Stored neighbours").first.wait_for(timeout=UI_TIMEOUT_MS)
    assert "pos=" in page.url
    with page.expect_download(timeout=UI_TIMEOUT_MS) as info:
        page.get_by_role("button", name="Download CSV").first.click()
    target = tmp_path / "neighbours.csv"
    info.value.save_as(target)
    header = target.read_text().splitlines()[0].split(",")
    assert header[:4] == ["rank", "entry", "token_id", "token"] and "weight_in_p_knn" in header


def test_bad_position_shows_error(page, server):
    page.goto(f"{server}/neighbors?run=tiny&pos=99999999")
    page.get_by_text("out of range").first.wait_for(timeout=UI_TIMEOUT_MS)
    assert page.locator('[data-testid="stException"]').count() == 0


def test_exact_page_and_compare_on_the_shipped_runs(page, shipped_server):
    _open(page, f"{shipped_server}/exact?run=demo", "Exact vs PQ search")
    page.get_by_text("IVFPQ + exact distances").first.wait_for(timeout=UI_TIMEOUT_MS)
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    _open(page, f"{shipped_server}/compare?run=demo", "Compare runs")
    page.get_by_text("Does the long-tail crisis hold in each setting?").first.wait_for(timeout=UI_TIMEOUT_MS)
    body = page.locator("body").inner_text()
    assert "in-domain" in body and "out-of-domain" in body and "demo-shakespeare" in body
    _open(page, f"{shipped_server}/tokens?run=demo&token=Boulter", "Token explorer")
    page.get_by_text("As a word of the evaluation text").first.wait_for(timeout=UI_TIMEOUT_MS)
    page.get_by_role("link", name=re.compile("oul")).first.click()  # a token of the word opens its type
    page.get_by_text("As a token type").first.wait_for(timeout=UI_TIMEOUT_MS)
    assert "token=" in page.url


# Issue 21 item 4. Every navigation link the browser ever draws, recorded from the first paint on (a
# MutationObserver installed before the page's own scripts): its text without the icon's ligature.
RECORD_NAV_LINKS = """
window.__navLinks = new Set();
const label = (el) => {
  const copy = el.cloneNode(true);
  copy.querySelectorAll('[data-testid="stIconMaterial"]').forEach((icon) => icon.remove());
  return copy.textContent.trim();
};
new MutationObserver(() => {
  document.querySelectorAll('[data-testid^="stSidebarNavLink"], [data-testid^="stTopNav"] a, a[data-testid^="stTopNav"]')
    .forEach((el) => window.__navLinks.add(label(el)));
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


# Six deep links, one per page family, opened at the same moment on a server nobody has used yet.
COLD_LINKS = {
    "bins?run=demo": "Frequency bins",
    "tokens?run=demo&token=the": "Token explorer",
    "neighbors?run=demo&pos=5": "Neighbour inspector",
    "exact?run=demo": "Exact vs PQ search",
    "whatif?run=demo": "What-if re-scoring",
    "compare?run=demo": "Compare runs",
}


async def _open_together(base: str, links: dict[str, str]) -> dict[str, tuple[str, set[str]]]:
    """Open every link in its own browser context (its own Streamlit session) at once; return
    each page's text once its heading is drawn, or what it shows instead after the timeout, and
    the text of every navigation link it drew from its first paint on (RECORD_NAV_LINKS)."""
    from playwright.async_api import async_playwright

    async def one(browser, path: str, heading: str) -> tuple[str, set[str]]:
        context = await browser.new_context(viewport={"width": 1400, "height": 1000})
        await context.add_init_script(RECORD_NAV_LINKS)
        page = await context.new_page()
        await page.goto(f"{base}/{path}")
        try:
            await page.get_by_role("heading", name=heading).first.wait_for(timeout=UI_TIMEOUT_MS)
            await page.wait_for_timeout(1000)  # let a rerun (if any) settle before reading the page
        except Exception:  # noqa: BLE001 - a page that never shows its heading is reported below
            pass
        return await page.locator("body").inner_text(), set(await page.evaluate("[...window.__navLinks]"))

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            texts = await asyncio.gather(*(one(browser, path, h) for path, h in links.items()))
        finally:
            await browser.close()
    return dict(zip(links, texts, strict=True))


def test_six_deep_links_at_once_on_a_fresh_server():
    """Issue 18 item 6: sessions that start together on a fresh server all render their page (they
    used to show "No run selected." until reloaded: pages/-directory mode raced a process flag).
    Issue 21 item 4: and no navigation link ever shows a raw file name (`app`, `bins`, ..., the stems
    of pages/*.py), which folder mode listed in the sidebar for seconds, from the first paint on."""
    if not (SHIPPED / "demo" / "metrics.duckdb").exists():
        pytest.skip("shipped runs not present")
    raw = {"app"} | {p.stem for p in (REPO / "pages").glob("*.py")}
    for base in _serve(SHIPPED):  # a server of its own: no earlier session has warmed it
        # A thread of its own: the module's sync Playwright page keeps an event loop running in this one.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            seen = pool.submit(asyncio.run, _open_together(base, COLD_LINKS)).result()
        failed = {path: text[:300] for path, (text, _) in seen.items()
                  if COLD_LINKS[path] not in text or "No run selected." in text or "could not be drawn" in text}
        assert not failed, failed
        links = set().union(*(nav for _, nav in seen.values()))
        assert "Frequency bins" in links, links  # the recorder saw the navigation
        assert not links & raw, f"navigation showed raw file names: {sorted(links & raw)}"


def test_hostile_url_shows_no_live_link(page, shipped_server):
    """User text from the URL is shown as text: a markdown link or HTML in `token=` stays inert."""
    page.goto(f"{shipped_server}/tokens?run=demo&token=%5Bx%5D(http://evil.example)%3Cb%3Ebold%3C/b%3E")
    page.get_by_role("heading", name="Token explorer").first.wait_for(timeout=UI_TIMEOUT_MS)
    page.get_by_text("evil.example").first.wait_for(timeout=UI_TIMEOUT_MS)
    assert page.locator('a[href*="evil"]').count() == 0
    assert page.locator("b:text('bold'), strong:text('bold')").count() == 0
    assert page.locator('[data-testid="stException"]').count() == 0


def test_overview_link_opens_the_overview(shipped_server):
    """Issue 21 item 4: the documented `/overview?run=` link, on a server already in use, shows that run's
    Overview (the Overview is served at `/`; /overview redirects there), never a "Page not found" dialog."""
    from playwright.sync_api import sync_playwright

    def visit() -> tuple[str, str]:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            _open(page, f"{shipped_server}/exact?run=demo", PAGES["exact"])  # the server leaves folder mode
            _open(page, f"{shipped_server}/overview?run=demo-shakespeare", PAGES["overview"])
            page.wait_for_timeout(1000)  # a late dialog
            text, url = page.locator("body").inner_text(), page.url
            browser.close()
        return text, url

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a thread of its own, as above
        text, url = pool.submit(visit).result()
    assert "Page not found" not in text, text[:300]
    assert "run=demo-shakespeare" in url and "demo-shakespeare" in text, url


def test_bin_bar_opens_the_filtered_token_explorer(shipped_server):
    """Issue 24 item 4: a click on a bar of the Frequency bins page's PPL chart lands on the Token explorer
    filtered to that bin: its URL carries `bin=<label>`, its sidebar slider and its list show that bin, and
    the copy-link box gives the same view."""
    from urllib.parse import parse_qs, urlsplit

    from playwright.sync_api import sync_playwright

    def visit() -> tuple[str, str, str]:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            _open(page, f"{shipped_server}/bins?run=demo", PAGES["bins"])
            chart = page.locator(".js-plotly-plot", has_text="Perplexity per frequency bin").first
            chart.wait_for(timeout=UI_TIMEOUT_MS)
            bars = chart.locator("g.trace.bars g.point path")
            bars.first.wait_for(timeout=UI_TIMEOUT_MS)
            label = chart.locator("g.xtick text").nth(2).text_content()  # the third bin's label (10–99 on the demo)
            # Plotly's drag layer lies over the bars: click the page at the visible middle of the bar (trace LM,
            # third bin), clipped to the plot area (a log-axis bar can reach below it).
            chart.scroll_into_view_if_needed()
            bar, area = bars.nth(2).bounding_box(), chart.locator("rect.nsewdrag").first.bounding_box()
            top, bottom = max(bar["y"], area["y"]), min(bar["y"] + bar["height"], area["y"] + area["height"])
            page.mouse.click(bar["x"] + bar["width"] / 2, (top + bottom) / 2)
            page.get_by_role("heading", name=PAGES["tokens"]).first.wait_for(timeout=UI_TIMEOUT_MS)
            page.get_by_text(f"Evaluation targets in frequency bin {label}").first.wait_for(timeout=UI_TIMEOUT_MS)
            page.wait_for_timeout(500)
            assert page.locator('[data-testid="stException"]').count() == 0
            text = page.locator("body").inner_text()
            link = page.locator('[data-testid="stSidebar"] [data-testid="stCode"]').first.inner_text()
            url = page.url
            browser.close()
        return label, url, text + "\n" + link

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a thread of its own (see above)
        label, url, text = pool.submit(visit).result()
    assert label == "10–99", label
    got, query = urlsplit(url), parse_qs(urlsplit(url).query)
    assert got.path.endswith("/tokens") and set(query["bin"]) == {label}, url  # the slider writes (low, high)
    assert query.get("run", ["demo"]) == ["demo"], url  # the default run is left out of the URL
    assert "token type(s) are evaluation targets in bin 10–99" in text
    assert "/tokens?run=demo&bin=10%E2%80%9399" in text, text[-500:]
