"""Embedding photos with a bundle's model, on the device: open a bundle, load its embedder
(``export.runtime``), describe the model an index is built with, check the preprocessing,
decode photos safely and embed them (L2-normalised): a few query photos, or a whole
catalog through a bounded-memory decode/embed pipeline.

Imports: numpy, :mod:`common`, :mod:`catalog`, :mod:`models` and :mod:`export`; no other
retrieval module (the index builder, the bundle's index and the searcher all use this one).
Loading a model imports the device runtime, which must come before usearch's import
(see :mod:`retrieval.vectors`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from common.errors import FedcbirError
from models.metrics import l2_normalize


# ----------------------------------------------------------------------------- bundle + model


def open_bundle(path: str | os.PathLike, check: str = "all"):
    from export.runtime import open_bundle as _open

    return _open(path, check=check)


def weights_identity(bundle) -> str | None:
    """What identifies the trained weights behind every file of a bundle (not one file)."""
    m = bundle.manifest
    for key in ("checkpoint", "source", "weights"):
        sect = m.get(key)
        if isinstance(sect, dict):
            for field_name in ("npz_sha256", "sha256", "weights_sha256"):
                if isinstance(sect.get(field_name), str):
                    return sect[field_name]
    ref = bundle.files.get("reference.npz")
    if isinstance(ref, dict) and isinstance(ref.get("sha256"), str):
        return ref["sha256"]
    return None


def load_model(bundle, runtime: str | None = None, precision: str | None = None, threads: int = 1):
    """The embedder for ``runtime``/``precision`` (default: onnx fp32 if present, else the first model)."""
    from export.runtime import load_embedder

    if runtime is None:
        models = bundle.models()
        if not models:
            raise FedcbirError(f"bundle {bundle.path} has no model files")
        wanted = [m for m in models if m[0] == "onnx" and m[1] == (precision or "fp32")]
        wanted = wanted or [m for m in models if precision is None or m[1] == precision] or models
        runtime, precision = wanted[0][0], wanted[0][1]
    return load_embedder(bundle, runtime=runtime, precision=precision or "fp32", threads=threads)


def model_record(bundle, embedder) -> dict[str, Any]:
    d = embedder.describe()
    return {"file": d.get("file"), "sha256": d.get("sha256"), "runtime": d.get("runtime"),
            "precision": d.get("precision"), "dim": int(embedder.dim), "input_size": int(embedder.input_size),
            "weights": weights_identity(bundle), "preprocessing": bundle.manifest.get("preprocessing"),
            "runtime_version": d.get("runtime_version")}


def preprocess_of(bundle, embedder):
    from catalog.images import Preprocess

    try:
        pre = bundle.preprocess
    except (KeyError, TypeError):
        pre = Preprocess(size=int(embedder.input_size))
    if pre.size != int(embedder.input_size):
        raise FedcbirError(f"bundle preprocessing size {pre.size} differs from the model input size {embedder.input_size}")
    return pre


# ----------------------------------------------------------------------------- decoding + embedding


@dataclass
class Decoded:
    """A decoded, resized photo (uint8 HWC) or why it could not be used."""

    pixels: np.ndarray | None
    error: str | None = None
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""


def decode_file(path: Path, pre, with_hash: bool = False) -> Decoded:
    """Safe decode + resize of one file (errors are returned, never raised)."""
    import hashlib

    from catalog.images import ImageError, load_image, to_uint8

    try:
        img = load_image(path)
        pixels = to_uint8(img, pre)
    except ImageError as exc:
        return Decoded(None, str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop indexing
        return Decoded(None, f"cannot read image {path}: {' '.join(str(exc).split()) or type(exc).__name__}")
    out = Decoded(pixels)
    if with_hash:
        try:
            st = path.stat()
            out.size, out.mtime_ns = st.st_size, st.st_mtime_ns
            out.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            return Decoded(None, f"cannot read image {path}: {exc.strerror or exc}")
    return out


def embed_pixels(embedder, pixels: np.ndarray, pre, batch_size: int = 32) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` → L2-normalised float32 ``[N, D]``."""
    from catalog.images import normalize

    outs = [embedder.embed(normalize(pixels[i:i + batch_size], pre)) for i in range(0, len(pixels), batch_size)]
    out = np.concatenate(outs, axis=0) if outs else np.zeros((0, embedder.dim), np.float32)
    bad = ~np.isfinite(out).all(axis=1) | (np.linalg.norm(out, axis=1) < 1e-12)
    if bad.any():
        raise FedcbirError(f"the model produced {int(bad.sum())} unusable (zero or non-finite) embeddings")
    return l2_normalize(out)


def iter_embedded(embedder, pre, paths: Sequence[Path], chunks: Iterable[Sequence[int]], *, batch_size: int = 32,
                  workers: int = 1, with_hash: bool = False):
    """Decode and embed ``paths[i]`` chunk by chunk; yields ``(chunk, infos, vectors, ok)`` per
    chunk in order (``infos[j]`` describes ``paths[chunk[j]]``, ``ok`` the positions in the chunk
    whose rows ``vectors`` holds).

    A pipeline: ``workers`` threads decode ahead (at most two chunks in flight) while the
    calling thread embeds with the runtime's own threads, so memory is bounded by a few
    chunks of pixels whatever the number of paths.
    """
    from catalog.batches import bounded_map

    chunks = list(chunks)
    window = 2 * max((len(c) for c in chunks), default=1)

    def decode(i: int) -> Decoded:
        return decode_file(Path(paths[i]), pre, with_hash)

    order = (i for c in chunks for i in c)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded_iter = bounded_map(pool, decode, order, window=window)
        for chunk in chunks:
            infos = [next(decoded_iter) for _ in chunk]
            good = []
            for j, d in enumerate(infos):
                if d.pixels is not None:
                    good.append((j, d.pixels))
                d.pixels = None  # keep memory bounded: only the infos stay
            if good:
                vectors = embed_pixels(embedder, np.stack([p for _, p in good]), pre, batch_size)
            else:
                vectors = np.zeros((0, embedder.dim), np.float32)
            yield chunk, infos, vectors, [j for j, _ in good]


def embed_files(embedder, pre, paths: Sequence[Path], *, batch_size: int = 32, workers: int = 1,
                with_hash: bool = False, on_progress: Callable[[int], None] | None = None):
    """Decode (in ``workers`` threads, bounded memory) and embed many files.

    Returns ``(vectors [n_ok, D], decoded infos (one per path), ok indices)``.
    """
    infos: list[Decoded | None] = [None] * len(paths)
    vectors: list[np.ndarray] = []
    ok: list[int] = []
    size = max(1, batch_size) * 4
    chunks = [range(s, min(len(paths), s + size)) for s in range(0, len(paths), size)]
    for chunk, got, vec, good in iter_embedded(embedder, pre, paths, chunks, batch_size=batch_size,
                                               workers=workers, with_hash=with_hash):
        for i, d in zip(chunk, got):
            infos[i] = d
        vectors.append(vec)
        ok.extend(chunk[j] for j in good)
        if on_progress is not None:
            on_progress(len(chunk))
    out = np.concatenate(vectors, axis=0) if vectors else np.zeros((0, embedder.dim), np.float32)
    return out, infos, ok
