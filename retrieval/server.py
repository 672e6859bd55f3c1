"""``catalog-search serve``: an upload page and a JSON API over one opened bundle.

    GET  /              the page (drop or pick a photo, or take one with a phone's camera; see the
                        best products as cards, each with its cosine similarity and its gap to #1)
    POST /api/search    multipart: ``image`` (file), optional ``k`` (1-100), ``type``
                        -> {"results": [{"query": filename, "matches": [...]}]}
    GET  /api/info      products, photos, product types, model and index facts
    GET  /thumb/{key}   the catalog photo recorded for an index key (only files under the
                        catalog root; anything else is 404)

Errors: an upload over the size limit is refused with 413 while it is being received
(an ASGI wrapper counts body bytes, so a large upload is never spooled to disk); a file
that is not a usable image gives 400 with the loader's one-line reason; a missing field
gives FastAPI's 422. (FastAPI is imported at module level: its signatures are resolved
from this module's globals.) The searcher is shared by all requests: embedding is serialised by
its lock, index searches run concurrently in the thread pool.
"""
from __future__ import annotations

import mimetypes
import os
import socket
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from common.errors import FedcbirError

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD = 10 * 1024 * 1024
MAX_K_HTTP = 100


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 as soon as a request body exceeds ``limit`` bytes."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        # multipart framing adds a few hundred bytes around the file itself
        slack = 64 * 1024
        if length is not None:
            try:
                too_big = int(length) > self.limit + slack
            except ValueError:
                too_big = False
            if too_big:
                return await _send_413(send, self.limit)
        seen = 0
        exceeded = False
        replied = False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit + slack:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            # once the body was cut off, whatever the app answers (FastAPI turns the
            # exception into "400 error parsing the body") becomes one 413
            nonlocal replied
            if exceeded:
                if not replied:
                    replied = True
                    await _send_413(send, self.limit)
                return
            if message["type"] == "http.response.start":
                replied = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if exceeded and not replied:
            await _send_413(send, self.limit)


async def _send_413(send, limit: int) -> None:
    import json

    body = json.dumps({"detail": f"upload too large: the limit is {limit / 1024 / 1024:.1f} MB"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(searcher, max_upload_bytes: int = DEFAULT_MAX_UPLOAD):
    """The FastAPI application over an opened :class:`retrieval.search.Searcher`."""
    from catalog.abo import IMAGES_DIR
    from catalog.images import ImageError

    app = FastAPI(title="fedcbir catalog search", docs_url=None, redoc_url=None, openapi_url=None)
    images_root = (searcher.catalog_root / IMAGES_DIR).resolve()
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        e = searcher.entry
        model = searcher.embedder.describe()
        return {"products": e.get("products"), "images": e.get("count"), "dtype": e.get("dtype"),
                "product_types": searcher.product_types,
                "model": {k: model.get(k) for k in ("file", "runtime", "precision", "dim", "input_size")},
                "max_upload_bytes": max_upload_bytes}

    @app.post("/api/search")
    def search(image: UploadFile = File(...), k: int = Form(10), type: str | None = Form(None)) -> JSONResponse:  # noqa: A002
        if not 1 <= k <= MAX_K_HTTP:
            raise HTTPException(422, f"k must be in 1..{MAX_K_HTTP}")
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload too large: the limit is {max_upload_bytes / 1024 / 1024:.1f} MB")
        name = os.path.basename(image.filename or "upload") or "upload"
        try:
            ptype = searcher.resolve_type(type or None)
            q = searcher.embed_bytes(data, name=name)[0]
            matches = searcher.search_vector(q, k, product_type=ptype)
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from None
        except FedcbirError as exc:
            raise HTTPException(400, str(exc)) from None
        out = []
        for m in matches:
            d = m.to_dict()
            d["thumbnail"] = f"/thumb/{m.key}"
            out.append(d)
        return JSONResponse({"results": [{"query": name, "matches": out}]})

    @app.get("/thumb/{key}")
    def thumbnail(key: int):
        if key < 0:
            raise HTTPException(404, "no such photo")
        row = searcher.store_row(key)
        if row is None:
            raise HTTPException(404, "no such photo")
        path = (images_root / row.path).resolve()
        try:
            path.relative_to(images_root)
        except ValueError:
            raise HTTPException(404, "no such photo") from None
        if not path.is_file():
            raise HTTPException(404, "photo file is missing")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not media.startswith("image/"):
            raise HTTPException(404, "no such photo")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "max-age=3600"})

    return BodyLimit(app, max_upload_bytes)


def serve(bundle: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8080,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD, runtime: str | None = None, precision: str | None = None,
          threads: int = 1) -> int:
    """Open the bundle (all checks first), bind, print the URL, serve until interrupted."""
    import uvicorn

    from retrieval.search import Searcher

    if max_upload_bytes < 1:
        raise FedcbirError("--max-upload-mb must be positive")
    if not 0 <= int(port) <= 65535:
        raise FedcbirError(f"--port must be in 0..65535, got {port}")
    searcher = Searcher(bundle, runtime=runtime, precision=precision, threads=threads)
    app = create_app(searcher, max_upload_bytes)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise FedcbirError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving {searcher.entry.get('products')} products on http://{shown}:{actual}/ (Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        searcher.close()
    print("stopped", file=sys.stderr)
    return 0
