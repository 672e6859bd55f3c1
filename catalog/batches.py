"""Framework-neutral batches: decode once, then numpy batches every framework consumes.

- :class:`ImageTable` decodes every image of some products once (``load_image`` then
  ``to_uint8``) into a uint8 table ``[N, S, S, 3]`` **on disk** (:class:`DiskImages`) with
  per-image product labels, product-type ids and paths; unreadable images are skipped and
  listed. Rows are read on demand (``table.images[idx]`` returns a fresh numpy array), so
  a process holds a constant plus the rows of one batch, whatever the catalog size: all
  of ABO at 160 px is 31 GB of pixels, more than this machine's memory. With a cache folder
  the table is one raw ``images-<key>.u8`` file plus a small ``images-<key>.json`` written
  after it (both atomically: temp file, then rename; the JSON is the commit point), keyed
  by the image list, file sizes and times, and the preprocessing, so the next load
  decodes nothing; without one it lives in an anonymous temporary file.
- :class:`PKBatches` yields P products x K photos per batch for metric learning, with
  seeded augmentation done here once (random resized crop, horizontal flip, brightness
  and contrast) so PyTorch, Keras and Flax see byte-identical float32 NHWC batches for
  the same seed and epoch. ``batch(epoch, step)`` gives random access (resume mid-epoch).
- :func:`eval_batches` yields the table in order, without augmentation.

Why ``pread`` and not ``numpy.memmap`` for reading: pages of a memory-mapped file that a
process has touched count in its resident set (``VmRSS``/``VmHWM``) until the kernel
reclaims them, so an epoch of random P x K batches over a memmap shows a peak RSS as big
as the file (measured: a 307 MB table read once through ``np.load(mmap_mode="r")`` raised
VmHWM by 300 MB). ``pread`` copies just the rows asked for; the file's pages stay in the
page cache, which is shared, reclaimable and not charged to the process.
``DiskImages.memmap()`` still gives a read-only memmap of a cached table.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from catalog.abo import IMAGES_DIR, Product
from catalog.images import DEFAULT_PREPROCESS, ImageError, Preprocess, load_image, normalize, to_uint8
from common.errors import FedcbirError
from common.progress import progress_bar
from common.io import atomic_path

CACHE_FORMAT = 2  # 1 = one .npz read back whole (before the tables moved to disk)
_MAX_READ = 1 << 30  # bytes per pread call (Linux caps one read at ~2 GiB)


@dataclass
class Batch:
    x: np.ndarray  # float32 [B, S, S, 3], normalised
    labels: np.ndarray  # int64 [B], product index in ImageTable.item_ids
    types: np.ndarray  # int64 [B], index in ImageTable.type_names
    keys: np.ndarray | None = None  # int64 [B], image x views + view (with ``views``): same key, same pixels


# ----------------------------------------------------------------------------- the table on disk


class DiskImages:
    """A read-only uint8 ``[N, S, S, 3]`` array kept in a raw file (C order, no header).

    Indexing (an int, a slice, an int or bool array) reads just those rows with ``pread``
    and returns a new in-memory array, like numpy fancy indexing; ``np.asarray`` reads all.
    Safe to index from several threads (``pread`` has no shared file position).
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, file, shape: tuple[int, int, int, int], path: Path | None = None):
        self._file = file  # an open binary file object (owned)
        self.shape = tuple(int(s) for s in shape)
        self.path = path  # None for an anonymous temporary file
        self._row = int(np.prod(self.shape[1:]))

    @classmethod
    def open(cls, path: str | os.PathLike, shape) -> "DiskImages":
        path = Path(path)
        f = open(path, "rb")
        if os.fstat(f.fileno()).st_size != int(np.prod(shape)):
            f.close()
            raise ValueError(f"{path} does not hold {shape} uint8 values")
        return cls(f, shape, path)

    # numpy-like surface
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"DiskImages(shape={self.shape}, path={str(self.path) if self.path else '<temporary file>'})"

    def __getitem__(self, key):
        n = self.shape[0]
        if isinstance(key, tuple):
            head, rest = (key[0], key[1:]) if key else (slice(None), ())
            rows = self[head]
            return rows[(slice(None),) * (rows.ndim - 3) + rest] if rest else rows
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for {n} images")
            return self._read_run(i % n, 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._read_run(start, max(0, stop - start))
            idx = np.arange(start, stop, step)
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean index of shape {idx.shape} for {n} images")
                idx = np.flatnonzero(idx)
            elif idx.size == 0:
                idx = idx.astype(np.int64)
            elif idx.dtype.kind not in "iu":
                raise IndexError(f"images can be indexed by integers, slices or booleans, not {idx.dtype}")
            if idx.ndim != 1:
                out = self[idx.reshape(-1)]
                return out.reshape(idx.shape + self.shape[1:])
            if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
                raise IndexError(f"index out of bounds for {n} images")
            idx = idx.astype(np.int64) % max(n, 1)
        out = np.empty((len(idx),) + self.shape[1:], np.uint8)
        if not len(idx):
            return out
        # one read per run of consecutive rows (a sorted slice is a single read)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for s, e in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(idx)]])):
            self._read_into(out[s:e], int(idx[s]))
        return out

    def _read_run(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count,) + self.shape[1:], np.uint8)
        if count:
            self._read_into(out, start)
        return out

    def _read_into(self, out: np.ndarray, row: int) -> None:
        buf = memoryview(out).cast("B")
        offset = row * self._row
        fd = self._file.fileno()
        done = 0
        while done < len(buf):
            got = os.preadv(fd, [buf[done:done + _MAX_READ]], offset + done)
            if got <= 0:
                raise OSError(f"short read from the image table {self.path or '<temporary file>'}")
            done += got

    def memmap(self) -> np.memmap:
        """A read-only ``numpy.memmap`` of the file (touching rows makes them resident: see module doc)."""
        if self.path is None:
            raise ValueError("an anonymous temporary table has no file to memory-map")
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __reduce__(self):
        if self.path is not None:
            return (DiskImages.open, (self.path, self.shape))
        return (np.asarray, (self[:],))  # an anonymous table travels as its pixels


def bounded_map(pool: ThreadPoolExecutor | None, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``map(fn, items)`` in order, with at most ``window`` calls in flight (``Executor.map``
    submits every item at once: one future per catalog photo)."""
    if pool is None:
        for it in items:
            yield fn(it)
        return
    pending: deque = deque()
    for it in items:
        pending.append(pool.submit(fn, it))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class ImageTable:
    images: Any  # DiskImages (or an in-memory uint8 ndarray) [N, S, S, 3]
    labels: np.ndarray  # int64 [N]
    types: np.ndarray  # int64 [N]
    paths: list[str]  # [N], relative to images/small
    item_ids: list[str]  # one per product (label → item id)
    type_names: list[str]  # type id → name
    pre: Preprocess = DEFAULT_PREPROCESS
    skipped: list[str] = field(default_factory=list)  # "path: reason" of unreadable images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_products(self) -> int:
        return len(self.item_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of pixels (on disk for a loaded table)."""
        return int(np.prod(self.images.shape))

    def rows(self, idx) -> np.ndarray:
        """uint8 pixels of rows ``idx`` (a slice or indices), read now."""
        return np.asarray(self.images[idx])

    def subset(self, idx: np.ndarray) -> "ImageTable":
        """The rows ``idx`` as an in-memory table (small selections only)."""
        idx = np.asarray(idx)
        return ImageTable(images=self.rows(idx), labels=self.labels[idx], types=self.types[idx],
                          paths=[self.paths[int(i)] for i in np.arange(len(self))[idx]], item_ids=self.item_ids,
                          type_names=self.type_names, pre=self.pre, skipped=list(self.skipped))

    def close(self) -> None:
        close = getattr(self.images, "close", None)
        if close is not None:
            close()

    @classmethod
    def load(cls, root: str | Path, products: Sequence[Product], pre: Preprocess = DEFAULT_PREPROCESS,
             progress: bool = True, cache_dir: str | Path | None = None, *,
             type_names: Sequence[str] | None = None, workers: int | None = None) -> "ImageTable":
        """Decode all images of ``products`` (labels follow the order of ``products``).

        ``type_names`` fixes the product-type ids (pass the catalog-wide list so that ids
        agree across clients); by default the sorted types of ``products``.
        """
        root = Path(root)
        images_dir = root / IMAGES_DIR
        names = list(type_names) if type_names is not None else sorted({p.product_type for p in products})
        type_id = {t: i for i, t in enumerate(names)}
        missing = sorted({p.product_type for p in products} - set(type_id))
        if missing:
            raise FedcbirError(f"product types not in type_names: {', '.join(missing)}")
        item_ids = [p.item_id for p in products]
        entries = [(label, type_id[p.product_type], rel) for label, p in enumerate(products) for rel in p.images]

        pixels_file = meta_file = None
        if cache_dir is not None:
            key = _cache_key(images_dir, entries, item_ids, names, pre)
            pixels_file = Path(cache_dir) / f"images-{key}.u8"
            meta_file = Path(cache_dir) / f"images-{key}.json"
            table = _read_cache(pixels_file, meta_file, entries, item_ids, names, pre)
            if table is not None:
                return table

        size = pre.size

        def decode(i: int):
            try:
                return i, to_uint8(load_image(images_dir / entries[i][2]), pre), None
            except ImageError as exc:
                return i, None, f"{entries[i][2]}: {exc}"

        n_workers = max(1, workers or min(4, os.cpu_count() or 1))
        bar = progress_bar(progress)
        task = bar.add_task("decoding images", total=len(entries)) if bar else None
        skipped: list[tuple[int, str]] = []
        rows = 0

        def write_all(f) -> None:
            nonlocal rows
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                for i, arr, err in bounded_map(pool, decode, range(len(entries)), window=8 * n_workers):
                    if arr is None:
                        skipped.append((i, err))
                    else:
                        f.write(np.ascontiguousarray(arr, np.uint8).data)
                        rows += 1
                    if bar:
                        bar.advance(task)

        try:
            if bar:
                bar.start()
            if pixels_file is not None:
                pixels_file.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(pixels_file) as tmp:
                    with open(tmp, "wb") as f:
                        write_all(f)
                with atomic_path(meta_file) as tmp:  # the commit point: written after the pixels
                    tmp.write_text(json.dumps(_meta(rows, pre, skipped)), encoding="utf-8")
                images = DiskImages.open(pixels_file, (rows, size, size, 3))
            else:
                f = tempfile.TemporaryFile(prefix="fedcbir-images-")
                try:
                    write_all(f)
                    f.flush()
                except BaseException:
                    f.close()
                    raise
                images = DiskImages(f, (rows, size, size, 3))
        finally:
            if bar:
                bar.stop()
        return _table(images, entries, item_ids, names, pre, skipped)


def _meta(rows: int, pre: Preprocess, skipped: list[tuple[int, str]]) -> dict:
    return {"format": CACHE_FORMAT, "rows": int(rows), "pre": pre.to_dict(),
            "skipped": [[int(i), str(why)] for i, why in skipped]}


def _table(images, entries, item_ids, names, pre, skipped: list[tuple[int, str]]) -> ImageTable:
    gone = {i for i, _ in skipped}
    keep = [i for i in range(len(entries)) if i not in gone] if gone else range(len(entries))
    return ImageTable(
        images=images,
        labels=np.fromiter((entries[i][0] for i in keep), np.int64, count=len(keep)),
        types=np.fromiter((entries[i][1] for i in keep), np.int64, count=len(keep)),
        paths=[entries[i][2] for i in keep],
        item_ids=item_ids,
        type_names=names,
        pre=pre,
        skipped=[why for _, why in skipped],
    )


def _cache_key(images_dir: Path, entries, item_ids, names, pre: Preprocess) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "pre": pre.to_dict(), "types": names, "items": item_ids},
                        sort_keys=True).encode())
    for label, t, rel in entries:
        try:
            st = (images_dir / rel).stat()
            sig = (st.st_size, st.st_mtime_ns)
        except OSError:
            sig = (-1, -1)
        h.update(f"{label}\t{t}\t{rel}\t{sig[0]}\t{sig[1]}\n".encode())
    return h.hexdigest()[:32]


def _read_cache(pixels_file: Path, meta_file: Path, entries, item_ids, names, pre: Preprocess) -> ImageTable | None:
    """The cached table, or None when absent, damaged or of other settings (then it is rebuilt)."""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT or Preprocess.from_dict(meta["pre"]) != pre:
            return None
        skipped = [(int(i), str(why)) for i, why in meta["skipped"]]
        rows = int(meta["rows"])
        if rows + len(skipped) != len(entries) or any(not 0 <= i < len(entries) for i, _ in skipped):
            return None
        images = DiskImages.open(pixels_file, (rows, pre.size, pre.size, 3))
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        return None
    return _table(images, entries, item_ids, names, pre, skipped)


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Augment:
    """Augmentation ranges (defaults: crop area 60–100 %, aspect 3/4–4/3, flip 50 %, ±20 %)."""

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2


def augment_uint8(images: np.ndarray, rng: np.random.Generator, aug: Augment = Augment()) -> np.ndarray:
    """Seeded augmentation of a uint8 NHWC batch → float32 in 0..255 (not yet normalised)."""
    n, h, w, _ = images.shape
    area = rng.uniform(aug.scale[0], aug.scale[1], size=n)
    log_r = rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1]), size=n)
    fx, fy = rng.random(n), rng.random(n)
    flips = rng.random(n) < aug.flip
    bright = rng.uniform(1 - aug.brightness, 1 + aug.brightness, size=n).astype(np.float32)
    contrast = rng.uniform(1 - aug.contrast, 1 + aug.contrast, size=n).astype(np.float32)
    out = np.empty((n, h, w, 3), np.float32)
    for i in range(n):
        r = math.exp(log_r[i])
        cw = min(float(w), math.sqrt(area[i] * r) * w)
        ch = min(float(h), math.sqrt(area[i] / r) * h)
        x0, y0 = fx[i] * (w - cw), fy[i] * (h - ch)
        img = Image.fromarray(images[i]).resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        if flips[i]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(img, dtype=np.float32)
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    out -= mean
    out *= contrast[:, None, None, None]
    out += mean
    out *= bright[:, None, None, None]
    np.clip(out, 0.0, 255.0, out=out)
    return out


class PKBatches:
    """P products x K photos per batch; ``epoch(e)`` is the same for the same seed everywhere.

    Products are visited in a seeded order each epoch (``steps_per_epoch = products // P``,
    the remainder is left for that epoch); each product contributes K photos, drawn
    without replacement when it has at least K and with replacement otherwise, so
    one-photo products are still usable (augmentation makes the copies differ).
    With fewer than P products, P is lowered to the number of products.
    Iterating the object runs epoch 0, then 1, ... (one epoch per ``for`` loop).

    ``views = V > 0``: every photo has V fixed augmented versions (view ``v`` of image ``i``
    is seeded by ``(seed, i, v)``) and each draw picks one of them; the batch's ``keys``
    (``i * V + v``) name them, so a frozen trunk's output can be cached per key
    (``models.trainer``).  ``views = 0``: a fresh augmentation for every draw (no keys).
    """

    def __init__(self, table: ImageTable, p: int = 8, k: int = 4, seed: int = 0, augment: bool = True,
                 aug: Augment = Augment(), views: int = 0) -> None:
        if p < 1 or k < 1:
            raise FedcbirError(f"P and K must be positive, got P={p}, K={k}")
        if views < 0:
            raise FedcbirError(f"views must be >= 0, got {views}")
        self.table = table
        self.seed = int(seed)
        self.views = int(views) if augment else 0
        self.augment = augment
        self.aug = aug
        self.k = int(k)
        order = np.argsort(table.labels, kind="stable")
        labels_sorted = table.labels[order]
        products, starts = np.unique(labels_sorted, return_index=True)
        if products.size == 0:
            raise FedcbirError("no decodable images to make batches from")
        ends = np.append(starts[1:], len(order))
        self._pools = [order[s:e] for s, e in zip(starts, ends)]
        self.products = products
        self.p = min(int(p), int(products.size))
        self._next_epoch = 0

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.products) // self.p)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, int(epoch), 0]).permutation(len(self.products))

    def batch(self, epoch: int, step: int, _order: np.ndarray | None = None) -> Batch:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1}")
        order = self._order(epoch) if _order is None else _order
        rng = np.random.default_rng([self.seed, int(epoch), int(step) + 1])
        chosen = order[step * self.p:(step + 1) * self.p]
        idx = []
        for j in chosen.tolist():
            pool = self._pools[j]
            if len(pool) >= self.k:
                idx.append(rng.choice(pool, self.k, replace=False))
            else:
                extra = rng.choice(pool, self.k - len(pool), replace=True)
                idx.append(np.concatenate([rng.permutation(pool), extra]))
        sel = np.concatenate(idx)
        raw = self.table.images[sel]
        keys = None
        if self.augment and self.views:
            v = rng.integers(0, self.views, size=len(sel))
            keys = sel.astype(np.int64) * self.views + v
            x = np.concatenate([augment_uint8(raw[j:j + 1], np.random.default_rng(
                [self.seed, int(i), int(vv), 7]), self.aug) for j, (i, vv) in enumerate(zip(sel, v))])
        elif self.augment:
            x = augment_uint8(raw, rng, self.aug)
        if self.augment:
            pre = self.table.pre
            std = np.asarray(pre.std, np.float32)
            x *= (1.0 / (255.0 * std)).astype(np.float32)
            x -= (np.asarray(pre.mean, np.float32) / std).astype(np.float32)
        else:
            x = normalize(raw, self.table.pre)
        return Batch(x=x, labels=self.table.labels[sel].copy(), types=self.table.types[sel].copy(),
                     keys=keys)

    def epoch(self, e: int) -> Iterator[Batch]:
        order = self._order(e)
        for step in range(self.steps_per_epoch):
            yield self.batch(e, step, order)

    def __iter__(self) -> Iterator[Batch]:
        e = self._next_epoch
        self._next_epoch += 1
        return self.epoch(e)


def eval_batches(table: ImageTable, batch_size: int = 64) -> Iterator[Batch]:
    """The whole table in order, normalised, no augmentation (last batch may be smaller)."""
    if batch_size < 1:
        raise FedcbirError(f"batch size must be positive, got {batch_size}")
    for start in range(0, len(table), batch_size):
        sl = slice(start, start + batch_size)
        yield Batch(x=normalize(table.images[sl], table.pre), labels=table.labels[sl].copy(),
                    types=table.types[sl].copy())
