"""The page at GET /, driven in headless Chromium (Debian's ``chromium`` through Playwright) against a real server.

Chromium comes from apt: when it is missing, this module installs it (as root, or through passwordless sudo)
and skips, saying why, where it cannot. Playwright only drives it (``playwright install`` is never run: it
downloads a browser from a CDN). ``MAE_SCREENSHOT_DIR=DIR`` keeps the screenshots this test takes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.serving_support import Server, build_index, export_digits, tiny_artifact

CHROMIUM_NAMES = ("chromium", "chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
K = 6


def chromium() -> str:
    """The chromium executable, installed from apt first when it is missing; skips with the reason otherwise."""
    found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and there is no apt-get to install it with")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and (not shutil.which("sudo") or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode):
        pytest.skip("chromium is not installed and installing it needs root (sudo apt-get install -y chromium)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(sudo + cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode:
            pytest.skip(f"could not install chromium ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}")
    found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not found:
        pytest.skip("apt-get installed chromium but no chromium executable is on PATH")
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                         "playwright, or the dev extra)")
    executable = chromium()
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=executable, headless=True,
                                                       args=ARGS, viewport={"width": 1180, "height": 820})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    artifact = tiny_artifact(tmp / "artifact", labels=[str(i) for i in range(10)])
    images = export_digits(tmp / "digits", 30)
    index = build_index(artifact, tmp / "digits", tmp / "index")
    srv = Server(artifact, index, tmp / "server.log")
    try:
        srv.wait_ready()
        yield {"server": srv, "images": images, "index": index, "tmp": tmp}
    finally:
        srv.stop()


def open_page(browser, url: str):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, wait_until="load")
    page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    return page, errors


def query(page, image: Path) -> None:
    page.fill("#k", str(K))
    page.set_input_files("#file", str(image))
    page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=60_000)


def keep(page, tmp: Path, name: str) -> Path:
    shot = tmp / name
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("MAE_SCREENSHOT_DIR"):
        Path(os.environ["MAE_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["MAE_SCREENSHOT_DIR"]) / name)
    return shot


def test_page_shows_labels_and_neighbours_for_a_picked_image(browser, server):
    page, errors = open_page(browser, server["server"].url + "/")
    assert "10 labels" in page.inner_text("#model-info")
    query_image = server["images"][4]
    query(page, query_image)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    labels = page.locator("#labels li")
    assert labels.count() == 5 and page.is_visible("#labels-panel")
    assert all(labels.nth(i).locator(".name").inner_text() in [str(d) for d in range(10)] for i in range(5))
    cards = page.locator("#neighbours .neighbour")
    assert cards.count() == K
    first = cards.nth(0)
    assert first.locator(".path").get_attribute("title") == str(query_image.resolve())
    assert first.locator(".path").inner_text() == f"{query_image.parent.name}/{query_image.name}"
    assert float(first.locator(".score").inner_text()) == pytest.approx(1.0, abs=1e-3)
    assert first.locator(".label").inner_text() == query_image.parent.name
    page.wait_for_function("[...document.querySelectorAll('#neighbours img')].every(i => i.complete)")
    widths = page.eval_on_selector_all("#neighbours img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == K and min(widths) > 0, "a thumbnail did not load"
    shot = keep(page, server["tmp"], "page-results.png")
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    page.close()


def test_page_shows_the_servers_message_for_a_bad_file(browser, server):
    page, errors = open_page(browser, server["server"].url + "/")
    bad = server["tmp"] / "notes.png"
    bad.write_bytes(b"this is text with an image's name")
    query(page, bad)
    assert page.get_attribute("body", "data-state") == "error"
    message = page.inner_text("#error")
    assert "notes.png" in message and "not a recognised image format" in message
    keep(page, server["tmp"], "page-error.png")
    assert not errors, errors
    page.close()
