"""Resuming an interrupted index build: the work list of photos to embed and the embedded
segments of an unfinished build, kept in ``BUNDLE/index/.work/partial-<key>/`` (one
atomically written ``.npz`` per segment, reused only while its photos are unchanged).

Imports: numpy, :mod:`common`, :mod:`retrieval.vectors` (its error) and
:mod:`retrieval.bundle_index` (the index folder); only the builder (:mod:`retrieval.index`)
uses it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retrieval.bundle_index import INDEX_DIR
from retrieval.vectors import IndexFileError


class Work:
    """Photos to embed: (item_id, path relative to images/small, is_main)."""

    def __init__(self):
        self.items: list[tuple[str, str, bool]] = []


class CatalogPaths:
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


def resume_key(rec: dict, root: Path, old_entry: dict | None, work: Work, batch_size: int,
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


class Partial:
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
    def begin(cls, bundle_dir: Path, key: str, n_items: int, segment_images: int) -> "Partial":
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

    def reusable(self, photos: CatalogPaths) -> set[int]:
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
            if all(stat_pair(photos[i]) == (int(seg["size"][j]), int(seg["mtime"][j])) for j, i in enumerate(r)):
                out.add(g)
        return out

    def save(self, g: int, parts: list, photos: CatalogPaths) -> None:
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
                    sizes[k], mtimes[k] = stat_pair(photos[j])
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


def stat_pair(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1
