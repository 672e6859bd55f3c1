"""PyTorch builder: the reference implementation (canonical names = its state_dict).

``Encoder.forward`` maps NCHW images to the un-normalised embedding and ends at the
projection (adaptive average pool + flatten + linear): that is the graph exported to
ONNX / ExecuTorch.  ``forward_train`` also returns the product-type logits.

Inputs arrive as numpy float32 NHWC; ``to_input`` views them as NCHW with channels-last
strides (no copy).  The model runs channels-last by default (measured 2x faster than
NCHW-contiguous for the depthwise convolutions on this CPU); ``memory_format=
"contiguous"`` selects the NCHW path.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import canonical
from models.losses import torch_loss
from models.optim import torch_optimizer
from models.spec import ArchSpec, ConvLayer, SELayer, resolve
from models.trainer import Trainer

MEMORY_FORMATS = ("channels_last", "contiguous")


def _act(name):
    if name is None:
        return nn.Identity()
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}[name]()


class ConvBN(nn.Module):
    def __init__(self, c: ConvLayer, eps: float, momentum: float):
        super().__init__()
        # symmetric padding inside the convolution; an asymmetric one ('SAME' at stride 2)
        # as an explicit zero pad (left, right, top, bottom) before a VALID convolution
        self.pad = None if c.symmetric else (c.pad_lo, c.pad_hi, c.pad_lo, c.pad_hi)
        self.conv = nn.Conv2d(c.cin, c.cout, c.kernel, c.stride, c.pad_lo if c.symmetric else 0,
                              groups=c.cin if c.depthwise else 1, bias=False)
        self.bn = nn.BatchNorm2d(c.cout, eps=eps, momentum=momentum)
        self.act = _act(c.act)

    def forward(self, x):
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, s: SELayer):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(s.channels, s.squeeze, 1, bias=True)
        self.fc2 = nn.Conv2d(s.squeeze, s.channels, 1, bias=True)

    def forward(self, x):
        s = F.relu(self.fc1(self.pool(x)))
        return x * F.hardsigmoid(self.fc2(s))


class InvertedResidual(nn.Module):
    def __init__(self, b, eps, momentum):
        super().__init__()
        # registration order = canonical order: expand, dw, se, project
        if b.expand is not None:
            self.expand = ConvBN(b.expand, eps, momentum)
        self.dw = ConvBN(b.dw, eps, momentum)
        if b.se is not None:
            self.se = SqueezeExcite(b.se)
        self.project = ConvBN(b.project, eps, momentum)
        self.residual = b.residual
        self.has_expand = b.expand is not None
        self.has_se = b.se is not None

    def forward(self, x):
        y = self.expand(x) if self.has_expand else x
        y = self.dw(y)
        if self.has_se:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class Encoder(nn.Module):
    """NCHW float32 -> embedding [N, D] (un-normalised)."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        r = resolve(spec)
        self.spec = spec
        eps, mom = spec.bn_eps, spec.bn_momentum
        self.stem = ConvBN(r.stem, eps, mom)
        self.blocks = nn.ModuleList([InvertedResidual(b, eps, mom) for b in r.blocks])
        self.head = ConvBN(r.head, eps, mom)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(r.feature_dim, r.embedding_dim)
        self.type_on_features = spec.type_head_input == "features"
        self.type_head = nn.Linear(r.type_in, r.num_types) if r.num_types else None

    def trunk(self, x, k: int):
        """Images -> the tensor entering block ``k`` (stem + blocks[:k])."""
        x = self.stem(x)
        for b in self.blocks[:k]:
            x = b(x)
        return x

    def top_features(self, x, k: int = 0):
        """From block ``k`` on (``k = 0``: from the images, stem included) to the pooled features."""
        if k == 0:
            x = self.stem(x)
        for b in self.blocks[k:]:
            x = b(x)
        return torch.flatten(self.pool(self.head(x)), 1)

    def features(self, x):
        return self.top_features(x, 0)

    def forward(self, x):
        return self.proj(self.features(x))

    def frozen_modules(self, k: int) -> list[nn.Module]:
        """The modules that stay frozen (inference mode, no gradient) when training from block k."""
        return [] if k == 0 else [self.stem, *self.blocks[:k]]

    def forward_train(self, x, k: int = 0):
        f = self.top_features(x, k)
        e = self.proj(f)
        logits = None
        if self.type_head is not None:
            logits = self.type_head(f if self.type_on_features else e)
        return e, logits


def build(spec: ArchSpec, weights=None, memory_format: str = "channels_last") -> Encoder:
    """Build the encoder (eval mode); load canonical ``weights`` when given."""
    model = Encoder(spec)
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if weights is not None:
        load_canonical(model, weights)
    return model.eval()


def load_canonical(model: Encoder, weights) -> None:
    sd = model.state_dict()
    with torch.no_grad():
        for name in canonical.param_names(model.spec):
            sd[name].copy_(torch.from_numpy(np.asarray(weights[name], np.float32)))
        for name, t in sd.items():
            if name.endswith("num_batches_tracked"):
                t.zero_()


def to_canonical(model: Encoder) -> dict[str, np.ndarray]:
    sd = model.state_dict()
    return {n: sd[n].detach().contiguous().cpu().numpy().astype(np.float32, copy=True)
            for n in canonical.param_names(model.spec)}


def to_input(x: np.ndarray, memory_format: str = "channels_last") -> torch.Tensor:
    """numpy NHWC float32 -> torch NCHW (a channels-last view, or an NCHW copy)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(0, 3, 1, 2)
    return t if memory_format == "channels_last" else t.contiguous()


class TorchTrainer(Trainer):
    framework = "torch"

    def __init__(self, spec: ArchSpec, cfg, memory_format: str = "channels_last"):
        super().__init__(spec, cfg)
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}")
        torch.manual_seed(cfg.seed)
        self.memory_format = memory_format
        self.model = build(spec, memory_format=memory_format)
        k = self.train_from
        frozen = {id(m) for f in self.model.frozen_modules(k) for m in f.modules()}
        self.frozen_modules = self.model.frozen_modules(k)
        self.bns = [m for m in self.model.modules()
                    if isinstance(m, nn.BatchNorm2d) and id(m) not in frozen]
        self.tnames = canonical.trainable_names(spec, k)
        params = dict(self.model.named_parameters())
        self.tparams = [params[n] for n in self.tnames]
        keep = set(self.tnames)
        for n, p in params.items():
            p.requires_grad_(n in keep)
        self.anchor = None
        self.opt = None

    def describe(self):
        return {"framework": "torch", "version": torch.__version__,
                "memory_format": self.memory_format,
                "depthwise": f"torch.nn.Conv2d(groups=C), {self.memory_format}"}

    def _load(self, weights):
        load_canonical(self.model, weights)

    def _dump(self):
        return to_canonical(self.model)

    def _reset_optimizer(self):
        self.opt = torch_optimizer(self.cfg.optim, list(zip(self.tnames, self.tparams)),
                                   canonical.decay_names(self.spec, self.train_from))

    def _set_anchor(self, weights):
        self.anchor = [torch.from_numpy(weights[n].copy()) for n in self.tnames]

    @torch.no_grad()
    def _embed_batch(self, x):
        self.model.eval()
        return self.model(to_input(x, self.memory_format)).numpy()

    @torch.no_grad()
    def _trunk_batch(self, x):
        self.model.eval()
        h = self.model.trunk(to_input(x, self.memory_format), self.train_from)
        return h.permute(0, 2, 3, 1).contiguous().numpy()  # NHWC

    def _train_mode(self):
        self.model.train()
        for f in self.frozen_modules:
            f.eval()

    def _train_step(self, x, labels, types):
        m = self.model
        self._train_mode()
        for bn in self.bns:
            bn.momentum = self.spec.bn_momentum
        emb, logits = m.forward_train(to_input(x, self.memory_format), self.train_from)
        total, sup, ce = torch_loss(emb, torch.from_numpy(labels.astype(np.int64)),
                                    torch.from_numpy(types.astype(np.int64)), logits,
                                    self.cfg.temperature, self.cfg.type_weight)
        if self.cfg.prox_mu > 0:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(self.tparams, self.anchor))
            total = total + 0.5 * self.cfg.prox_mu * prox
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        m.eval()
        return float(total.detach()), float(sup.detach()), float(ce.detach())

    @torch.no_grad()
    def _bn_step(self, x, momentum):
        m = self.model
        self._train_mode()
        for bn in self.bns:
            bn.momentum = momentum
        m.top_features(to_input(x, self.memory_format), self.train_from)
        for bn in self.bns:
            bn.momentum = self.spec.bn_momentum
        m.eval()
