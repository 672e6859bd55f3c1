"""One local-training interface for PyTorch, Keras/TensorFlow and Flax.

    trainer = make_trainer("torch" | "tf" | "jax", spec, TrainConfig(...))
    trainer.set_weights(canonical)          # also resets the optimizer, sets the FedProx anchor
    metrics = trainer.train(batches)        # loss, loss_supcon, loss_type, examples, steps,
                                            # seconds, peak_rss_mb, threads, framework
    trainer.recalibrate_bn(batches)         # FedBN evaluation: BN stats from local data
    emb = trainer.embed(x_nhwc)             # eval mode, un-normalised [N, D]
    weights = trainer.get_weights()         # canonical float32, BN running stats included

    new_weights, metrics = local_train(framework, spec, weights, batches, cfg)

Call ``models.threads.set_threads(cfg.threads)`` before the first framework import when
thread counts matter (``make_trainer`` calls it too, which is enough for TF and JAX only
if they were not imported yet).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from common.errors import FedcbirError
from models import canonical
from models.optim import OptimConfig
from models.spec import ArchSpec

FRAMEWORKS = ("torch", "tf", "jax")
ALIASES = {"torch": "torch", "pytorch": "torch", "tf": "tf", "tensorflow": "tf",
           "keras": "tf", "jax": "jax", "flax": "jax"}
BN_POLICIES = ("local", "shared")


@dataclass(frozen=True)
class TrainConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 1
    max_steps: int | None = None  # per train() call; None = all batches x epochs
    temperature: float = 0.1  # SupCon
    type_weight: float = 0.1  # product-type cross entropy (only with a type head)
    prox_mu: float = 0.0  # FedProx
    bn_policy: str = "local"  # which names the server averages: see shared_names
    threads: int | None = 1
    seed: int = 0
    train_from: int = 0  # first trained block; 0 = everything (see models.trainer)
    cache_mb: int = 256  # frozen-trunk activation cache (only with train_from > 0)

    def __post_init__(self):
        if isinstance(self.optim, dict):
            object.__setattr__(self, "optim", OptimConfig.from_dict(self.optim))
        if self.bn_policy not in BN_POLICIES:
            raise FedcbirError(f"bn_policy must be one of {BN_POLICIES}")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 0):
            raise FedcbirError("epochs must be >= 1 and max_steps >= 0")
        if self.train_from < 0 or self.cache_mb < 0:
            raise FedcbirError("train_from and cache_mb must be >= 0")
        if self.temperature <= 0 or self.type_weight < 0 or self.prox_mu < 0:
            raise FedcbirError("temperature must be > 0; type_weight and prox_mu >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"] = self.optim.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return cls(**dict(d))


def shared_names(spec: ArchSpec, bn_policy: str = "local", train_from: int = 0) -> list[str]:
    """Canonical names a server should average.

    ``local`` (FedBN, the default): everything except BN layers (affine parameters and
    running statistics stay on the device; evaluation recalibrates them).
    ``shared``: every tensor, BN statistics included.
    Only the trained part counts (``train_from``): frozen tensors never change.
    """
    if bn_policy not in BN_POLICIES:
        raise FedcbirError(f"bn_policy must be one of {BN_POLICIES}")
    names = canonical.trained_part_names(spec, train_from)
    if bn_policy == "shared":
        return names
    return [n for n in names if not canonical.is_bn(n)]


def normalize_framework(framework: str) -> str:
    fw = ALIASES.get(str(framework).lower())
    if fw is None:
        raise FedcbirError(f"unknown framework {framework!r}: choose torch, tf or jax")
    return fw


def make_trainer(framework: str, spec: ArchSpec, cfg: TrainConfig | None = None, **options):
    """Build a trainer. ``options``: torch ``memory_format`` ("channels_last" |
    "contiguous"); jax ``depthwise_impl`` ("shift" | "lax")."""
    from models.threads import set_threads

    cfg = cfg or TrainConfig()
    fw = normalize_framework(framework)
    set_threads(cfg.threads)
    if fw == "torch":
        from models.torch_model import TorchTrainer

        return TorchTrainer(spec, cfg, **options)
    if fw == "tf":
        from models.keras_model import KerasTrainer

        return KerasTrainer(spec, cfg, **options)
    from models.flax_model import FlaxTrainer

    return FlaxTrainer(spec, cfg, **options)


_CACHE: dict[tuple, Any] = {}


def local_train(framework: str, spec: ArchSpec, weights: Mapping[str, np.ndarray],
                batches: Iterable, cfg: TrainConfig | None = None,
                **options) -> tuple[dict[str, np.ndarray], dict]:
    """Functional wrapper: set weights, train, return ``(new canonical weights, metrics)``.

    Trainers are cached per (framework, spec, cfg, options) within the process, so a
    long-lived client does not rebuild / recompile every round.
    """
    cfg = cfg or TrainConfig()
    key = (normalize_framework(framework), spec, cfg, tuple(sorted(options.items())))
    trainer = _CACHE.get(key)
    if trainer is None:
        trainer = _CACHE[key] = make_trainer(framework, spec, cfg, **options)
    trainer.set_weights(weights)
    metrics = trainer.train(batches)
    return trainer.get_weights(), metrics
