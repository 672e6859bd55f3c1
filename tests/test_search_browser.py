"""The upload page in a real headless Chromium (Playwright), against ``catalog-search serve``.

Slow (runs in CI with ``-m slow``): the server is started as a separate process on
127.0.0.1 on a free port and stopped by its PID. Chromium comes from the system
(Debian package ``chromium``, /usr/bin/chromium, or $CHROMIUM); Playwright's own
browser download is never used.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_retrieval import products_of, shared_bundle

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path_factory, sample_catalog, tmp_path):
    bundle = shared_bundle(tmp_path_factory, sample_catalog, indexed=True)
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--bundle", str(bundle),
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"server exited: {(tmp_path / 'serve.log').read_text()}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.time() < deadline, "server did not start listening"
                time.sleep(0.1)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_upload_a_photo_and_read_the_results(served, sample_catalog):
    from catalog.abo import IMAGES_DIR

    exe = chromium_path()
    if exe is None:
        pytest.fail("Chromium is not installed (apt-get install -y chromium); the browser test needs it")
    from playwright.sync_api import sync_playwright

    p = products_of(sample_catalog)[11]
    photo = Path(sample_catalog) / IMAGES_DIR / p.other_images[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=exe, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(served)
            page.wait_for_function("document.getElementById('facts').textContent.includes('60 products')")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#results .card", timeout=30_000)
            cards = page.locator("#results .card")
            assert cards.count() == 10
            first = cards.nth(0)
            assert first.get_attribute("data-item-id") == p.item_id
            assert p.name in first.locator(".name").inner_text()
            assert first.locator(".type").inner_text() == p.product_type
            score = float(first.locator(".score").inner_text().split()[-1])
            assert score == pytest.approx(1.0, abs=2e-3)
            # every card's thumbnail actually loaded
            page.wait_for_function("[...document.querySelectorAll('#results .card img')].every(i => i.complete)")
            widths = page.eval_on_selector_all("#results .card img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == 10 and min(widths) > 0
            assert "10 products" in page.locator("#status").inner_text()
            # a file that is not an image: the page shows the server's one-line reason
            bad = Path(sample_catalog) / "listings" / "metadata"
            not_image = next(bad.iterdir())
            page.set_input_files("#file", str(not_image))
            page.wait_for_function("document.getElementById('status').className === 'error'")
            assert "400" in page.locator("#status").inner_text()
            assert errors == []
        finally:
            browser.close()
