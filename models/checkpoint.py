"""Checkpoints: canonical weights ``.npz`` + JSON metadata, written atomically.

Layout for a prefix ``runs/x/round-0003`` (or a directory ``runs/x/round-0003/``, which
holds ``model.npz`` + ``model.json``)::

    round-0003.npz    canonical float32 arrays (np.savez, no pickles)
    round-0003.json   {"format": "fedcbir-checkpoint", "format_version": 1,
                       "arch": ArchSpec.to_dict(), "preprocessing": {...}, "framework": "torch",
                       "round": 3, "epoch": null, "metrics": {...}, "created": ISO-8601 UTC,
                       "fedcbir_version": "...", "npz_sha256": "...", "npz_bytes": N,
                       "names": [...], ...extra keys from the caller}

The ``.npz`` is written first and the ``.json`` (which holds its sha256) last, so a crash
leaves either the old checkpoint or a complete new one.  ``load_checkpoint`` accepts the
prefix, the directory, or either file, and raises ``FedcbirError`` for missing, truncated,
tampered (sha256 mismatch) or mismatched-architecture files.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common import __version__
from common.errors import FedcbirError
from common.io import atomic_path, write_bytes_atomic
from models import canonical
from models.spec import ArchSpec

FORMAT = "fedcbir-checkpoint"
FORMAT_VERSION = 1
_RESERVED = {"format", "format_version", "npz_sha256", "npz_bytes", "names", "created",
             "fedcbir_version"}


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(npz, json) for a prefix, a directory or either file."""
    p = Path(path)
    if p.suffix in (".npz", ".json"):
        p = p.with_suffix("")
    elif p.is_dir() or str(path).endswith(("/", os.sep)):
        p = p / "model"
    return p.with_name(p.name + ".npz"), p.with_name(p.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path_prefix_or_dir: str | os.PathLike, weights: Mapping[str, np.ndarray],
                    meta: Mapping[str, Any]) -> Path:
    """Write ``<prefix>.npz`` + ``<prefix>.json`` atomically; returns the JSON path.

    ``meta`` must contain ``arch`` (an ``ArchSpec`` or its dict); usual keys:
    ``preprocessing`` (dict), ``framework``, ``round``/``epoch``, ``metrics``. Weights are
    validated against the architecture and stored as float32.
    """
    meta = dict(meta)
    arch = meta.get("arch")
    if arch is None:
        raise FedcbirError("checkpoint metadata needs 'arch' (the architecture spec)")
    spec = arch if isinstance(arch, ArchSpec) else ArchSpec.from_dict(arch)
    w = canonical.as_float32(weights)
    canonical.validate_weights(spec, w)
    bad = sorted(_RESERVED & set(meta))
    if bad:
        raise FedcbirError(f"checkpoint metadata keys reserved for the format: {', '.join(bad)}")
    names = canonical.param_names(spec)
    buf = io.BytesIO()
    np.savez(buf, **{n: w[n] for n in names})
    data = buf.getvalue()
    npz_path, json_path = checkpoint_paths(path_prefix_or_dir)
    write_bytes_atomic(npz_path, data)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": spec.to_dict(),
        "preprocessing": meta.pop("preprocessing", {}),
        "framework": meta.pop("framework", None),
        "round": meta.pop("round", None),
        "epoch": meta.pop("epoch", None),
        "metrics": meta.pop("metrics", {}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fedcbir_version": __version__,
        "npz_file": npz_path.name,
        "npz_sha256": hashlib.sha256(data).hexdigest(),
        "npz_bytes": len(data),
        "names": names,
    }
    meta.pop("arch")
    doc.update(meta)
    try:
        text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise FedcbirError(f"checkpoint metadata is not JSON-serialisable: {exc}") from None
    with atomic_path(json_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return json_path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify a checkpoint; returns ``(weights, meta)`` (``meta["arch"]`` is the
    spec dict; ``ArchSpec.from_dict(meta["arch"])`` rebuilds it)."""
    npz_path, json_path = checkpoint_paths(path)
    if not json_path.is_file():
        raise FedcbirError(f"checkpoint metadata not found: {json_path}")
    if not npz_path.is_file():
        raise FedcbirError(f"checkpoint weights not found: {npz_path}")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedcbirError(f"checkpoint metadata {json_path} is damaged: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FedcbirError(f"{json_path} is not a fedcbir checkpoint")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FedcbirError(f"{json_path} has format version {meta.get('format_version')}; "
                           f"this fedcbir reads up to {FORMAT_VERSION}")
    size = npz_path.stat().st_size
    if "npz_bytes" in meta and size != meta["npz_bytes"]:
        raise FedcbirError(f"checkpoint weights {npz_path} are truncated or replaced "
                           f"({size} bytes, expected {meta['npz_bytes']})")
    digest = _sha256(npz_path)
    if digest != meta.get("npz_sha256"):
        raise FedcbirError(f"checkpoint weights {npz_path} do not match their sha256 "
                           f"(tampered or damaged)")
    try:
        spec = ArchSpec.from_dict(meta.get("arch"))
    except TypeError as exc:
        raise FedcbirError(f"checkpoint architecture is invalid: {exc}") from None
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            weights = {k: np.array(z[k]) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FedcbirError(f"checkpoint weights {npz_path} cannot be read: {exc}") from None
    names = meta.get("names")
    if names is not None and list(names) != canonical.param_names(spec):
        raise FedcbirError("checkpoint names do not match its architecture")
    canonical.validate_weights(spec, weights)
    return weights, meta
