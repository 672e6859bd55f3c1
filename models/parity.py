"""Cross-framework parity check: the three implementations must compute the same function.

``run_parity`` loads the same canonical weights into the PyTorch, Keras/TF and Flax
trainers, embeds the same images (eval mode) and runs one identical training step (same
batch, loss, optimizer, FedProx anchor), then reports max absolute differences between
every pair — for the embeddings, and over ALL canonical arrays after the step (BN running
statistics included).

Weights: ``models.initial.init_weights`` with BN running statistics recalibrated on the batch
(PyTorch, train-mode forwards: what FedBN evaluation does) and small perturbations of the
BN affine parameters and biases, so that every tensor carries a non-trivial value.

Learning rates: SGD (momentum 0.9) at lr 1e-3; AdamW at lr 1e-5.  AdamW's first update is
``lr * g / (|g| + eps)`` ~ ``lr * sign(g)``.  The gradients of the projection-BN biases are
mathematically zero (a per-channel shift is cancelled by the next 1x1 conv + train-mode
BN) and in float32 they are rounding noise (~1e-7..1e-6, different in each framework), so
their AdamW step differs by up to ``2 * lr`` between frameworks whatever the
implementation; at lr 1e-3 that is 2e-3.  The AdamW formulas themselves are checked at a
realistic learning rate by the optimizer tests.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from common.errors import FedcbirError
from models import canonical
from models import initial
from models.optim import OptimConfig
from models.spec import ArchSpec

PAIRS = (("torch", "tf"), ("torch", "jax"), ("tf", "jax"))
PARITY_OPTIMIZERS = {
    "adamw": OptimConfig(name="adamw", lr=1e-5, weight_decay=0.05),
    "sgd": OptimConfig(name="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4),
}
EVAL_GOAL = 1e-5  # on the L2-normalised embedding (what retrieval compares)
TRAIN_GOAL = 1e-4


def synthetic_batch(size: int, products: int = 8, photos: int = 4, seed: int = 0,
                    num_types: int = 0):
    """A deterministic P x K batch of smooth "product photos" (float32 NHWC, roughly
    zero-mean / unit-variance like preprocessed images): each product is a colored pattern
    of a few plane waves; its photos differ by shift, zoom, brightness and noise."""
    rng = np.random.default_rng([int(seed), 7])
    g = np.linspace(-1.0, 1.0, size, dtype=np.float64)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    xs, labels = [], []
    for p in range(products):
        freqs = rng.uniform(-6, 6, size=(3, 2))
        phase = rng.uniform(0, 2 * np.pi, size=3)
        color = rng.normal(size=(3, 3))
        for _ in range(photos):
            zoom = rng.uniform(0.8, 1.25)
            dx, dy = rng.uniform(-0.2, 0.2, size=2)
            u, v = (xx + dx) * zoom, (yy + dy) * zoom
            waves = np.stack([np.sin(f[0] * u + f[1] * v + ph) for f, ph in zip(freqs, phase)], -1)
            img = waves @ color * rng.uniform(0.7, 1.3) + rng.normal(0, 0.1, (size, size, 3))
            xs.append(img)
            labels.append(p)
    x = np.stack(xs)
    x = (x - x.mean()) / x.std()
    labels = np.asarray(labels, np.int32)
    types = (labels % num_types).astype(np.int32) if num_types else np.full_like(labels, -1)
    return x.astype(np.float32), labels, types


def parity_weights(spec: ArchSpec, x: np.ndarray, seed: int = 0,
                   threads: int | None = 1) -> dict[str, np.ndarray]:
    """Init weights, BN statistics recalibrated on ``x`` (PyTorch), perturbed affine/biases."""
    from models.api import TrainConfig, make_trainer

    w = initial.init_weights(spec, seed)
    t = make_trainer("torch", spec, TrainConfig(threads=threads))
    t.set_weights(w)
    t.recalibrate_bn([x])
    w = t.get_weights()
    rng = np.random.default_rng([int(seed), 11])
    for e in canonical.entries(spec):
        if e.kind == "bn_weight":
            w[e.name] = (w[e.name] * (1 + 0.05 * rng.standard_normal(e.shape))).astype(np.float32)
        elif e.kind in ("bn_bias", "bias"):
            w[e.name] = (w[e.name] + 0.05 * rng.standard_normal(e.shape)).astype(np.float32)
    return w


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _weights_diff(a: dict, b: dict) -> tuple[float, str]:
    worst, name = -1.0, ""
    for k in a:
        d = _max_diff(a[k], b[k])
        if d > worst:
            worst, name = d, k
    return worst, name


_TRAINERS: dict[tuple, Any] = {}


def _trainer(fw: str, spec: ArchSpec, cfg):
    """Trainers are cached per process (tests and the CLI reuse compiled steps)."""
    from models.api import make_trainer

    key = (fw, spec, cfg)
    if key not in _TRAINERS:
        _TRAINERS[key] = make_trainer(fw, spec, cfg)
    return _TRAINERS[key]


def run_parity(spec: ArchSpec, seed: int = 0, optimizers=("adamw", "sgd"),
               products: int = 8, photos: int = 4, prox_mu: float = 0.1,
               type_weight: float = 0.5, threads: int | None = 1,
               batch=None, train_from: int = 0) -> dict:
    """Run the check; returns the JSON-able report (see module docstring)."""
    from models.threads import set_threads

    set_threads(threads)  # before any framework import
    from models.api import FRAMEWORKS, TrainConfig

    if batch is None:
        batch = synthetic_batch(spec.input_size, products, photos, seed, spec.num_types)
    x, labels, types = batch
    t_start = time.perf_counter()
    weights = parity_weights(spec, x, seed, threads)
    rng = np.random.default_rng([int(seed), 13])
    anchor = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
              if not canonical.is_bn_stat(k) else v for k, v in weights.items()}
    report: dict[str, Any] = {"spec": spec.to_dict(), "seed": seed, "batch": list(x.shape),
                              "goals": {"eval": EVAL_GOAL, "train_step": TRAIN_GOAL}}
    emb: dict[str, np.ndarray] = {}
    after: dict[str, dict[str, dict]] = {}
    losses: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, float]] = {fw: {} for fw in FRAMEWORKS}
    kernels = {}
    for opt_name in optimizers:
        cfg = TrainConfig(optim=PARITY_OPTIMIZERS[opt_name], prox_mu=prox_mu,
                          type_weight=type_weight, threads=threads, seed=seed,
                          train_from=train_from)
        after[opt_name], losses[opt_name] = {}, {}
        for fw in FRAMEWORKS:
            t0 = time.perf_counter()
            tr = _trainer(fw, spec, cfg)
            tr.set_weights(weights, anchor=anchor)
            if fw not in emb:
                t1 = time.perf_counter()
                emb[fw] = tr.embed(x)
                seconds[fw]["embed_first_call"] = time.perf_counter() - t1
                kernels[fw] = tr.describe()
            t1 = time.perf_counter()
            m = tr.train([(x, labels, types)], max_steps=1)
            seconds[fw][f"{opt_name}_step_first_call"] = time.perf_counter() - t1
            seconds[fw][f"{opt_name}_total"] = time.perf_counter() - t0
            losses[opt_name][fw] = m["loss"]
            after[opt_name][fw] = tr.get_weights()
    report["eval_max_abs_diff"] = {f"{a}-{b}": _max_diff(emb[a], emb[b]) for a, b in PAIRS}
    unit = {fw: e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) for fw, e in emb.items()}
    report["eval_l2_max_abs_diff"] = {f"{a}-{b}": _max_diff(unit[a], unit[b]) for a, b in PAIRS}
    report["train_from"] = int(train_from)
    report["embedding_max_abs"] = float(np.max(np.abs(emb["torch"])))
    for i, opt_name in enumerate(optimizers):
        key = "train_step_max_abs_diff" if i == 0 else f"train_step_max_abs_diff_{opt_name}"
        diffs, worst = {}, {}
        for a, b in PAIRS:
            d, n = _weights_diff(after[opt_name][a], after[opt_name][b])
            diffs[f"{a}-{b}"], worst[f"{a}-{b}"] = d, n
        report[key] = diffs
        report[f"worst_tensor_{opt_name}"] = worst
    report["optimizers"] = {o: PARITY_OPTIMIZERS[o].to_dict() for o in optimizers}
    report["train_step_optimizer"] = optimizers[0]
    report["prox_mu"] = prox_mu
    report["type_weight"] = type_weight
    report["loss"] = losses
    report["kernels"] = kernels
    report["seconds"] = seconds
    report["seconds_total"] = time.perf_counter() - t_start
    ev = max(report["eval_l2_max_abs_diff"].values())
    tr_ = max(max(report[k].values()) for k in report if k.startswith("train_step_max_abs_diff"))
    report["ok"] = bool(ev <= EVAL_GOAL and tr_ <= TRAIN_GOAL)
    return report


def catalog_batch(root: str, spec: ArchSpec, products: int, photos: int, seed: int):
    """The first P x K batch (no augmentation) of a catalog's training products, at the
    spec's input size; product types folded into ``spec.num_types`` classes."""
    import dataclasses

    from catalog.batches import PKBatches
    from catalog.dataset import CatalogSplit
    from catalog.images import DEFAULT_PREPROCESS

    split = CatalogSplit.load(root, seed=seed)
    pre = dataclasses.replace(DEFAULT_PREPROCESS, size=spec.input_size)
    table = split.table(split.train, pre)
    pk = PKBatches(table, p=products, k=photos, seed=seed, augment=False)
    if len(pk) < 1:
        raise FedcbirError(f"{root}: not enough training products for a {products} x {photos} "
                           f"batch")
    b = pk.batch(0, 0)
    types = (np.asarray(b.types, np.int64) % spec.num_types if spec.num_types
             else np.full(len(b.labels), -1))
    return (np.ascontiguousarray(b.x, np.float32), np.asarray(b.labels, np.int32),
            types.astype(np.int32))
