"""One function per exported file: framework model -> bytes on disk.

Each returns a dict of facts for the manifest (input layout/shape, what was quantized
and how, the route).  Calibration images are normalised float32 NHWC arrays.

Measured choices (see DESIGN.md "Export and on-device runtimes" and the module docs):

* Keras -> LiteRT: the Keras model is traced once into a frozen concrete function and
  converted three ways.  int8 is full-integer (int8 weights per channel, int8
  activations, float32 input/output with QUANTIZE/DEQUANTIZE at the ends), EXCEPT the
  hard-swish activations: LiteRT's XNNPACK delegate has no int8 HARD_SWISH, so a fully
  int8 MobileNetV3 is cut into ~20 delegate partitions with the built-in kernel in
  between and runs ~1.6x SLOWER than fp32 (0.90 vs 0.58 ms: width 1.0, 96 px, batch 1,
  1 thread, this machine, benchmarks/inference.py).  Keeping HARD_SWISH in float
  (selective quantization, ``QuantizationDebugOptions(denylisted_ops=["HARD_SWISH"])``)
  puts DEQUANTIZE -> HARD_SWISH -> QUANTIZE around each of them, which XNNPACK runs; the
  file is then ~1.5x FASTER than fp32 (0.38 ms) at the same size and accuracy.
  ``int8_float_ops=()`` gives the pure full-integer file (for integer-only accelerators).
* torch -> ONNX: ``torch.onnx.export(dynamo=True, external_data=False)`` with a dynamic
  batch (example batch 2).  int8: ONNX Runtime static quantization, QDQ, per-channel
  int8 weights, uint8 activations (U8S8: on x86, S8S8 measured 2.7x slower here, as ORT's
  docs warn); pre-processing with ``skip_symbolic_shape=True`` (the symbolic shape
  inference fails on dynamo-exported graphs).
* torch -> ExecuTorch: ``torch.export`` (batch 1..max_batch: the upper bound sizes the
  memory plan) -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner; int8 by
  pt2e with ``XNNPACKQuantizer`` (symmetric, per-channel), which leaves hard-swish in
  float with quantize/dequantize around it, as above.
* Flax -> LiteRT: ``jax2tf.convert`` (native serialization, the only mode in jax 0.10)
  with a STATIC batch of 1, then the same TFLite converter.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.reference import export_spec, flax_function, keras_model, torch_module
from fedcbir.errors import FedcbirError
from models.spec import ArchSpec

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
DEFAULT_PTE_MAX_BATCH = 8
INT8_TFLITE_FLOAT_OPS = ("HARD_SWISH",)


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _batches(calib: np.ndarray, size: int):
    for i in range(0, len(calib), size):
        yield calib[i:i + size]


# ------------------------------------------------------------------------------ LiteRT
def _tflite_convert(concrete_fn, precision: str, calib: np.ndarray | None,
                    float_ops: Sequence[str], batch: int | None) -> tuple[bytes, dict]:
    import tensorflow as tf

    def make():
        return tf.lite.TFLiteConverter.from_concrete_functions([concrete_fn])

    facts: dict[str, Any] = {}
    if precision == "fp32":
        return make().convert(), facts
    if precision == "fp16":
        c = make()
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.target_spec.supported_types = [tf.float16]
        facts["quantization"] = {"weights": "float16 (dequantized to float32 at load on CPU)",
                                 "activations": "float32"}
        return c.convert(), facts
    if precision != "int8":
        raise ValueError(precision)
    if calib is None or not len(calib):
        raise FedcbirError("int8 export needs calibration images")
    step = batch or 1

    def rep():
        for b in _batches(calib, step):
            if len(b) == step:
                yield [b]

    c = make()
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = rep
    c.inference_input_type = tf.float32
    c.inference_output_type = tf.float32
    if float_ops:
        # selective quantization: everything int8 except the listed op types
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops))
        dbg = tf.lite.experimental.QuantizationDebugger(converter=c, debug_dataset=rep, debug_options=opts)
        data = dbg.get_nondebug_quantized_model()
    else:
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        data = c.convert()
    facts["quantization"] = {
        "scheme": "static post-training (TFLite converter, representative dataset)",
        "weights": "int8 symmetric, per-channel", "activations": "int8 asymmetric, per-tensor",
        "io": "float32 input and output (QUANTIZE / DEQUANTIZE inside the graph)",
        "float_ops": list(float_ops),
        "why_float_ops": ("XNNPACK has no int8 HARD_SWISH: in int8 it splits the graph into "
                          "~20 delegate partitions and the file runs slower than fp32"
                          if float_ops else None),
        "calibration_images": int(len(calib) // step * step),
    }
    return data, facts


def _tflite_facts(data: bytes, s: int) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    d = it.get_input_details()[0]
    sig = [int(v) for v in d.get("shape_signature", d["shape"])]
    ops: dict[str, int] = {}
    for o in it._get_ops_details():  # noqa: SLF001 - op census for the manifest
        ops[o["op_name"]] = ops.get(o["op_name"], 0) + 1
    return {"input": {"name": d["name"], "layout": "NHWC", "dtype": "float32",
                      "shape": [sig[0] if sig[0] > 0 else "N", s, s, 3],
                      "batch": "dynamic" if sig[0] == -1 else "static",
                      "max_batch": None if sig[0] == -1 else sig[0]},
            "ops": dict(sorted(ops.items()))}


def keras_tflite(spec: ArchSpec, weights, precisions: Sequence[str], calib: np.ndarray | None,
                 int8_float_ops: Sequence[str] = INT8_TFLITE_FLOAT_OPS) -> dict[str, tuple[bytes, dict]]:
    """Keras model -> {precision: (tflite bytes, facts)} (dynamic batch, NHWC)."""
    _quiet_tf()
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    s = export_spec(spec).input_size
    km = keras_model(spec, weights)
    fn = tf.function(lambda x: km(x, training=False),
                     input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32, name=INPUT_NAME)])
    # freeze: the Keras variables become constants (a non-frozen conversion leaves
    # READ_VARIABLE ops that LiteRT cannot initialise)
    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
    out = {}
    for p in precisions:
        data, facts = _tflite_convert(frozen, p, calib, int8_float_ops, batch=8)
        facts.update(_tflite_facts(data, s))
        facts["source"] = "keras"
        facts["route"] = "Keras 3 functional model -> tf.function (frozen) -> tf.lite.TFLiteConverter"
        out[p] = (data, facts)
    return out


def jax_tflite(spec: ArchSpec, weights, precisions: Sequence[str], calib: np.ndarray | None,
               int8_float_ops: Sequence[str] = INT8_TFLITE_FLOAT_OPS) -> dict[str, tuple[bytes, dict]]:
    """Flax model -> jax2tf -> LiteRT, static batch 1 (NHWC)."""
    _quiet_tf()
    import tensorflow as tf
    from jax.experimental import jax2tf

    s = export_spec(spec).input_size
    f = flax_function(spec, weights)
    tf_fn = tf.function(jax2tf.convert(f, with_gradient=False), autograph=False,
                        input_signature=[tf.TensorSpec([1, s, s, 3], tf.float32, name=INPUT_NAME)])
    cf = tf_fn.get_concrete_function()
    out = {}
    for p in precisions:
        data, facts = _tflite_convert(cf, p, calib, int8_float_ops, batch=1)
        facts.update(_tflite_facts(data, s))
        facts["source"] = "flax"
        facts["route"] = ("Flax (lax depthwise/pointwise convs) -> jax2tf (native serialization, "
                          "static batch 1) -> tf.lite.TFLiteConverter")
        out[p] = (data, facts)
    return out


# ------------------------------------------------------------------------------ ONNX
def torch_onnx(spec: ArchSpec, weights, path: Path, opset: int | None = None) -> dict:
    import torch

    s = export_spec(spec).input_size
    m = torch_module(spec, weights, memory_format="contiguous")
    example = torch.zeros(2, 3, s, s)  # batch >= 2, or the exporter specialises batch 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    kw = {} if opset is None else {"opset_version": opset}
    torch.onnx.export(m, (example,), str(path), dynamo=True, external_data=False,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=({0: batch},), optimize=True, verbose=False, **kw)
    return _onnx_facts(path, s) | {
        "source": "torch",
        "route": "torch.export -> torch.onnx.export(dynamo=True, external_data=False, optimize=True)"}


def _onnx_facts(path: Path, s: int) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"input": {"name": m.graph.input[0].name, "layout": "NCHW", "dtype": "float32",
                      "shape": ["N", 3, s, s], "batch": "dynamic", "max_batch": None},
            "opset": opset, "ir_version": int(m.ir_version), "ops": dict(sorted(ops.items()))}


def onnx_int8(src: Path, dst: Path, calib_nhwc: np.ndarray, activation: str = "uint8") -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quant_pre_process, quantize_static)

    import onnx

    if calib_nhwc is None or not len(calib_nhwc):
        raise FedcbirError("int8 export needs calibration images")
    calib = np.ascontiguousarray(calib_nhwc.transpose(0, 3, 1, 2))
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{name: b} for b in _batches(calib, 8)])

        def get_next(self):
            return next(self._it, None)

    act = QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory(prefix="fedcbir-ort-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    s = calib.shape[-1]
    return _onnx_facts(dst, s) | {
        "source": "torch",
        "route": "model.onnx -> onnxruntime.quantization (quant_pre_process skip_symbolic_shape, "
                 "quantize_static QDQ per-channel)",
        "quantization": {"scheme": "static post-training (ONNX Runtime, MinMax calibration)",
                         "format": "QDQ", "weights": "int8 symmetric, per-channel",
                         "activations": f"{activation} per-tensor",
                         "why_activations": ("U8S8 is ONNX Runtime's fast path on x86 "
                                             "(S8S8 measured 2.7x slower here)"
                                             if activation == "uint8" else None),
                         "io": "float32 input and output",
                         "calibration_images": int(len(calib))}}


# ------------------------------------------------------------------------------ ExecuTorch
def _lower_pte(ep) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    return prog.buffer


def _pte_facts(s: int, max_batch: int) -> dict:
    return {"input": {"name": "x", "layout": "NCHW", "dtype": "float32", "shape": ["N", 3, s, s],
                      "batch": f"dynamic 1..{max_batch}", "max_batch": max_batch}}


def torch_pte(spec: ArchSpec, weights, precision: str, calib_nhwc: np.ndarray | None,
              max_batch: int = DEFAULT_PTE_MAX_BATCH) -> tuple[bytes, dict]:
    import torch

    s = export_spec(spec).input_size
    m = torch_module(spec, weights, memory_format="contiguous")
    example = (torch.zeros(2, 3, s, s),)
    dyn = ({0: torch.export.Dim("batch", min=1, max=int(max_batch))},)
    facts = _pte_facts(s, max_batch) | {"source": "torch"}
    if precision == "fp32":
        ep = torch.export.export(m, example, dynamic_shapes=dyn)
        facts["route"] = "torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte"
        return _lower_pte(ep), facts
    if precision != "int8":
        raise ValueError(precision)
    if calib_nhwc is None or not len(calib_nhwc):
        raise FedcbirError("int8 export needs calibration images")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    calib = torch.from_numpy(np.ascontiguousarray(calib_nhwc.transpose(0, 3, 1, 2)))
    graph = torch.export.export(m, example, dynamic_shapes=dyn).module()
    q = XNNPACKQuantizer()
    q.set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, q)
    with torch.no_grad():
        for b in _batches(calib, int(max_batch)):
            prepared(b)
    converted = convert_pt2e(prepared)
    ep = torch.export.export(converted, example, dynamic_shapes=dyn)
    facts["route"] = ("torch.export -> pt2e prepare/convert (XNNPACKQuantizer) -> torch.export -> "
                      "to_edge_transform_and_lower(XnnpackPartitioner) -> .pte")
    facts["quantization"] = {"scheme": "static post-training (pt2e, MinMax observers)",
                             "weights": "int8 symmetric, per-channel",
                             "activations": "int8 asymmetric, per-tensor",
                             "float_ops": ["hardswish (not annotated by XNNPACKQuantizer: runs in "
                                           "float between dequantize/quantize)"],
                             "io": "float32 input and output",
                             "calibration_images": int(len(calib))}
    return _lower_pte(ep), facts

