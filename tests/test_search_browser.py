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


def launch(pw):
    exe = chromium_path()
    if exe is None:
        pytest.fail("Chromium is not installed (apt-get install -y chromium); the browser test needs it")
    return pw.chromium.launch(
        executable_path=exe, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"])


def test_upload_a_photo_and_read_the_results(served, sample_catalog):
    from playwright.sync_api import sync_playwright

    from catalog.abo import IMAGES_DIR

    p = products_of(sample_catalog)[11]
    photo = Path(sample_catalog) / IMAGES_DIR / p.other_images[0]
    with sync_playwright() as pw:
        browser = launch(pw)
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
            assert score == pytest.approx(float(first.get_attribute("data-score")), abs=5e-4)
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


# the page's geometry, read from the DOM: (left, top, right, bottom) in CSS pixels
_BOXES = """() => {
  const box = (e) => { if (!e) return null; const r = e.getBoundingClientRect();
                       return r.width || r.height ? [r.left, r.top, r.right, r.bottom] : null; };
  const drop = document.getElementById("drop");
  const all = (sel) => [...document.querySelectorAll(sel)].map(box);
  return {
    display: getComputedStyle(drop).display, fragments: drop.getClientRects().length,
    facts: box(document.getElementById("facts")), drop: box(drop),
    controls: box(document.querySelector(".controls")), preview: box(document.getElementById("preview")),
    cards: all("#results .card"), camera: box(document.querySelector("label[for=camera]")),
    viewport: document.documentElement.clientWidth, scroll: document.documentElement.scrollWidth,
  };
}"""


def _apart(upper, lower):
    """``upper`` ends before ``lower`` begins (vertically): the boxes do not overlap."""
    return upper[3] <= lower[1] + 0.5


def _inside(inner, outer):
    return (inner[0] >= outer[0] - 0.5 and inner[1] >= outer[1] - 0.5 and inner[2] <= outer[2] + 0.5
            and inner[3] <= outer[3] + 0.5)


@pytest.mark.parametrize("width, phone", [(1200, False), (390, True)], ids=["desktop-1200", "phone-390"])
def test_layout_and_camera_input(served, sample_catalog, width, phone):
    """The drop zone is one block box below the facts line (it was an inline <label> whose padding
    and border were drawn over the line above, split in fragments around the preview); nothing is
    wider than the viewport; the phone gets a camera button; every card shows its score."""
    from playwright.sync_api import sync_playwright

    from catalog.abo import IMAGES_DIR

    p = products_of(sample_catalog)[5]
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            context = browser.new_context(viewport={"width": width, "height": 900}, is_mobile=phone,
                                          has_touch=phone, device_scale_factor=1)
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(served)
            page.wait_for_function("document.getElementById('facts').textContent.includes('60 products')")

            camera = page.locator("#camera")
            assert camera.get_attribute("type") == "file" and camera.get_attribute("accept") == "image/*"
            assert camera.get_attribute("capture") == "environment"
            assert page.locator("#file").get_attribute("accept") == "image/*"
            assert page.locator("#file").get_attribute("capture") is None  # the gallery stays reachable

            before = page.evaluate(_BOXES)
            assert before["display"] != "inline" and before["fragments"] == 1, before
            assert before["preview"] is None  # hidden until a photo is chosen
            assert _apart(before["facts"], before["drop"]) and _apart(before["drop"], before["controls"]), before
            assert before["scroll"] <= before["viewport"] == width, before
            # the camera button only where the pointer is a finger
            assert (before["camera"] is not None) == phone, before

            # a phone user takes a photo: the camera input searches like the file picker
            page.set_input_files("#camera" if phone else "#file",
                                 str(Path(sample_catalog) / IMAGES_DIR / p.other_images[0]))
            page.wait_for_selector("body[data-state=done]", timeout=30_000)
            after = page.evaluate(_BOXES)
            assert after["fragments"] == 1 and after["preview"] is not None, after
            assert _inside(after["preview"], after["drop"]), after
            assert _apart(after["facts"], after["drop"]) and _apart(after["drop"], after["controls"]), after
            assert after["scroll"] <= after["viewport"] == width, after
            assert len(after["cards"]) == 10
            assert all(c[0] >= 0 and c[2] <= width for c in after["cards"]), after["cards"]
            columns = len({round(c[0]) for c in after["cards"]})
            assert (columns >= 4) if not phone else (columns == 2), after["cards"]

            cards = page.locator("#results .card")
            assert cards.nth(0).get_attribute("data-item-id") == p.item_id
            scores = [float(cards.nth(i).get_attribute("data-score")) for i in range(10)]
            assert scores == sorted(scores, reverse=True)
            for i in range(10):
                shown = cards.nth(i).locator(".score").inner_text()
                assert shown == f"similarity {scores[i]:.3f}"
                gap = cards.nth(i).locator(".gap").inner_text()
                assert gap == ("best match" if i == 0 else f"{scores[0] - scores[i]:.3f} below #1")
                fill = cards.nth(i).locator(".bar > span").evaluate("e => parseFloat(e.style.width)")
                assert fill == pytest.approx(100 * min(1.0, max(0.0, scores[i])), abs=0.06)
            note = page.locator("#scorenote").inner_text()
            assert f"{scores[-1]:.3f} to {scores[0]:.3f}" in note and "not a calibrated" in note.lower()
            assert errors == []
            context.close()
        finally:
            browser.close()
