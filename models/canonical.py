"""Canonical parameter names and layout, shared by every framework.

Canonical = the PyTorch ``state_dict`` of ``models.torch_model.Encoder`` (names, order,
layouts: conv ``OIHW``, depthwise ``[C, 1, kh, kw]``, linear ``[out, in]``) minus
``num_batches_tracked``.  The list is derived here from the spec walk, without torch;
a test checks it equals the torch ``state_dict`` keys in order.

Kinds (how each framework converts a tensor):
    conv      OIHW full convolution weight (also the 1x1 squeeze-excite convs)
    dwconv    [C, 1, kh, kw] depthwise weight
    linear    [out, in]
    bias      [out] (squeeze-excite convs, linear layers)
    bn_weight, bn_bias            BN affine (trainable)
    bn_mean, bn_var               BN running statistics (not trainable)

Initialisation is done once, here, in numpy (seeded per name), and loaded into every
framework: the frameworks' default initialisers differ.
"""
from __future__ import annotations

import hashlib

import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from common.errors import FedcbirError
from models.spec import ArchSpec, ConvLayer, resolve

BN_STATS = ("running_mean", "running_var")


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    kind: str

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[1]

    @property
    def trainable(self) -> bool:
        return self.kind not in ("bn_mean", "bn_var")


def _conv_entries(c: ConvLayer) -> list[ParamEntry]:
    if c.depthwise:
        w = ParamEntry(f"{c.name}.conv.weight", (c.cout, 1, c.kernel, c.kernel), "dwconv")
    else:
        w = ParamEntry(f"{c.name}.conv.weight", (c.cout, c.cin, c.kernel, c.kernel), "conv")
    bn = f"{c.name}.bn"
    return [
        w,
        ParamEntry(f"{bn}.weight", (c.cout,), "bn_weight"),
        ParamEntry(f"{bn}.bias", (c.cout,), "bn_bias"),
        ParamEntry(f"{bn}.running_mean", (c.cout,), "bn_mean"),
        ParamEntry(f"{bn}.running_var", (c.cout,), "bn_var"),
    ]


_ENTRY_CACHE: dict[ArchSpec, tuple[ParamEntry, ...]] = {}


def entries(spec: ArchSpec) -> tuple[ParamEntry, ...]:
    """All canonical tensors in ``state_dict`` order."""
    hit = _ENTRY_CACHE.get(spec)
    if hit is not None:
        return hit
    r = resolve(spec)
    out = _conv_entries(r.stem)
    for b in r.blocks:
        if b.expand is not None:
            out += _conv_entries(b.expand)
        out += _conv_entries(b.dw)
        if b.se is not None:
            s = b.se
            out += [
                ParamEntry(f"{s.name}.fc1.weight", (s.squeeze, s.channels, 1, 1), "conv"),
                ParamEntry(f"{s.name}.fc1.bias", (s.squeeze,), "bias"),
                ParamEntry(f"{s.name}.fc2.weight", (s.channels, s.squeeze, 1, 1), "conv"),
                ParamEntry(f"{s.name}.fc2.bias", (s.channels,), "bias"),
            ]
        out += _conv_entries(b.project)
    out += _conv_entries(r.head)
    out += [
        ParamEntry("proj.weight", (r.embedding_dim, r.feature_dim), "linear"),
        ParamEntry("proj.bias", (r.embedding_dim,), "bias"),
    ]
    if r.num_types:
        out += [
            ParamEntry("type_head.weight", (r.num_types, r.type_in), "linear"),
            ParamEntry("type_head.bias", (r.num_types,), "bias"),
        ]
    result = tuple(out)
    _ENTRY_CACHE[spec] = result
    return result


def param_names(spec: ArchSpec) -> list[str]:
    return [e.name for e in entries(spec)]


def param_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    return {e.name: e.shape for e in entries(spec)}


def param_kinds(spec: ArchSpec) -> dict[str, str]:
    return {e.name: e.kind for e in entries(spec)}


def is_bn_stat(name: str) -> bool:
    """BN running statistics (not trainable, updated by train-mode forwards)."""
    return name.endswith(".bn.running_mean") or name.endswith(".bn.running_var")


def is_bn_param(name: str) -> bool:
    """BN affine parameters (gamma = ``.bn.weight``, beta = ``.bn.bias``)."""
    return name.endswith(".bn.weight") or name.endswith(".bn.bias")


def is_bn(name: str) -> bool:
    return is_bn_stat(name) or is_bn_param(name)


def in_trained_part(name: str, train_from: int = 0) -> bool:
    """Whether tensor ``name`` belongs to the part trained from block ``train_from`` on:
    blocks ``>= train_from``, the head, the projection and the type head; the stem only when
    ``train_from == 0`` (everything trained)."""
    if train_from <= 0:
        return True
    if name.startswith("stem."):
        return False
    if name.startswith("blocks."):
        return int(name.split(".", 2)[1]) >= train_from
    return True


def trained_part_names(spec: ArchSpec, train_from: int = 0) -> list[str]:
    """Every tensor of the trained part (BN running statistics included), canonical order."""
    return [e.name for e in entries(spec) if in_trained_part(e.name, train_from)]


def frozen_names(spec: ArchSpec, train_from: int = 0) -> list[str]:
    return [e.name for e in entries(spec) if not in_trained_part(e.name, train_from)]


def trainable_names(spec: ArchSpec, train_from: int = 0) -> list[str]:
    return [e.name for e in entries(spec) if e.trainable and in_trained_part(e.name, train_from)]


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """The one weight-decay rule: conv/linear weights (``.weight`` with ndim > 1)."""
    return name.endswith(".weight") and len(shape) > 1


def decay_names(spec: ArchSpec, train_from: int = 0) -> list[str]:
    return [e.name for e in entries(spec)
            if e.trainable and decays(e.name, e.shape) and in_trained_part(e.name, train_from)]


def num_params(spec: ArchSpec, trainable_only: bool = True) -> int:
    return int(sum(int(np.prod(e.shape)) for e in entries(spec)
                   if e.trainable or not trainable_only))


def seeded_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def frozen_digest(weights: Mapping[str, np.ndarray], names) -> str:
    """sha256 over the named tensors (name, shape, bytes): what a device and the server
    compare so that both hold the same frozen part."""
    h = hashlib.sha256()
    for n in names:
        a = np.ascontiguousarray(weights[n], dtype=np.float32)
        h.update(n.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def validate_weights(spec: ArchSpec, weights: Mapping[str, np.ndarray],
                     *, check_finite: bool = True) -> None:
    """Raise FedcbirError naming the first tensor that is missing, extra, mis-shaped,
    not float32 or not finite."""
    if not isinstance(weights, Mapping):
        raise FedcbirError("weights must be a mapping of canonical name -> array")
    ents = entries(spec)
    expected = {e.name for e in ents}
    for e in ents:
        if e.name not in weights:
            raise FedcbirError(f"weights: missing tensor '{e.name}'")
    for name in weights:
        if name not in expected:
            raise FedcbirError(f"weights: unexpected tensor '{name}' (not in this architecture)")
    for e in ents:
        a = weights[e.name]
        shape = tuple(getattr(a, "shape", ()))
        if shape != e.shape:
            raise FedcbirError(f"weights: '{e.name}' has shape {shape}, expected {e.shape}")
        dtype = getattr(a, "dtype", None)
        if dtype != np.float32:
            raise FedcbirError(f"weights: '{e.name}' has dtype {dtype}, expected float32")
        if check_finite and not np.all(np.isfinite(a)):
            raise FedcbirError(f"weights: '{e.name}' contains NaN or infinity")
        if e.kind == "bn_var" and np.any(np.asarray(a) < 0):
            raise FedcbirError(f"weights: '{e.name}' has negative variance")


def as_float32(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast (e.g. float64 from a FedAvg/FedAdam server) to contiguous float32 copies."""
    return {k: np.ascontiguousarray(np.asarray(v), dtype=np.float32) for k, v in weights.items()}


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    if set(a) != set(b):
        raise FedcbirError("cannot compare weights with different name sets")
    return float(max((np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))
                      if np.size(a[k]) else 0.0) for k in a))
