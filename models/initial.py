"""What a run starts from: ``init_weights(spec, seed)``, deterministic numpy weights in canonical
names (seeded random initialisation, then, for a pretrained spec, the ImageNet backbone from
``models.pretrained``).  Imports models.spec, models.canonical and models.pretrained only."""
from __future__ import annotations

import numpy as np

from models.canonical import entries, seeded_rng
from models.pretrained import apply
from models.spec import ArchSpec


def init_weights(spec: ArchSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic numpy initialisation (each tensor seeded by ``(seed, name)``).

    conv / dwconv: Kaiming normal, fan_out mode, ReLU gain: std = sqrt(2 / fan_out) with
    fan_out = (out_channels / groups) * kh * kw, i.e. kh * kw for a depthwise conv (each
    input channel feeds kh*kw outputs; PyTorch's shape-based fan_out would be C * kh * kw
    and shrinks depthwise outputs by ~C);
    linear: normal(0, 0.01) (as torchvision's MobileNetV3); biases 0; BN gamma 1, beta 0, running mean 0,
    running var 1.  A spec with ``pretrained = "imagenet"`` then takes its stem, blocks and
    head from ``models.pretrained`` and an orthogonal projection.
    """
    out: dict[str, np.ndarray] = {}
    for e in entries(spec):
        if e.kind in ("conv", "dwconv"):
            groups_out = 1 if e.kind == "dwconv" else e.shape[0]
            fan_out = groups_out * e.shape[2] * e.shape[3]
            a = seeded_rng(seed, e.name).standard_normal(e.shape) * np.sqrt(2.0 / fan_out)
        elif e.kind == "linear":
            a = seeded_rng(seed, e.name).standard_normal(e.shape) * 0.01
        elif e.kind in ("bn_weight", "bn_var"):
            a = np.ones(e.shape)
        else:  # bias, bn_bias, bn_mean
            a = np.zeros(e.shape)
        out[e.name] = np.ascontiguousarray(a, dtype=np.float32)
    if spec.pretrained:
        # the pretrained backbone replaces the random one; the projection gets orthonormal
        # rows (models.pretrained.apply)
        apply(spec, out, seed)
    return out
