"""Keras 3 (TensorFlow backend) builder walking the same spec.

Parity choices (see DESIGN.md): explicit ``ZeroPadding2D((lo, hi))`` from the resolved spec
+ ``valid`` convolutions (never Keras' own 'same'); ``TorchBatchNorm`` follows PyTorch exactly (train mode
normalises with the biased batch variance, running variance updated with the unbiased
one, PyTorch momentum convention, explicit eps); hard-swish / hard-sigmoid written out
as ``x * relu6(x + 3) / 6``; pooling is ``AveragePooling2D`` over the whole final map +
``Flatten`` (the "adaptive average pool + flatten" of the PyTorch graph).

Layer names are the canonical module paths with ``.`` replaced by ``_`` (``blocks_3_dw_conv``).
``KerasEncoder.embed_model`` ends at the projection (the export graph);
``train_model`` also outputs the type logits when the spec has a type head.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers, ops  # noqa: E402

from models import canonical  # noqa: E402
from models.losses import tf_loss  # noqa: E402
from models.optim import TFOptimizer  # noqa: E402
from models.spec import ArchSpec, ConvLayer, resolve  # noqa: E402
from models.trainer import Trainer  # noqa: E402

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    raise ImportError("models.keras_model needs KERAS_BACKEND=tensorflow")


class MomentumRef:
    """A plain holder (not tracked by Keras) for a scalar tf.Variable that overrides the
    BN momentum at run time (used by BN recalibration)."""

    def __init__(self, value: float):
        self.var = tf.Variable(float(value), dtype=tf.float32, trainable=False)


@keras.saving.register_keras_serializable(package="fedcbir")
class TorchBatchNorm(layers.Layer):
    """BatchNorm with PyTorch's semantics (NHWC, channel axis last)."""

    def __init__(self, eps: float = 1e-5, momentum: float = 0.1, **kw):
        super().__init__(**kw)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self._momentum_ref = None

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.weight = self.add_weight(shape=(c,), initializer="ones", name="weight")
        self.bias = self.add_weight(shape=(c,), initializer="zeros", name="bias")
        self.running_mean = self.add_weight(shape=(c,), initializer="zeros",
                                            trainable=False, name="running_mean")
        self.running_var = self.add_weight(shape=(c,), initializer="ones",
                                           trainable=False, name="running_var")

    def call(self, x, training=None):
        if training:
            axes = (0, 1, 2)
            mean = ops.mean(x, axis=axes)
            var = ops.mean(ops.square(x - mean), axis=axes)  # biased, two-pass
            shape = ops.shape(x)
            n = ops.cast(shape[0] * shape[1] * shape[2], "float32")
            m = self._momentum_ref.var if self._momentum_ref is not None else self.momentum
            self.running_mean.assign((1.0 - m) * self.running_mean + m * mean)
            self.running_var.assign((1.0 - m) * self.running_var + m * var * (n / (n - 1.0)))
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * ops.rsqrt(var + self.eps)
        return x * scale + (self.bias - mean * scale)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps, "momentum": self.momentum}


@keras.saving.register_keras_serializable(package="fedcbir")
def hard_swish(x):
    return x * ops.relu6(x + 3.0) / 6.0


@keras.saving.register_keras_serializable(package="fedcbir")
def hard_sigmoid(x):
    return ops.relu6(x + 3.0) / 6.0


def _lname(canonical_module: str) -> str:
    return canonical_module.replace(".", "_")


class KerasEncoder:
    """Keras models for one spec plus the canonical-name -> variable map."""

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        r = self.r = resolve(spec)
        self.momentum_ref = MomentumRef(spec.bn_momentum)
        self.bns: list[TorchBatchNorm] = []
        self.layer_of: dict[str, layers.Layer] = {}  # canonical module -> layer (made once)
        self._tag = ""
        inp = keras.Input(shape=(spec.input_size, spec.input_size, 3), name="image")
        feats = self._top(inp, 0)
        proj = layers.Dense(r.embedding_dim, name="proj")
        self.layer_of["proj"] = proj
        if r.num_types:
            self.layer_of["type_head"] = layers.Dense(r.num_types, name="type_head")
        emb, outputs = self._outputs(feats)
        self.embed_model = keras.Model(inp, emb, name="fedcbir_encoder")
        self.train_model = keras.Model(inp, outputs, name="fedcbir_encoder_train")
        self.var_of = {}
        for e in canonical.entries(spec):
            lay = self.layer_of[e.module]
            if e.kind in ("conv", "dwconv", "linear"):
                v = lay.kernel
            elif e.leaf == "bias" and e.kind == "bias":
                v = lay.bias
            else:
                v = getattr(lay, e.leaf)
            self.var_of[e.name] = v

    def _outputs(self, feats):
        emb = self.layer_of["proj"](feats)
        outputs = [emb]
        if "type_head" in self.layer_of:
            th = self.layer_of["type_head"]
            outputs.append(th(feats if self.spec.type_head_input == "features" else emb))
        return emb, outputs

    def _blocks(self, x, lo: int, hi: int):
        for b in self.r.blocks[lo:hi]:
            y = self._conv_bn(x, b.expand) if b.expand is not None else x
            y = self._conv_bn(y, b.dw)
            if b.se is not None:
                y = self._se(y, b.se)
            y = self._conv_bn(y, b.project)
            x = layers.Add(name=f"{self._tag}blocks_{b.index}_add")([x, y]) if b.residual else y
        return x

    def _top(self, x, k: int):
        """From block ``k`` (k = 0: from the images, stem included) to the pooled features."""
        if k == 0:
            x = self._conv_bn(x, self.r.stem)
        x = self._conv_bn(self._blocks(x, k, len(self.r.blocks)), self.r.head)
        x = layers.AveragePooling2D(pool_size=self.r.feature_hw, name=f"{self._tag}pool")(x)
        return layers.Flatten(name=f"{self._tag}flatten")(x)

    def split_models(self, k: int):
        """``(trunk, top_train)`` sharing this encoder's layers: the trunk maps images to the
        tensor entering block ``k`` (stem + blocks[:k]); ``top_train`` maps that tensor to the
        training outputs (embedding [, type logits])."""
        hw, c = self.r.block_input(k)
        self._tag = "trunk_"
        img = keras.Input(shape=(self.spec.input_size, self.spec.input_size, 3), name="image")
        trunk = keras.Model(img, self._blocks(self._conv_bn(img, self.r.stem), 0, k), name="trunk")
        self._tag = "top_"
        h = keras.Input(shape=(hw, hw, c), name="block_input")
        _, outputs = self._outputs(self._top(h, k))
        top = keras.Model(h, outputs, name="top_train")
        self._tag = ""
        return trunk, top

    def _conv_bn(self, x, c: ConvLayer):
        made = c.name + ".conv" in self.layer_of
        if c.pad_lo or c.pad_hi:
            x = layers.ZeroPadding2D(((c.pad_lo, c.pad_hi), (c.pad_lo, c.pad_hi)),
                                     name=self._tag + _lname(c.name) + "_pad")(x)
        if made:
            conv, bn = self.layer_of[c.name + ".conv"], self.layer_of[c.name + ".bn"]
        else:
            if c.depthwise:
                conv = layers.DepthwiseConv2D(c.kernel, strides=c.stride, padding="valid",
                                              use_bias=False, name=_lname(c.name) + "_conv")
            else:
                conv = layers.Conv2D(c.cout, c.kernel, strides=c.stride, padding="valid",
                                     use_bias=False, name=_lname(c.name) + "_conv")
            bn = TorchBatchNorm(self.spec.bn_eps, self.spec.bn_momentum, name=_lname(c.name) + "_bn")
            bn._momentum_ref = self.momentum_ref
            self.bns.append(bn)
            self.layer_of[c.name + ".conv"] = conv
            self.layer_of[c.name + ".bn"] = bn
        x = bn(conv(x))
        name = self._tag + _lname(c.name)
        if c.act == "relu":
            x = layers.ReLU(name=name + "_relu")(x)
        elif c.act == "relu6":
            x = layers.ReLU(max_value=6.0, name=name + "_relu6")(x)
        elif c.act == "hswish":
            x = layers.Activation(hard_swish, name=name + "_hswish")(x)
        return x

    def _se(self, x, s):
        p = self._tag + _lname(s.name)
        y = layers.AveragePooling2D(pool_size=s.hw, name=p + "_pool")(x)
        if s.name + ".fc1" not in self.layer_of:
            self.layer_of[s.name + ".fc1"] = layers.Conv2D(s.squeeze, 1, use_bias=True,
                                                           name=_lname(s.name) + "_fc1")
            self.layer_of[s.name + ".fc2"] = layers.Conv2D(s.channels, 1, use_bias=True,
                                                           name=_lname(s.name) + "_fc2")
        fc1, fc2 = self.layer_of[s.name + ".fc1"], self.layer_of[s.name + ".fc2"]
        y = layers.ReLU(name=p + "_relu")(fc1(y))
        y = layers.Activation(hard_sigmoid, name=p + "_hsigmoid")(fc2(y))
        return layers.Multiply(name=p + "_scale")([x, y])


# Layout conversion canonical (PyTorch) <-> Keras
def to_keras_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(a, (2, 3, 1, 0))  # OIHW -> HWIO
    if kind == "dwconv":
        return np.transpose(a, (2, 3, 0, 1))  # [C,1,kh,kw] -> [kh,kw,C,1]
    if kind == "linear":
        return np.transpose(a)  # [out,in] -> [in,out]
    return a


def from_keras_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.transpose(a, (3, 2, 0, 1))  # HWIO -> OIHW
    if kind == "dwconv":
        return np.transpose(a, (2, 3, 0, 1))  # [kh,kw,C,1] -> [C,1,kh,kw]
    if kind == "linear":
        return np.transpose(a)
    return a


def build(spec: ArchSpec, weights=None) -> KerasEncoder:
    enc = KerasEncoder(spec)
    if weights is not None:
        load_canonical(enc, weights)
    return enc


def load_canonical(enc: KerasEncoder, weights) -> None:
    for e in canonical.entries(enc.spec):
        a = to_keras_layout(e.kind, np.asarray(weights[e.name], np.float32))
        enc.var_of[e.name].assign(np.ascontiguousarray(a))


def to_canonical(enc: KerasEncoder) -> dict[str, np.ndarray]:
    out = {}
    for e in canonical.entries(enc.spec):
        a = np.asarray(enc.var_of[e.name].numpy())
        out[e.name] = np.ascontiguousarray(from_keras_layout(e.kind, a), dtype=np.float32)
    return out


class KerasTrainer(Trainer):
    framework = "tf"

    def __init__(self, spec: ArchSpec, cfg):
        super().__init__(spec, cfg)
        keras.utils.set_random_seed(cfg.seed)
        self.enc = build(spec)
        k = self.train_from
        self.tnames = canonical.trainable_names(spec, k)
        self.tvars = [self.enc.var_of[n] for n in self.tnames]
        self.opt = TFOptimizer(cfg.optim, self.tvars, self._decay_flags(self.tnames))
        self.anchor = None
        if cfg.prox_mu > 0:
            self.anchor = [tf.Variable(tf.zeros(v.shape), trainable=False) for v in self.tvars]
        size = spec.input_size
        img = tf.TensorSpec([None, size, size, 3], tf.float32)
        self.top_model = self.enc.train_model
        x_sig = img
        if k:
            trunk, self.top_model = self.enc.split_models(k)
            hw, c = self.enc.r.block_input(k)
            x_sig = tf.TensorSpec([None, hw, hw, c], tf.float32)
            self._trunk_fn = tf.function(lambda x: trunk(x, training=False), input_signature=[img])
        sig = [x_sig, tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)]
        self._step_fn = tf.function(self._step_impl, input_signature=sig)
        self._embed_fn = tf.function(
            lambda x: self.enc.embed_model(x, training=False), input_signature=[img])
        self._bn_fn = tf.function(lambda x: self.top_model(x, training=True), input_signature=[x_sig])

    def describe(self):
        return {"framework": "tf", "version": tf.__version__, "keras": keras.__version__,
                "memory_format": "NHWC",
                "depthwise": "keras DepthwiseConv2D (tf.nn.depthwise_conv2d), tf.function"}

    def _step_impl(self, x, labels, types):
        cfg = self.cfg
        with tf.GradientTape() as tape:
            outs = self.top_model(x, training=True)
            if isinstance(outs, (list, tuple)):
                emb = outs[0]
                logits = outs[1] if len(outs) > 1 else None
            else:
                emb, logits = outs, None
            total, sup, ce = tf_loss(emb, labels, types, logits, cfg.temperature, cfg.type_weight)
            if self.anchor is not None:
                prox = tf.add_n([tf.reduce_sum(tf.square(v - a))
                                 for v, a in zip(self.tvars, self.anchor)])
                total = total + 0.5 * cfg.prox_mu * prox
        grads = tape.gradient(total, self.tvars)
        self.opt.apply(grads)
        return total, sup, ce

    def _load(self, weights):
        load_canonical(self.enc, weights)

    def _dump(self):
        return to_canonical(self.enc)

    def _reset_optimizer(self):
        self.opt.reset()

    def _set_anchor(self, weights):
        kinds = canonical.param_kinds(self.spec)
        for n, a in zip(self.tnames, self.anchor):
            a.assign(to_keras_layout(kinds[n], weights[n]))

    def _embed_batch(self, x):
        return self._embed_fn(tf.constant(x)).numpy()

    def _trunk_batch(self, x):
        return self._trunk_fn(tf.constant(x)).numpy()

    def _train_step(self, x, labels, types):
        self.enc.momentum_ref.var.assign(self.spec.bn_momentum)
        t, s, c = self._step_fn(tf.constant(x), tf.constant(labels), tf.constant(types))
        return float(t), float(s), float(c)

    def _bn_step(self, x, momentum):
        self.enc.momentum_ref.var.assign(momentum)
        self._bn_fn(tf.constant(x))
        self.enc.momentum_ref.var.assign(self.spec.bn_momentum)
