"""The vector layer of catalog search: usearch indexes with explicit keys, checksummed files
(verified before they are opened, with a per-user stat cache), memory-mapped opening, the
exact vectors kept beside an i8 index and exact re-ranking. It knows nothing of bundles,
catalogs or models (:mod:`retrieval.bundle_index` lays these files out in a bundle).

Imports: numpy, usearch (only through :func:`usearch_index`) and :mod:`common`; no other
retrieval module (the rest of retrieval builds on this one).

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
