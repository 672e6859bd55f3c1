"""The on-device side of a bundle: open it, check it, run one of its files.

    from export.runtime import open_bundle, load_embedder, l2_normalize

    bundle = open_bundle("bundle/")                      # manifest + sizes + sha256 checked
    emb = load_embedder(bundle, runtime="litert", precision="int8", threads=1)
    vectors = l2_normalize(emb.embed_images(["query.jpg"]))   # [1, D] unit vectors
    emb.embed(x)        # x: float32 NHWC, already normalised -> float32 [N, D], un-normalised

Runtimes (the bundle's manifest says which file needs which, and the minimum version):

=========  ==========================  ====================  ==========================
runtime    files                       package               imports
=========  ==========================  ====================  ==========================
litert     model[.fp16|.int8].tflite   ai-edge-litert        numpy only (no TensorFlow)
onnx       model[.int8].onnx           onnxruntime           numpy only (no PyTorch)
pte        model[.int8].pte            executorch            **PyTorch** (executorch's
                                                             Python runtime is built on it)
=========  ==========================  ====================  ==========================

This module imports only numpy, Pillow (through ``catalog.images``) and the one runtime
that is asked for — never torch, tensorflow or jax for ``.tflite`` / ``.onnx`` files (a
test checks ``sys.modules`` in a fresh process).  ``tflite_runtime`` is used as a
fallback only when ``ai_edge_litert`` is not installed (old ``tflite_runtime`` wheels
cannot load every op version TF 2.21 writes).

Inputs: every embedder takes NHWC float32 images; the ONNX and ExecuTorch graphs are
NCHW (they come from PyTorch) and the transpose happens here, in numpy.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from export.manifest import (FORMAT, MANIFEST, PRECISIONS, RUNTIME_FORMAT, RUNTIMES, SCHEMA_VERSION,
                             dist_version, sha256_file, version_at_least)
from common.errors import FedcbirError

RUNTIME_NAMES = tuple(RUNTIME_FORMAT)  # ("litert", "onnx", "pte")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); the step the exported graphs leave out."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


# ------------------------------------------------------------------------------ the bundle
_FILE_KEYS = ("sha256", "bytes", "format", "precision", "role")


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def input_size(self) -> int:
        return int(self.manifest["input"]["size"])

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding"]["dim"])

    @property
    def preprocess(self):
        from catalog.images import Preprocess

        return Preprocess.from_dict(self.manifest["preprocessing"])

    def file_path(self, name: str) -> Path:
        return self.path / name

    def models(self) -> list[tuple[str, str, str]]:
        """``(runtime, precision, file name)`` of every model file, in manifest order."""
        out = []
        for name, info in self.files.items():
            if info.get("role") == "model" and info.get("format") in RUNTIMES:
                out.append((RUNTIMES[info["format"]][0], info["precision"], name))
        return out

    def find(self, runtime: str, precision: str = "fp32") -> str:
        fmt = RUNTIME_FORMAT.get(runtime)
        if fmt is None:
            raise FedcbirError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIME_NAMES)}")
        if precision not in PRECISIONS:
            raise FedcbirError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        for rt, prec, name in self.models():
            if rt == runtime and prec == precision:
                return name
        have = ", ".join(f"{rt}/{prec}" for rt, prec, _ in self.models()) or "none"
        raise FedcbirError(f"bundle {self.path} has no {runtime} {precision} file (it has: {have})")

    def check_file(self, name: str) -> None:
        """Presence, size and sha256 of one listed file (FedcbirError, one line)."""
        info = self.files[name]
        p = self.path / name
        if not p.is_file():
            raise FedcbirError(f"bundle {self.path}: file {name} is missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise FedcbirError(f"bundle {self.path}: file {name} is truncated or replaced "
                               f"({size} bytes, the manifest says {info['bytes']})")
        if sha256_file(p) != info["sha256"]:
            raise FedcbirError(f"bundle {self.path}: file {name} does not match its sha256 "
                               f"(tampered or damaged)")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` of a bundle folder (no file checks)."""
    path = Path(path)
    if not path.exists():
        raise FedcbirError(f"bundle not found: {path}")
    if not path.is_dir():
        raise FedcbirError(f"{path} is not a bundle folder")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FedcbirError(f"{path} is not a fedcbir bundle (no {MANIFEST})")
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedcbirError(f"bundle manifest {mpath} is damaged: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FedcbirError(f"{mpath} is not a fedcbir bundle manifest")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FedcbirError(f"bundle {path} has manifest schema version {version!r}; "
                           f"this fedcbir reads version {SCHEMA_VERSION}")
    _validate(doc, mpath)
    return doc


def _validate(doc: dict, mpath: Path) -> None:
    def bad(msg):
        raise FedcbirError(f"bundle manifest {mpath} is invalid: {msg}")

    for key in ("architecture", "preprocessing", "input", "embedding", "files"):
        if not isinstance(doc.get(key), dict):
            bad(f"'{key}' must be an object")
    try:
        size, dim = int(doc["input"]["size"]), int(doc["embedding"]["dim"])
    except (KeyError, TypeError, ValueError):
        bad("'input.size' and 'embedding.dim' must be integers")
    if size <= 0 or dim <= 0:
        bad("'input.size' and 'embedding.dim' must be positive")
    if not doc["files"]:
        bad("no files listed")
    for name, info in doc["files"].items():
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
            bad(f"file name {name!r} is not a plain file name")
        if not isinstance(info, dict) or any(k not in info for k in _FILE_KEYS):
            bad(f"file {name}: needs {', '.join(_FILE_KEYS)}")
        if not isinstance(info["bytes"], int) or not isinstance(info["sha256"], str):
            bad(f"file {name}: 'bytes' must be an integer and 'sha256' a string")
        if info["role"] == "model":
            if info["format"] not in RUNTIMES or info["precision"] not in PRECISIONS:
                bad(f"file {name}: unknown format/precision {info['format']}/{info['precision']}")
            inp = info.get("input")
            if not isinstance(inp, dict) or inp.get("layout") not in ("NHWC", "NCHW"):
                bad(f"file {name}: 'input.layout' must be NHWC or NCHW")


def open_bundle(path: str | os.PathLike, check: str = "all") -> Bundle:
    """Open a bundle folder. ``check="all"`` verifies presence, size and sha256 of every
    listed file now; ``"lazy"`` only when ``load_embedder`` opens a file."""
    if check not in ("all", "lazy"):
        raise ValueError("check must be 'all' or 'lazy'")
    path = Path(path)
    bundle = Bundle(path, read_manifest(path))
    if check == "all":
        for name in bundle.files:
            bundle.check_file(name)
    return bundle


# ------------------------------------------------------------------------------ embedders
class Embedder:
    """One bundle file loaded in its runtime. ``embed`` takes normalised float32 NHWC."""

    runtime = ""

    def __init__(self, bundle: Bundle, name: str, threads: int, reference_kernels: bool = False):
        self.bundle = bundle
        self.reference_kernels = bool(reference_kernels)
        self.name = name
        self.info = bundle.files[name]
        self.precision = self.info["precision"]
        self.layout = self.info["input"]["layout"]
        self.threads = int(threads)
        self.input_size = bundle.input_size
        self.dim = bundle.dim
        shape = self.info["input"].get("shape") or []
        fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        self.max_batch = self.info["input"].get("max_batch") or fixed
        self.runtime_version: str | None = None
        self._pre = None

    # subclasses: run one chunk (already in the file's layout) -> [n, D]
    def _run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def embed(self, x: np.ndarray) -> np.ndarray:
        """float32 NHWC ``[N, S, S, 3]`` (normalised as the manifest says) -> ``[N, D]``."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        s = self.input_size
        if x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise FedcbirError(f"{self.name} expects NHWC images of shape [N, {s}, {s}, 3], "
                               f"got {list(x.shape)}")
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x)
        step = self.max_batch or len(x)
        outs = [self._run(x[i:i + step]) for i in range(0, len(x), step)]
        out = np.concatenate(outs, axis=0).astype(np.float32, copy=False)
        if out.shape != (len(x), self.dim):
            raise FedcbirError(f"{self.name} returned shape {list(out.shape)}, "
                               f"expected [{len(x)}, {self.dim}]")
        return out

    def embed_images(self, images: Iterable[Any], batch_size: int = 32,
                     normalize: bool = False) -> np.ndarray:
        """Paths, file bytes or PIL images -> ``[N, D]`` (the manifest's preprocessing:
        resize policy, mean/std). ``normalize=True`` returns L2-normalised rows."""
        from PIL import Image

        from catalog.images import load_image, normalize as norm, to_uint8

        if self._pre is None:
            self._pre = self.bundle.preprocess
        pre = self._pre
        batch: list[np.ndarray] = []
        outs: list[np.ndarray] = []
        for item in images:
            img = item if isinstance(item, Image.Image) else load_image(item)
            batch.append(to_uint8(img, pre))
            if len(batch) >= max(1, int(batch_size)):
                outs.append(self.embed(norm(np.stack(batch), pre)))
                batch = []
        if batch:
            outs.append(self.embed(norm(np.stack(batch), pre)))
        out = np.concatenate(outs, axis=0) if outs else np.zeros((0, self.dim), np.float32)
        return l2_normalize(out) if normalize else out

    def describe(self) -> dict[str, Any]:
        return {"file": self.name, "runtime": self.runtime,
                "runtime_package": self.info["runtime"]["package"],
                "runtime_version": self.runtime_version, "precision": self.precision,
                "format": self.info["format"], "layout": self.layout,
                "input_shape": self.info["input"].get("shape"), "max_batch": self.max_batch,
                "input_size": self.input_size, "dim": self.dim, "threads": self.threads,
                "bytes": self.info["bytes"], "sha256": self.info["sha256"],
                "source": self.info.get("source"), "kernels": "reference" if self.reference_kernels else "fast",
                "normalization": self.bundle.manifest["embedding"].get("normalization")}


def _require(info: dict, name: str) -> str:
    """Installed version of the file's runtime package; refuse one older than the manifest's
    minimum (a runtime must not be older than the exporter that wrote the file)."""
    rt = info["runtime"]
    pkg, minimum = rt["package"], rt.get("min_version")
    have = dist_version(pkg)
    if have is None:
        raise FedcbirError(f"{name} needs the {pkg} package (pip install {pkg}), which is not installed")
    if minimum and not version_at_least(have, minimum):
        raise FedcbirError(f"{name} needs {pkg} >= {minimum} (it was written by newer exporters); "
                           f"installed: {have}")
    return have


class LiteRTEmbedder(Embedder):
    """LiteRT; ``reference_kernels=True``: its reference op kernels (no XNNPACK), the
    file's function without the CPU-specific fast kernels."""

    runtime = "litert"

    def __init__(self, bundle, name, threads, reference_kernels=False):
        super().__init__(bundle, name, threads, reference_kernels)
        kw = {}
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType

            self.runtime_version = _require(self.info, name)
            self.package = "ai-edge-litert"
            if self.reference_kernels:
                kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_REF
        except ImportError:
            try:  # optional fallback (old wheels may not load every op version)
                from tflite_runtime.interpreter import Interpreter  # type: ignore
            except ImportError:
                raise FedcbirError(f"{name} needs ai-edge-litert (pip install ai-edge-litert)") from None
            if self.reference_kernels:
                raise FedcbirError(f"{name}: reference kernels need ai-edge-litert") from None
            self.package = "tflite-runtime"
            self.runtime_version = dist_version("tflite-runtime")
        try:
            self.interp = Interpreter(model_path=str(bundle.file_path(name)), num_threads=self.threads, **kw)
        except (ValueError, RuntimeError) as exc:
            raise FedcbirError(f"{name} cannot be loaded by LiteRT: {' '.join(str(exc).split())}") from None
        d = self.interp.get_input_details()[0]
        self._in = d["index"]
        self._out = self.interp.get_output_details()[0]["index"]
        sig = [int(v) for v in d.get("shape_signature", d["shape"])]
        if sig[1:] != [self.input_size, self.input_size, 3]:
            raise FedcbirError(f"{name} has input shape {sig}, expected NHWC "
                               f"[N, {self.input_size}, {self.input_size}, 3]")
        self.dynamic = sig[0] == -1
        if not self.dynamic:
            self.max_batch = int(sig[0])
        self._batch = None

    def _run(self, x):
        n = len(x)
        if n != self._batch:
            if self.dynamic:
                self.interp.resize_tensor_input(self._in, [n, *x.shape[1:]], strict=False)
            self.interp.allocate_tensors()
            self._batch = n
        self.interp.set_tensor(self._in, x)
        self.interp.invoke()
        return self.interp.get_tensor(self._out).copy()

    def describe(self):
        return {**super().describe(), "runtime_package": self.package,
                "delegate": None if self.reference_kernels else "XNNPACK (LiteRT default CPU delegate)"}


class OnnxEmbedder(Embedder):
    """ONNX Runtime (CPU); ``reference_kernels=True``: graph optimizations off, so a QDQ int8
    file runs as DequantizeLinear -> float op -> QuantizeLinear (its exact quantized
    function) instead of the fused integer kernels (QLinearConv, ...) chosen for this CPU."""

    runtime = "onnx"

    def __init__(self, bundle, name, threads, reference_kernels=False):
        super().__init__(bundle, name, threads, reference_kernels)
        self.runtime_version = _require(self.info, name)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if self.reference_kernels
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(bundle.file_path(name)), so,
                                             providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise FedcbirError(f"{name} cannot be loaded by ONNX Runtime: "
                               f"{' '.join(str(exc).split())[:300]}") from None
        self._in = self.sess.get_inputs()[0].name

    def _run(self, x):
        return self.sess.run(None, {self._in: x})[0]

    def describe(self):
        return {**super().describe(), "execution_provider": "CPUExecutionProvider"}


class PteEmbedder(Embedder):
    """ExecuTorch (XNNPACK delegate). Its Python runtime imports torch."""

    runtime = "pte"

    def __init__(self, bundle, name, threads, reference_kernels=False):
        if reference_kernels:
            raise FedcbirError(f"{name}: ExecuTorch's runtime has no reference kernels to compare with")
        super().__init__(bundle, name, threads)
        self.runtime_version = _require(self.info, name)
        import torch  # noqa: F401  (executorch.runtime needs it anyway)
        from executorch.runtime import Runtime

        try:  # the XNNPACK thread pool is process-wide
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(self.threads)
        except Exception:  # pragma: no cover - experimental API
            pass
        try:
            program = Runtime.get().load_program(Path(bundle.file_path(name)))
            self.method = program.load_method("forward")
        except Exception as exc:
            raise FedcbirError(f"{name} cannot be loaded by ExecuTorch: "
                               f"{' '.join(str(exc).split())[:300]}") from None
        if self.method is None:
            raise FedcbirError(f"{name} has no 'forward' method")
        self._torch = torch

    def _run(self, x):
        out = self.method.execute((self._torch.from_numpy(x),))[0]
        return out.numpy().copy()

    def describe(self):
        return {**super().describe(), "delegate": "XNNPACK", "needs": "torch (executorch Python runtime)"}


_EMBEDDERS = {"litert": LiteRTEmbedder, "onnx": OnnxEmbedder, "pte": PteEmbedder}


def load_embedder(bundle: Bundle | str | os.PathLike, runtime: str = "litert",
                  precision: str = "fp32", threads: int = 1, file: str | None = None,
                  reference_kernels: bool = False) -> Embedder:
    """Load the bundle file for ``runtime`` x ``precision`` (or the named ``file``).

    ``reference_kernels=True`` (checks, not devices): the runtime's plain reference kernels
    instead of the fast CPU-specific ones (ONNX Runtime: graph optimizations off; LiteRT:
    built-in reference ops, no XNNPACK; ExecuTorch has none: FedcbirError)."""
    if not isinstance(bundle, Bundle):
        bundle = open_bundle(bundle, check="lazy")
    if file is not None:
        if file not in bundle.files or bundle.files[file].get("role") != "model":
            raise FedcbirError(f"bundle {bundle.path} has no model file {file!r}")
        runtime = RUNTIMES[bundle.files[file]["format"]][0]
        name = file
    else:
        name = bundle.find(runtime, precision)
    if int(threads) < 1:
        raise FedcbirError("threads must be >= 1")
    bundle.check_file(name)
    return _EMBEDDERS[runtime](bundle, name, int(threads), reference_kernels=bool(reference_kernels))


def available(bundle: Bundle) -> list[dict[str, str]]:
    return [{"runtime": rt, "precision": p, "file": n} for rt, p, n in bundle.models()]


__all__ = ["Bundle", "Embedder", "open_bundle", "read_manifest", "load_embedder", "l2_normalize",
           "available", "RUNTIME_NAMES"]

