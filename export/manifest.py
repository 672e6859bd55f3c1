"""The bundle manifest: what a device needs to know to run a bundle file correctly.

A bundle is a folder::

    manifest.json        this description (schema below)
    model.tflite         Keras (or Flax via jax2tf) -> LiteRT, float32        NHWC input
    model.fp16.tflite    same, float16 weights (computes in float32 on CPU)    NHWC input
    model.int8.tflite    int8 weights + activations, float32 input/output      NHWC input
    model.onnx           torch.onnx (dynamo), float32                          NCHW input
    model.int8.onnx      ONNX Runtime static QDQ int8, float32 input/output     NCHW input
    model.pte            ExecuTorch + XNNPACK, float32                         NCHW input
    model.int8.pte       ExecuTorch + XNNPACK, pt2e int8, float32 in/out       NCHW input
    reference.npz        the canonical float32 weights the files were made from (used by
                         ``fedcbir export verify``; a device does not need it)

Every graph maps normalised float32 images (``(x / 255 - mean) / std``, see
``preprocessing``) to the UN-normalised embedding ``[N, D]``; L2 normalisation is
applied outside the graph (``export.runtime.l2_normalize``).

This module imports only the standard library (the device side reads it).
"""
from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path

FORMAT = "fedcbir-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# format -> (runtime key for load_embedder, distribution that runs it, python module)
RUNTIMES = {
    "tflite": ("litert", "ai-edge-litert", "ai_edge_litert.interpreter"),
    "onnx": ("onnx", "onnxruntime", "onnxruntime"),
    "pte": ("pte", "executorch", "executorch.runtime"),
}
RUNTIME_FORMAT = {v[0]: k for k, v in RUNTIMES.items()}
PRECISIONS = ("fp32", "fp16", "int8")

# (format, precision) -> file name
FILE_NAMES = {
    ("tflite", "fp32"): "model.tflite",
    ("tflite", "fp16"): "model.fp16.tflite",
    ("tflite", "int8"): "model.int8.tflite",
    ("onnx", "fp32"): "model.onnx",
    ("onnx", "int8"): "model.int8.onnx",
    ("pte", "fp32"): "model.pte",
    ("pte", "int8"): "model.int8.pte",
}
REFERENCE_FILE = "reference.npz"

# distributions whose versions are recorded as "exporter versions"
EXPORTER_DISTS = ("torch", "executorch", "torchao", "tensorflow-cpu", "tensorflow", "keras",
                  "jax", "jaxlib", "flax", "onnx", "onnxscript", "onnxruntime", "ai-edge-litert",
                  "numpy")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def exporter_versions() -> dict[str, str]:
    out = {}
    for name in EXPORTER_DISTS:
        v = dist_version(name)
        if v is not None:
            out[name] = v
    return out


def version_tuple(v: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '1.5.1rc2' -> (1, 5, 1). Non-numeric parts end it."""
    out = []
    for part in str(v).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out)


def version_at_least(installed: str, minimum: str) -> bool:
    a, b = version_tuple(installed), version_tuple(minimum)
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)) >= b + (0,) * (n - len(b))
