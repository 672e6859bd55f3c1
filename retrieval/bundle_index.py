"""The catalog index inside a bundle: its files (``index/catalog-<gen>.*``) and the manifest's
``"index"`` entry that records them, opening it with every file verified
(:class:`CatalogIndex`), refusing an index built by another model (:func:`check_model`), and
``catalog-search info`` (:func:`describe_bundle`).

Imports: :mod:`retrieval.vectors`, :mod:`retrieval.embedding` (the model's identity),
:mod:`retrieval.store`, :mod:`common` and :mod:`export`; never the builder
(:mod:`retrieval.index`) or the searcher (:mod:`retrieval.search`), which both use it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FedcbirError
from retrieval.embedding import weights_identity
from retrieval.vectors import ExactVectors, IndexFileError, VectorSearch, open_index, sha256_file, verify_file


# ----------------------------------------------------------------------------- the catalog index in a bundle
#
# Files (``<gen>`` changes on every build or update, so a published file is never rewritten):
#
#     BUNDLE/index/catalog-<gen>.usearch       the usearch index (keys = store image keys)
#     BUNDLE/index/catalog-<gen>.sqlite        the metadata store (retrieval.store)
#     BUNDLE/index/catalog-<gen>.keys.npy      i8 only: sorted keys of the exact vectors
#     BUNDLE/index/catalog-<gen>.vectors.npy   i8 only: f16 L2-normalised vectors, row-aligned
#
# and the manifest's ``"index"`` entry (written last, atomically: it is the commit point)::
#
#     {"format": "fedcbir-catalog-index", "format_version": 1, "generation": "...",
#      "dtype": "f16", "metric": "cos", "ndim": 128, "count": images, "products": N,
#      "skipped": S, "deleted_slots": D, "connectivity": 16, "expansion_add": 64,
#      "expansion_search": 128, "usearch_version": "2.26.6",
#      "files": {"index": {"path": "index/catalog-<gen>.usearch", "sha256": ..., "bytes": ...},
#                "store": {...}, ["keys": {...}, "vectors": {...}]},
#      "model": {"file": "model.onnx", "sha256": ..., "runtime": "onnx", "precision": "fp32",
#                "dim": 128, "input_size": 96, ...},
#      "catalog": {"root": "/abs/catalog", "products": N, "images": I},
#      "built": ISO-8601, "updated": ISO-8601 | null, "fedcbir_version": "..."}

INDEX_DIR = "index"
INDEX_KEY = "index"
INDEX_FORMAT = "fedcbir-catalog-index"
INDEX_FORMAT_VERSION = 1
FILE_ROLES = ("index", "store", "keys", "vectors")
_SUFFIX = {"index": ".usearch", "store": ".sqlite", "keys": ".keys.npy", "vectors": ".vectors.npy"}


def new_generation() -> str:
    import datetime as _dt
    import secrets

    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def generation_paths(bundle_dir: Path, gen: str, roles=FILE_ROLES) -> dict[str, Path]:
    return {r: bundle_dir / INDEX_DIR / f"catalog-{gen}{_SUFFIX[r]}" for r in roles}


def file_record(bundle_dir: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(bundle_dir).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def entry_path(bundle_dir: Path, entry: dict, role: str) -> Path | None:
    """The file of ``role`` recorded in an index entry (refusing paths outside the bundle)."""
    rec = (entry.get("files") or {}).get(role)
    if rec is None:
        return None
    rel = str(rec.get("path", ""))
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise IndexFileError(f"the manifest names an unsafe index file path {rel!r}")
    return bundle_dir / p


def check_entry(entry: Any) -> dict:
    if not isinstance(entry, dict) or entry.get("format") != INDEX_FORMAT:
        raise IndexFileError("the bundle's manifest has a damaged 'index' entry; build the index again")
    if entry.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexFileError(f"unsupported catalog index version {entry.get('format_version')!r} "
                             f"(this fedcbir reads {INDEX_FORMAT_VERSION}); build the index again")
    for key in ("dtype", "ndim", "files", "model"):
        if key not in entry:
            raise IndexFileError(f"the manifest's 'index' entry lacks {key!r}; build the index again")
    if "index" not in entry["files"] or "store" not in entry["files"]:
        raise IndexFileError("the manifest's 'index' entry lacks its files; build the index again")
    return entry


def index_entry(bundle) -> dict | None:
    return bundle.manifest.get("index")


def check_model(entry: dict, bundle, embedder) -> None:
    """Refuse an index built by another model (dimension or weights differ)."""
    rec = entry.get("model") or {}
    built_dim = int(entry.get("ndim", rec.get("dim", 0)))
    if built_dim != int(embedder.dim):
        raise IndexFileError(
            f"the index holds {built_dim}-d embeddings from model {rec.get('file')!r}, but this bundle's model "
            f"{embedder.describe().get('file')!r} gives {embedder.dim}-d embeddings: the index belongs to another "
            "model; rebuild it with 'catalog-search index'")
    mine, theirs = weights_identity(bundle), rec.get("weights")
    if mine and theirs and mine != theirs:
        raise IndexFileError("the index was built with other model weights than this bundle's; "
                             "rebuild it with 'catalog-search index'")
    if not (mine and theirs) and rec.get("sha256") and rec.get("file") in bundle.files:
        if bundle.files[rec["file"]].get("sha256") != rec["sha256"]:
            raise IndexFileError(f"the index was built with another {rec['file']} than this bundle's; "
                                 "rebuild it with 'catalog-search index'")


@dataclass
class CatalogIndex:
    """A verified, opened catalog index: vectors (usearch, memory-mapped) + metadata store."""

    bundle_dir: Path
    entry: dict
    vectors: VectorSearch
    store: Any  # retrieval.store.Store
    open_seconds: dict

    @classmethod
    def open(cls, bundle_dir: str | os.PathLike, entry: dict, *, view: bool = True,
             use_cache: bool = False) -> "CatalogIndex":
        """Check every file's size and sha256, then open (``view``: memory-map) the index.

        ``use_cache``: trust an earlier verification of an unchanged file (see :func:`verify_file`)."""
        import time

        from retrieval.store import Store

        bundle_dir = Path(bundle_dir)
        entry = check_entry(entry)
        t0 = time.perf_counter()
        files = entry["files"]
        for role in FILE_ROLES:
            path = entry_path(bundle_dir, entry, role)
            if path is not None:
                rec = files[role]
                verify_file(path, rec.get("sha256"), rec.get("bytes"), f"index {role} file", use_cache=use_cache)
        t1 = time.perf_counter()
        index = open_index(entry_path(bundle_dir, entry, "index"), sha256=None,
                           ndim=int(entry["ndim"]), dtype=str(entry["dtype"]), view=view)
        exact = None
        if "vectors" in files:
            exact = ExactVectors.load(entry_path(bundle_dir, entry, "keys"), entry_path(bundle_dir, entry, "vectors"))
            if exact.vectors.shape[1] != index.ndim:
                raise IndexFileError("the exact vectors and the index disagree on the dimension (damaged files)")
        t2 = time.perf_counter()
        store = Store.open_readonly(entry_path(bundle_dir, entry, "store"))
        t3 = time.perf_counter()
        count = entry.get("count")
        if count is not None and len(index) != int(count):
            store.close()
            raise IndexFileError(f"the index holds {len(index)} vectors, the manifest records {count}; "
                                 "build the index again")
        times = {"verify_ms": (t1 - t0) * 1e3, "open_index_ms": (t2 - t1) * 1e3, "open_store_ms": (t3 - t2) * 1e3}
        return cls(bundle_dir, entry, VectorSearch(index, exact), store, times)

    def close(self) -> None:
        self.store.close()


def describe_bundle(bundle_path: str | os.PathLike) -> dict[str, Any]:
    """``catalog-search info``: the bundle's models and its index, every checksum verified."""
    from export.runtime import Bundle, read_manifest

    bundle_dir = Path(bundle_path)
    bundle = Bundle(bundle_dir, read_manifest(bundle_dir))
    models = []
    for rt, prec, name in bundle.models():
        try:
            bundle.check_file(name)
            status = "ok"
        except FedcbirError as exc:
            status = f"damaged: {exc}"
        models.append({"file": name, "runtime": rt, "precision": prec, "bytes": bundle.files[name]["bytes"],
                       "status": status})
    out: dict[str, Any] = {"bundle": str(bundle_dir), "embedding_dim": bundle.dim, "input_size": bundle.input_size,
                           "models": models, "index": None}
    entry = bundle.manifest.get(INDEX_KEY)
    if entry is None:
        return out
    idx: dict[str, Any] = {k: entry.get(k) for k in ("dtype", "metric", "ndim", "count", "products", "skipped",
                                                     "deleted_slots", "generation", "built", "updated", "model",
                                                     "catalog", "usearch_version", "exact_vectors")}
    try:
        idx["bytes"] = sum(int(f.get("bytes", 0)) for f in (entry.get("files") or {}).values())
        idx["files"] = {r: f.get("path") for r, f in (entry.get("files") or {}).items()}
    except (AttributeError, TypeError, ValueError):
        idx["bytes"], idx["files"] = 0, {}
    try:
        opened = CatalogIndex.open(bundle_dir, entry, view=True)
        try:
            idx["product_types"] = opened.store.product_types()
            idx["skipped_examples"] = [{"item_id": i, "image": p, "reason": r} for i, p, r in opened.store.skipped(5)]
            idx["open_ms"] = {k: round(v, 2) for k, v in opened.open_seconds.items()}
        finally:
            opened.close()
        idx["status"] = "ok"
    except FedcbirError as exc:
        idx["status"] = f"damaged: {exc}"
    for key in ("model", "catalog"):
        if not isinstance(idx.get(key), dict):
            idx[key] = {}
    out["index"] = idx
    return out
