"""The real ComfyUI frontend in a real headless browser (Debian's chromium, driven by
Playwright): log in, load the official Z-Image Turbo template the way the frontend loads
templates (``/?template=<name>``, its template loader), run it with the Run button, see the
image; another tenant's browser sees none of it."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TEMPLATE = "image_z_image_turbo"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: scripts/install-tools.sh installs it (make test runs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield chromium
        chromium.close()


class Tab:
    """One tenant's browser context, with what it asked the server and what went wrong."""

    def __init__(self, browser, base_url: str, out: Path, name: str) -> None:
        self.context = browser.new_context(base_url=base_url, viewport={"width": 1600, "height": 1000})
        self.page = self.context.new_page()
        self.out, self.name = out, name
        self.requests: list[str] = []
        self.failures: list[str] = []
        self.console: list[str] = []
        self.page.on("request", lambda r: self.requests.append(f"{r.method} {r.url}"))
        self.page.on("response", self._response)
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def _response(self, response) -> None:
        if response.status >= 400:
            self.failures.append(f"{response.status} {response.request.method} {response.url}")

    def login(self, key: str) -> None:
        self.page.goto("/")
        self.page.fill("#api_key", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_selector("#vue-app", state="attached")

    def dump(self) -> None:
        self.page.screenshot(path=str(self.out / f"{self.name}.png"), full_page=True)
        (self.out / f"{self.name}.log").write_text(
            "\n".join(["# requests", *self.requests, "# failures", *self.failures, "# console", *self.console])
        )


@pytest.fixture
def tabs(browser, web_server, tmp_path, request):
    opened: list[Tab] = []

    def open_tab(name: str) -> Tab:
        tab = Tab(browser, web_server.url, tmp_path, name)
        opened.append(tab)
        return tab

    yield open_tab
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else True
    for tab in opened:
        if failed or os.environ.get("ZIMAGE_BROWSER_DUMP"):
            tab.dump()
        tab.context.close()
    if failed:
        print(f"browser screenshots and logs: {tmp_path}")


def wait_ready(page) -> None:
    """The graph is loaded and the Run button is there."""
    page.wait_for_selector('[data-testid="queue-button"]', timeout=60_000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.graph.nodes.length > 0", timeout=60_000)


def run_and_wait_for_image(tab: Tab) -> str:
    page = tab.page
    page.click('[data-testid="queue-button"]')
    image = page.wait_for_selector('img[src*="/api/view?"]', timeout=90_000)
    return image.get_attribute("src")


def test_official_template_runs_in_the_browser(tabs, web_server, web_keys):
    acme = tabs("acme")
    acme.login(web_keys["acme"])
    acme.page.goto(f"/?template={TEMPLATE}")
    wait_ready(acme.page)
    src = run_and_wait_for_image(acme)
    acme.dump()
    assert src
