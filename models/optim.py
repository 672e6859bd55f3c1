"""Optimizers, defined once (PyTorch's formulas) and implemented per framework.

Decay rule (one for all): only conv/linear weights decay (``canonical.decays``: names ending
in ``.weight`` with ndim > 1); biases and BN affine parameters do not.  BN running
statistics are not trainable.

SGD (``torch.optim.SGD``, dampening 0, no Nesterov; ``weight_decay`` is coupled L2)::

    g  = grad + wd * w                 (decaying tensors only)
    b  = momentum * b + g              (b starts at 0, so the first step b = g)
    w  = w - lr * b

AdamW (``torch.optim.AdamW``: decoupled decay, eps added AFTER bias correction)::

    w  = w * (1 - lr * wd)             (decaying tensors only)
    m  = b1 * m + (1 - b1) * g
    v  = b2 * v + (1 - b2) * g^2
    w  = w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Keras' built-in Adam/AdamW put eps before the bias correction (and default eps=1e-7), so
TensorFlow uses ``TFOptimizer`` below; PyTorch uses ``torch.optim`` and Flax uses optax,
whose formulas are the ones above (``optax.adamw`` with a decay mask; ``add_decayed_weights``
+ ``sgd(momentum)``) — checked by the parity tests.

Optimizer state is reset whenever a trainer receives new weights (``set_weights``),
i.e. once per federated round.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from common.errors import FedcbirError

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.name not in OPTIMIZERS:
            raise FedcbirError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if not (self.lr > 0):
            raise FedcbirError("learning rate must be > 0")
        if self.weight_decay < 0 or not (0 <= self.momentum < 1):
            raise FedcbirError("weight_decay must be >= 0 and momentum in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas) or self.eps <= 0:
            raise FedcbirError("betas must be two numbers in [0, 1) and eps > 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimConfig":
        return cls(**d)


# ---------------------------------------------------------------------------- PyTorch
def torch_optimizer(cfg: OptimConfig, named_params, decay_names):
    """torch.optim with two parameter groups (decay / no decay)."""
    import torch

    decay_names = set(decay_names)
    dec = [p for n, p in named_params if n in decay_names]
    nodec = [p for n, p in named_params if n not in decay_names]
    groups = [{"params": dec, "weight_decay": cfg.weight_decay},
              {"params": nodec, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=0.0,
                               nesterov=False)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, amsgrad=False)


# ---------------------------------------------------------------------------- optax
def optax_transform(cfg: OptimConfig, decay_mask):
    """optax chain with the formulas above; ``decay_mask`` is a pytree of bools."""
    import optax

    if cfg.name == "sgd":
        parts = []
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(cfg.lr, momentum=cfg.momentum if cfg.momentum > 0 else None,
                               nesterov=False))
        return optax.chain(*parts)
    return optax.adamw(cfg.lr, b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps, eps_root=0.0,
                       weight_decay=cfg.weight_decay, mask=decay_mask)


# ---------------------------------------------------------------------------- TensorFlow
class TFOptimizer:
    """SGD / AdamW with PyTorch's formulas on a fixed list of TF variables.

    ``apply(grads)`` is meant to run inside a ``tf.function``; ``reset()`` zeroes the
    state eagerly (new round).
    """

    def __init__(self, cfg: OptimConfig, variables, decay_flags):
        import tensorflow as tf

        self.cfg = cfg
        self.vars = list(variables)
        self.decay = [bool(f) for f in decay_flags]
        self.step = tf.Variable(0.0, dtype=tf.float32, trainable=False, name="opt_step")
        self.slots1 = []
        self.slots2 = []
        for v in self.vars:
            shape, dtype = v.shape, v.dtype
            self.slots1.append(tf.Variable(tf.zeros(shape, dtype), trainable=False))
            if cfg.name == "adamw":
                self.slots2.append(tf.Variable(tf.zeros(shape, dtype), trainable=False))

    def reset(self) -> None:
        import tensorflow as tf

        self.step.assign(0.0)
        for s in self.slots1 + self.slots2:
            s.assign(tf.zeros_like(s))

    def apply(self, grads) -> None:
        import tensorflow as tf

        c = self.cfg
        lr = tf.constant(c.lr, tf.float32)
        t = self.step.assign_add(1.0)
        if c.name == "sgd":
            for v, g, b, d in zip(self.vars, grads, self.slots1, self.decay):
                if d and c.weight_decay > 0:
                    g = g + c.weight_decay * v
                if c.momentum > 0:
                    g = b.assign(c.momentum * b + g)
                v.assign_sub(lr * g)
            return
        b1, b2 = c.betas
        bc1 = 1.0 - tf.pow(tf.constant(b1, tf.float32), t)
        bc2 = 1.0 - tf.pow(tf.constant(b2, tf.float32), t)
        for v, g, m, s, d in zip(self.vars, grads, self.slots1, self.slots2, self.decay):
            if d and c.weight_decay > 0:
                v.assign(v * (1.0 - lr * c.weight_decay))
            m_new = m.assign(b1 * m + (1.0 - b1) * g)
            v_new = s.assign(b2 * s + (1.0 - b2) * tf.square(g))
            v.assign_sub(lr * (m_new / bc1) / (tf.sqrt(v_new / bc2) + c.eps))
