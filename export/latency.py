"""Batch-1 latency of a bundle, side by side: every bundle file through its device runtime
(``export.runtime``) and the three eager frameworks on the bundle's reference weights, called in
turn (interleaved, so load changes on a shared machine hit all alike).  Used by
``benchmarks.inference`` and by the framework study's export section."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def build_candidates(bundle, x: np.ndarray, threads: int, full_int8: Path | None):
    """[(name, info, fn)] where fn() runs one batch-1 inference."""
    import torch

    from export.reference import export_spec
    from export.runtime import load_embedder
    from export.verify import load_reference
    from models.spec import ArchSpec

    spec = ArchSpec.from_dict(bundle.manifest["architecture"])
    w = load_reference(bundle)
    out = []

    # eager PyTorch: the reference path (channels-last, as models.torch_model trains)
    from export.reference import torch_module

    tm = torch_module(spec, w, memory_format="channels_last")
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # channels-last view, no copy

    def torch_fn():
        with torch.no_grad():
            return tm(xt)

    out.append(("torch eager", {"kind": "eager", "framework": "torch", "precision": "fp32",
                                "path": "nn.Module eval + no_grad, channels_last"}, torch_fn))
    # Keras: the compiled forward (what KerasTrainer.embed runs)
    import tensorflow as tf

    from export.reference import keras_model

    km = keras_model(spec, w)
    s = export_spec(spec).input_size
    kfn = tf.function(lambda a: km(a, training=False),
                      input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)])
    xtf = tf.constant(x)
    out.append(("keras tf.function", {"kind": "eager", "framework": "keras", "precision": "fp32",
                                      "path": "Keras model call inside tf.function"},
                lambda: kfn(xtf).numpy()))
    # JAX: jitted Flax apply with the training kernels
    import jax

    from export.reference import flax_function

    jfn = jax.jit(flax_function(spec, w, depthwise_impl="shift", pointwise_impl="matmul"))
    xj = jax.device_put(x)
    out.append(("jax jit", {"kind": "eager", "framework": "jax", "precision": "fp32",
                            "path": "jax.jit(Flax apply), shift-and-add depthwise, matmul 1x1"},
                lambda: jfn(xj).block_until_ready()))
    # every bundle file through the device runtime code
    for runtime, precision, name in bundle.models():
        emb = load_embedder(bundle, file=name, threads=threads)
        xin = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if emb.layout == "NCHW" else x
        emb._run(xin)  # noqa: SLF001 - bypass the numpy bookkeeping: time the runtime call only
        out.append((name, {"kind": "file", "runtime": runtime, "precision": precision, "file": name,
                           "format": bundle.files[name]["format"], "bytes": bundle.files[name]["bytes"],
                           "source": bundle.files[name].get("source"),
                           "runtime_version": emb.runtime_version},
                    (lambda e=emb, a=xin: e._run(a))))  # noqa: SLF001
    if full_int8 is not None:
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(full_int8), num_threads=threads)
        it.allocate_tensors()
        i_in, i_out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

        def full_fn(it=it):
            it.set_tensor(i_in, x)
            it.invoke()
            return it.get_tensor(i_out)

        out.append((full_int8.name, {"kind": "file", "runtime": "litert", "precision": "int8",
                                     "file": full_int8.name, "format": "tflite",
                                     "bytes": full_int8.stat().st_size, "source": "keras",
                                     "note": "not in the bundle: every op int8, hard-swish included"},
                    full_fn))
    return out


def measure(cands, repeats: int, warmup: int) -> dict[str, list[float]]:
    for _, _, fn in cands:
        for _ in range(warmup):
            fn()
    times = {name: [] for name, _, _ in cands}
    order = list(range(len(cands)))
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        rng.shuffle(order)  # interleaved, in a varying order
        for i in order:
            name, _, fn = cands[i]
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times
