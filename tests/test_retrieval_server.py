"""``catalog-search serve``: the JSON API and the page, on a real bundle and a real server.

The app runs in uvicorn on 127.0.0.1 (a free port, in a thread of this process) and is
called over HTTP, so size limits, multipart parsing and concurrency are the real ones.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from test_retrieval import products_of, shared_bundle

MAX_UPLOAD = 256 * 1024


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, sample_catalog) -> Path:
    return shared_bundle(tmp_path_factory, sample_catalog, indexed=True)


class RunningServer:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def server(indexed):
    from retrieval.search import Searcher
    from retrieval.server import create_app

    searcher = Searcher(indexed)
    with RunningServer(create_app(searcher, max_upload_bytes=MAX_UPLOAD)) as url:
        yield url, searcher
    searcher.close()


def photo(sample_catalog, i: int, which: str = "main") -> Path:
    from catalog.abo import IMAGES_DIR

    p = products_of(sample_catalog)[i]
    return Path(sample_catalog) / IMAGES_DIR / (p.main_image if which == "main" else p.other_images[0])


def post(url, data: bytes, name: str = "photo.jpg", **form):
    return httpx.post(f"{url}/api/search", files={"image": (name, data, "image/jpeg")},
                      data={k: str(v) for k, v in form.items()}, timeout=60)


def test_search_returns_the_query_json(server, sample_catalog):
    url, _ = server
    p = products_of(sample_catalog)[7]
    r = post(url, photo(sample_catalog, 7, "other").read_bytes(), name="mine.jpg", k=4)
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["results"] and body["results"][0]["query"] == "mine.jpg"
    matches = body["results"][0]["matches"]
    assert len(matches) == 4 and matches[0]["item_id"] == p.item_id and matches[0]["name"] == p.name
    for m in matches:
        assert {"item_id", "score", "name", "product_type", "image", "thumbnail"} <= set(m)
    t = httpx.get(url + matches[0]["thumbnail"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert t.content == Path(matches[0]["image"]).read_bytes()
    r = post(url, photo(sample_catalog, 7).read_bytes(), k=30, type=p.product_type)
    assert r.status_code == 200 and {m["product_type"] for m in r.json()["results"][0]["matches"]} == {p.product_type}


def test_info_and_page(server):
    url, searcher = server
    info = httpx.get(url + "/api/info").json()
    assert info["products"] == 60 and info["images"] == 300 and info["model"]["file"] == "model.onnx"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and 'id="file"' in page.text
    # a phone can take the photo with its camera (tests/test_search_browser.py checks the layout)
    assert 'accept="image/*" capture="environment"' in page.text


def _png(size):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case, status, words", [
    ("text", 400, "not an image"),
    ("empty", 400, "empty"),
    ("truncated", 400, "damaged"),
    ("too_large", 413, "too large"),
    ("missing_field", 422, None),
    ("bad_k", 422, "k must be"),
    ("bad_type", 400, "no indexed products of type"),
])
def test_bad_uploads(case, status, words, server, sample_catalog):
    url, _ = server
    jpeg = photo(sample_catalog, 0).read_bytes()
    if case == "text":
        r = post(url, b"hello, this is not a picture", name="notes.txt")
    elif case == "empty":
        r = post(url, b"")
    elif case == "truncated":
        r = post(url, jpeg[: len(jpeg) // 2])
    elif case == "too_large":
        r = post(url, os.urandom(MAX_UPLOAD + 100_000))
    elif case == "missing_field":
        r = httpx.post(f"{url}/api/search", data={"k": "3"})
    elif case == "bad_k":
        r = post(url, jpeg, k=0)
    else:
        r = post(url, jpeg, type="SPACESHIP")
    assert r.status_code == status, r.text
    if words:
        assert words in r.json()["detail"]


def test_oversized_upload_without_content_length_is_cut_off(server):
    url, _ = server

    def body():
        boundary = b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
        yield boundary
        for _ in range(40):
            yield b"\0" * 65536  # 2.5 MB, never announced
        yield b"\r\n--xyz--\r\n"

    r = httpx.post(f"{url}/api/search", content=body(), headers={"content-type": "multipart/form-data; boundary=xyz"},
                   timeout=60)
    assert r.status_code == 413


def test_huge_image_dimensions_are_refused(server):
    url, _ = server
    buf = io.BytesIO()
    Image.new("1", (20000, 12000)).save(buf, "PNG")  # 240 M pixels, a few kB
    r = post(url, buf.getvalue(), name="bomb.png")
    assert r.status_code == 400 and "refusing image bomb.png" in r.json()["detail"]


def test_many_concurrent_requests(server, sample_catalog):
    url, _ = server
    products = products_of(sample_catalog)
    jobs = [(i % 12, photo(sample_catalog, i % 12).read_bytes()) for i in range(48)]
    jobs.append((-1, b"garbage"))

    def one(job):
        i, data = job
        return i, post(url, data, k=3)

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, jobs))
    for i, r in results:
        if i < 0:
            assert r.status_code == 400
            continue
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["matches"][0]["item_id"] == products[i].item_id


def test_thumbnails_only_serve_catalog_photos(tmp_path, tmp_path_factory, sample_catalog):
    """A catalog photo replaced by a symlink to a file outside the catalog root is not served."""
    from catalog.abo import IMAGES_DIR
    from retrieval.cli import main
    from retrieval.search import Searcher
    from retrieval.server import create_app

    catalog = tmp_path / "catalog"
    shutil.copytree(sample_catalog, catalog)
    bundle = tmp_path / "bundle"
    shutil.copytree(shared_bundle(tmp_path_factory, sample_catalog), bundle)
    assert main(["index", "--bundle", str(bundle), "--catalog", str(catalog), "--json"]) == 0
    secret = tmp_path / "secret.jpg"
    p0 = products_of(catalog)[0]
    shutil.copy(catalog / IMAGES_DIR / p0.main_image, secret)
    target = catalog / IMAGES_DIR / p0.main_image
    target.unlink()
    target.symlink_to(secret)
    with Searcher(bundle) as s, RunningServer(create_app(s)) as url:
        main_key = s.store.main_images()[p0.item_id]
        other_key = s.store.main_images()[products_of(catalog)[1].item_id]
        assert httpx.get(f"{url}/thumb/{main_key}").status_code == 404
        assert httpx.get(f"{url}/thumb/{other_key}").status_code == 200
        for bad in ("999999", "-1", "abc", "..%2F..%2Fmanifest.json"):
            assert httpx.get(f"{url}/thumb/{bad}").status_code in (404, 422)


def test_serve_command_refuses_a_bundle_without_index_before_binding(tmp_path_factory, sample_catalog, capsys):
    from retrieval.cli import main

    rc = main(["serve", "--bundle", str(shared_bundle(tmp_path_factory, sample_catalog)), "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "no catalog index yet" in err
