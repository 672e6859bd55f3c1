"""Framework-neutral batches: decode once, then numpy batches every framework consumes.

- :class:`ImageTable` decodes every image of some products once (``load_image`` then
  ``to_uint8``) into a uint8 array ``[N, S, S, 3]`` with per-image product labels,
  product-type ids and paths; unreadable images are skipped and listed. An optional
  cache (``.npz``, keyed by the image list, file sizes and times, and the preprocessing)
  makes the next load a single file read.
- :class:`PKBatches` yields P products x K photos per batch for metric learning, with
  seeded augmentation done here once (random resized crop, horizontal flip, brightness
  and contrast) so PyTorch, Keras and Flax see byte-identical float32 NHWC batches for
  the same seed and epoch. ``batch(epoch, step)`` gives random access (resume mid-epoch).
- :func:`eval_batches` yields the table in order, without augmentation.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from catalog.abo import IMAGES_DIR, Product
from catalog.images import DEFAULT_PREPROCESS, ImageError, Preprocess, load_image, normalize, to_uint8
from fedcbir.errors import FedcbirError
from fedcbir.progress import progress_bar
from fedcbir.io import atomic_path

CACHE_FORMAT = 1


@dataclass
class Batch:
    x: np.ndarray  # float32 [B, S, S, 3], normalised
    labels: np.ndarray  # int64 [B], product index in ImageTable.item_ids
    types: np.ndarray  # int64 [B], index in ImageTable.type_names
    keys: np.ndarray | None = None  # int64 [B], image x views + view (with ``views``): same key, same pixels


@dataclass
class ImageTable:
    images: np.ndarray  # uint8 [N, S, S, 3]
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

        cache_file = None
        if cache_dir is not None:
            cache_file = Path(cache_dir) / f"images-{_cache_key(images_dir, entries, item_ids, names, pre)}.npz"
            table = _read_cache(cache_file, pre)
            if table is not None:
                return table

        size = pre.size
        out = np.empty((len(entries), size, size, 3), np.uint8)
        ok = np.zeros(len(entries), bool)
        skipped: list[str] = []

        def decode(i: int):
            try:
                return i, to_uint8(load_image(images_dir / entries[i][2]), pre), None
            except ImageError as exc:
                return i, None, f"{entries[i][2]}: {exc}"

        bar = progress_bar(progress)
        task = bar.add_task("decoding images", total=len(entries)) if bar else None
        n_workers = workers or min(4, os.cpu_count() or 1)
        try:
            if bar:
                bar.start()
            with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
                for i, arr, err in pool.map(decode, range(len(entries)), chunksize=16):
                    if arr is None:
                        skipped.append(err)
                    else:
                        out[i] = arr
                        ok[i] = True
                    if bar:
                        bar.advance(task)
        finally:
            if bar:
                bar.stop()
        keep = np.flatnonzero(ok)
        table = cls(
            images=out[keep] if len(keep) != len(entries) else out,
            labels=np.array([entries[i][0] for i in keep], np.int64),
            types=np.array([entries[i][1] for i in keep], np.int64),
            paths=[entries[i][2] for i in keep],
            item_ids=item_ids,
            type_names=names,
            pre=pre,
            skipped=skipped,
        )
        if cache_file is not None:
            _write_cache(cache_file, table)
        return table


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


def _write_cache(path: Path, table: ImageTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=table.images, labels=table.labels, types=table.types,
                     paths=np.array(table.paths, dtype=str), item_ids=np.array(table.item_ids, dtype=str),
                     type_names=np.array(table.type_names, dtype=str), skipped=np.array(table.skipped, dtype=str),
                     pre=np.array(json.dumps(table.pre.to_dict())))


def _read_cache(path: Path, pre: Preprocess) -> ImageTable | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if Preprocess.from_dict(json.loads(str(z["pre"]))) != pre:
                return None
            table = ImageTable(images=z["images"], labels=z["labels"].astype(np.int64), types=z["types"].astype(np.int64),
                               paths=z["paths"].tolist(), item_ids=z["item_ids"].tolist(),
                               type_names=z["type_names"].tolist(), pre=pre, skipped=z["skipped"].tolist())
    except Exception:  # a damaged cache is rebuilt, never fatal
        return None
    n = table.images.shape[0]
    if table.images.shape[1:] != (pre.size, pre.size, 3) or len(table.labels) != n or len(table.paths) != n:
        return None
    return table



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
