"""int8 files on THIS CPU: which CPU it is, and whether the runtime's fast kernels compute
the file's own quantized function.

Why: a runtime picks its int8 kernels by CPU.  ONNX Runtime's U8S8 kernels on x86-64
without VNNI (AVX2 / AVX-512 only) add pairs of uint8 x int8 products in 16 bits with
saturation, so an int8 file with 8-bit weights gives other (wrong) embeddings there than
on a VNNI or ARM64 CPU.  The check runs the file twice on the same images:

    fast       the runtime as a device runs it (ONNX Runtime with graph optimizations:
               fused QLinearConv ...; LiteRT with XNNPACK)
    reference  the same file with the runtime's plain reference kernels (ONNX Runtime with
               optimizations off: DequantizeLinear -> float op -> QuantizeLinear, the file's
               exact quantized function; LiteRT's built-in reference ops)

on up to ``KERNEL_CHECK_IMAGES`` images and requires (1) min cosine(fast, reference) >=
``KERNEL_MIN_COS`` and (2) that the fast kernels add at most ``KERNEL_MAX_ADDED`` of the
file's own quantization error: mean(1 - cos(fast, reference)) <= 0.25 x mean(1 - cos(reference,
fp32)) — a correct kernel differs from the reference by rounding only (measured 0.03-0.06 of
the quantization error), a saturating one by more than the quantization itself (1.3-5).
(2) is for ONNX Runtime only, whose reference path is the file's exact quantized arithmetic:
LiteRT's XNNPACK and reference kernels round differently by design (measured: 0.9 of the
small quantization error of the 40-epoch MobileNetV3 int8 .tflite), so there only (1) holds.
Every int8 file also has
to keep its mean cosine to the fp32 reference >= ``INT8_MIN_COS`` (a floor for gross
breakage; ExecuTorch has no reference kernels, so its int8 files get only this floor and
verify's recall rule).  The same bounds hold on every CPU class for
a correct file (they measure kernel faults, not quantization noise), so a check that fails
means "this file gives wrong results on this CPU" — the CPU is recorded with the result.

Standard library + numpy at import; onnx / onnxruntime only inside ``u8s8_saturates``.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

# min cosine between a file's fast and reference kernels on the same images.  Measured
# (AMD EPYC, AVX2 only): 7-bit-weight U8S8 QDQ 0.9989 (trained model, 600 photos); the
# 8-bit U8S8 file 0.967 there and 0.26 on the test model
KERNEL_MIN_COS = 0.99
KERNEL_MAX_ADDED = {"onnx": 0.25, "litert": None}  # mean(1 - cos(fast, ref)) / mean(1 - cos(ref, fp32))
KERNEL_CHECK_IMAGES = 64  # LiteRT's reference kernels take ~0.26 s per 160 px image
# floor for the MEAN cosine(int8 file, fp32 reference): catches garbage output even when too
# few queries are at hand for the recall rule (the recall rule and the kernel check do the
# rest).  Mean, not min, and low: int8 files of the EfficientNet-Lite0 encoder reach min
# 0.63 / mean 0.95 (ONNX, 7-bit weights) and min 0.36 / mean 0.86 (.pte) on sample photos
INT8_MIN_COS = 0.5
X86_FLAGS = ("sse4_1", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve", "sve2")
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
              "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
              "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
              "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2"}


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """{"model", "machine", "flags": the int8-relevant features it has, "lacks": those it
    lacks} from /proc/cpuinfo (``cpuinfo`` text for tests); x86 flags or ARM features."""
    machine = platform.machine() or "unknown"
    given = cpuinfo is not None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip().lower(), v.strip())
    have = set((fields.get("flags") or fields.get("features") or "").split())
    arm = "features" in fields and "flags" not in fields
    if given:  # text from elsewhere (tests): the machine it describes
        machine = "aarch64" if arm else "x86_64"
    wanted = ARM_FLAGS if arm else X86_FLAGS
    model = fields.get("model name") or fields.get("model") or fields.get("hardware")
    if not model and arm:
        part = fields.get("cpu part", "").lower()
        model = _ARM_PARTS.get(part, f"ARM implementer {fields.get('cpu implementer', '?')} part {part or '?'}")
    return {"model": model or platform.processor() or "unknown", "machine": machine,
            "flags": [f for f in wanted if f in have], "lacks": [f for f in wanted if f not in have],
            "source": "/proc/cpuinfo" if have else "platform"}


def cpu_line(info: dict | None = None) -> str:
    """'AMD EPYC (x86_64; avx2; lacks avx512f, avx512_vnni, ...)' for messages."""
    info = info or cpu_info()
    has = ", ".join(info["flags"]) or "none of " + ", ".join(X86_FLAGS if "x86" in info["machine"] else ARM_FLAGS)
    lacks = f"; lacks {', '.join(info['lacks'])}" if info["lacks"] else ""
    return f"{info['model']} ({info['machine']}; {has}{lacks})"


def u8s8_saturates() -> bool | None:
    """Does ONNX Runtime's U8S8 QLinearConv saturate on this CPU?  One 1x1 conv over 2
    channels, x = 255, w = 127: exact sum 64770; a 16-bit saturating pair sum gives 32767.
    None when onnx / onnxruntime is not installed."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto as T
        from onnx import helper as h
    except ImportError:
        return None
    k = 2
    init = [h.make_tensor("xs", T.FLOAT, [], [1.0]), h.make_tensor("xz", T.UINT8, [], [0]),
            h.make_tensor("w", T.INT8, [1, k, 1, 1], [127] * k), h.make_tensor("ws", T.FLOAT, [1], [1.0]),
            h.make_tensor("wz", T.INT8, [1], [0]), h.make_tensor("ys", T.FLOAT, [], [1024.0]),
            h.make_tensor("yz", T.UINT8, [], [0])]
    node = h.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = h.make_graph([node], "u8s8_probe", [h.make_tensor_value_info("x", T.UINT8, [1, k, 1, 1])],
                         [h.make_tensor_value_info("y", T.UINT8, [1, 1, 1, 1])], init)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = int(sess.run(None, {"x": np.full((1, k, 1, 1), 255, np.uint8)})[0].item()) * 1024
    return bool(abs(got - 255 * 127 * k) > 1024)  # 64770 exact vs ~32768 saturated


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def has_reference_kernels(runtime: str) -> bool:
    return runtime in ("onnx", "litert")


def kernel_check(fast: np.ndarray, reference: np.ndarray, fp32: np.ndarray,
                 max_added: float | None = 0.25) -> dict[str, Any]:
    """``fast`` / ``reference``: the file through the fast / reference kernels; ``fp32``: the
    fp32 reference's embeddings of the same images; ``max_added``: bound on the added error
    (None: not applied)."""
    c = cosines(fast, reference)
    noise = float(np.mean(1.0 - cosines(reference, fp32)))
    ratio = max(0.0, float(np.mean(1.0 - c))) / max(noise, 1e-12)
    ok = c.min() >= KERNEL_MIN_COS and (max_added is None or ratio <= max_added)
    return {"images": int(len(c)), "min_cosine": float(c.min()), "mean_cosine": float(c.mean()),
            "bound": KERNEL_MIN_COS, "added_error": ratio, "max_added_error": max_added, "ok": bool(ok)}


def floor_check(emb: np.ndarray, fp32: np.ndarray) -> dict[str, Any]:
    c = cosines(emb, fp32)
    return {"images": int(len(c)), "min_cosine": float(c.min()), "mean_cosine": float(c.mean()),
            "bound": INT8_MIN_COS, "ok": bool(c.mean() >= INT8_MIN_COS)}


def check_int8_file(bundle, name: str, x: np.ndarray, fast: np.ndarray, fp32: np.ndarray,
                    cpu: dict | None = None, threads: int = 1) -> dict[str, Any]:
    """The check recorded in the manifest (export) and repeated by verify: ``fast`` = the
    file's embeddings of ``x`` as a device computes them, ``fp32`` = the fp32 reference's."""
    from export.runtime import load_embedder

    cpu = cpu or cpu_info()
    info = bundle.files[name]
    runtime = {"tflite": "litert", "onnx": "onnx", "pte": "pte"}[info["format"]]
    out: dict[str, Any] = {"cpu": cpu, "runtime": None, "images": int(len(x))}
    if has_reference_kernels(runtime):
        ref = load_embedder(bundle, file=name, threads=threads, reference_kernels=True)
        out["runtime"] = f"{info['runtime']['package']} {ref.runtime_version}"
        k = KERNEL_CHECK_IMAGES
        out["kernels"] = kernel_check(fast[:k], ref.embed(x[:k]), fp32[:k], KERNEL_MAX_ADDED[runtime]) | {
            "reference": {"onnx": "ONNX Runtime, graph optimizations off (DequantizeLinear -> float op -> "
                                  "QuantizeLinear: the file's exact quantized function)",
                          "litert": "LiteRT built-in reference kernels (no XNNPACK)"}[runtime]}
    else:
        out["kernels"] = None
        out["kernels_note"] = "ExecuTorch has no reference kernels: only the floor against fp32 and verify's recall rule"
    if runtime == "onnx":
        out["u8s8_saturates_here"] = u8s8_saturates()
    out["vs_fp32"] = floor_check(fast, fp32)
    out["ok"] = bool(out["vs_fp32"]["ok"] and (out["kernels"] is None or out["kernels"]["ok"]))
    return out


def check_reason(check: dict) -> str:
    """One line: why an int8 check failed (or '' when it passed), with the CPU."""
    parts = []
    k = check.get("kernels")
    if k and not k["ok"]:
        bound = (f", <= {k['max_added_error']}" if k["max_added_error"] is not None else ", no bound")
        parts.append(f"its fast kernels differ from its reference kernels (min cos {k['min_cosine']:.4f}, "
                     f">= {k['bound']}; they add {k['added_error']:.2f} of its quantization error{bound})")
    f = check.get("vs_fp32")
    if f and not f["ok"]:
        parts.append(f"mean cos {f['mean_cosine']:.4f} against fp32 (< {f['bound']})")
    if not parts:
        return ""
    sat = " (ONNX Runtime's U8S8 kernels saturate on this CPU)" if check.get("u8s8_saturates_here") else ""
    return f"wrong results on {cpu_line(check.get('cpu'))}{sat}: " + "; ".join(parts)
