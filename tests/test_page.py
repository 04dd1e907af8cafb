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

import numpy as np
import pytest

from tests.serving_support import Server, build_index, export_digits, request, tiny_artifact

CHROMIUM_NAMES = ("chromium", "chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
K = 6
WRITE_KEY = "page-write-key-3f9a7c1e5b2d"


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
    """Two servers on one collection: as today (no keys), and with a write key (the page's add and delete)."""
    tmp = tmp_path_factory.mktemp("page")
    artifact = tiny_artifact(tmp / "artifact", labels=[str(i) for i in range(10)])
    images = export_digits(tmp / "digits", 30)
    index = build_index(artifact, tmp / "digits", tmp / "index")
    keyed_index = build_index(artifact, tmp / "digits", tmp / "keyed-index")
    (tmp / "keys.txt").write_text(f"write {WRITE_KEY}\n")
    srv = Server(artifact, index, tmp / "server.log")
    keyed = Server(artifact, keyed_index, tmp / "keyed.log", ["--api-keys", str(tmp / "keys.txt")])
    try:
        srv.wait_ready()
        keyed.wait_ready()
        yield {"server": srv, "keyed": keyed, "images": images, "index": index, "tmp": tmp}
    finally:
        srv.stop()
        keyed.stop()


def open_page(browser, url: str):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the server's Content-Security-Policy: anything the page does that it forbids is an error here
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
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
    assert first.locator(".path").get_attribute("title") == f"digits/{query_image.parent.name}/{query_image.name}"
    assert first.locator(".path").inner_text() == f"{query_image.parent.name}/{query_image.name}"
    assert float(first.locator(".score").inner_text()) == pytest.approx(1.0, abs=1e-3)
    assert first.locator(".label").inner_text() == query_image.parent.name
    page.wait_for_function("() => [...document.querySelectorAll('#neighbours img')].every(i => i.complete)")
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


def wait_state(page, *states: str, timeout: float = 60_000) -> str:
    page.wait_for_selector(", ".join(f"body[data-state={s}]" for s in states), timeout=timeout)
    return page.get_attribute("body", "data-state")


def test_page_filters_and_asks_for_more_like_a_result(browser, server):
    """Without keys the page works as before, with the filter box and "more like this"; no write controls."""
    page, errors = open_page(browser, server["server"].url + "/")
    assert not page.is_visible("#add-panel") and page.is_visible("#filters")
    query_image = server["images"][7]
    page.fill("#filter-label", query_image.parent.name)
    query(page, query_image)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    labels = page.locator("#neighbours .neighbour .label").all_inner_texts()
    assert labels and set(labels) == {query_image.parent.name}
    assert page.locator("#neighbours .delete").count() == 0
    page.fill("#filter-label", "")
    page.fill("#filter-folder", "digits/5/")
    page.evaluate("document.body.dataset.state = 'idle'")
    page.dispatch_event("#filter-folder", "change")  # a changed filter reruns the query
    assert wait_state(page, "done", "error") == "done", page.inner_text("#error")
    titles = page.eval_on_selector_all("#neighbours .path", "els => els.map(e => e.title)")
    assert titles and all(t.startswith("digits/5/") for t in titles)
    page.fill("#filter-folder", "")
    first = page.locator("#neighbours .neighbour").nth(0)
    chosen = int(first.get_attribute("data-id"))
    page.evaluate("document.body.dataset.state = 'idle'")
    first.locator(".similar").click()
    assert wait_state(page, "done", "error") == "done", page.inner_text("#error")
    assert page.inner_text("#results-title").startswith("More like 5/")
    ids = [int(i) for i in page.eval_on_selector_all("#neighbours .neighbour", "els => els.map(e => e.dataset.id)")]
    assert len(ids) == K and chosen not in ids
    keep(page, server["tmp"], "page-more-like-this.png")
    assert not errors, errors
    page.close()


def test_page_with_a_write_key_adds_and_deletes(browser, server, tmp_path):
    from PIL import Image

    keyed = server["keyed"]
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(keyed.url + "/", wait_until="load")
    page.evaluate("localStorage.clear()")
    page.reload(wait_until="load")
    assert wait_state(page, "locked", "ready") == "locked"
    assert "needs an API key" in page.inner_text("#error")
    page.fill("#key", "a-wrong-key-0000000000")
    page.click("#key-save")
    assert wait_state(page, "locked", "ready") == "locked" and "not accepted" in page.inner_text("#key-status")
    page.fill("#key", WRITE_KEY)
    page.click("#key-save")
    assert wait_state(page, "ready", "locked") == "ready", page.inner_text("#error")
    assert page.is_visible("#add-panel") and "write" in page.inner_text("#key-status")
    new = tmp_path / "fresh.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(new)
    page.set_input_files("#add-files", str(new))
    page.fill("#add-label", "fresh")
    page.evaluate("document.body.dataset.state = 'idle'")
    page.click("#add-button")
    assert wait_state(page, "done", "error") == "done", page.inner_text("#error")
    assert "added 1" in page.inner_text("#add-status")
    # the key stays in this browser: a reload needs no typing, and thumbnails come with it
    page.reload(wait_until="load")
    assert wait_state(page, "ready", "locked") == "ready"
    query(page, new)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    first = page.locator("#neighbours .neighbour").nth(0)
    assert first.locator(".label").inner_text() == "fresh"
    item_id = int(first.get_attribute("data-id"))
    page.wait_for_function(  # a function, not an expression: the page's policy forbids eval, which expressions use
        "() => [...document.querySelectorAll('#neighbours img')].every(i => i.complete && i.naturalWidth)")
    headers = {"Authorization": f"Bearer {WRITE_KEY}"}
    assert request(f"{keyed.url}/items/{item_id}", headers=headers)[0] == 200
    page.evaluate("document.body.dataset.state = 'idle'")
    first.locator(".delete").click()
    assert wait_state(page, "done", "error") == "done", page.inner_text("#error")
    assert str(item_id) not in page.eval_on_selector_all("#neighbours .neighbour", "els => els.map(e => e.dataset.id)")
    assert request(f"{keyed.url}/items/{item_id}", headers=headers)[0] == 404
    keep(page, server["tmp"], "page-keyed.png")
    assert not errors, errors
    page.close()
