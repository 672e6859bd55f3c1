"""The vector side of catalog search: usearch indexes with explicit keys, checksummed files,
memory-mapped opening and exact re-ranking.

Facts this module relies on (usearch 2.26.6, measured on this machine):

- ``Index.restore(path, view=True)`` memory-maps a file without checking it: a damaged
  header or body is searched anyway (wrong results or a crash). Every file is therefore
  opened only after its sha256 matches the manifest (:func:`open_index`).
- Adding to a viewed index crashes the process: updates load a private copy (``view=False``).
- ``remove`` marks slots deleted; they are reused by later ``add`` calls only partly and
  never compacted, so :func:`needs_compaction` tells the builder to rebuild.
- An ``i8`` index with the ``cos`` metric stores ``127 * x / |x|``: recall@10 ≈ 0.96 at 400k
  (benchmarks/search.py; ≈ 0.999 re-ranked), so
  an i8 index keeps f16 copies of its vectors (``.npy``, memory-mapped) and re-ranks an
  over-fetched candidate list exactly (:class:`VectorSearch`).
- Graph settings (connectivity 16, expansion_add 128, expansion_search 128) give f16
  recall@10 ≈ 0.995 at 400k x 128 with single-query p50 ≈ 0.5 ms on one thread; with
  expansion_add 64 it stayed at 0.985-0.99 even with expansion_search 256.
- Importing ``usearch`` before ``onnxruntime`` in one process makes the later import of
  ``onnxruntime`` crash (segmentation fault in its extension's start-up);
  the reverse order works. :func:`usearch_index` imports onnxruntime first when it is
  installed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import FedcbirError

DTYPES = ("f16", "i8", "f32")
METRIC = "cos"
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 128
RERANK_FACTOR = 4  # i8: candidates fetched per requested result before exact re-ranking
EXACT_DTYPE = {"i8": "f16"}  # index dtype -> dtype of the exact vectors kept beside it
COMPACT_DELETED_FRACTION = 0.25
_HASH_CHUNK = 1 << 20


class IndexFileError(FedcbirError):
    """An index file that is missing, damaged, tampered with or built for another model."""


def usearch_index():
    """The ``usearch.index`` module, imported after onnxruntime (see the module notes)."""
    if "usearch.index" not in sys.modules and "onnxruntime" not in sys.modules:
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime  # noqa: F401  (import order matters, see module docstring)
    import usearch.index

    return usearch.index


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise FedcbirError(f"index dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def new_index(ndim: int, dtype: str = "f16", *, connectivity: int = CONNECTIVITY,
              expansion_add: int = EXPANSION_ADD, expansion_search: int = EXPANSION_SEARCH):
    ui = usearch_index()
    return ui.Index(ndim=int(ndim), metric=METRIC, dtype=check_dtype(dtype), connectivity=connectivity,
                    expansion_add=expansion_add, expansion_search=expansion_search)


def as_keys(keys) -> np.ndarray:
    k = np.asarray(keys)
    if k.ndim != 1:
        raise ValueError("keys must be one-dimensional")
    if k.size and (k.dtype.kind not in "iu" or int(k.min()) < 0):
        raise ValueError("keys must be non-negative integers")
    return k.astype(np.uint64)


def as_vectors(vectors, ndim: int | None = None) -> np.ndarray:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or (ndim is not None and v.shape[1] != ndim):
        raise ValueError(f"expected vectors of shape [N, {ndim}], got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise FedcbirError("embeddings contain NaN or infinite values (the model output is unusable)")
    return v


def add_vectors(index, keys, vectors, threads: int = 0) -> None:
    keys = as_keys(keys)
    vectors = as_vectors(vectors, index.ndim)
    if len(keys) != len(vectors):
        raise ValueError("keys and vectors differ in length")
    if len(keys):
        index.add(keys, vectors, threads=threads)


def header(path: str | os.PathLike) -> dict[str, Any]:
    """usearch's header of an index file (dimensions, scalar kind, counts), read without mapping it."""
    ui = usearch_index()
    try:
        meta = ui.Index.metadata(os.fspath(path))
    except Exception as exc:  # usearch raises plain RuntimeError/ValueError
        raise IndexFileError(f"{path} is not a usearch index ({' '.join(str(exc).split())})") from None
    if not meta:
        raise IndexFileError(f"{path} is not a usearch index")
    return meta


def deleted_fraction(path: str | os.PathLike) -> float:
    meta = header(path)
    present, deleted = int(meta.get("count_present", 0)), int(meta.get("count_deleted", 0))
    return deleted / max(1, present + deleted)


def needs_compaction(path: str | os.PathLike) -> bool:
    """True when more than a quarter of an index file's slots are deleted ones."""
    return deleted_fraction(path) > COMPACT_DELETED_FRACTION


def _scalar_name(kind) -> str:
    return str(getattr(kind, "name", kind)).lower()


def verify_file(path: Path, sha256: str | None, size: int | None, what: str, *, use_cache: bool = False) -> None:
    """Raise :class:`IndexFileError` unless ``path`` exists with the recorded size and sha256.

    ``use_cache``: skip re-hashing a file this user already verified when its inode, size,
    mtime and ctime are unchanged (a stat cache like git's index, kept in the fedcbir cache
    folder, never in the bundle). Any write to the file changes its ctime, a replacement
    its inode, so a modified file is always hashed again.
    """
    if not path.is_file():
        raise IndexFileError(f"{what} {path} is missing: build the index again with 'catalog-search index'")
    st = path.stat()
    if size is not None and st.st_size != int(size):
        raise IndexFileError(f"{what} {path} has {st.st_size} bytes, the manifest records {size}: "
                             "the file is damaged or was modified; build the index again")
    if sha256 is None:
        return
    if use_cache and _VerifiedCache.hit(path, st, sha256):
        return
    if sha256_file(path) != sha256:
        raise IndexFileError(f"{what} {path} does not match its sha256 in the manifest: the file is damaged "
                             "or was modified; build the index again with 'catalog-search index'")
    if use_cache:
        _VerifiedCache.add(path, st, sha256)


class _VerifiedCache:
    """``{absolute path: [stat key, sha256]}`` of index files verified before (best effort)."""

    NAME = "verified-index-files.json"
    LIMIT = 256

    @staticmethod
    def _file() -> Path:
        from common.io import cache_dir

        return cache_dir() / _VerifiedCache.NAME

    @staticmethod
    def _key(st) -> str:
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    @classmethod
    def _read(cls) -> dict:
        import json

        try:
            doc = json.loads(cls._file().read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    @classmethod
    def hit(cls, path: Path, st, sha256: str) -> bool:
        rec = cls._read().get(os.fspath(path.resolve()))
        return isinstance(rec, list) and rec == [cls._key(st), sha256]

    @classmethod
    def add(cls, path: Path, st, sha256: str) -> None:
        from common.io import write_json_atomic

        doc = cls._read()
        doc.pop(os.fspath(path.resolve()), None)
        doc[os.fspath(path.resolve())] = [cls._key(st), sha256]
        while len(doc) > cls.LIMIT:
            doc.pop(next(iter(doc)))
        try:
            write_json_atomic(cls._file(), doc)
        except OSError:
            pass  # a read-only home folder only costs the next open a re-hash


def open_index(path: str | os.PathLike, *, sha256: str | None, size: int | None = None,
               ndim: int | None = None, dtype: str | None = None, view: bool = True):
    """Open an index file after checking its checksum and header; ``view`` memory-maps it.

    ``sha256=None`` skips the checksum (only for files this process just wrote).
    """
    path = Path(path)
    verify_file(path, sha256, size, "index file")
    meta = header(path)
    dims = int(meta.get("dimensions", 0))
    kind = _scalar_name(meta.get("kind_scalar"))
    metric = _scalar_name(meta.get("kind_metric"))
    if ndim is not None and dims != int(ndim):
        raise IndexFileError(f"index {path} holds {dims}-d vectors, expected {ndim}-d")
    if dtype is not None and kind != dtype:
        raise IndexFileError(f"index {path} stores {kind} vectors, the manifest says {dtype}")
    if metric != METRIC:
        raise IndexFileError(f"index {path} uses the {metric} metric, expected {METRIC}")
    ui = usearch_index()
    index = ui.Index(ndim=dims, metric=METRIC, dtype=kind)
    try:
        if view:
            index.view(os.fspath(path))
        else:
            index.load(os.fspath(path))
    except Exception as exc:
        raise IndexFileError(f"cannot open index {path}: {' '.join(str(exc).split())}") from None
    index.expansion_search = EXPANSION_SEARCH
    return index


# ----------------------------------------------------------------------------- exact vectors


@dataclass
class ExactVectors:
    """Vectors kept beside a lossy (i8) index: ``keys`` sorted ascending, ``vectors`` row-aligned."""

    keys: np.ndarray  # uint64 [N], sorted
    vectors: np.ndarray  # f16/f32 [N, D], L2-normalised, possibly a read-only memmap

    @classmethod
    def load(cls, keys_path: Path, vectors_path: Path, mmap: bool = True) -> "ExactVectors":
        try:
            keys = np.load(keys_path, allow_pickle=False)
            vectors = np.load(vectors_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"cannot read the exact vectors ({exc})") from None
        if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors):
            raise IndexFileError("the exact vectors do not match their keys (damaged files)")
        return cls(keys.astype(np.uint64, copy=False), vectors)

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Row index of each key (-1 where absent)."""
        keys = np.asarray(keys, dtype=np.uint64)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, max(0, len(self.keys) - 1))
        ok = (len(self.keys) > 0) & (self.keys[pos] == keys) if len(self.keys) else np.zeros(keys.shape, bool)
        return np.where(ok, pos, -1)

    def get(self, keys: np.ndarray) -> np.ndarray:
        rows = self.rows(keys)
        if (rows < 0).any():
            raise IndexFileError("the exact vectors lack some indexed keys (damaged files)")
        return np.asarray(self.vectors[rows], dtype=np.float32)


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


# ----------------------------------------------------------------------------- search


class VectorSearch:
    """Nearest neighbours by cosine similarity over one usearch index (+ exact re-ranking).

    Scores are cosine similarities (1 = same direction). Not thread-safe for building;
    concurrent ``search`` calls on one index are safe (usearch searches are read-only).
    """

    def __init__(self, index, exact: ExactVectors | None = None, rerank_factor: int = RERANK_FACTOR):
        self.index = index
        self.exact = exact
        self.rerank_factor = max(1, int(rerank_factor))

    @property
    def ndim(self) -> int:
        return int(self.index.ndim)

    def __len__(self) -> int:
        return len(self.index)

    def search(self, queries: np.ndarray, count: int, *, exhaustive: bool = False,
               threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Top ``count`` (keys, similarities) for each L2-normalised query row.

        Rows shorter than ``count`` (small index) are padded with key ``-1``/score ``-inf``.
        ``exhaustive`` compares against every vector (used when a filter needs more candidates
        than the graph walk reliably returns).
        """
        q = as_vectors(queries, self.ndim)
        n = len(self.index)
        count = max(1, int(count))
        fetch = min(n, count * (self.rerank_factor if self.exact is not None else 1))
        keys = np.full((len(q), count), -1, dtype=np.int64)
        scores = np.full((len(q), count), -np.inf, dtype=np.float32)
        if n == 0 or fetch == 0:
            return keys, scores
        m = self.index.search(q, fetch, threads=threads, exact=bool(exhaustive))
        got_keys = np.asarray(m.keys).reshape(len(q), -1)
        got_dist = np.asarray(m.distances, dtype=np.float32).reshape(len(q), -1)
        counts = np.asarray(m.counts).reshape(-1) if hasattr(m, "counts") else np.full(len(q), got_keys.shape[1])
        for i in range(len(q)):
            c = int(counts[i])
            ck = got_keys[i, :c].astype(np.int64)
            cs = 1.0 - got_dist[i, :c]
            if self.exact is not None and c:
                vec = self.exact.get(ck.astype(np.uint64))
                cs = vec @ q[i]
                order = np.argsort(-cs, kind="stable")
                ck, cs = ck[order], cs[order]
            c = min(c, count)
            keys[i, :c] = ck[:c]
            scores[i, :c] = cs[:c]
        return keys, scores


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


# ----------------------------------------------------------------------------- building and updating


class _BundleLock:
    """An exclusive ``flock`` on the bundle folder itself (no lock file is left behind)."""

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = bundle_dir
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.bundle_dir, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise FedcbirError(f"another 'catalog-search index' is writing to {self.bundle_dir}; try again when it ends") from None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


class _Work:
    """Photos to embed: (item_id, path relative to images/small, is_main)."""

    def __init__(self):
        self.items: list[tuple[str, str, bool]] = []


class _CatalogPaths:
    """``paths[i]`` = the file of work item ``i`` (made on demand, not a list of N Paths)."""

    def __init__(self, images_dir: Path, items: list[tuple[str, str, bool]]):
        self.images_dir = images_dir
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Path:
        return self.images_dir / self.items[i][1]


WORK_DIR = ".work"  # BUNDLE/index/.work/partial-<key>/: embedded segments of an unfinished build
PARTIAL_FORMAT = 1


def _resume_key(rec: dict, root: Path, old_entry: dict | None, work: _Work, batch_size: int,
                segment_images: int) -> str:
    """What embedded segments depend on: the model file and its runtime, the preprocessing, the
    catalog, the index being updated (its generation), the photos in order, the batch size
    (it groups photos into runtime calls) and the segment size. Decoding threads and runtime
    threads are not part of it: they do not change which vectors a photo gets."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps({"format": PARTIAL_FORMAT, "model": rec, "catalog": str(root),
                         "update_of": (old_entry or {}).get("generation"), "batch_size": int(batch_size),
                         "segment_images": int(segment_images), "photos": len(work.items)},
                        sort_keys=True, default=str).encode())
    for item_id, rel, is_main in work.items:
        h.update(f"{item_id}\t{rel}\t{int(is_main)}\n".encode())
    return h.hexdigest()[:24]


def _segment_saved(segment: int) -> None:
    """Called after each segment is on disk. ``FEDCBIR_INDEX_SEGMENT_PAUSE`` (seconds) slows
    a build down here, so tests and demonstrations can interrupt it part-way."""
    pause = os.environ.get("FEDCBIR_INDEX_SEGMENT_PAUSE")
    if pause:
        import time

        time.sleep(float(pause))


class _Partial:
    """The embedded segments of one unfinished build (``index/.work/partial-<key>/seg-NNNNNN.npz``).

    Segment ``g`` covers work items ``[g * S, (g + 1) * S)``; its file is written atomically
    (temporary file, then rename), so a file that exists is complete. It records, per photo,
    the file's size, mtime and sha256 (or why it could not be used) and the vectors of the
    usable ones; a segment is reused only when every photo still has the recorded size and
    mtime."""

    def __init__(self, folder: Path, n_items: int, segment_images: int):
        self.dir = folder
        self.n_items = int(n_items)
        self.segment_images = int(segment_images)
        self.segments = -(-self.n_items // self.segment_images)

    @classmethod
    def begin(cls, bundle_dir: Path, key: str, n_items: int, segment_images: int) -> "_Partial":
        import shutil

        work = bundle_dir / INDEX_DIR / WORK_DIR
        if work.is_dir():
            for other in work.iterdir():  # another build's leftovers can never be resumed now
                if other.name != f"partial-{key}":
                    shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink()
        folder = work / f"partial-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*"):
            stale.unlink()  # a temporary file of a killed run
        return cls(folder, n_items, segment_images)

    def segment_range(self, g: int) -> range:
        return range(g * self.segment_images, min(self.n_items, (g + 1) * self.segment_images))

    def file(self, g: int) -> Path:
        return self.dir / f"seg-{g:06d}.npz"

    def reusable(self, photos: _CatalogPaths) -> set[int]:
        """Segments on disk whose photos are unchanged (the others are embedded again)."""
        out = set()
        for g in range(self.segments):
            if not self.file(g).is_file():
                continue
            r = self.segment_range(g)
            try:
                with np.load(self.file(g), allow_pickle=False) as z:  # reads only these arrays
                    seg = {k: z[k] for k in ("first", "count", "size", "mtime")}
                if int(seg["first"]) != r.start or int(seg["count"]) != len(r) or len(seg["size"]) != len(r):
                    raise ValueError("another layout")
            except Exception:  # noqa: BLE001 - damaged or foreign: embed it again
                self.file(g).unlink(missing_ok=True)
                continue
            if all(_stat_pair(photos[i]) == (int(seg["size"][j]), int(seg["mtime"][j])) for j, i in enumerate(r)):
                out.add(g)
        return out

    def save(self, g: int, parts: list, photos: _CatalogPaths) -> None:
        from common.io import atomic_path

        r = self.segment_range(g)
        sizes = np.full(len(r), -1, np.int64)
        mtimes = np.full(len(r), -1, np.int64)
        shas = np.zeros(len(r), "S64")
        errors = [""] * len(r)
        ok: list[int] = []
        vectors = []
        for chunk, infos, vec, good in parts:
            for j, d in zip(chunk, infos):
                k = j - r.start
                if d.error is None:
                    sizes[k], mtimes[k], shas[k] = d.size, d.mtime_ns, d.sha256.encode("ascii")
                else:
                    sizes[k], mtimes[k] = _stat_pair(photos[j])
                    errors[k] = d.error
            ok.extend(chunk[j] - r.start for j in good)
            vectors.append(np.asarray(vec, np.float32))
        if sorted(ok) != ok or len(ok) != sum(len(v) for v in vectors):
            raise RuntimeError("internal error: segment parts out of order")
        with atomic_path(self.file(g), suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, first=np.int64(r.start), count=np.int64(len(r)), ok=np.asarray(ok, np.int64),
                         vectors=np.concatenate(vectors, axis=0), size=sizes, mtime=mtimes, sha256=shas,
                         errors=np.asarray(errors, dtype=str))
                f.flush()
                os.fsync(f.fileno())

    def load(self, g: int) -> dict[str, np.ndarray]:
        r = self.segment_range(g)
        try:
            with np.load(self.file(g), allow_pickle=False) as z:
                seg = {k: z[k] for k in ("first", "count", "ok", "vectors", "size", "mtime", "sha256", "errors")}
        except Exception as exc:  # noqa: BLE001 - damaged: embed it again
            raise IndexFileError(f"damaged resume segment {self.file(g)}: {exc}") from None
        n = len(r)
        ok = seg["ok"]
        if (int(seg["first"]) != r.start or int(seg["count"]) != n or len(seg["size"]) != n
                or len(seg["errors"]) != n or seg["vectors"].ndim != 2 or len(seg["vectors"]) != len(ok)
                or (len(ok) and (int(ok.min()) < 0 or int(ok.max()) >= n))):
            raise IndexFileError(f"resume segment {self.file(g)} does not match this build")
        return seg

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()  # .work, when empty
        except OSError:
            pass


def _stat_pair(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _utc_now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _publish(bundle, new_paths: dict[str, Path], entry: dict) -> None:
    """Record the new files in the manifest (atomic replace), then delete the previous ones."""
    from export.manifest import MANIFEST
    from export.runtime import read_manifest
    from common.io import write_json_atomic

    bundle_dir = Path(bundle.path)
    entry["files"] = {role: file_record(bundle_dir, p) for role, p in new_paths.items()}
    manifest = read_manifest(bundle_dir)  # fresh copy: keep everything the export package wrote
    old = manifest.get(INDEX_KEY)
    manifest[INDEX_KEY] = entry
    write_json_atomic(bundle_dir / MANIFEST, manifest)
    bundle.manifest = manifest
    if isinstance(old, dict):
        for role in FILE_ROLES:
            try:
                p = entry_path(bundle_dir, old, role)
            except IndexFileError:
                continue
            if p is not None and p not in new_paths.values() and p.is_file():
                p.unlink()


def build_catalog_index(bundle_path: str | os.PathLike, catalog_root: str | os.PathLike, *,
                        runtime: str | None = None, precision: str | None = None, dtype: str | None = None,
                        update: bool = False, threads: int = 1, workers: int = 2, batch_size: int = 32,
                        progress: bool = True, segment_images: int = 1024) -> dict[str, Any]:
    """``catalog-search index``: embed the catalog's photos, build the index + store, publish.

    ``update=True`` applies added, removed and changed listings and photos to the existing
    index (same model and dtype) instead of re-embedding everything; it rebuilds the graph
    only when more than a quarter of its slots would be deleted ones ("compaction").
    Returns a report (counts, skipped photos, timings). The bundle changes only at the
    final manifest replace; on any error it is left as it was, except that an interrupted
    run (Ctrl-C, a kill, a crash) leaves the photos it embedded in ``index/.work/`` (one
    file per ``segment_images`` photos, each written atomically): the next run with the
    same model, catalog, work list and batch size reuses them and embeds only the rest
    (``report["resumed"]``), and any other run removes them.

    ``workers`` threads decode photos ahead of the embedding (a pipeline); ``threads`` is
    the runtime's own thread count (and usearch's when adding). Memory holds a few chunks
    of ``4 x batch_size`` photos and one segment of vectors besides the index itself.
    """
    if workers < 1 or threads < 1 or batch_size < 1 or segment_images < 1:
        raise FedcbirError("workers, threads, batch size and segment size must be >= 1")
    from retrieval.search import open_bundle

    bundle = open_bundle(bundle_path, check="all")
    # one writer at a time; the manifest is read again under the lock
    with _BundleLock(Path(bundle.path)):
        bundle = open_bundle(bundle_path, check="lazy")
        return _build_locked(bundle, catalog_root, runtime=runtime, precision=precision, dtype=dtype, update=update,
                             threads=threads, workers=workers, batch_size=batch_size, progress=progress,
                             segment_images=segment_images)


def _build_locked(bundle, catalog_root, *, runtime, precision, dtype, update, threads, workers, batch_size,
                  progress, segment_images) -> dict[str, Any]:
    import time

    from catalog.abo import AboCatalog, IMAGES_DIR
    from common.progress import progress_bar
    from retrieval.search import check_model, iter_embedded, load_model, model_record, preprocess_of

    t_start = time.perf_counter()
    bundle_dir = Path(bundle.path)
    catalog = AboCatalog(catalog_root)
    root = Path(catalog.root).resolve()
    old_entry = bundle.manifest.get(INDEX_KEY)
    if update and old_entry is None:
        raise FedcbirError(f"bundle {bundle_dir} has no index to update; run 'catalog-search index' without --update")
    if update:
        check_entry(old_entry)
        old_model = old_entry.get("model") or {}
        if runtime is None and precision is None:
            runtime, precision = old_model.get("runtime"), old_model.get("precision")
        if dtype is not None and dtype != old_entry["dtype"]:
            raise FedcbirError(f"--update keeps the index dtype ({old_entry['dtype']}); run without --update "
                               f"to rebuild it as {dtype}")
        dtype = old_entry["dtype"]
    dtype = check_dtype(dtype or "f16")
    embedder = load_model(bundle, runtime, precision, threads)  # imports the runtime before usearch
    pre = preprocess_of(bundle, embedder)
    rec = model_record(bundle, embedder)
    if update:
        if (old_entry.get("model") or {}).get("file") != rec["file"]:
            raise FedcbirError(f"the index was built with {old_entry['model'].get('file')}, not {rec['file']}: "
                               "mixing models in one index would make scores meaningless; rebuild without --update")
        check_model(old_entry, bundle, embedder)
    products = list(catalog.products())
    if not products:
        raise FedcbirError(f"catalog {root} has no usable products")
    ui = usearch_index()
    gen = new_generation()
    paths = generation_paths(bundle_dir, gen, ("index", "store", "keys", "vectors") if dtype in EXACT_DTYPE
                             else ("index", "store"))
    made_dir = not (bundle_dir / INDEX_DIR).exists()
    (bundle_dir / INDEX_DIR).mkdir(exist_ok=True)
    for stale in (bundle_dir / INDEX_DIR).glob(".catalog-*.tmp"):
        stale.unlink()  # left by a killed run (we hold the bundle's lock: no other writer)
    tmp = {r: p.with_name("." + p.name + ".tmp") for r, p in paths.items()}
    partial = None
    report: dict[str, Any] = {"bundle": str(bundle_dir), "catalog": str(root), "dtype": dtype, "update": update,
                              "model": {k: rec[k] for k in ("file", "runtime", "precision", "dim")}}
    try:
        store, index, exact, work, removed, changed_meta, compacted = _prepare(
            bundle, old_entry if update else None, products, root, dtype, tmp, embedder, ui)
        report.update(products=len(products), to_embed=len(work.items), removed_images=len(removed),
                      changed_listings=changed_meta)
        if update and not work.items and not removed and not changed_meta:
            store.close()
            for p in tmp.values():
                p.unlink(missing_ok=True)
            report.update(status="up to date", seconds=round(time.perf_counter() - t_start, 2))
            return report
        # embed: finished segments persist in the bundle's index work folder, so an
        # interrupted run (Ctrl-C, a kill, a crash) resumes where it stopped
        partial = _Partial.begin(bundle_dir, _resume_key(rec, root, old_entry if update else None, work,
                                                         batch_size, segment_images),
                                 len(work.items), segment_images)
        photos = _CatalogPaths(root / IMAGES_DIR, work.items)
        t_embed = time.perf_counter()
        reused = partial.reusable(photos)
        todo = [g for g in range(partial.segments) if g not in reused]
        reused_photos = sum(len(partial.segment_range(g)) for g in reused)
        chunk = max(1, batch_size) * 4
        chunks = [range(c, min(r.stop, c + chunk)) for g in todo for r in [partial.segment_range(g)]
                  for c in range(r.start, r.stop, chunk)]
        bar = progress_bar(progress and bool(work.items))
        embedded_now = 0
        try:
            if bar is not None:
                bar.start()
                task = bar.add_task("embedding catalog photos" + (f" (resumed: {reused_photos} done before)"
                                                                  if reused_photos else ""),
                                    total=len(work.items), completed=reused_photos)
            pending: dict[int, list] = {}
            for ch, infos, vectors, ok in iter_embedded(embedder, pre, photos, chunks, batch_size=batch_size,
                                                        workers=workers, with_hash=True):
                g = ch.start // partial.segment_images
                pending.setdefault(g, []).append((ch, infos, vectors, ok))
                embedded_now += len(ch)
                if bar is not None:
                    bar.advance(task, len(ch))
                if ch.stop == partial.segment_range(g).stop:
                    partial.save(g, pending.pop(g), photos)
                    _segment_saved(g)
        finally:
            if bar is not None:
                bar.stop()
        embed_s = time.perf_counter() - t_embed
        # add to the store and the index, segment by segment (keys in work order, as one pass would)
        t_index = time.perf_counter()
        skipped = []
        n_ok = 0
        bar = progress_bar(progress and partial.segments > 1)
        try:
            if bar is not None:
                bar.start()
                task = bar.add_task("adding to the index", total=len(work.items))
            new_exact = []
            for g in range(partial.segments):
                seg = partial.load(g)
                r = partial.segment_range(g)
                new_keys = store.allocate_keys(len(seg["ok"]))
                ok_set = set(seg["ok"].tolist())
                for j in range(len(r)):
                    if j not in ok_set:
                        item_id, rel, _ = work.items[r.start + j]
                        why = str(seg["errors"][j])
                        skipped.append((item_id, rel, why))
                        store.record_skipped(item_id, rel, why, int(seg["size"][j]), int(seg["mtime"][j]))
                for key, j in zip(new_keys, seg["ok"].tolist()):
                    item_id, rel, is_main = work.items[r.start + j]
                    store.add_image(key, item_id, rel, is_main, int(seg["size"][j]), int(seg["mtime"][j]),
                                    seg["sha256"][j].decode("ascii"))
                add_vectors(index, new_keys, seg["vectors"], threads=max(1, threads))
                if exact is not None:
                    new_exact.append((np.asarray(new_keys, np.uint64), seg["vectors"].astype(np.float16)))
                n_ok += len(new_keys)
                if bar is not None:
                    bar.advance(task, len(r))
        finally:
            if bar is not None:
                bar.stop()
        if exact is not None and new_exact:
            all_keys = np.concatenate([exact[0]] + [k for k, _ in new_exact])
            order = np.argsort(all_keys, kind="stable")
            exact = (all_keys[order], np.concatenate([exact[1]] + [v for _, v in new_exact])[order])
            del new_exact
        index.save(os.fspath(tmp["index"]))
        if update and needs_compaction(tmp["index"]):
            index = _rebuild(index, exact, dtype, ui, threads)
            index.save(os.fspath(tmp["index"]))
            compacted = True
        index_s = time.perf_counter() - t_index
        if exact is not None:
            save_npy(tmp["keys"], exact[0])
            save_npy(tmp["vectors"], exact[1])
        counts = store.counts()
        if counts["images"] == 0:
            raise FedcbirError(f"none of the catalog's {len(work.items)} photos could be used "
                               f"(e.g. {skipped[0][2] if skipped else 'no photos'}); the bundle was not changed")
        store.set_meta("generation", gen)
        store.commit_and_close()
        meta = header(tmp["index"])
        if int(meta.get("count_present", -1)) != counts["images"]:
            raise FedcbirError(f"internal error: the index holds {meta.get('count_present')} vectors but the "
                               f"store {counts['images']} photos; the bundle was not changed")
        for r, p in tmp.items():
            os.replace(p, paths[r])
        now = _utc_now()
        entry = {
            "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "generation": gen,
            "dtype": dtype, "metric": METRIC, "ndim": int(embedder.dim), "count": counts["images"],
            "products": counts["products"], "skipped": counts["skipped"],
            "deleted_slots": int(meta.get("count_deleted", 0)),
            "connectivity": int(index.connectivity), "expansion_add": int(index.expansion_add),
            "expansion_search": EXPANSION_SEARCH, "exact_vectors": EXACT_DTYPE.get(dtype),
            "usearch_version": _usearch_version(), "model": rec,
            "catalog": {"root": str(root), "products": len(products), "images": sum(len(p.images) for p in products)},
            "built": (old_entry or {}).get("built") if update else now, "updated": now if update else None,
            "fedcbir_version": _fedcbir_version(),
        }
        _publish(bundle, paths, entry)
        if partial is not None:
            partial.remove()  # done: nothing to resume
    except BaseException as exc:
        for p in list(tmp.values()) + list(paths.values()):
            if p.exists() and p not in _current_files(bundle_dir):
                p.unlink()
        if partial is not None and isinstance(exc, FedcbirError):
            partial.remove()  # a refusal (bad data, bad model) would only fail the same way again
        if made_dir and partial is not None and partial.dir.exists():
            made_dir = False  # the work folder stays for the next run
        if made_dir:
            try:
                (bundle_dir / INDEX_DIR).rmdir()
            except OSError:
                pass
        raise
    report.update(
        status="updated" if update else "built", generation=gen, images=counts["images"],
        indexed_products=counts["products"], embedded=n_ok, embedded_now=embedded_now, resumed=reused_photos,
        skipped=len(skipped),
        skipped_examples=[{"item_id": i, "image": r, "reason": why} for i, r, why in skipped[:10]],
        compacted=compacted, deleted_slots=entry["deleted_slots"],
        embed_seconds=round(embed_s, 2),
        images_per_second=round(embedded_now / embed_s, 1) if embedded_now and embed_s > 0 else None,
        workers=workers, threads=threads,
        index_seconds=round(index_s, 2), seconds=round(time.perf_counter() - t_start, 2),
        files={r: entry["files"][r]["path"] for r in entry["files"]},
        bytes=sum(int(f["bytes"]) for f in entry["files"].values()))
    return report


def _current_files(bundle_dir: Path) -> set[Path]:
    """Files the bundle's manifest references right now (never deleted on failure)."""
    import json

    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
        entry = manifest.get(INDEX_KEY) or {}
        return {p for r in FILE_ROLES if (p := entry_path(bundle_dir, entry, r)) is not None}
    except Exception:  # noqa: BLE001
        return set()


def _usearch_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("usearch")
    except metadata.PackageNotFoundError:
        return None


def _fedcbir_version() -> str:
    from common import __version__

    return __version__


def _rebuild(index, exact, dtype, ui, threads):
    """A fresh graph from the present vectors (compaction: deleted slots are dropped)."""
    keys = np.asarray(index.keys, dtype=np.uint64) if exact is None else exact[0]
    keys = np.sort(keys)
    if exact is not None:
        vectors = np.asarray(exact[1], dtype=np.float32)
    elif len(keys):
        got = index.get(keys, dtype=np.float32)
        vectors = np.stack(got) if isinstance(got, tuple) else np.asarray(got)
    else:
        vectors = np.zeros((0, index.ndim), np.float32)
    fresh = new_index(index.ndim, dtype)
    add_vectors(fresh, keys, vectors, threads=max(1, threads))
    return fresh


def _prepare(bundle, old_entry, products, root: Path, dtype: str, tmp: dict, embedder, ui):
    """A writable store + index (fresh, or copies of the current ones) and the photos to embed."""
    from catalog.abo import IMAGES_DIR
    from retrieval.store import Store, listing_hash

    bundle_dir = Path(bundle.path)
    work = _Work()
    removed: list[int] = []
    changed_meta = 0
    if old_entry is None:
        store = Store.create(tmp["store"], root)
        for p in products:
            store.put_product(p)
            for j, rel in enumerate(p.images):
                work.items.append((p.item_id, rel, j == 0 and p.main_image is not None))
        index = new_index(embedder.dim, dtype)
        exact = (np.zeros(0, np.uint64), np.zeros((0, embedder.dim), np.float16)) if dtype in EXACT_DTYPE else None
        return store, index, exact, work, removed, changed_meta, False

    current = CatalogIndex.open(bundle_dir, old_entry, view=False)  # verified private copy
    try:
        index = current.vectors.index
        exact = None
        if current.vectors.exact is not None:
            exact = (np.array(current.vectors.exact.keys), np.array(current.vectors.exact.vectors))
        old_root = Path(current.store.catalog_root)
    finally:
        current.close()
    if old_root != root:
        raise FedcbirError(f"the index was built from catalog {old_root}, not {root}; "
                           "run without --update to index another catalog")
    store = Store.copy_for_update(entry_path(bundle_dir, old_entry, "store"), tmp["store"])
    hashes = store.listing_hashes()
    skipped = store.skipped_files()
    seen: set[str] = set()
    for p in products:
        seen.add(p.item_id)
        fingerprint = listing_hash(p)
        if hashes.get(p.item_id) != fingerprint:
            if p.item_id in hashes:
                changed_meta += 1
            store.put_product(p, fingerprint)
        have = {img.path: img for img in store.images_of(p.item_id)}
        wanted = {rel: (j == 0 and p.main_image is not None) for j, rel in enumerate(p.images)}
        for rel, img in have.items():
            if rel not in wanted:
                removed.append(img.key)
        for rel, is_main in wanted.items():
            img = have.get(rel)
            path = root / IMAGES_DIR / rel
            if img is None:
                # new photo, or one that failed before: retried only if its file changed since
                if (p.item_id, rel) not in skipped or skipped[(p.item_id, rel)] != _stat_pair(path):
                    work.items.append((p.item_id, rel, is_main))
            elif _file_changed(path, img, store):
                removed.append(img.key)
                work.items.append((p.item_id, rel, is_main))
            elif img.is_main != is_main:
                store.set_main(img.key, is_main)
                changed_meta += 1
        for item_id_rel in [k for k in skipped if k[0] == p.item_id and k[1] not in wanted]:
            store.forget_skipped(*item_id_rel)
    for item_id in set(hashes) - seen:
        removed.extend(store.delete_product(item_id))
    # the photos being re-embedded lose their old keys
    store.delete_images(removed)
    if removed:
        index.remove(np.asarray(removed, dtype=np.uint64))
        if exact is not None:
            keep = ~np.isin(exact[0], np.asarray(removed, dtype=np.uint64))
            exact = (exact[0][keep], exact[1][keep])
    return store, index, exact, work, removed, changed_meta, False


def _file_changed(path: Path, img, store) -> bool:
    """Has a photo's content changed since it was indexed (size/mtime first, then sha256)?"""
    try:
        st = path.stat()
    except OSError:
        return True  # gone or unreadable: re-embedding will record why
    if st.st_size == img.file_size and st.st_mtime_ns == img.file_mtime_ns:
        return False
    try:
        same = sha256_file(path) == img.file_sha256
    except OSError:
        return True
    if same:
        store.touch_image(img.key, st.st_size, st.st_mtime_ns)
    return not same


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
