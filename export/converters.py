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
  Two accuracy measures on top (``int8_ranges="mse"``, ``int8_float_stride=8``; the
  previous file is ``int8_ranges="minmax", int8_float_stride=0``):

  - activation ranges by least squared error, not min/max.  The calibrated activations
    are heavy-tailed (BN outputs with per-channel std ~1 reach +-20 on a few pixels), so
    the min/max range that the converter takes leaves ~4.5 effective bits for the bulk of
    the values.  After the converter's calibration pass (``_experimental_calibrate_only``,
    the switch that ``tf.lite.experimental.QuantizationDebugger`` uses) every activation
    tensor gets the [lo, hi] that minimises N_in*step^2/12 + sum_outside (x - clip)^2 on a
    2048-bin histogram of the calibration images (lo and hi searched independently over
    5..100 % of the observed min and max), then the same MLIR quantizer runs.  Same
    graph, size and speed.
  - the high-resolution layers (stem and the blocks with output stride <= 8: stem and
    blocks 0-2 of MobileNetV3-Small, ~1 % of the weights) stay float: per-layer
    sensitivity showed their int8 noise changes the most rank-1 neighbours; +17 kB
    (32.7 % of fp32 instead of 32.3 %) and ~+0.015 ms.  Keras route only (the names
    that identify them are Keras layer names).
  On the 40-epoch centralized checkpoint (width 1.0, 96 px; 6 calibration draws of 256
  training images) the rank-1 neighbour agreement with fp32 rose from 0.81 to 0.88 on
  the 300 test queries (0.68 to 0.81 on 1200 training-product queries), the mean-centred
  cosine from 0.991 to 0.9945, and test Recall@1 from 0.228 (min 0.207: the failure in
  the issue) to 0.244 (min 0.233) against 0.243 fp32.  Measured and not taken: keeping
  FULLY_CONNECTED float (cosine up, agreement not, 37.7 % of fp32 size), more or
  better-spread calibration images (min/max ranges only widen), int16 activations
  ("16x8": agreement 0.94 but LiteRT's reference kernels, 29 ms, 50x slower).
* torch -> ONNX: ``torch.onnx.export(dynamo=True, external_data=False)`` with a dynamic
  batch (example batch 2).  int8: ONNX Runtime static quantization, QDQ, per-channel
  int8 weights with ``reduce_range=True`` (7-bit: -64..64), uint8 activations; pre-processing
  with ``skip_symbolic_shape=True`` (the symbolic shape inference fails on dynamo-exported
  graphs).  Why 7-bit weights: on x86-64 without VNNI (AVX2 or AVX-512 only, like the AMD
  EPYC this was measured on) ORT's U8S8 kernels add pairs of uint8 x int8 products in
  16 bits with saturation (VPMADDUBSW): 255*127*2 = 64770 > 32767.  Measured here on a
  one-layer QLinearConv: exact 64770, ORT 32768; with 7-bit weights 255*64*2 = 32640 always
  fits.  The 8-bit file's embeddings there differ from its own exact reference (ORT with
  graph optimizations off: DequantizeLinear -> float op -> QuantizeLinear) by cosine down to
  0.26 (test model) / 0.88 (trained); the 7-bit file matches its reference on every CPU
  class (VNNI and ARM64 kernels do not saturate) at the same speed.  S8S8 QDQ (ORT's generic
  default) is exact too but 2.8x slower on x86 (most convs are not fused there); U8U8 is
  slower and its safety depends on which kernel ORT picks (the QOperator U8U8 file
  saturated here).  Table: README "Export".
* torch -> ExecuTorch: ``torch.export`` (batch 1..max_batch: the upper bound sizes the
  memory plan) -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner; int8 by
  pt2e with ``XNNPACKQuantizer`` (symmetric, per-channel), which leaves hard-swish in
  float with quantize/dequantize around it, as above.
* Flax -> LiteRT: ``jax2tf.convert`` (native serialization, the only mode in jax 0.10)
  with a STATIC batch of 1, then the same TFLite converter.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.reference import export_spec, flax_function, keras_model, torch_module
from common.errors import FedcbirError
from models.spec import ArchSpec

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
DEFAULT_PTE_MAX_BATCH = 8
INT8_TFLITE_FLOAT_OPS = ("HARD_SWISH",)
INT8_TFLITE_RANGES = ("mse", "minmax")  # activation range rule of the int8 .tflite; first: default
INT8_TFLITE_FLOAT_STRIDE = 8  # layers with output stride <= this stay float (0: none)
_HIST_BINS = 2048
_RANGE_FRACTIONS = np.linspace(0.05, 1.0, 96)


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _batches(calib: np.ndarray, size: int):
    for i in range(0, len(calib), size):
        yield calib[i:i + size]


# ------------------------------------------------------------------------------ LiteRT
def high_resolution_layers(spec: ArchSpec, max_stride: int) -> list[str]:
    """Keras layer-name prefixes of the stem and the blocks whose output stride is at most
    ``max_stride`` (["stem", "blocks_0", "blocks_1", "blocks_2"] for MobileNetV3-Small, 8)."""
    from models.spec import resolve

    r = resolve(export_spec(spec))
    stride = r.stem.stride
    if max_stride < stride:
        return []
    out = ["stem"]
    for b in r.blocks:
        stride *= b.dw.stride
        if stride > max_stride:
            break
        out.append(f"blocks_{b.index}")
    return out


def _op_names(model) -> list[str]:
    """Output tensor name of every operator (the quantizer's node names)."""
    sg = model.subgraphs[0]
    names = []
    for op in sg.operators:
        if op.outputs is not None and len(op.outputs):
            n = sg.tensors[op.outputs[0]].name
            names.append(n.decode() if isinstance(n, bytes) else str(n))
    return names


def _nodes_of_layers(names: Sequence[str], prefixes: Sequence[str]) -> list[str]:
    """The node names that belong to the given Keras layers (fused names are ';'-joined
    TF node paths such as ``fedcbir_encoder_1/blocks_0_dw_relu_1/Relu``)."""
    if not prefixes:
        return []
    pat = re.compile(r"(?:^|/)(?:" + "|".join(re.escape(p) for p in prefixes) + r")_")
    return [n for n in names if any(pat.search(part) for part in n.split(";"))]


def _best_range(hist: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """[lo', hi'] (lo' a fraction of lo, hi' of hi) minimising the expected squared int8
    error over a histogram of [lo, hi]: N_in * step^2 / 12 + sum_outside (x - clip)^2."""
    edges = np.linspace(lo, hi, len(hist) + 1)
    x = (edges[:-1] + edges[1:]) / 2
    h = hist.astype(np.float64)
    c0, c1, c2 = (np.concatenate([[0.0], np.cumsum(h * x ** k)]) for k in range(3))
    lows = _RANGE_FRACTIONS * lo if lo < 0 else np.array([lo])
    highs = _RANGE_FRACTIONS * hi if hi > 0 else np.array([hi])
    il = np.searchsorted(x, lows)  # bins below the low clip: [0, il)
    ih = np.searchsorted(x, highs, side="right")  # bins above the high clip: [ih, n)
    lo_, hi_ = lows[:, None], highs[None, :]
    below = (c2[il] - 2 * lows * c1[il] + lows ** 2 * c0[il])[:, None]
    above = ((c2[-1] - c2[ih]) - 2 * highs * (c1[-1] - c1[ih]) + highs ** 2 * (c0[-1] - c0[ih]))[None, :]
    step = (hi_ - lo_) / 255.0
    err = (c0[ih][None, :] - c0[il][:, None]) * step ** 2 / 12.0 + below + above
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(lows[i]), float(highs[j])


def _mse_ranges(model, calibrated: bytes, calib: np.ndarray, step: int) -> dict:
    """Replace the calibrated min/max of every activation tensor in ``model`` (the parsed
    ``calibrated`` flatbuffer) by the least-squared-error range; returns facts."""
    from ai_edge_litert.interpreter import Interpreter

    sg = model.subgraphs[0]
    ranges = {}
    for i, t in enumerate(sg.tensors):
        q = t.quantization
        if q is not None and q.min is not None and q.max is not None and len(q.min) == 1:
            lo, hi = float(q.min[0]), float(q.max[0])
            if hi > lo:
                ranges[i] = (lo, hi)
    # preserve_all_tensors also keeps the default delegate off: every tensor is readable
    it = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True, num_threads=1)
    inp = it.get_input_details()[0]["index"]
    it.resize_tensor_input(inp, [step, *calib.shape[1:]], strict=False)
    it.allocate_tensors()
    hists = {i: np.zeros(_HIST_BINS, np.int64) for i in ranges}
    for b in _batches(calib, step):
        if len(b) != step:
            continue
        it.set_tensor(inp, np.ascontiguousarray(b, np.float32))
        it.invoke()
        for i, (lo, hi) in ranges.items():
            hists[i] += np.histogram(it.get_tensor(i), bins=_HIST_BINS, range=(lo, hi))[0]
    kept = []
    for i, (lo, hi) in ranges.items():
        if not hists[i].sum():
            continue
        new_lo, new_hi = _best_range(hists[i], lo, hi)
        q = sg.tensors[i].quantization
        q.min = np.array([new_lo], np.float32)
        q.max = np.array([new_hi], np.float32)
        kept.append((new_hi - new_lo) / (hi - lo))
    return {"tensors": len(kept), "median_range_kept": round(float(np.median(kept)), 3) if kept else None}


def _tflite_int8(concrete_fn, calib: np.ndarray, step: int, float_ops: Sequence[str],
                 float_layers: Sequence[str], ranges: str) -> tuple[bytes, dict]:
    """Calibrate (TFLite converter), choose the activation ranges, quantize (MLIR quantizer)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tfl_convert
    from tensorflow.lite.tools import flatbuffer_utils

    def rep():
        for b in _batches(calib, step):
            if len(b) == step:
                yield [b]

    c = tf.lite.TFLiteConverter.from_concrete_functions([concrete_fn])
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = rep
    c.inference_input_type = tf.float32
    c.inference_output_type = tf.float32
    c.target_spec.supported_ops = ([tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
                                   if float_ops else [tf.lite.OpsSet.TFLITE_BUILTINS_INT8])
    # calibration only (float model + per-tensor min/max), then the same quantizer call that
    # convert() makes: what tf.lite.experimental.QuantizationDebugger does for selective
    # quantization, with a step in between that can set the ranges
    c._experimental_calibrate_only = True  # noqa: SLF001
    calibrated = c.convert()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    facts: dict[str, Any] = {}
    if ranges == "mse":
        facts = _mse_ranges(model, calibrated, calib, step)
        calibrated = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    elif ranges != "minmax":
        raise ValueError(ranges)
    nodes = _nodes_of_layers(_op_names(model), float_layers) if float_ops else []
    data = tfl_convert.mlir_quantize(calibrated, disable_per_channel=False, fully_quantize=False,
                                     enable_numeric_verify=False, denylisted_ops=list(float_ops),
                                     denylisted_nodes=nodes)
    facts["float_nodes"] = len(nodes)
    return data, facts


def _tflite_convert(concrete_fn, precision: str, calib: np.ndarray | None,
                    float_ops: Sequence[str], batch: int | None, float_layers: Sequence[str] = (),
                    ranges: str = INT8_TFLITE_RANGES[0]) -> tuple[bytes, dict]:
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
    float_layers = list(float_layers) if float_ops else []  # full integer: nothing stays float
    data, q = _tflite_int8(concrete_fn, calib, step, float_ops, float_layers, ranges)
    facts["quantization"] = {
        "scheme": "static post-training (TFLite converter calibration + MLIR quantizer, representative dataset)",
        "weights": "int8 symmetric, per-channel", "activations": "int8 asymmetric, per-tensor",
        "io": "float32 input and output (QUANTIZE / DEQUANTIZE inside the graph)",
        "activation_ranges": ({"method": "mse", "tensors": q["tensors"],
                               "median_range_kept": q["median_range_kept"],
                               "rule": "per tensor [lo, hi] minimising the expected squared int8 error "
                                       "(rounding inside + clipping outside) on a histogram of the "
                                       "calibration activations"}
                              if ranges == "mse" else {"method": "minmax"}),
        "why_activation_ranges": ("the activations are heavy-tailed (a few pixels at ~20x the per-channel "
                                  "std): min/max ranges waste most int8 levels on them; least-squares "
                                  "ranges raised the rank-1 agreement with fp32 on every calibration draw"
                                  if ranges == "mse" else None),
        "float_ops": list(float_ops),
        "why_float_ops": ("XNNPACK has no int8 HARD_SWISH: in int8 it splits the graph into "
                          "~20 delegate partitions and the file runs slower than fp32"
                          if float_ops else None),
        "float_layers": float_layers,
        "float_nodes": q["float_nodes"],
        "why_float_layers": ("the high-resolution layers (stem and the blocks at output stride <= 8 "
                             "by default) hold ~1 % of the weights but their int8 noise moves the "
                             "rank-1 neighbours the most; float there costs ~5 % latency and ~1 % size"
                             if float_layers else None),
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
                 int8_float_ops: Sequence[str] = INT8_TFLITE_FLOAT_OPS,
                 int8_ranges: str = INT8_TFLITE_RANGES[0],
                 int8_float_stride: int = INT8_TFLITE_FLOAT_STRIDE) -> dict[str, tuple[bytes, dict]]:
    """Keras model -> {precision: (tflite bytes, facts)} (dynamic batch, NHWC).

    int8: ``int8_float_ops`` op types and (unless that is empty: full integer) the layers
    with output stride <= ``int8_float_stride`` stay float; ``int8_ranges`` "mse" or
    "minmax" (see the module docstring)."""
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
    float_layers = high_resolution_layers(spec, int8_float_stride) if int8_float_stride > 0 else []
    out = {}
    for p in precisions:
        data, facts = _tflite_convert(frozen, p, calib, int8_float_ops, batch=8, float_layers=float_layers,
                                      ranges=int8_ranges)
        facts.update(_tflite_facts(data, s))
        facts["source"] = "keras"
        facts["route"] = "Keras 3 functional model -> tf.function (frozen) -> tf.lite.TFLiteConverter"
        out[p] = (data, facts)
    return out


def jax_tflite(spec: ArchSpec, weights, precisions: Sequence[str], calib: np.ndarray | None,
               int8_float_ops: Sequence[str] = INT8_TFLITE_FLOAT_OPS,
               int8_ranges: str = INT8_TFLITE_RANGES[0],
               int8_float_stride: int = INT8_TFLITE_FLOAT_STRIDE) -> dict[str, tuple[bytes, dict]]:
    """Flax model -> jax2tf -> LiteRT, static batch 1 (NHWC).

    ``int8_float_stride`` has no effect here: the jax2tf graph has no Keras layer names to
    find the high-resolution layers by (facts: ``float_layers: []``)."""
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
        data, facts = _tflite_convert(cf, p, calib, int8_float_ops, batch=1, ranges=int8_ranges)
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


ONNX_INT8_FORMATS = {  # name -> (activations, weights, reduce_range); first: the default
    "u8s8-reduce-range": ("uint8", "int8", True),
    "u8s8": ("uint8", "int8", False),
    "s8s8": ("int8", "int8", False),
    "u8u8": ("uint8", "uint8", False),
}


def onnx_int8(src: Path, dst: Path, calib_nhwc: np.ndarray, fmt: str = "u8s8-reduce-range") -> dict:
    """Static QDQ per-channel int8 of ``src`` in one of ``ONNX_INT8_FORMATS`` (see the module
    docstring for why the default has 7-bit weights; "u8s8" is the previous file)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quant_pre_process, quantize_static)

    import onnx

    if fmt not in ONNX_INT8_FORMATS:
        raise FedcbirError(f"unknown ONNX int8 format {fmt!r}: choose one of {', '.join(ONNX_INT8_FORMATS)}")
    activation, weight, reduce_range = ONNX_INT8_FORMATS[fmt]
    if calib_nhwc is None or not len(calib_nhwc):
        raise FedcbirError("int8 export needs calibration images")
    calib = np.ascontiguousarray(calib_nhwc.transpose(0, 3, 1, 2))
    name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{name: b} for b in _batches(calib, 8)])

        def get_next(self):
            return next(self._it, None)

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(prefix="fedcbir-ort-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=qtype[activation],
                        weight_type=qtype[weight], calibrate_method=CalibrationMethod.MinMax)
    s = calib.shape[-1]
    bits = 7 if reduce_range else 8
    return _onnx_facts(dst, s) | {
        "source": "torch",
        "route": "model.onnx -> onnxruntime.quantization (quant_pre_process skip_symbolic_shape, "
                 f"quantize_static QDQ per-channel{', reduce_range' if reduce_range else ''})",
        "quantization": {"scheme": "static post-training (ONNX Runtime, MinMax calibration)",
                         "format": "QDQ", "onnx_int8": fmt,
                         "weights": (f"{weight} {'symmetric' if weight == 'int8' else 'asymmetric'}, "
                                     f"per-channel, {bits}-bit" + (" (reduce_range: -64..64)" if reduce_range else "")),
                         "activations": f"{activation} per-tensor",
                         "why": ({"u8s8-reduce-range":
                                  "uint8 x int8 is ONNX Runtime's fast int8 path on x86 and ARM64; 7-bit weights "
                                  "keep its 16-bit pair sums from saturating on x86-64 without VNNI "
                                  "(255*64*2 = 32640 <= 32767), so the file gives the same results on every CPU",
                                  "u8s8": "the previous file: 8-bit weights; ONNX Runtime's U8S8 kernels saturate "
                                          "on x86-64 CPUs without VNNI (AVX2 / AVX-512 only)",
                                  "s8s8": "ONNX Runtime's generic default; exact everywhere, but on x86 most convs "
                                          "are not fused and it runs slower than fp32",
                                  "u8u8": "8-bit weights without the U8S8 kernels; slower on x86"}[fmt]),
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

