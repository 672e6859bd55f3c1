"""The encoder architecture as data.

One ``ArchSpec`` describes the network; ``resolve(spec)`` walks it once into concrete
layers (channels after the width multiplier, spatial sizes, which blocks have an
expansion, squeeze-excite, residual).  The PyTorch, Keras and Flax builders all walk
that same resolved list, and ``models.canonical`` derives the parameter names from it,
so the three frameworks cannot disagree about the structure.

The network is MobileNetV3-Small-style::

    stem     conv 3x3 s2 (symmetric padding) + BN + hard-swish
    blocks   inverted residuals: [1x1 expand + BN + act] -> depthwise kxk (stride s) + BN + act
             -> [squeeze-excite: avg-pool, 1x1 conv + ReLU, 1x1 conv + hard-sigmoid, scale]
             -> 1x1 project + BN  (+ input when stride 1 and channels unchanged)
    head     conv 1x1 + BN + hard-swish
    pool     adaptive average pool to 1x1 + flatten            -> "features"
    proj     linear -> embedding (default 128-d, NOT normalised; L2 happens outside the graph)
    type     optional linear product-type head on the embedding or on the features

Padding is always ``k // 2`` on every side (never TF/Flax 'SAME', which pads stride-2
convolutions asymmetrically).  BN ``eps``/``momentum`` use the PyTorch convention
(``running = (1 - momentum) * running + momentum * batch``).

This module imports only the standard library.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedcbir.errors import FedcbirError

ACTIVATIONS = ("relu", "hswish")
TYPE_HEAD_INPUTS = ("embedding", "features")


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual block, channels before the width multiplier."""

    kernel: int  # depthwise kernel size (3 or 5)
    expand: int  # expanded (hidden) channels
    out: int  # output channels
    se: bool  # squeeze-excite after the depthwise conv
    act: str  # "relu" | "hswish"
    stride: int  # depthwise stride (1 or 2)

    def to_list(self) -> list:
        return [self.kernel, self.expand, self.out, self.se, self.act, self.stride]

    @classmethod
    def from_list(cls, row) -> "BlockSpec":
        if isinstance(row, dict):
            return cls(**row)
        k, e, o, se, act, s = row
        return cls(int(k), int(e), int(o), bool(se), str(act), int(s))


# MobileNetV3-Small (Howard et al. 2019, table 2): kernel, expand, out, SE, activation, stride.
MOBILENET_V3_SMALL: tuple[BlockSpec, ...] = tuple(
    BlockSpec(*row)
    for row in [
        (3, 16, 16, True, "relu", 2),
        (3, 72, 24, False, "relu", 2),
        (3, 88, 24, False, "relu", 1),
        (5, 96, 40, True, "hswish", 2),
        (5, 240, 40, True, "hswish", 1),
        (5, 240, 40, True, "hswish", 1),
        (5, 120, 48, True, "hswish", 1),
        (5, 144, 48, True, "hswish", 1),
        (5, 288, 96, True, "hswish", 2),
        (5, 576, 96, True, "hswish", 1),
        (5, 576, 96, True, "hswish", 1),
    ]
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


@dataclass(frozen=True)
class ArchSpec:
    """Everything that determines the encoder's parameters and function."""

    width: float = 1.0
    input_size: int = 96
    embedding_dim: int = 128
    num_types: int = 0  # > 0 adds the product-type head
    type_head_input: str = "embedding"  # "embedding" | "features"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.1  # PyTorch convention
    stem_channels: int = 16
    head_channels: int = 576
    se_ratio: float = 0.25
    blocks: tuple[BlockSpec, ...] = field(default=MOBILENET_V3_SMALL)
    name: str = "mobilenetv3-small"

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(
            b if isinstance(b, BlockSpec) else BlockSpec.from_list(b) for b in self.blocks))
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise FedcbirError(f"invalid architecture spec: {msg}")

        if not (0.1 <= float(self.width) <= 4.0):
            bad(f"width {self.width} outside [0.1, 4]")
        if not (32 <= int(self.input_size) <= 1024):
            bad(f"input_size {self.input_size} outside [32, 1024]")
        if not (1 <= int(self.embedding_dim) <= 4096):
            bad(f"embedding_dim {self.embedding_dim} outside [1, 4096]")
        if int(self.num_types) < 0:
            bad("num_types must be >= 0")
        if self.type_head_input not in TYPE_HEAD_INPUTS:
            bad(f"type_head_input must be one of {TYPE_HEAD_INPUTS}")
        if not (0 < float(self.bn_eps) < 1):
            bad("bn_eps must be in (0, 1)")
        if not (0 < float(self.bn_momentum) <= 1):
            bad("bn_momentum must be in (0, 1]")
        if not self.blocks:
            bad("at least one block is needed")
        for i, b in enumerate(self.blocks):
            if b.kernel not in (1, 3, 5, 7) or b.stride not in (1, 2) or b.act not in ACTIVATIONS:
                bad(f"block {i}: kernel must be 1/3/5/7, stride 1/2, act one of {ACTIVATIONS}")
            if b.expand < 1 or b.out < 1:
                bad(f"block {i}: channels must be positive")

    # -- serialisation (goes into checkpoints and bundle manifests) --
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks"] = [b.to_list() for b in self.blocks]
        d["width"] = float(self.width)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchSpec":
        if not isinstance(d, dict):
            raise FedcbirError("architecture spec must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FedcbirError(f"unknown architecture spec keys: {', '.join(unknown)}")
        kw = dict(d)
        if "blocks" in kw:
            try:
                kw["blocks"] = tuple(BlockSpec.from_list(r) for r in kw["blocks"])
            except (TypeError, ValueError) as exc:
                raise FedcbirError(f"bad block list in architecture spec: {exc}") from None
        return cls(**kw)

    def replace(self, **kw) -> "ArchSpec":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------------------
# The walk: concrete layers every builder follows.
# ---------------------------------------------------------------------------------------

def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output size of a convolution with symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1


@dataclass(frozen=True)
class ConvLayer:
    """conv (no bias) + BN + optional activation; ``depthwise`` means groups = channels."""

    name: str  # canonical module prefix, e.g. "blocks.3.dw"
    cin: int
    cout: int
    kernel: int
    stride: int
    depthwise: bool
    act: str | None  # None | "relu" | "hswish"
    in_hw: int
    out_hw: int

    @property
    def pad(self) -> int:
        return self.kernel // 2


@dataclass(frozen=True)
class SELayer:
    name: str  # "blocks.i.se"
    channels: int
    squeeze: int
    hw: int


@dataclass(frozen=True)
class Block:
    index: int
    expand: ConvLayer | None
    dw: ConvLayer
    se: SELayer | None
    project: ConvLayer
    residual: bool


@dataclass(frozen=True)
class Resolved:
    spec: ArchSpec
    stem: ConvLayer
    blocks: tuple[Block, ...]
    head: ConvLayer
    feature_dim: int
    feature_hw: int
    embedding_dim: int
    num_types: int
    type_in: int  # input width of the type head (0 when absent)


def resolve(spec: ArchSpec) -> Resolved:
    """Walk the spec into concrete layers (channels, strides, spatial sizes)."""
    w = float(spec.width)
    hw = int(spec.input_size)
    cin = 3
    c_stem = make_divisible(spec.stem_channels * w)
    stem = ConvLayer("stem", cin, c_stem, 3, 2, False, "hswish", hw, conv_out(hw, 3, 2))
    hw, cin = stem.out_hw, c_stem
    blocks = []
    for i, b in enumerate(spec.blocks):
        cexp = make_divisible(b.expand * w)
        cout = make_divisible(b.out * w)
        pre = f"blocks.{i}"
        expand = None
        if cexp != cin:
            expand = ConvLayer(f"{pre}.expand", cin, cexp, 1, 1, False, b.act, hw, hw)
        out_hw = conv_out(hw, b.kernel, b.stride)
        dw = ConvLayer(f"{pre}.dw", cexp, cexp, b.kernel, b.stride, True, b.act, hw, out_hw)
        se = None
        if b.se:
            se = SELayer(f"{pre}.se", cexp, make_divisible(cexp * spec.se_ratio), out_hw)
        project = ConvLayer(f"{pre}.project", cexp, cout, 1, 1, False, None, out_hw, out_hw)
        blocks.append(Block(i, expand, dw, se, project, b.stride == 1 and cin == cout))
        hw, cin = out_hw, cout
    c_head = make_divisible(spec.head_channels * w)
    head = ConvLayer("head", cin, c_head, 1, 1, False, "hswish", hw, hw)
    type_in = 0
    if spec.num_types > 0:
        type_in = spec.embedding_dim if spec.type_head_input == "embedding" else c_head
    return Resolved(spec, stem, tuple(blocks), head, c_head, hw, int(spec.embedding_dim),
                    int(spec.num_types), type_in)


def conv_layers(r: Resolved) -> list[ConvLayer]:
    """All conv+BN layers in forward order."""
    out = [r.stem]
    for b in r.blocks:
        if b.expand is not None:
            out.append(b.expand)
        out.append(b.dw)
        out.append(b.project)
    out.append(r.head)
    return out


# ---------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------

def flops(spec: ArchSpec, batch: int = 1) -> int:
    """Forward FLOPs = 2 x multiply-adds of every conv and linear layer, from the spec.

    Counted: all convolutions (stem, expand, depthwise, project, head), the two
    squeeze-excite 1x1 convs (on 1x1 maps), the projection and the type head.
    Not counted (they are a few percent): BN, activations, the SE scaling, pooling,
    residual adds, the loss.

    Training: the backward pass of a conv/linear layer costs two products of the same
    size as its forward (gradient w.r.t. the input and w.r.t. the weights), so one
    training step is taken as ``3 * flops(spec, batch)`` when GFLOP/s is reported.
    """
    r = resolve(spec)
    macs = 0
    for c in conv_layers(r):
        per_out = c.kernel * c.kernel * (1 if c.depthwise else c.cin)
        macs += c.out_hw * c.out_hw * c.cout * per_out
    for b in r.blocks:
        if b.se is not None:
            macs += 2 * b.se.channels * b.se.squeeze
    macs += r.feature_dim * r.embedding_dim
    if r.num_types:
        macs += r.type_in * r.num_types
    return 2 * macs * int(batch)


def train_flops(spec: ArchSpec, batch: int = 1) -> int:
    """FLOPs of one training step (forward + backward ~= 3 x forward, see ``flops``)."""
    return 3 * flops(spec, batch)
