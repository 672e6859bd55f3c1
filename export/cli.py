"""``fedcbir export``: checkpoint -> device bundle, and ``fedcbir export verify``.

    fedcbir export CHECKPOINT --out BUNDLE [--formats tflite,onnx,pte] [--quantize fp16,int8]
                              [--calibration ROOT] [--from torch|jax] [--json]
    fedcbir export verify BUNDLE [--catalog ROOT] [--json]

(``verify`` is recognised as the first argument; a checkpoint literally named "verify"
can be given as ``./verify``.)  No framework is imported until a command runs.
Standalone: ``python -m export.cli export ...``.
"""
from __future__ import annotations

import argparse
import sys

from fedcbir.errors import FedcbirError
from fedcbir.io import print_json

DESCRIPTION = """\
Export a checkpoint to a bundle folder for on-device search, or verify a bundle.

  fedcbir export CHECKPOINT --out BUNDLE [options]
      model.tflite / model.fp16.tflite / model.int8.tflite  (LiteRT; NHWC input)
      model.onnx / model.int8.onnx                          (ONNX Runtime; NCHW input)
      model.pte / model.int8.pte                            (ExecuTorch + XNNPACK; NCHW input)
      reference.npz (weights, for verify) and manifest.json (sha256, sizes, layouts,
      preprocessing, runtime versions, parity). Every graph outputs the UN-normalised
      embedding; L2-normalise outside (export.runtime.l2_normalize). int8 files take and
      return float32 (quantize/dequantize are inside the graph).

  fedcbir export verify BUNDLE [--catalog ROOT] [--json]
      runs every file with its device runtime on the catalog's test products and compares
      with the reference framework: fp32 max|diff| <= 1e-4 and cosine >= 0.9999, fp16
      cosine >= 0.999, int8 Recall@1 at most 2 points below fp32. Exit 1 if any file fails.
"""


def _csv(value: str, allowed: tuple[str, ...], what: str, allow_none: bool = False) -> tuple[str, ...]:
    items = [v.strip().lower() for v in value.split(",") if v.strip()]
    if allow_none and items in (["none"], []):
        return ()
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise FedcbirError(f"{what}: unknown value(s) {', '.join(bad) or '(empty)'}; choose from "
                           f"{', '.join(allowed)}{' or none' if allow_none else ''}")
    return tuple(dict.fromkeys(items))


def register(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to TFLite / ONNX / ExecuTorch bundles; "
                                      "'export verify BUNDLE' checks one",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="CHECKPOINT|verify",
                   help="checkpoint (prefix, folder, .npz or .json), or the word 'verify'")
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help="(verify) the bundle folder")
    e = p.add_argument_group("export options")
    e.add_argument("--out", metavar="BUNDLE", help="bundle folder to write (replaced if it is a bundle)")
    e.add_argument("--formats", default="tflite,onnx,pte", help="comma list of tflite, onnx, pte "
                                                                 "(default: all)")
    e.add_argument("--quantize", default="fp16,int8",
                   help="extra precisions besides fp32: fp16 (tflite only), int8; 'none' for fp32 only "
                        "(default: fp16,int8)")
    e.add_argument("--calibration", metavar="ROOT",
                   help="catalog for int8 calibration (training products) and parity images (test "
                        "products); default: the checkpoint's catalog, else the built-in sample")
    e.add_argument("--calibration-images", type=int, default=256, metavar="N",
                   help="int8 calibration images from the training products (default 256)")
    e.add_argument("--from", dest="source", default="torch", choices=["torch", "jax"],
                   help="torch (default): .tflite from the Keras model, .onnx/.pte from PyTorch; "
                        "jax: .tflite from the Flax model through jax2tf (static batch 1); "
                        ".onnx/.pte always come from PyTorch")
    e.add_argument("--tflite-int8", choices=["fast", "full"], default="fast",
                   help="fast (default): hard-swish (XNNPACK has no int8 hard-swish) and the "
                        "high-resolution layers (see --tflite-int8-float-stride) stay float inside "
                        "the int8 .tflite; full: every op int8 (integer-only hardware)")
    e.add_argument("--tflite-int8-ranges", choices=["mse", "minmax"], default="mse",
                   help="int8 .tflite activation ranges: mse (default): per tensor, the range with the "
                        "least squared int8 error on the calibration activations; minmax: the "
                        "converter's min/max (the earlier default)")
    e.add_argument("--tflite-int8-float-stride", type=int, default=8, metavar="N",
                   help="with --tflite-int8 fast: the stem and the blocks with output stride <= N stay "
                        "float in the int8 .tflite (default 8; 0: none). Keras route only")
    e.add_argument("--pte-max-batch", type=int, default=8, metavar="N",
                   help="largest batch the .pte files accept (sizes their memory plan; default 8)")
    v = p.add_argument_group("verify options")
    v.add_argument("--catalog", metavar="ROOT",
                   help="catalog whose test products are embedded (default: the one in the manifest, "
                        "else the built-in sample)")
    v.add_argument("--test-fraction", type=float, default=None,
                   help="test split fraction (default: the manifest's)")
    v.add_argument("--runtime-threads", type=int, default=1, metavar="N",
                   help="threads per runtime (default 1)")
    c = p.add_argument_group("common")
    c.add_argument("--seed", type=int, default=None, help="catalog split seed (default: the checkpoint's)")
    c.add_argument("--threads", type=int, default=1, help="framework threads (default 1)")
    c.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(func=run_export_command)


def run_export_command(args) -> int:
    from models.threads import set_threads

    set_threads(max(1, int(args.threads)))
    if args.target == "verify":
        return _verify(args)
    return _export(args)


def _export(args) -> int:
    from export.bundle import FORMATS, QUANTIZATIONS, ExportOptions, export_bundle

    if args.bundle:
        raise FedcbirError(f"unexpected argument {args.bundle!r} (did you mean --out {args.bundle}?)")
    if not args.out:
        raise FedcbirError("give the bundle folder with --out BUNDLE")
    if args.catalog:
        raise FedcbirError("--catalog is a verify option; for export use --calibration ROOT")
    opts = ExportOptions(
        formats=_csv(args.formats, FORMATS, "--formats"),
        quantize=_csv(args.quantize, QUANTIZATIONS, "--quantize", allow_none=True),
        source=args.source, calibration=args.calibration,
        calibration_images=args.calibration_images, pte_max_batch=args.pte_max_batch,
        tflite_int8_float_ops=("HARD_SWISH",) if args.tflite_int8 == "fast" else (),
        tflite_int8_ranges=args.tflite_int8_ranges, tflite_int8_float_stride=args.tflite_int8_float_stride,
        seed=args.seed)
    manifest = export_bundle(args.target, args.out, opts)
    summary = {"bundle": str(args.out), "files": {
        name: {"bytes": f["bytes"], "format": f["format"], "precision": f["precision"],
               "source": f.get("source"), "layout": (f.get("input") or {}).get("layout"),
               "parity": f.get("parity")}
        for name, f in manifest["files"].items()}}
    if args.json:
        print_json(summary)
    else:
        for name, f in summary["files"].items():
            par = f["parity"] or {}
            extra = (f"  max|diff| {par['max_abs_diff']:.1e}  min cos {par['min_cosine']:.6f}"
                     if par else "")
            print(f"{name:20s} {f['bytes'] / 1e6:7.2f} MB  {f['precision']:4s} "
                  f"{f['layout'] or '':4s}{extra}")
        print(f"bundle written to {args.out}")
    return 0


def _verify(args) -> int:
    from export.verify import verify_bundle

    if not args.bundle:
        raise FedcbirError("usage: fedcbir export verify BUNDLE [--catalog ROOT] [--json]")
    if args.out or args.calibration:
        raise FedcbirError("--out/--calibration are export options, not verify options")
    report = verify_bundle(args.bundle, catalog=args.catalog, seed=args.seed,
                           test_fraction=args.test_fraction, threads=max(1, args.runtime_threads))
    if args.json:
        print_json(report)
    else:
        for e in report["files"]:
            print(f"{'ok  ' if e['ok'] else 'FAIL'} {e['file']:20s} {e['runtime']:6s} {e['precision']:4s} "
                  f"max|diff| {e['max_abs_diff']:.1e}  min cos {e['min_cosine']:.6f}  "
                  f"R@1 {e['recall@1']:.3f} (ref {e['reference_recall@1']:.3f})")
        print("all files ok" if report["ok"] else "some files FAILED")
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.cli")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    return parser


def main(argv=None) -> int:
    from fedcbir.cli import run

    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
