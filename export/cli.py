"""``fedcbir export``: checkpoint -> device bundle, and ``fedcbir export verify``.

    fedcbir export CHECKPOINT --out BUNDLE [--formats tflite,onnx,pte] [--quantize fp16,int8]
                              [--calibration ROOT] [--from torch|jax] [--json]
    fedcbir export verify BUNDLE [--catalog ROOT] [--json]

Messages of the runtimes and converters that a user can do nothing about (ExecuTorch's
``[threadpool.cpp:66] Resetting threadpool ...``, TensorFlow / PyTorch converter logs,
Python warnings) go to a log file beside the bundle (``BUNDLE.export.log`` /
``BUNDLE.verify.log``, or ``--log FILE``), not to the terminal; it is kept only when
something was written, and the command names it.

(``verify`` is recognised as the first argument; a checkpoint literally named "verify"
can be given as ``./verify``.)  No framework is imported until a command runs.
Standalone: ``python -m export.cli export ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from common.errors import FedcbirError
from common.io import print_json

DESCRIPTION = """\
Export a checkpoint to a bundle folder for on-device search, or verify a bundle.

  fedcbir export CHECKPOINT --out BUNDLE [options]
      model.tflite / model.fp16.tflite / model.int8.tflite  (LiteRT; NHWC input)
      model.onnx / model.int8.onnx                          (ONNX Runtime; NCHW input)
      model.pte / model.int8.pte                            (ExecuTorch + XNNPACK; NCHW input)
      reference.npz (weights, for verify) and manifest.json (sha256, sizes, layouts,
      preprocessing, runtime versions, parity, and per int8 file the CPU it was checked on
      with the result). Every graph outputs the UN-normalised embedding; L2-normalise
      outside (export.runtime.l2_normalize). int8 files take and return float32
      (quantize/dequantize are inside the graph).

  fedcbir export verify BUNDLE [--catalog ROOT] [--json]
      runs every file with its device runtime on the catalog's photos and compares with
      the reference framework: fp32 max|diff| <= 1e-4 and cosine >= 0.9999, fp16 cosine
      >= 0.999. int8, on up to 2000 paired queries (test products first): PASS when the
      one-sided 95 % lower bound of Recall@1(int8) - Recall@1(fp32) is >= -2 points, FAIL
      when the upper bound is below -2 points or the file computes wrong results on this
      CPU (its fast kernels against its reference kernels), otherwise "not enough queries
      to judge" (neither). Exit 1 if any file fails, else 0.
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
    e.add_argument("--int8-formats", default=None, metavar="LIST",
                   help="formats that get an int8 file (default: every exported format, except .pte for "
                        "the pretrained EfficientNet-Lite0, whose pt2e int8 file fails verify)")
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
    e.add_argument("--onnx-int8", default="u8s8-reduce-range", metavar="FORMAT",
                   choices=["u8s8-reduce-range", "u8s8", "s8s8", "u8u8"],
                   help="int8 .onnx format (QDQ, per-channel): u8s8-reduce-range (default: uint8 "
                        "activations x 7-bit int8 weights, right and fast on every CPU), u8s8 (the "
                        "previous file: 8-bit weights, wrong on x86 CPUs without VNNI), s8s8 (slow on "
                        "x86), u8u8")
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
    v.add_argument("--int8-queries", type=int, default=2000, metavar="N",
                   help="query photos for the int8 rule: the test products first, then training "
                        "products, until N (default 2000)")
    c = p.add_argument_group("common")
    c.add_argument("--seed", type=int, default=None, help="catalog split seed (default: the checkpoint's)")
    c.add_argument("--threads", type=int, default=1, help="framework threads (default 1)")
    c.add_argument("--log", metavar="FILE", help="where the runtimes' and converters' own messages go "
                                                 "(default: BUNDLE.export.log / BUNDLE.verify.log)")
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
        int8_formats=_csv(args.int8_formats, FORMATS, "--int8-formats") if args.int8_formats else None,
        source=args.source, calibration=args.calibration,
        calibration_images=args.calibration_images, pte_max_batch=args.pte_max_batch,
        tflite_int8_float_ops=("HARD_SWISH",) if args.tflite_int8 == "fast" else (),
        tflite_int8_ranges=args.tflite_int8_ranges, tflite_int8_float_stride=args.tflite_int8_float_stride,
        onnx_int8=args.onnx_int8, seed=args.seed)
    with chatter_to(_log_path(args, args.out, "export")) as say:
        opts.log = say
        manifest = export_bundle(args.target, args.out, opts)
    summary = {"bundle": str(args.out), "files": {
        name: {"bytes": f["bytes"], "format": f["format"], "precision": f["precision"],
               "source": f.get("source"), "layout": (f.get("input") or {}).get("layout"),
               "parity": f.get("parity"),
               **({"int8_check": {"ok": f["int8_check"]["ok"], "cpu": f["int8_check"]["cpu"]}}
                  if "int8_check" in f else {})}
        for name, f in manifest["files"].items()}}
    if args.json:
        print_json(summary)
    else:
        for name, f in summary["files"].items():
            par = f["parity"] or {}
            extra = (f"  max|diff| {par['max_abs_diff']:.1e}  min cos {par['min_cosine']:.6f}"
                     if par else "")
            if "int8_check" in f:
                extra += "  int8 check " + ("ok" if f["int8_check"]["ok"] else "FAILED")
            print(f"{name:20s} {f['bytes'] / 1e6:7.2f} MB  {f['precision']:4s} "
                  f"{f['layout'] or '':4s}{extra}")
        checks = [f["int8_check"] for f in summary["files"].values() if "int8_check" in f]
        if checks:
            from export.int8check import cpu_line

            print(f"int8 files checked on {cpu_line(checks[0]['cpu'])}")
        print(f"bundle written to {args.out}")
    return 0


def _verify(args) -> int:
    from export.verify import UNDECIDED, verify_bundle

    if not args.bundle:
        raise FedcbirError("usage: fedcbir export verify BUNDLE [--catalog ROOT] [--json]")
    if args.out or args.calibration:
        raise FedcbirError("--out/--calibration are export options, not verify options")
    with chatter_to(_log_path(args, args.bundle, "verify")) as say:
        report = verify_bundle(args.bundle, catalog=args.catalog, seed=args.seed,
                               test_fraction=args.test_fraction, threads=max(1, args.runtime_threads),
                               log=say, int8_queries=args.int8_queries)
    if args.json:
        print_json(report)
    else:
        from export.int8check import cpu_line

        tag = {"pass": "ok  ", "fail": "FAIL", UNDECIDED: "??  "}
        for e in report["files"]:
            print(f"{tag[e['verdict']]} {e['file']:20s} {e['runtime']:6s} {e['precision']:4s} "
                  f"max|diff| {e['max_abs_diff']:.1e}  min cos {e['min_cosine']:.6f}  "
                  f"R@1 {e['recall@1']:.3f} (ref {e['reference_recall@1']:.3f})")
            if e["precision"] == "int8":
                print(f"     int8 rule: {e['rule']}")
        undecided = [e["file"] for e in report["files"] if e["verdict"] == UNDECIDED]
        print(f"checked on {cpu_line(report['cpu'])}")
        if report["verdict"] == "fail":
            print("some files FAILED")
        elif undecided:
            print(f"no file failed; not enough queries to judge {', '.join(undecided)} (neither pass nor "
                  f"fail: use a catalog with more products or --int8-queries)")
        else:
            print("all files ok")
    return 0 if report["ok"] else 1


def _log_path(args, bundle, what: str) -> Path:
    if args.log:
        return Path(args.log)
    b = Path(bundle)
    return b.parent / f"{b.name}.{what}.log"


@contextmanager
def chatter_to(path: Path) -> Iterator[Callable[[str], None]]:
    """The runtimes' and converters' own messages go to ``path`` while the block runs: file
    descriptor 2 (C++ libraries: common.io.stderr_to) and Python's ``sys.stderr`` (Python
    warnings, and ExecuTorch's pybindings, which log ``[threadpool.cpp:66] ...`` through
    it).  Yields ``say(msg)``, which still reaches the terminal (or whatever ``sys.stderr``
    was before, e.g. under pytest).  The file is kept only when something was written; the
    last line names it."""
    from common.io import stderr_to

    path = Path(path)
    old = sys.stderr
    try:
        fd2 = old.fileno() == 2
    except (AttributeError, OSError, ValueError):
        fd2 = False
    term = os.fdopen(os.dup(2), "w", buffering=1) if fd2 else old
    start = path.stat().st_size if path.is_file() else None

    def say(msg: str) -> None:
        print(msg, file=term, flush=True)

    try:
        with ExitStack() as stack:
            try:
                stack.enter_context(stderr_to(path))
                stream = stack.enter_context(open(path, "a", buffering=1, encoding="utf-8", errors="replace"))
            except OSError as exc:  # not writable: the messages stay where they were
                say(f"(cannot write {path}: {exc.strerror}; runtime messages are not kept apart)")
                stream = None
            if stream is not None:
                sys.stderr = stream
            try:
                yield say
            finally:
                sys.stderr = old
    finally:
        size = path.stat().st_size if path.is_file() else 0
        if start is None and size == 0:
            path.unlink(missing_ok=True)
        elif size > (start or 0):
            say(f"(runtime and converter messages: {path})")
        if term is not old:
            term.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.cli")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    return parser


def main(argv=None) -> int:
    from common.cli import run

    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
