"""The framework-independent half of a local trainer.

``Trainer`` owns the loop (epochs, step limit, timing, metrics, input checks); each
framework module subclasses it and implements the few tensor-level hooks:

    _load(weights)                canonical float32 dict -> framework variables
    _dump() -> dict               framework variables -> canonical float32 dict
    _reset_optimizer()            fresh optimizer state (new round)
    _set_anchor(weights)          FedProx reference weights (only when prox_mu > 0)
    _embed_batch(x) -> np.ndarray eval-mode projection output
    _train_step(x, labels, types) -> (total, supcon, type_ce) as floats
    _bn_step(x, momentum)         train-mode forward that only updates BN running stats
    _trunk_batch(x) -> np.ndarray inference-mode stem + blocks[:train_from] (NHWC), only used
                                  when ``cfg.train_from > 0``
    describe() -> dict            kernel path / memory format / versions

Partial fine-tuning (``cfg.train_from = k > 0``): the stem and blocks ``< k`` are frozen —
inference mode (BN running statistics), no gradient, no optimizer state — and only
blocks ``>= k``, the head, the projection and the type head train.  The frozen trunk's output
for one photo and one augmentation never changes during a run, so when a batch carries
``keys`` (one per photo-and-augmentation, ``catalog.batches.PKBatches(views=...)``) it is
computed once and kept in a bounded cache (:class:`ActivationCache`, ``cfg.cache_mb``).
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

import numpy as np

from common.errors import FedcbirError
from models import canonical
from models.spec import ArchSpec
from models.threads import thread_info
from common.memory import peak_rss_mb


def unpack_batch(batch: Any, input_size: int):
    """Accept ``Batch``-like objects (``.x .labels .types``), tuples or dicts."""
    if hasattr(batch, "x"):
        x, labels, types = batch.x, getattr(batch, "labels", None), getattr(batch, "types", None)
    elif isinstance(batch, Mapping):
        x, labels, types = batch["x"], batch.get("labels"), batch.get("types")
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        x, labels = batch[0], batch[1]
        types = batch[2] if len(batch) == 3 else None
    else:
        raise FedcbirError("a training batch needs .x, .labels (and optionally .types)")
    x = check_images(x, input_size)
    n = x.shape[0]
    if labels is None:
        raise FedcbirError("a training batch needs product labels")
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    types = (np.full(n, -1, np.int32) if types is None
             else np.asarray(types).astype(np.int32).reshape(-1))
    if labels.shape[0] != n or types.shape[0] != n:
        raise FedcbirError(f"batch has {n} images but {labels.shape[0]} labels and "
                           f"{types.shape[0]} types")
    if n < 2:
        raise FedcbirError("a training batch needs at least 2 images")
    return x, labels, types


def check_images(x: Any, input_size: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1:] != (input_size, input_size, 3):
        raise FedcbirError(f"images must be float32 NHWC [N, {input_size}, {input_size}, 3], "
                           f"got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


class ActivationCache:
    """Frozen-trunk outputs by key, least recently used first out, at most ``max_bytes``.

    Rows live in one preallocated array (a slab of ``max_bytes // row bytes`` slots, made on
    the first row; pages are committed only when written), and an evicted row's slot is
    reused: a dict of small per-row arrays let the allocator's fragmentation roughly double
    the resident memory of the cached bytes (measured: +37 MB of RSS for 22 MB of rows).

    Valid only for one set of frozen weights: ``Trainer.set_weights`` clears it when the
    frozen part changes (it does not during a run)."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.max_bytes = int(max_bytes)
        self.rows: "OrderedDict[int, int]" = OrderedDict()  # key -> slot, least recently used first
        self.slab: np.ndarray | None = None
        self._next = 0  # first never-used slot
        self.bytes = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.rows.clear()
        self.slab = None
        self._next = 0
        self.bytes = 0

    def row(self, key: int) -> np.ndarray:
        return self.slab[self.rows[int(key)]]

    def _put(self, key: int, row: np.ndarray) -> None:
        if key in self.rows:
            return
        if self.slab is None or self.slab.shape[1:] != row.shape or self.slab.dtype != row.dtype:
            capacity = self.max_bytes // max(1, row.nbytes)
            if capacity < 1:
                return
            self.clear()
            self.slab = np.empty((capacity, *row.shape), row.dtype)
        if self._next < len(self.slab):
            slot = self._next
            self._next += 1
        else:
            _, slot = self.rows.popitem(last=False)
        self.slab[slot] = row
        self.rows[key] = slot
        self.bytes = len(self.rows) * row.nbytes

    def save(self, path) -> None:
        """Write every row to ``path`` (.npz, atomically): a device keeps its frozen
        activations between rounds (each round's training runs in a fresh process)."""
        from common.io import atomic_path

        if not self.rows:
            return
        keys = np.fromiter(self.rows.keys(), np.int64, len(self.rows))
        slots = np.fromiter(self.rows.values(), np.int64, len(self.rows))
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, rows=self.slab[slots])

    def load(self, path) -> int:
        """Rows from a file written by :meth:`save` (a damaged file is ignored); returns how many."""
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, rows = z["keys"], z["rows"]
        except (OSError, ValueError, KeyError):
            return 0
        for k, row in zip(keys.tolist(), rows):
            if self.bytes + row.nbytes > self.max_bytes:
                break
            self._put(int(k), row)
        return len(self.rows)

    def lookup(self, keys: np.ndarray, compute) -> np.ndarray:
        """Rows for ``keys``; missing ones come from ``compute(index array)`` in one call."""
        keys = [int(k) for k in keys]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = compute(np.asarray(missing, np.int64)) if missing else None
        from_fresh = {i: j for j, i in enumerate(missing)}
        out = None
        for i, k in enumerate(keys):
            j = from_fresh.get(i)
            if j is not None:
                row = fresh[j]
            else:
                row = self.slab[self.rows[k]]
                self.rows.move_to_end(k)
            if out is None:
                out = np.empty((len(keys), *row.shape), row.dtype)
            out[i] = row
        if self.max_bytes > 0:  # after ``out`` is complete: an eviction may reuse a slot read above
            for j, i in enumerate(missing):
                self._put(keys[i], fresh[j])
        return out


class Trainer:
    framework = "?"

    def __init__(self, spec: ArchSpec, cfg):
        self.spec = spec
        self.cfg = cfg
        self.names = canonical.param_names(spec)
        self._has_weights = False
        self.train_from = int(getattr(cfg, "train_from", 0) or 0)
        if not 0 <= self.train_from <= len(spec.blocks):
            raise FedcbirError(f"train_from {self.train_from} outside 0..{len(spec.blocks)} "
                               f"for {spec.name}")
        self.frozen = canonical.frozen_names(spec, self.train_from)
        self.cache = ActivationCache(int(getattr(cfg, "cache_mb", 0) or 0) << 20)
        self._frozen_sig = None

    # ------------------------------------------------------------------ public API
    def set_weights(self, weights: Mapping[str, np.ndarray],
                    anchor: Mapping[str, np.ndarray] | None = None) -> None:
        """Load canonical weights (cast to float32) and reset the optimizer state.

        With ``prox_mu > 0`` the FedProx anchor (w_global) becomes ``anchor``, by default
        the weights themselves (the round's global model)."""
        w = canonical.as_float32(weights)
        canonical.validate_weights(self.spec, w)
        if anchor is not None:
            anchor = canonical.as_float32(anchor)
            canonical.validate_weights(self.spec, anchor)
        sig = canonical_digest(w, self.frozen) if self.frozen else None
        if sig != self._frozen_sig:
            self.cache.clear()
            self._frozen_sig = sig
        self._load(w)
        self._reset_optimizer()
        if self.cfg.prox_mu > 0:
            self._set_anchor(w if anchor is None else anchor)
        self._has_weights = True

    def get_weights(self) -> dict[str, np.ndarray]:
        """Canonical float32 copies of every tensor, BN running statistics included."""
        self._need_weights()
        out = self._dump()
        return {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in self.names}

    def embed(self, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Eval-mode, un-normalised projection output, float32 ``[N, D]``."""
        self._need_weights()
        x = check_images(x, self.spec.input_size)
        if batch_size < 1:
            raise FedcbirError("batch_size must be >= 1")
        if x.shape[0] == 0:
            return np.zeros((0, self.spec.embedding_dim), np.float32)
        parts = [self._embed_batch(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def train(self, batches: Iterable, max_steps: int | None = None) -> dict:
        """Run ``cfg.epochs`` passes (or until ``max_steps`` / ``cfg.max_steps``) over
        ``batches``; returns metrics (loss = mean total objective per step)."""
        self._need_weights()
        limit = max_steps if max_steps is not None else self.cfg.max_steps
        epochs = int(self.cfg.epochs)
        if epochs > 1 and iter(batches) is batches:
            raise FedcbirError("epochs > 1 needs a re-iterable batch source, not an iterator")
        steps = examples = 0
        tot = sup = ce = 0.0
        step_times: list[float] = []
        t0 = time.perf_counter()
        c0 = time.process_time()
        done = False
        for _ in range(epochs):
            for batch in batches:
                if limit is not None and steps >= limit:
                    done = True
                    break
                x, labels, types = unpack_batch(batch, self.spec.input_size)
                ts = time.perf_counter()
                if self.train_from:
                    x = self.trunk(x, getattr(batch, "keys", None))
                a, b, c = self._train_step(x, labels, types)
                step_times.append(time.perf_counter() - ts)
                if not np.isfinite(a):
                    raise FedcbirError(f"training diverged (loss {a}) at step {steps + 1}")
                tot, sup, ce = tot + a, sup + b, ce + c
                steps += 1
                examples += x.shape[0]
            if done:
                break
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        d = max(steps, 1)
        return {
            "framework": self.framework,
            "loss": tot / d, "loss_supcon": sup / d, "loss_type": ce / d,
            "examples": examples, "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_rss_mb": peak_rss_mb(), "threads": thread_info(),
            "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
            # the first step includes tracing / compilation; the others are the steady cost
            "first_step_seconds": step_times[0] if step_times else 0.0,
            "steady_step_seconds": float(np.median(step_times[1:])) if len(step_times) > 1 else 0.0,
        }

    def trunk(self, x: np.ndarray, keys=None) -> np.ndarray:
        """The frozen trunk's output for images ``x`` (cached by ``keys`` when given)."""
        if keys is None or self.cache.max_bytes <= 0:
            return self._trunk_batch(x)
        return self.cache.lookup(np.asarray(keys), lambda idx: self._trunk_batch(x[idx]))

    def recalibrate_bn(self, batches: Iterable, max_batches: int | None = None) -> dict:
        """Recompute every BN running statistic on ``batches``: train-mode forwards, no
        weight update, cumulative average (batch k uses momentum 1/(k+1), like PyTorch's
        ``momentum=None``): the result is the mean over batches of the batch means and
        of the unbiased batch variances."""
        self._need_weights()
        k = 0
        examples = 0
        t0 = time.perf_counter()
        for batch in batches:
            if max_batches is not None and k >= max_batches:
                break
            if hasattr(batch, "x") or isinstance(batch, (Mapping, tuple, list)):
                x = batch.x if hasattr(batch, "x") else (
                    batch["x"] if isinstance(batch, Mapping) else batch[0])
            else:
                x = batch
            x = check_images(x, self.spec.input_size)
            if x.shape[0] < 2:
                continue
            if self.train_from:  # frozen BN statistics stay as they are
                x = self._trunk_batch(x)
            self._bn_step(x, 1.0 / (k + 1))
            k += 1
            examples += x.shape[0]
        return {"batches": k, "examples": examples, "seconds": time.perf_counter() - t0}

    def describe(self) -> dict:
        return {"framework": self.framework}

    # ------------------------------------------------------------------ helpers
    def _need_weights(self):
        if not self._has_weights:
            raise FedcbirError("the trainer has no weights yet: call set_weights first")

    def _decay_flags(self, names):
        shapes = canonical.param_shapes(self.spec)
        return [canonical.decays(n, shapes[n]) for n in names]

    # hooks -------------------------------------------------------------------
    def _load(self, weights):  # pragma: no cover - abstract
        raise NotImplementedError

    def _dump(self):  # pragma: no cover
        raise NotImplementedError

    def _reset_optimizer(self):  # pragma: no cover
        raise NotImplementedError

    def _set_anchor(self, weights):  # pragma: no cover
        raise NotImplementedError

    def _embed_batch(self, x):  # pragma: no cover
        raise NotImplementedError

    def _train_step(self, x, labels, types):  # pragma: no cover
        raise NotImplementedError

    def _bn_step(self, x, momentum):  # pragma: no cover
        raise NotImplementedError

    def _trunk_batch(self, x):  # pragma: no cover
        raise NotImplementedError


def canonical_digest(weights: Mapping[str, np.ndarray], names) -> str:
    from models.canonical import frozen_digest

    return frozen_digest(weights, names)
