"""Flax (linen) builder walking the same spec.

Parity choices (see DESIGN.md): explicit symmetric padding ``((p, p), (p, p))``;
``TorchBatchNorm`` with PyTorch's semantics (biased batch variance computed as
``mean((x - mean)^2)`` for normalising, unbiased for the running variance, PyTorch momentum,
explicit eps); hard-swish written out; global average pool = mean over H, W.

Speed (XLA:CPU, one core; numbers in benchmarks/train_step.py's report):
* depthwise: XLA's grouped convolution is extremely slow on CPU, so the default
  ``depthwise_impl="shift"`` computes it as written in the definition — a sum over the
  kh x kw taps of strided slices of the padded input times the per-channel weight — with a
  hand-written backward (``depthwise_shift_vjp``): the input gradient is one shift-and-add
  of the dilated output gradient with the flipped kernel, the kernel gradient one
  reduction per tap over a materialised input (see ``_materialize``).
  ``"shift_autodiff"`` (XLA differentiates the slices) and ``"lax"``
  (``lax.conv_general_dilated(feature_group_count=C)``) are kept for the benchmark.
* 1x1 convolutions run as matrix products (``pointwise_impl="matmul"``; ``"lax"`` = conv).
* Compilation of the training step takes ~25 s for the default spec; JAX's persistent
  cache (``JAX_COMPILATION_CACHE_DIR`` or ``enable_compile_cache``) makes it ~5 s in the
  next process (measured 28.4 s -> 5.2 s).

Parameter tree: canonical ``blocks.3.dw.conv.weight`` <-> ``params/blocks_3/dw/conv/kernel``
(conv/linear weights are called ``kernel``; BN running stats live in the ``batch_stats``
collection).  Layouts: conv OIHW -> HWIO, depthwise ``[C,1,kh,kw]`` -> ``[kh,kw,1,C]``
(both ``transpose(2, 3, 1, 0)``), linear ``[out,in]`` -> ``[in,out]``.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from models import canonical
from models.losses import jax_loss
from models.optim import optax_transform
from models.spec import ArchSpec, Block, ConvLayer, SELayer, resolve
from models.trainer import Trainer

DEPTHWISE_IMPLS = ("shift", "shift_autodiff", "lax")
POINTWISE_IMPLS = ("matmul", "lax")


def enable_compile_cache(path) -> str:
    """Use JAX's persistent compilation cache in ``path`` (same as setting
    ``JAX_COMPILATION_CACHE_DIR`` before starting Python)."""
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return str(path)


def hard_swish(x):
    return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_sigmoid(x):
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def _pads(pad) -> tuple[int, int]:
    """``pad``: an int (symmetric) or ``(before, after)`` (the same on both spatial axes)."""
    return (int(pad), int(pad)) if isinstance(pad, int) else (int(pad[0]), int(pad[1]))


def depthwise_shift(x, kernel, stride: int, pad):
    """Depthwise conv as a sum of kh*kw strided slices (NHWC, kernel [kh, kw, 1, C])."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    n, h, w, c = x.shape
    lo, hi = _pads(pad)
    if lo or hi:
        x = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    ho = (h + lo + hi - kh) // stride + 1
    wo = (w + lo + hi - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            sl = lax.slice(x, (0, i, j, 0),
                           (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                           (1, stride, stride, 1))
            term = sl * kernel[i, j, 0, :]
            out = term if out is None else out + term
    return out


def _taps(xp, kh: int, kw: int, stride: int, ho: int, wo: int):
    n, c = xp.shape[0], xp.shape[3]
    for i in range(kh):
        for j in range(kw):
            yield i, j, lax.slice(xp, (0, i, j, 0),
                                  (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                                  (1, stride, stride, 1))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shift_vjp(x, kernel, stride: int, pad):
    """``depthwise_shift`` with a hand-written backward pass: the input gradient is one
    shift-and-add over the dilated, padded output gradient with the flipped kernel; the
    kernel gradient one reduction per tap over the (materialised) input."""
    return depthwise_shift(x, kernel, stride, pad)


def _materialize(x, probe):
    """Return ``x`` unchanged, but as the result of a conditional (with a data-dependent,
    always-true predicate), which XLA cannot fuse into its consumers: otherwise XLA:CPU
    recomputes the producer (BN + activation) inside each of the kh*kw tap slices
    (``optimization_barrier`` is expanded away on CPU)."""
    flag = probe.reshape(-1)[0] == probe.reshape(-1)[0]  # False only for NaN
    return lax.cond(flag, lambda a: a, lambda a: a + 0.0, x)


def _dw_fwd(x, kernel, stride, pad):
    return depthwise_shift(x, kernel, stride, pad), (x, kernel)


def _dw_bwd(stride, pad, res, g):
    x, kernel = res
    x = _materialize(x, g)
    kh, kw = kernel.shape[0], kernel.shape[1]
    n, h, w, c = x.shape
    ho, wo = g.shape[1], g.shape[2]
    lo, hi = _pads(pad)
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0))) if (lo or hi) else x
    dk = jnp.stack([(sl * g).sum((0, 1, 2)) for _, _, sl in _taps(xp, kh, kw, stride, ho, wo)])
    dk = dk.reshape(kh, kw, 1, c)
    zero = jnp.zeros((), g.dtype)
    # input gradient: the dilated output gradient, padded so that output row o meets input
    # row o * stride + tap - lo (only ``lo`` matters; ``hi`` pixels get no gradient)
    gd = lax.pad(g, zero, ((0, 0, 0),
                           (kh - 1 - lo, h + lo - stride * (ho - 1) - 1, stride - 1),
                           (kw - 1 - lo, w + lo - stride * (wo - 1) - 1, stride - 1),
                           (0, 0, 0)))
    dx = None
    for i in range(kh):
        for j in range(kw):
            term = lax.slice(gd, (0, i, j, 0), (n, i + h, j + w, c)) * kernel[kh - 1 - i,
                                                                              kw - 1 - j, 0, :]
            dx = term if dx is None else dx + term
    return dx, dk


depthwise_shift_vjp.defvjp(_dw_fwd, _dw_bwd)


def depthwise_lax(x, kernel, stride: int, pad):
    c = x.shape[-1]
    lo, hi = _pads(pad)
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((lo, hi), (lo, hi)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


class Depthwise(nn.Module):
    layer: ConvLayer
    impl: str = "shift"

    @nn.compact
    def __call__(self, x):
        c = self.layer
        k = self.param("kernel", nn.initializers.zeros, (c.kernel, c.kernel, 1, c.cout))
        if self.impl == "shift":
            return depthwise_shift_vjp(x, k, c.stride, (c.pad_lo, c.pad_hi))
        fn = depthwise_shift if self.impl == "shift_autodiff" else depthwise_lax
        return fn(x, k, c.stride, (c.pad_lo, c.pad_hi))


class Pointwise(nn.Module):
    """1x1 convolution as a matrix product over the flattened N*H*W positions (XLA:CPU
    runs this ~1.5-3x faster than its convolution path, forward + backward);
    kernel ``[1, 1, Cin, Cout]`` like ``nn.Conv``."""

    features: int
    use_bias: bool = False
    impl: str = "matmul"

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        k = self.param("kernel", nn.initializers.zeros, (1, 1, cin, self.features))
        if self.impl == "matmul":
            n, h, w, _ = x.shape
            y = (x.reshape(n * h * w, cin) @ k[0, 0]).reshape(n, h, w, self.features)
        else:
            y = lax.conv_general_dilated(x, k, (1, 1), ((0, 0), (0, 0)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class TorchBatchNorm(nn.Module):
    """BatchNorm with PyTorch's semantics (NHWC)."""

    eps: float

    @nn.compact
    def __call__(self, x, train: bool, momentum):
        c = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (c,))
        b = self.param("bias", nn.initializers.zeros, (c,))
        rm = self.variable("batch_stats", "running_mean", lambda: jnp.zeros((c,), jnp.float32))
        rv = self.variable("batch_stats", "running_var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            mean = x.mean((0, 1, 2))
            var = jnp.square(x - mean).mean((0, 1, 2))
            n = x.shape[0] * x.shape[1] * x.shape[2]
            if not self.is_initializing():
                m = momentum
                rm.value = (1.0 - m) * rm.value + m * lax.stop_gradient(mean)
                rv.value = (1.0 - m) * rv.value + m * lax.stop_gradient(var) * (n / (n - 1.0))
        else:
            mean, var = rm.value, rv.value
        scale = w * lax.rsqrt(var + self.eps)
        return x * scale + (b - mean * scale)


class ConvBN(nn.Module):
    layer: ConvLayer
    eps: float
    impl: str = "shift"
    pointwise: str = "matmul"

    @nn.compact
    def __call__(self, x, train, momentum):
        c = self.layer
        if c.depthwise:
            x = Depthwise(c, self.impl, name="conv")(x)
        elif c.kernel == 1 and c.stride == 1:
            x = Pointwise(c.cout, False, self.pointwise, name="conv")(x)
        else:
            x = nn.Conv(c.cout, (c.kernel, c.kernel), strides=(c.stride, c.stride),
                        padding=((c.pad_lo, c.pad_hi), (c.pad_lo, c.pad_hi)), use_bias=False,
                        name="conv")(x)
        x = TorchBatchNorm(self.eps, name="bn")(x, train, momentum)
        if c.act == "relu":
            x = nn.relu(x)
        elif c.act == "relu6":
            x = jnp.clip(x, 0.0, 6.0)
        elif c.act == "hswish":
            x = hard_swish(x)
        return x


class SqueezeExcite(nn.Module):
    se: SELayer
    pointwise: str = "matmul"

    @nn.compact
    def __call__(self, x):
        s = self.se
        y = x.mean((1, 2), keepdims=True)
        y = nn.relu(Pointwise(s.squeeze, True, self.pointwise, name="fc1")(y))
        y = hard_sigmoid(Pointwise(s.channels, True, self.pointwise, name="fc2")(y))
        return x * y


class InvertedResidual(nn.Module):
    block: Block
    eps: float
    impl: str = "shift"
    pointwise: str = "matmul"

    @nn.compact
    def __call__(self, x, train, momentum):
        b = self.block
        y = x
        pw = self.pointwise
        if b.expand is not None:
            y = ConvBN(b.expand, self.eps, self.impl, pw, name="expand")(y, train, momentum)
        y = ConvBN(b.dw, self.eps, self.impl, pw, name="dw")(y, train, momentum)
        if b.se is not None:
            y = SqueezeExcite(b.se, pw, name="se")(y)
        y = ConvBN(b.project, self.eps, self.impl, pw, name="project")(y, train, momentum)
        return x + y if b.residual else y


class Encoder(nn.Module):
    """NHWC float32 -> (embedding [N, D], type logits or None).

    ``start`` > 0: the input is the tensor entering block ``start`` (the trained part of a
    partially fine-tuned encoder); ``stop`` >= 0: return the tensor entering block ``stop``
    (the frozen trunk) instead of the embedding.  Module names are the same in every
    segment, so a segment's variables are a sub-tree of the full encoder's."""

    spec: ArchSpec
    impl: str = "shift"
    pointwise: str = "matmul"
    start: int = 0
    stop: int = -1

    @nn.compact
    def __call__(self, x, train: bool = False, momentum=None):
        spec = self.spec
        r = resolve(spec)
        mom = spec.bn_momentum if momentum is None else momentum
        eps = spec.bn_eps
        pw = self.pointwise
        if self.start == 0:
            x = ConvBN(r.stem, eps, self.impl, pw, name="stem")(x, train, mom)
        stop = len(r.blocks) if self.stop < 0 else self.stop
        for b in r.blocks[self.start:stop]:
            x = InvertedResidual(b, eps, self.impl, pw, name=f"blocks_{b.index}")(
                x, train, mom)
        if self.stop >= 0:
            return x, None
        x = ConvBN(r.head, eps, self.impl, pw, name="head")(x, train, mom)
        f = x.mean((1, 2))
        e = nn.Dense(r.embedding_dim, name="proj")(f)
        logits = None
        if r.num_types:
            logits = nn.Dense(r.num_types, name="type_head")(
                f if spec.type_head_input == "features" else e)
        return e, logits


# ----------------------------------------------------------------- canonical <-> flax
def flax_path(name: str, kind: str) -> tuple[str, tuple[str, ...]]:
    """Canonical name -> (collection, path inside it)."""
    parts = name.split(".")
    merged: list[str] = []
    for p in parts:
        if p.isdigit() and merged:
            merged[-1] = f"{merged[-1]}_{p}"
        else:
            merged.append(p)
    if kind in ("conv", "dwconv", "linear"):
        merged[-1] = "kernel"
    coll = "batch_stats" if kind in ("bn_mean", "bn_var") else "params"
    return coll, tuple(merged)


def to_flax_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind in ("conv", "dwconv"):
        return np.transpose(a, (2, 3, 1, 0))
    if kind == "linear":
        return np.transpose(a)
    return a


def from_flax_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind in ("conv", "dwconv"):
        return np.transpose(a, (3, 2, 0, 1))
    if kind == "linear":
        return np.transpose(a)
    return a


def from_canonical(spec: ArchSpec, weights) -> dict[str, Any]:
    """Canonical dict -> ``{"params": ..., "batch_stats": ...}`` of jnp arrays."""
    tree: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for e in canonical.entries(spec):
        coll, path = flax_path(e.name, e.kind)
        node = tree[coll]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        a = to_flax_layout(e.kind, np.asarray(weights[e.name], np.float32))
        node[path[-1]] = jnp.asarray(np.ascontiguousarray(a))
    return tree


def to_canonical(spec: ArchSpec, variables) -> dict[str, np.ndarray]:
    out = {}
    for e in canonical.entries(spec):
        coll, path = flax_path(e.name, e.kind)
        node = variables[coll]
        for p in path:
            node = node[p]
        out[e.name] = np.ascontiguousarray(from_flax_layout(e.kind, np.asarray(node)),
                                           dtype=np.float32)
    return out


def build(spec: ArchSpec, weights=None, depthwise_impl: str = "shift",
          pointwise_impl: str = "matmul"):
    """Return ``(module, variables)``; variables from ``weights`` (or None)."""
    if depthwise_impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}")
    if pointwise_impl not in POINTWISE_IMPLS:
        raise ValueError(f"pointwise_impl must be one of {POINTWISE_IMPLS}")
    model = Encoder(spec, depthwise_impl, pointwise_impl)
    return model, (from_canonical(spec, weights) if weights is not None else None)


def _tree_of(spec: ArchSpec, fn) -> dict:
    """A ``params``-shaped pytree with ``fn(entry)`` at each leaf."""
    tree: dict[str, Any] = {}
    for e in canonical.entries(spec):
        coll, path = flax_path(e.name, e.kind)
        if coll != "params":
            continue
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = fn(e)
    return tree


_FN_CACHE: dict[tuple, dict] = {}


def _trained_key(key: str, train_from: int) -> bool:
    """Whether a top-level variable-tree key (``stem``, ``blocks_3``, ``head``, ``proj``,
    ``type_head``) belongs to the part trained from block ``train_from`` on."""
    return canonical.in_trained_part(key.replace("_", ".", 1) if key.startswith("blocks_") else
                                     key + ".", train_from)


def split_tree(tree: dict, train_from: int) -> tuple[dict, dict]:
    """``(frozen, trained)`` halves of one collection's top-level keys."""
    frozen = {k: v for k, v in tree.items() if not _trained_key(k, train_from)}
    trained = {k: v for k, v in tree.items() if _trained_key(k, train_from)}
    return frozen, trained


def compiled_functions(spec: ArchSpec, depthwise_impl: str = "shift", use_prox: bool = False,
                       pointwise_impl: str = "matmul", train_from: int = 0):
    """Jitted model functions for one spec, shared by every trainer in the process (they
    are pure; the optimizer update is jitted per trainer).  Loss settings are run-time
    scalars, so trainers with different optimizers / loss weights share one compilation.
    With ``train_from`` > 0 the training functions take the trained part's variables and the
    tensor entering block ``train_from`` (``trunk`` computes it in inference mode)."""
    key = (spec, depthwise_impl, bool(use_prox), pointwise_impl, int(train_from))
    hit = _FN_CACHE.get(key)
    if hit is not None:
        return hit
    model, _ = build(spec, depthwise_impl=depthwise_impl, pointwise_impl=pointwise_impl)
    top = Encoder(spec, depthwise_impl, pointwise_impl, start=int(train_from))
    trunk_model = Encoder(spec, depthwise_impl, pointwise_impl, stop=int(train_from))

    def loss_fn(params, bs, x, labels, types, anchor, temperature, type_weight, prox_mu):
        (e, logits), upd = top.apply({"params": params, "batch_stats": bs}, x,
                                     train=True, mutable=["batch_stats"])
        total, sup, ce = jax_loss(e, labels, types, logits, temperature, type_weight)
        if use_prox:
            sq = jax.tree_util.tree_map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
            total = total + 0.5 * prox_mu * sum(jax.tree_util.tree_leaves(sq))
        return total, (upd["batch_stats"], sup, ce)

    def grad_step(params, bs, x, labels, types, anchor, temperature, type_weight, prox_mu):
        (total, (bs, sup, ce)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            params, bs, x, labels, types, anchor, temperature, type_weight, prox_mu)
        return g, bs, total, sup, ce

    def embed(params, bs, x):
        return model.apply({"params": params, "batch_stats": bs}, x, train=False)[0]

    def bn_step(params, bs, x, momentum):
        _, upd = top.apply({"params": params, "batch_stats": bs}, x, train=True,
                           momentum=momentum, mutable=["batch_stats"])
        return upd["batch_stats"]

    def trunk(params, bs, x):
        return trunk_model.apply({"params": params, "batch_stats": bs}, x, train=False)[0]

    fns = {"grad_step": jax.jit(grad_step), "embed": jax.jit(embed),
           "bn_step": jax.jit(bn_step), "trunk": jax.jit(trunk), "model": model}
    _FN_CACHE[key] = fns
    return fns


class FlaxTrainer(Trainer):
    framework = "jax"

    def __init__(self, spec: ArchSpec, cfg, depthwise_impl: str = "shift",
                 pointwise_impl: str = "matmul"):
        super().__init__(spec, cfg)
        if depthwise_impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}")
        if pointwise_impl not in POINTWISE_IMPLS:
            raise ValueError(f"pointwise_impl must be one of {POINTWISE_IMPLS}")
        self.depthwise_impl = depthwise_impl
        self.pointwise_impl = pointwise_impl
        k = self.train_from
        decay = set(canonical.decay_names(spec, k))
        self.decay_mask = split_tree(_tree_of(spec, lambda e: e.name in decay), k)[1]
        self.tx = optax_transform(cfg.optim, self.decay_mask)
        self.params = self.batch_stats = self.opt_state = self.anchor = None
        self.use_prox = cfg.prox_mu > 0
        self.fns = compiled_functions(spec, depthwise_impl, self.use_prox, pointwise_impl, k)
        self.model = self.fns["model"]
        tx = self.tx

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self._update = jax.jit(update, donate_argnums=(0, 1))
        self._scalars = (jnp.float32(cfg.temperature), jnp.float32(cfg.type_weight),
                         jnp.float32(cfg.prox_mu))

    def describe(self):
        path = {"shift": "shift-and-add of strided slices, hand-written backward",
                "shift_autodiff": "shift-and-add of strided slices, XLA autodiff backward",
                "lax": "lax.conv_general_dilated(feature_group_count=C)"}[self.depthwise_impl]
        pw = ("1x1 convs as matmul" if self.pointwise_impl == "matmul"
              else "1x1 convs as lax.conv")
        return {"framework": "jax", "version": jax.__version__, "memory_format": "NHWC",
                "depthwise": f"{path}; {pw}; jax.jit", "depthwise_impl": self.depthwise_impl,
                "pointwise_impl": self.pointwise_impl}

    def _load(self, weights):
        tree = from_canonical(self.spec, weights)
        self.params, self.batch_stats = tree["params"], tree["batch_stats"]

    def _dump(self):
        return to_canonical(self.spec, {"params": self.params, "batch_stats": self.batch_stats})

    def _trained(self, tree):
        return split_tree(tree, self.train_from)[1]

    def _reset_optimizer(self):
        self.opt_state = self.tx.init(self._trained(self.params))

    def _set_anchor(self, weights):
        self.anchor = self._trained(from_canonical(self.spec, weights)["params"])

    def _embed_batch(self, x):
        return np.asarray(self.fns["embed"](self.params, self.batch_stats, jnp.asarray(x)))

    def _trunk_batch(self, x):
        p, bs = split_tree(self.params, self.train_from)[0], split_tree(self.batch_stats, self.train_from)[0]
        return np.asarray(self.fns["trunk"](p, bs, jnp.asarray(x)))

    def _train_step(self, x, labels, types):
        params, bs = self._trained(self.params), self._trained(self.batch_stats)
        g, bs, total, sup, ce = self.fns["grad_step"](
            params, bs, jnp.asarray(x), jnp.asarray(labels),
            jnp.asarray(types), self.anchor, *self._scalars)
        params, self.opt_state = self._update(params, self.opt_state, g)
        self.params = {**self.params, **params}
        self.batch_stats = {**self.batch_stats, **bs}
        return float(total), float(sup), float(ce)

    def _bn_step(self, x, momentum):
        bs = self.fns["bn_step"](self._trained(self.params), self._trained(self.batch_stats),
                                 jnp.asarray(x), jnp.float32(momentum))
        self.batch_stats = {**self.batch_stats, **bs}
