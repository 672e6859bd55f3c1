"""The metadata store of a catalog index: one SQLite file beside the usearch file.

It maps each usearch key (an explicit uint64, never reused) to one catalog photo and
that photo to its product::

    meta(key, value)                       format version, catalog root, next key, ...
    products(item_id, product_type, name, brand, color, country, marketplace, listing_hash)
    images(key, item_id, path, is_main, file_size, file_mtime_ns, file_sha256)
    skipped(item_id, path, reason, ...)    photos that could not be decoded at index time

``path`` is relative to the catalog's ``images/small`` folder (as in ``images.csv.gz``);
the catalog root is in ``meta``. A published store file is never modified: an update
copies it, edits the copy and publishes the copy under a new name (see
:mod:`retrieval.index`), so readers open it read-only and ``immutable`` (no locks, no
journal files written next to it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from common.errors import FedcbirError

STORE_FORMAT = "fedcbir-catalog-store"
STORE_VERSION = 1
_CHUNK = 500  # keys per "IN (...)" query (far below SQLite's variable limit)

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE products(
    item_id      TEXT PRIMARY KEY,
    product_type TEXT NOT NULL,
    name         TEXT NOT NULL,
    brand        TEXT,
    color        TEXT,
    country      TEXT,
    marketplace  TEXT,
    listing_hash TEXT NOT NULL
);
CREATE TABLE images(
    key           INTEGER PRIMARY KEY,
    item_id       TEXT NOT NULL REFERENCES products(item_id),
    path          TEXT NOT NULL,
    is_main       INTEGER NOT NULL,
    file_size     INTEGER NOT NULL,
    file_mtime_ns INTEGER NOT NULL,
    file_sha256   TEXT NOT NULL,
    UNIQUE(item_id, path)
);
CREATE INDEX images_by_item ON images(item_id);
CREATE INDEX products_by_type ON products(product_type);
CREATE TABLE skipped(
    item_id       TEXT NOT NULL,
    path          TEXT NOT NULL,
    reason        TEXT NOT NULL,
    file_size     INTEGER NOT NULL,
    file_mtime_ns INTEGER NOT NULL,
    PRIMARY KEY(item_id, path)
);
"""


class StoreError(FedcbirError):
    """A metadata store that cannot be read or does not match its index."""


@dataclass(frozen=True)
class ImageRow:
    """One indexed photo with its product's searchable fields."""

    key: int
    item_id: str
    path: str
    is_main: bool
    product_type: str
    name: str
    brand: str | None
    color: str | None


@dataclass(frozen=True)
class StoredImage:
    key: int
    item_id: str
    path: str
    is_main: bool
    file_size: int
    file_mtime_ns: int
    file_sha256: str


def listing_hash(product) -> str:
    """A fingerprint of a catalog product's stored fields and photo list (for ``--update``)."""
    doc = [product.item_id, product.product_type, product.name, product.brand, product.color,
           product.country, product.marketplace, product.main_image, list(product.other_images)]
    return hashlib.blake2b(json.dumps(doc, ensure_ascii=False).encode(), digest_size=16).hexdigest()


class Store:
    """A SQLite metadata store. Use :meth:`create`, :meth:`copy_for_update` or :meth:`open_readonly`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, writable: bool) -> None:
        self.conn = conn
        self.path = path
        self.writable = writable

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: str | os.PathLike, catalog_root: str | os.PathLike) -> "Store":
        """A new, empty store at ``path`` (which must not exist yet, e.g. a fresh temp name)."""
        path = Path(path)
        if path.exists() and path.stat().st_size > 0:
            raise StoreError(f"refusing to overwrite {path}")
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        store = cls(conn, path, writable=True)
        store.set_meta("format", STORE_FORMAT)
        store.set_meta("format_version", STORE_VERSION)
        store.set_meta("catalog_root", str(Path(catalog_root).resolve()))
        store.set_meta("next_key", 1)
        return store

    @classmethod
    def copy_for_update(cls, src: str | os.PathLike, dest: str | os.PathLike) -> "Store":
        """Copy a published store to ``dest`` and open the copy for writing (in one transaction)."""
        shutil.copyfile(src, dest)
        conn = sqlite3.connect(dest, isolation_level=None, check_same_thread=False)
        conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;")
        store = cls(conn, Path(dest), writable=True)
        store._check_format()
        conn.execute("BEGIN")
        return store

    @classmethod
    def open_readonly(cls, path: str | os.PathLike) -> "Store":
        """Open a published store without writing anything next to it."""
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"metadata store {path} is missing")
        uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            store = cls(conn, path, writable=False)
            store._check_format()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"metadata store {path} is damaged: {exc}") from None
        return store

    def _check_format(self) -> None:
        try:
            fmt = self.get_meta("format")
            version = self.get_meta("format_version")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a fedcbir metadata store ({exc})") from None
        if fmt != STORE_FORMAT:
            raise StoreError(f"{self.path} is not a fedcbir metadata store")
        if str(version) != str(STORE_VERSION):
            raise StoreError(f"{self.path}: unsupported store version {version} (this fedcbir reads {STORE_VERSION})")

    def commit_and_close(self) -> None:
        """Finish writing: commit, compact the file and close it."""
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")
        self.conn.execute("VACUUM")
        self.conn.close()

    def close(self) -> None:
        try:
            if self.writable and self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self.conn.close()

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def catalog_root(self) -> Path:
        return Path(self.get_meta("catalog_root"))

    # ------------------------------------------------------------------ writing

    def put_product(self, product, fingerprint: str | None = None) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO products(item_id, product_type, name, brand, color, country, marketplace, "
            "listing_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (product.item_id, product.product_type, product.name, product.brand, product.color,
             product.country, product.marketplace, fingerprint or listing_hash(product)))

    def delete_product(self, item_id: str) -> list[int]:
        """Remove a product, its photos and skip records; returns the removed keys."""
        keys = [k for (k,) in self.conn.execute("SELECT key FROM images WHERE item_id = ?", (item_id,))]
        self.conn.execute("DELETE FROM images WHERE item_id = ?", (item_id,))
        self.conn.execute("DELETE FROM skipped WHERE item_id = ?", (item_id,))
        self.conn.execute("DELETE FROM products WHERE item_id = ?", (item_id,))
        return keys

    def allocate_keys(self, n: int) -> list[int]:
        """``n`` fresh keys (monotonic, never reused, so an old key never names a new photo)."""
        first = int(self.get_meta("next_key", 1))
        self.set_meta("next_key", first + n)
        return list(range(first, first + n))

    def add_image(self, key: int, item_id: str, path: str, is_main: bool, size: int, mtime_ns: int, sha256: str) -> None:
        self.conn.execute(
            "INSERT INTO images(key, item_id, path, is_main, file_size, file_mtime_ns, file_sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (int(key), item_id, path, int(bool(is_main)), int(size), int(mtime_ns), sha256))
        self.conn.execute("DELETE FROM skipped WHERE item_id = ? AND path = ?", (item_id, path))

    def delete_images(self, keys: Iterable[int]) -> None:
        self.conn.executemany("DELETE FROM images WHERE key = ?", [(int(k),) for k in keys])

    def set_main(self, key: int, is_main: bool) -> None:
        self.conn.execute("UPDATE images SET is_main = ? WHERE key = ?", (int(bool(is_main)), int(key)))

    def touch_image(self, key: int, size: int, mtime_ns: int) -> None:
        self.conn.execute("UPDATE images SET file_size = ?, file_mtime_ns = ? WHERE key = ?", (int(size), int(mtime_ns), int(key)))

    def record_skipped(self, item_id: str, path: str, reason: str, size: int = -1, mtime_ns: int = -1) -> None:
        """A photo that could not be used, with its file's (size, mtime) then (-1 if absent)."""
        self.conn.execute("INSERT OR REPLACE INTO skipped(item_id, path, reason, file_size, file_mtime_ns) "
                          "VALUES (?, ?, ?, ?, ?)", (item_id, path, reason, int(size), int(mtime_ns)))

    def forget_skipped(self, item_id: str, path: str) -> None:
        self.conn.execute("DELETE FROM skipped WHERE item_id = ? AND path = ?", (item_id, path))

    # ------------------------------------------------------------------ reading

    def listing_hashes(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT item_id, listing_hash FROM products"))

    def images_of(self, item_id: str) -> list[StoredImage]:
        rows = self.conn.execute(
            "SELECT key, item_id, path, is_main, file_size, file_mtime_ns, file_sha256 FROM images "
            "WHERE item_id = ? ORDER BY key", (item_id,))
        return [StoredImage(k, i, p, bool(m), s, t, h) for k, i, p, m, s, t, h in rows]

    def iter_images(self) -> Iterator[StoredImage]:
        rows = self.conn.execute(
            "SELECT key, item_id, path, is_main, file_size, file_mtime_ns, file_sha256 FROM images ORDER BY key")
        for k, i, p, m, s, t, h in rows:
            yield StoredImage(k, i, p, bool(m), s, t, h)

    def keys(self) -> list[int]:
        return [k for (k,) in self.conn.execute("SELECT key FROM images ORDER BY key")]

    def rows_for_keys(self, keys: Sequence[int]) -> dict[int, ImageRow]:
        """key → :class:`ImageRow` for the keys that exist (unknown keys are absent)."""
        out: dict[int, ImageRow] = {}
        keys = [int(k) for k in keys]
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i:i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for k, item, path, main, ptype, name, brand, color in self.conn.execute(
                    "SELECT i.key, i.item_id, i.path, i.is_main, p.product_type, p.name, p.brand, p.color "
                    f"FROM images i JOIN products p ON p.item_id = i.item_id WHERE i.key IN ({marks})", chunk):
                out[k] = ImageRow(k, item, path, bool(main), ptype, name, brand, color)
        return out

    def row_for_key(self, key: int) -> ImageRow | None:
        return self.rows_for_keys([key]).get(int(key))

    def main_images(self) -> dict[str, int]:
        """item_id → key of its indexed main photo."""
        return dict(self.conn.execute("SELECT item_id, key FROM images WHERE is_main = 1"))

    def keys_by_path(self) -> dict[tuple[str, str], int]:
        return {(i, p): k for k, i, p in self.conn.execute("SELECT key, item_id, path FROM images")}

    def product_types(self) -> dict[str, int]:
        """product type → number of indexed products of that type."""
        return dict(self.conn.execute(
            "SELECT product_type, COUNT(*) FROM products WHERE item_id IN (SELECT item_id FROM images) "
            "GROUP BY product_type ORDER BY product_type"))

    def skipped_files(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(item_id, path) → (size, mtime_ns) the file had when it failed."""
        return {(i, p): (s, t) for i, p, s, t in self.conn.execute(
            "SELECT item_id, path, file_size, file_mtime_ns FROM skipped")}

    def skipped(self, limit: int | None = None) -> list[tuple[str, str, str]]:
        sql = "SELECT item_id, path, reason FROM skipped ORDER BY item_id, path"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return list(self.conn.execute(sql))

    def counts(self) -> dict[str, int]:
        one = lambda sql: int(self.conn.execute(sql).fetchone()[0])  # noqa: E731
        return {
            "products": one("SELECT COUNT(DISTINCT item_id) FROM images"),
            "images": one("SELECT COUNT(*) FROM images"),
            "skipped": one("SELECT COUNT(*) FROM skipped"),
            "product_types": one("SELECT COUNT(DISTINCT p.product_type) FROM products p "
                                 "WHERE p.item_id IN (SELECT item_id FROM images)"),
        }
