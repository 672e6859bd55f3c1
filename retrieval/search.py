"""Searching a catalog index with photos, on the device.

:class:`Searcher` opens a bundle once (model file checked by the export runtime, index
files checked by sha256 and memory-mapped) and answers photo queries:

1. decode (``catalog.images.load_image``: the one safe loader) and preprocess the photos
   as the bundle's manifest says, embed them with the device runtime, L2-normalise;
2. fetch nearest photos from the usearch index (i8: over-fetch and re-rank exactly);
3. collapse photos to products (a product's score is its best photo's), drop photos that
   fail a filter (``--type``, main photos only), and fetch more (x4, finally an exhaustive
   scan) until ``k`` products are found or the index is exhausted.

The import of the runtime happens before usearch's (see :mod:`retrieval.vectors`).

Imports: :mod:`retrieval.embedding`, :mod:`retrieval.bundle_index`, :mod:`retrieval.vectors`,
:mod:`common`, :mod:`catalog` and :mod:`models`; never :mod:`retrieval.index` (building).
The server and the command line use this module.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.errors import FedcbirError
from models.metrics import l2_normalize
from retrieval.bundle_index import CatalogIndex, check_model, index_entry
from retrieval.embedding import embed_pixels, load_model, open_bundle, preprocess_of
from retrieval.vectors import IndexFileError

DEFAULT_K = 10
MAX_K = 1000


# ----------------------------------------------------------------------------- results


@dataclass
class Match:
    item_id: str
    score: float
    name: str
    product_type: str
    brand: str | None
    image: str  # absolute path of the best-matching catalog photo
    key: int

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "score": round(float(self.score), 6), "name": self.name,
                "product_type": self.product_type, "brand": self.brand, "image": self.image, "key": self.key}


@dataclass
class SearchStats:
    fetched: int = 0
    rounds: int = 0
    exhaustive: bool = False


class Searcher:
    """A bundle opened for search: embedder + verified, memory-mapped catalog index + store.

    Thread-safe: embedding is serialised by a lock (LiteRT interpreters are not
    re-entrant); index searches and store reads run concurrently.
    """

    def __init__(self, bundle_path: str | os.PathLike, *, runtime: str | None = None, precision: str | None = None,
                 threads: int = 1, view: bool = True, use_cache: bool = True):
        t0 = time.perf_counter()
        self.bundle = open_bundle(bundle_path, check="lazy")
        entry = index_entry(self.bundle)
        if entry is None:
            raise IndexFileError(f"bundle {bundle_path} has no catalog index yet: build one with "
                                 f"'catalog-search index --bundle {bundle_path} --catalog ROOT'")
        rec = entry.get("model") or {}
        if runtime is None and precision is None and rec.get("runtime"):
            runtime, precision = rec.get("runtime"), rec.get("precision")
        t1 = time.perf_counter()
        # the runtime first: it must be imported before usearch (see retrieval.vectors)
        self.embedder = load_model(self.bundle, runtime, precision, threads)
        self.pre = preprocess_of(self.bundle, self.embedder)
        t2 = time.perf_counter()
        check_model(entry, self.bundle, self.embedder)
        self.index = CatalogIndex.open(self.bundle.path, entry, view=view, use_cache=use_cache)
        self.entry = self.index.entry
        self.store = self.index.store
        self.vectors = self.index.vectors
        self.catalog_root = Path(self.store.catalog_root)
        self._types = self.store.product_types()
        self._main = None
        self._embed_lock = threading.Lock()
        self._store_lock = threading.Lock()
        counts = self.store.counts()
        self.images_per_product = counts["images"] / max(1, counts["products"])
        self.num_products = counts["products"]
        t3 = time.perf_counter()
        self.timings = {"open_bundle_ms": (t1 - t0) * 1e3, "load_model_ms": (t2 - t1) * 1e3,
                        "open_index_ms": (t3 - t2) * 1e3, **{k: round(v, 3) for k, v in self.index.open_seconds.items()}}

    def close(self) -> None:
        self.index.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- info

    @property
    def product_types(self) -> dict[str, int]:
        return dict(self._types)

    def resolve_type(self, product_type: str | None) -> str | None:
        if product_type is None or product_type == "":
            return None
        if product_type in self._types:
            return product_type
        folded = {t.upper(): t for t in self._types}
        if product_type.upper() in folded:
            return folded[product_type.upper()]
        known = ", ".join(sorted(self._types)[:12]) + (" ..." if len(self._types) > 12 else "")
        raise FedcbirError(f"no indexed products of type {product_type!r} (types: {known})")

    def store_row(self, key: int):
        """The store's row of one index key (None if unknown)."""
        with self._store_lock:
            return self.store.row_for_key(int(key))

    def image_path(self, rel: str) -> Path:
        from catalog.abo import IMAGES_DIR

        return self.catalog_root / IMAGES_DIR / rel

    # -------------------------------------------------------------- embedding

    def embed_paths(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """Decode every query photo first (any failure: one-line error), then embed them."""
        from catalog.images import load_image, to_uint8

        pixels = [to_uint8(load_image(p), self.pre) for p in paths]
        return self.embed_uint8(np.stack(pixels) if pixels else np.zeros((0, self.pre.size, self.pre.size, 3), np.uint8))

    def embed_bytes(self, data: bytes, name: str = "upload") -> np.ndarray:
        from catalog.images import ImageError, load_image, to_uint8

        try:
            img = load_image(data)
        except ImageError as exc:
            raise ImageError(str(exc).replace(f"<{len(data)} bytes in memory>", name)) from None
        return self.embed_uint8(to_uint8(img, self.pre)[None])

    def embed_uint8(self, pixels: np.ndarray) -> np.ndarray:
        with self._embed_lock:
            return embed_pixels(self.embedder, pixels, self.pre)

    # -------------------------------------------------------------- searching

    def _main_keys(self) -> set[int]:
        if self._main is None:
            with self._store_lock:
                self._main = set(self.store.main_images().values())
        return self._main

    def search_vector(self, q: np.ndarray, k: int = DEFAULT_K, *, product_type: str | None = None,
                      main_only: bool = False, stats: SearchStats | None = None) -> list[Match]:
        """The ``k`` best products for one L2-normalised query vector."""
        k = int(k)
        if not 1 <= k <= MAX_K:
            raise FedcbirError(f"k must be in 1..{MAX_K}, got {k}")
        ptype = self.resolve_type(product_type)
        main = self._main_keys() if main_only else None
        n = len(self.vectors)
        if n == 0:
            return []
        # expected photos per wanted product, times how rare the filter makes them
        per = max(1.0, self.images_per_product)
        if ptype is not None:
            per *= self.num_products / max(1, self._types.get(ptype, 1))
        if main_only:
            per *= self.images_per_product
        fetch = min(n, int(math.ceil(k * per * 2)) + 8)
        stats = stats if stats is not None else SearchStats()
        while True:
            exhaustive = fetch >= n
            keys, scores = self.vectors.search(q[None, :], fetch, exhaustive=exhaustive)
            stats.rounds += 1
            stats.fetched = fetch
            stats.exhaustive = exhaustive
            keys, scores = keys[0], scores[0]
            valid = keys >= 0
            keys, scores = keys[valid], scores[valid]
            with self._store_lock:
                rows = self.store.rows_for_keys(keys.tolist())
            out: list[Match] = []
            seen: set[str] = set()
            for key, score in zip(keys.tolist(), scores.tolist()):
                row = rows.get(key)
                if row is None or row.item_id in seen:
                    continue
                if ptype is not None and row.product_type != ptype:
                    continue
                if main is not None and key not in main:
                    continue
                seen.add(row.item_id)
                out.append(Match(row.item_id, float(score), row.name, row.product_type, row.brand,
                                 str(self.image_path(row.path)), key))
                if len(out) == k:
                    return out
            if exhaustive:
                return out
            fetch = min(n, fetch * 4)

    def search_paths(self, paths: Sequence[str | os.PathLike], k: int = DEFAULT_K,
                     product_type: str | None = None) -> dict[str, Any]:
        """The JSON answer of ``catalog-search query``."""
        self.resolve_type(product_type)
        if not 1 <= int(k) <= MAX_K:
            raise FedcbirError(f"k must be in 1..{MAX_K}, got {k}")
        vectors = self.embed_paths(paths)
        results = []
        for path, q in zip(paths, vectors):
            matches = self.search_vector(q, k, product_type=product_type)
            results.append({"query": str(path), "matches": [m.to_dict() for m in matches]})
        return {"results": results}

    def info(self) -> dict[str, Any]:
        return {"entry": self.entry, "model": self.embedder.describe(), "timings_ms": self.timings,
                "counts": self.store.counts(), "product_types": self.product_types}


# ----------------------------------------------------------------------------- evaluation


def evaluate(searcher: Searcher, catalog_root: str | os.PathLike, *, seed: int = 0, test_fraction: float = 0.2,
             max_queries: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Retrieval quality and latency of an indexed bundle on the test products.

    Protocol (ABO multi-view retrieval, adapted to an index that holds the whole catalog):
    the test products are those of ``CatalogSplit.load(root, seed, test_fraction)``; the
    queries are their non-main photos, decoded from the catalog and embedded with the
    bundle's runtime exactly like a user's photo; the gallery is the indexed MAIN photo of
    every catalog product (train products are distractors), so a query cannot find
    another photo of its own product; a hit is the same ``item_id``. Reported:
    Recall@1/5/10 and mAP@R (R = 1 here, so mAP@R = Recall@1) from the index search, the
    same metrics by exact numpy search over the same vectors (what the ANN index loses),
    and per-query latency (decode + embed + search, and search alone) p50/p99.
    """
    from catalog.dataset import CatalogSplit
    from models.metrics import retrieval_metrics, retrieval_metrics_from_ranking

    split = CatalogSplit.load(catalog_root, seed=seed, test_fraction=test_fraction)
    main_of = searcher.store.main_images()  # item_id -> key
    test = [p for p in split.test if p.item_id in main_of]
    queries = [(p.item_id, p.product_type, rel) for p in test for rel in p.other_images]
    if max_queries is not None:
        queries = queries[:max_queries]
    if not queries:
        raise FedcbirError("no queries: the test products have no indexed main photo and other photos "
                           "(is this the catalog the index was built from?)")
    gallery_items = sorted(main_of)
    gallery_keys = np.array([main_of[i] for i in gallery_items], dtype=np.uint64)
    pos_of = {item: j for j, item in enumerate(gallery_items)}
    types_of = {}
    rows = searcher.store.rows_for_keys(gallery_keys.tolist())
    for j, key in enumerate(gallery_keys.tolist()):
        types_of[gallery_items[j]] = rows[key].product_type
    root = Path(catalog_root)
    from catalog.abo import IMAGES_DIR

    k_max = 10
    ranking, q_labels, q_types, q_vecs = [], [], [], []
    total_ms, search_ms, skipped = [], [], []
    bar = None
    if progress:
        from common.progress import progress_bar

        bar = progress_bar(True)
    task = None
    if bar is not None:
        bar.start()
        task = bar.add_task("queries", total=len(queries))
    try:
        for item_id, ptype, rel in queries:
            t0 = time.perf_counter()
            try:
                q = searcher.embed_paths([root / IMAGES_DIR / rel])[0]
            except FedcbirError as exc:
                skipped.append({"item_id": item_id, "image": rel, "reason": str(exc)})
                if bar is not None:
                    bar.advance(task)
                continue
            t1 = time.perf_counter()
            matches = searcher.search_vector(q, k_max, main_only=True)
            t2 = time.perf_counter()
            total_ms.append((t2 - t0) * 1e3)
            search_ms.append((t2 - t1) * 1e3)
            row = [pos_of[m.item_id] for m in matches if m.item_id in pos_of]
            row += [-1] * (k_max - len(row))
            ranking.append(row[:k_max])
            q_labels.append(item_id)
            q_types.append(ptype)
            q_vecs.append(q)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    if not ranking:
        raise FedcbirError("every query photo failed to decode")
    # a short ranking (fewer than 10 products found) is padded with a label no query has
    g_labels = gallery_items + ["\0none"]
    g_types = [types_of[i] for i in gallery_items] + ["\0none"]
    rank = np.array(ranking, dtype=np.int64)
    rank[rank < 0] = len(gallery_items)
    index_metrics = retrieval_metrics_from_ranking(rank, q_labels, g_labels, query_types=q_types,
                                                   gallery_types=g_types)
    index_metrics["gallery"] = len(gallery_items)
    gallery_vecs = _vectors_of(searcher, gallery_keys)
    exact_metrics = retrieval_metrics(np.stack(q_vecs), q_labels, gallery_vecs, gallery_items,
                                      query_types=q_types, gallery_types=[types_of[i] for i in gallery_items])

    def pct(xs, p):
        return round(float(np.percentile(xs, p)), 3)

    return {
        "protocol": "queries = non-main photos of test products (CatalogSplit seed/test_fraction); gallery = "
                    "indexed main photo of every catalog product; hit = same item_id",
        "seed": seed, "test_fraction": test_fraction,
        "test_products": len(test), "queries": len(ranking), "skipped_queries": skipped[:20],
        "skipped_count": len(skipped),
        "gallery": len(gallery_items),
        "index": {k: index_metrics[k] for k in ("recall@1", "recall@5", "recall@10", "map@r", "type_precision@1")},
        "exact": {k: exact_metrics[k] for k in ("recall@1", "recall@5", "recall@10", "map@r", "type_precision@1")},
        "latency_ms": {"query_p50": pct(total_ms, 50), "query_p99": pct(total_ms, 99),
                       "search_p50": pct(search_ms, 50), "search_p99": pct(search_ms, 99)},
        "model": {k: searcher.embedder.describe().get(k) for k in ("file", "runtime", "precision", "threads")},
        "index_dtype": searcher.entry.get("dtype"),
    }


def _vectors_of(searcher: Searcher, keys: np.ndarray) -> np.ndarray:
    """The stored (exact where kept) vectors of ``keys``, float32 L2-normalised."""
    vs = searcher.vectors
    if vs.exact is not None:
        return l2_normalize(vs.exact.get(keys))
    got = vs.index.get(keys, dtype=np.float32)
    return l2_normalize(np.stack(got) if isinstance(got, tuple) else np.asarray(got))
