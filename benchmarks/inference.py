"""On-device inference: batch-1 latency and file size of every bundle file, side by side
with the eager frameworks, in one process and one run.

    python -m benchmarks.inference [--bundle B | --checkpoint CK] [--json]
                                   [--repeats 200] [--warmup 20] [--threads 1] [--no-full-int8]

Without ``--bundle``/``--checkpoint`` the default encoder (ImageNet EfficientNet-Lite0,
160 px, 256-d, projection from the sample catalog) is exported to a temporary bundle
first (a few minutes).  Candidates:

    eager   torch (eval, no_grad, channels-last), Keras (forward in tf.function),
            JAX/Flax (jax.jit; the training kernels: shift-and-add depthwise, matmul 1x1)
    files   every bundle file through export.runtime (LiteRT+XNNPACK, ONNX Runtime CPU,
            ExecuTorch+XNNPACK), plus, unless --no-full-int8, a FULL-integer .tflite made
            from the bundle's reference weights (no layer kept in float).

Method: one thread per runtime and the process pinned to one CPU (XLA ignores thread
limits); the same normalised image for all; each candidate warmed up, then the candidates
take turns call by call (interleaved, so load changes on a shared machine hit all
alike); median and p90 of ``--repeats`` calls.  Ratios: speed-up = eager-PyTorch median /
candidate median; int8 size = int8 bytes / fp32 bytes of the same format.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from export.int8check import cpu_info
from export.latency import build_candidates, measure

GOAL_SPEEDUP = 3.0
GOAL_INT8_SIZE = 0.35


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_checkpoint(folder: Path) -> Path:
    """The default encoder as a run starts it (ImageNet EfficientNet-Lite0, 160 px, PCA
    projection from the sample catalog's main photos)."""
    from catalog.dataset import CatalogSplit
    from catalog.images import Preprocess
    from catalog.sample import ensure_default_sample
    from models import initial
    from models.checkpoint import save_checkpoint
    from models.projection import catalog_projection, main_photos
    from models.spec import preprocess_kwargs, preset

    spec = preset()
    pre = Preprocess(**preprocess_kwargs(spec))
    root = ensure_default_sample(progress=False)
    split = CatalogSplit.load(root)
    w = catalog_projection(spec, initial.init_weights(spec, 0), main_photos(split, pre), 0)
    path = folder / "bench-checkpoint"
    save_checkpoint(path, w, {"arch": spec, "preprocessing": pre.to_dict(),
                              "framework": "torch", "catalog": str(root)})
    return path


def full_int8_tflite(bundle, folder: Path) -> Path:
    """The pure full-integer variant (hard-swish in int8 too), from reference.npz."""
    from export.bundle import catalog_images, resolve_catalog
    from export.converters import keras_tflite
    from export.verify import load_reference
    from models.spec import ArchSpec

    spec = ArchSpec.from_dict(bundle.manifest["architecture"])
    w = load_reference(bundle)
    data = bundle.manifest.get("data") or {}
    root, _ = resolve_catalog(None, {"catalog": data.get("catalog")}, _log)
    n = ((data.get("calibration") or {}).get("images")) or 256
    calib, _, _ = catalog_images(root, bundle.preprocess, int(data.get("seed", 0)),
                                 float(data.get("test_fraction", 0.2)), n, 1)
    blob, _ = keras_tflite(spec, w, ["int8"], calib, int8_float_ops=())["int8"]
    path = folder / "model.int8-full.tflite"
    path.write_bytes(blob)
    return path


def run(args) -> dict:
    from models.threads import set_threads

    info = set_threads(args.threads, pin=not args.no_pin)
    from export.runtime import open_bundle
    from models import parity

    tmp = tempfile.TemporaryDirectory(prefix="fedcbir-bench-")
    folder = Path(tmp.name)
    if args.bundle:
        bundle_path = Path(args.bundle)
    else:
        from export.bundle import ExportOptions, export_bundle

        ck = Path(args.checkpoint) if args.checkpoint else default_checkpoint(folder)
        bundle_path = folder / "bundle"
        _log(f"exporting {ck} -> {bundle_path}")
        export_bundle(ck, bundle_path, ExportOptions(log=_log))
    bundle = open_bundle(bundle_path)
    full = None
    if not args.no_full_int8:
        _log("making the full-integer .tflite variant")
        full = full_int8_tflite(bundle, folder)
    x = parity.synthetic_batch(bundle.input_size, products=1, photos=1)[0][:1]
    cands = build_candidates(bundle, x, args.threads, full)
    _log(f"timing {len(cands)} candidates x {args.repeats} calls (warm-up {args.warmup})")
    times = measure(cands, args.repeats, args.warmup)
    rows = []
    for name, meta, _ in cands:
        t = np.asarray(times[name]) * 1e3
        rows.append({"name": name, **meta, "median_ms": float(np.median(t)),
                     "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min())})
    base = next(r["median_ms"] for r in rows if r["name"] == "torch eager")
    fp32_bytes = {r["format"]: r["bytes"] for r in rows if r["kind"] == "file" and r["precision"] == "fp32"}
    fp32_ms = {r["format"]: r["median_ms"] for r in rows
               if r["kind"] == "file" and r["precision"] == "fp32" and r["name"] in bundle.files}
    for r in rows:
        r["speedup_vs_torch_eager"] = base / r["median_ms"]
        if r["kind"] == "file" and r["format"] in fp32_bytes:
            r["size_vs_fp32"] = r["bytes"] / fp32_bytes[r["format"]]
            if r["precision"] == "int8" and r["format"] in fp32_ms:
                r["int8_slower_than_fp32"] = r["median_ms"] > fp32_ms[r["format"]]
                r["speed_vs_fp32"] = fp32_ms[r["format"]] / r["median_ms"]
    files = [r for r in rows if r["kind"] == "file" and r["name"] in bundle.files]
    best = max(files, key=lambda r: r["speedup_vs_torch_eager"])
    int8 = [r for r in files if r["precision"] == "int8"]
    result = {
        "bundle": str(bundle_path),
        "architecture": {k: bundle.manifest["architecture"][k] for k in ("width", "input_size", "embedding_dim")},
        "config": {"batch": 1, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                   "interleaved": True, "pinned_cpus": info.get("cpu_affinity"), "cpu": cpu_info()["model"],
                   "versions": bundle.manifest.get("exporters")},
        "results": rows,
        "goals": {
            "best_runtime": best["name"],
            "best_speedup_vs_torch_eager": best["speedup_vs_torch_eager"],
            "speedup_goal": GOAL_SPEEDUP,
            "speedup_ok": best["speedup_vs_torch_eager"] >= GOAL_SPEEDUP,
            "int8_size_vs_fp32": {r["name"]: r["size_vs_fp32"] for r in int8},
            "int8_size_goal": GOAL_INT8_SIZE,
            "int8_size_ok": all(r["size_vs_fp32"] <= GOAL_INT8_SIZE for r in int8),
            "int8_slower_than_fp32": [r["name"] for r in int8 if r.get("int8_slower_than_fp32")],
        },
        "notes": ([
            "XNNPACK has no int8 hard-swish: the full-integer .tflite (not in the bundle) splits into "
            "many delegate partitions; the bundle's model.int8.tflite keeps HARD_SWISH in float "
            "(selective quantization) so XNNPACK runs it.",
            "ExecuTorch's XNNPACKQuantizer leaves hard-swish in float likewise (dequantize/quantize around it).",
        ] if "hswish" in json.dumps(bundle.manifest.get("architecture")) else [
            "ReLU6 network (no hard-swish): every op has an int8 kernel in XNNPACK.",
        ]) + [
            "ONNX Runtime int8 is QDQ U8S8 with 7-bit weights (reduce_range): right on x86 with or without "
            "VNNI and on ARM64 (see README, int8 on every CPU).",
        ],
    }
    tmp.cleanup()
    return result


def print_table(res: dict) -> None:
    c = res["config"]
    print(f"batch 1, {c['threads']} thread(s), {c['repeats']} interleaved calls, cpu {c['cpu']} "
          f"(pinned {c['pinned_cpus']}); model {res['architecture']}")
    print(f"{'candidate':24s} {'median ms':>9s} {'p90 ms':>8s} {'vs torch':>8s} {'MB':>6s} {'size/fp32':>9s}")
    for r in res["results"]:
        mb = f"{r['bytes'] / 1e6:6.2f}" if "bytes" in r else "     -"
        size = f"{r['size_vs_fp32']:9.2f}" if "size_vs_fp32" in r else "        -"
        print(f"{r['name']:24s} {r['median_ms']:9.3f} {r['p90_ms']:8.3f} "
              f"{r['speedup_vs_torch_eager']:7.1f}x {mb} {size}")
    g = res["goals"]
    print(f"best: {g['best_runtime']} {g['best_speedup_vs_torch_eager']:.1f}x eager PyTorch "
          f"(goal >= {g['speedup_goal']:g}x: {'ok' if g['speedup_ok'] else 'MISSED'}); int8 size "
          f"<= {g['int8_size_goal']:.0%} of fp32: {'ok' if g['int8_size_ok'] else 'MISSED'}; "
          f"int8 slower than fp32: {', '.join(g['int8_slower_than_fp32']) or 'none'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="an existing bundle folder")
    p.add_argument("--checkpoint", help="export this checkpoint to a temporary bundle first")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin the process to --threads CPUs")
    p.add_argument("--no-full-int8", action="store_true", help="skip the full-integer .tflite variant")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
