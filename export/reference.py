"""Eager reference models (PyTorch, Keras, Flax) for export and verification.

The exported graph is the embedding function only: the optional product-type head is
dropped (``export_spec`` sets ``num_types=0`` and ``export_weights`` removes its
tensors), so no file carries unused parameters.  Each reference embedder takes
normalised float32 NHWC images and returns the un-normalised embedding, exactly like
``export.runtime.Embedder.embed``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from models import canonical
from models.spec import ArchSpec

FRAMEWORK_LABEL = {"torch": "torch", "keras": "keras", "flax": "flax"}
EmbedFn = Callable[[np.ndarray], np.ndarray]


def export_spec(spec: ArchSpec) -> ArchSpec:
    return spec.replace(num_types=0) if spec.num_types else spec


def export_weights(spec: ArchSpec, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical weights of the exported graph (type head removed), float32."""
    es = export_spec(spec)
    return {n: np.ascontiguousarray(weights[n], dtype=np.float32) for n in canonical.param_names(es)}


def torch_module(spec: ArchSpec, weights, memory_format: str = "contiguous"):
    """Eval-mode ``models.torch_model.Encoder`` (NCHW in, embedding out)."""
    from models import torch_model

    es = export_spec(spec)
    return torch_model.build(es, export_weights(spec, weights), memory_format=memory_format)


def keras_model(spec: ArchSpec, weights):
    """The Keras functional model that ends at the projection (NHWC in)."""
    from models import keras_model as km

    es = export_spec(spec)
    return km.build(es, export_weights(spec, weights)).embed_model


def flax_function(spec: ArchSpec, weights, depthwise_impl: str = "lax", pointwise_impl: str = "lax"):
    """A pure function NHWC -> embedding (Flax apply with the weights closed over).

    Export uses ``lax`` depthwise / pointwise convolutions (one conv op each, which
    converters map to DEPTHWISE_CONV_2D / CONV_2D); the training-speed variants
    (shift-and-add, matmul) compute the same function."""
    from models import flax_model

    es = export_spec(spec)
    model, variables = flax_model.build(es, export_weights(spec, weights), depthwise_impl=depthwise_impl,
                                        pointwise_impl=pointwise_impl)

    def embed(x):
        return model.apply(variables, x, train=False)[0]

    return embed


def reference_embedder(framework: str, spec: ArchSpec, weights, batch_size: int = 64) -> EmbedFn:
    """numpy NHWC float32 -> numpy [N, D] through the eager framework model."""
    if framework == "torch":
        import torch

        m = torch_module(spec, weights, memory_format="channels_last")

        def run(x):
            with torch.no_grad():
                t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).permute(0, 3, 1, 2)
                return m(t).numpy()
    elif framework == "keras":
        import tensorflow as tf

        km = keras_model(spec, weights)
        s = export_spec(spec).input_size
        fn = tf.function(lambda x: km(x, training=False), reduce_retracing=True,
                         input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)])

        def run(x):
            return fn(tf.constant(np.ascontiguousarray(x, np.float32))).numpy()
    elif framework == "flax":
        import jax

        fn = jax.jit(flax_function(spec, weights))

        def run(x):
            return np.asarray(fn(np.ascontiguousarray(x, np.float32)))
    else:
        raise ValueError(f"unknown reference framework {framework!r}")

    def embed(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        outs = [np.asarray(run(x[i:i + batch_size]), np.float32) for i in range(0, len(x), batch_size)]
        return np.concatenate(outs, axis=0)

    return embed


def framework_version(framework: str) -> str:
    from export.manifest import dist_version

    if framework == "torch":
        return f"torch {dist_version('torch')}"
    if framework == "keras":
        return f"keras {dist_version('keras')} / tensorflow {dist_version('tensorflow-cpu') or dist_version('tensorflow')}"
    return f"flax {dist_version('flax')} / jax {dist_version('jax')}"
