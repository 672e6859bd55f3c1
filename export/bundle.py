"""Checkpoint -> bundle folder (all files, manifest with parity), written atomically.

    export_bundle("runs/x/checkpoints/round-0010", "bundle/", ExportOptions())

The bundle is assembled in a hidden temporary folder beside ``out`` and renamed into
place at the end, so an interrupted export leaves either nothing or the previous bundle
(an existing bundle is replaced; an existing non-empty folder that is not a bundle is
refused).  Calibration images (int8) come from the TRAINING products of a catalog; the
parity images recorded in the manifest from its TEST products.
"""
from __future__ import annotations

import datetime as _dt
import io
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from export.manifest import (FILE_NAMES, FORMAT, MANIFEST, REFERENCE_FILE, RUNTIMES, SCHEMA_VERSION,
                             dist_version, exporter_versions, sha256_file)
from common import __version__
from common.errors import FedcbirError
from common.io import write_json_atomic

FORMATS = ("tflite", "onnx", "pte")
QUANTIZATIONS = ("fp16", "int8")
SOURCES = ("torch", "jax")
# which precisions each format supports (fp16 only for LiteRT)
FORMAT_PRECISIONS = {"tflite": ("fp32", "fp16", "int8"), "onnx": ("fp32", "int8"), "pte": ("fp32", "int8")}
# parity goals (also used by verify)
FP32_MAX_ABS = 1e-4
FP32_MIN_COS = 0.9999
FP16_MIN_COS = 0.999
# int8: verify's paired rule on Recall@1 (export.verify): the margin and the one-sided
# confidence of its bounds; the kernel / fp32-floor bounds are in export.int8check
INT8_MAX_RECALL_DROP = 0.02
INT8_CONFIDENCE = 0.95
INT8_CHECK_IMAGES = 256  # images of the export-time int8 check (parity, then calibration images)


@dataclass
class ExportOptions:
    formats: Sequence[str] = FORMATS
    quantize: Sequence[str] = QUANTIZATIONS
    int8_formats: Sequence[str] | None = None  # formats that get an int8 file (None: every format, but
    # no int8 .pte for a pretrained architecture, whose pt2e int8 file is wrong; see export_bundle)
    source: str = "torch"  # torch: TFLite from Keras, ONNX/PTE from PyTorch; jax: TFLite from Flax
    calibration: str | os.PathLike | None = None  # catalog root; default: checkpoint's / sample
    calibration_images: int = 256
    parity_images: int = 16
    pte_max_batch: int = 8
    tflite_int8_float_ops: Sequence[str] = ("HARD_SWISH",)  # () = full integer (nothing float)
    tflite_int8_ranges: str = "mse"  # activation ranges: mse (least squares) | minmax (the converter's)
    tflite_int8_float_stride: int = 8  # stem + blocks with output stride <= this stay float; 0: none
    onnx_int8: str = "u8s8-reduce-range"  # export.converters.ONNX_INT8_FORMATS; "u8s8": the previous file
    seed: int | None = None  # catalog split seed (default: the checkpoint's, else 0)
    test_fraction: float | None = None  # default: the checkpoint's, else 0.2
    log: Callable[[str], None] | None = None
    plan: list = field(default_factory=list)  # filled: (file, format, precision, source)

    def __post_init__(self):
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise FedcbirError(f"unknown format(s) {', '.join(bad) or '(none)'}: choose from {', '.join(FORMATS)}")
        bad = [q for q in self.quantize if q not in QUANTIZATIONS]
        if bad:
            raise FedcbirError(f"unknown quantization(s) {', '.join(bad)}: choose from "
                               f"{', '.join(QUANTIZATIONS)} (or 'none')")
        if self.source not in SOURCES:
            raise FedcbirError(f"--from must be one of {', '.join(SOURCES)}")
        if self.calibration_images < 1 or self.parity_images < 1 or self.pte_max_batch < 1:
            raise FedcbirError("calibration/parity image counts and the pte max batch must be >= 1")
        from export.converters import ONNX_INT8_FORMATS

        if self.onnx_int8 not in ONNX_INT8_FORMATS:
            raise FedcbirError(f"unknown ONNX int8 format {self.onnx_int8!r}: choose one of "
                               f"{', '.join(ONNX_INT8_FORMATS)}")
        if self.tflite_int8_ranges not in ("mse", "minmax"):
            raise FedcbirError("tflite int8 activation ranges must be mse or minmax")
        if self.tflite_int8_float_stride < 0:
            raise FedcbirError("the tflite int8 float stride must be >= 0 (0: no float layers)")


def plan_files(opts: ExportOptions) -> list[tuple[str, str, str, str]]:
    """(file name, format, precision, source framework) in a fixed order."""
    out = []
    for fmt in FORMATS:
        if fmt not in opts.formats:
            continue
        for prec in FORMAT_PRECISIONS[fmt]:
            if prec != "fp32" and prec not in opts.quantize:
                continue
            if prec == "int8" and opts.int8_formats is not None and fmt not in opts.int8_formats:
                continue
            src = ("flax" if opts.source == "jax" else "keras") if fmt == "tflite" else "torch"
            out.append((FILE_NAMES[(fmt, prec)], fmt, prec, src))
    return out


# ------------------------------------------------------------------------------ catalog data
def _split_params(meta: dict, opts: ExportOptions) -> tuple[int, float]:
    rc = meta.get("run_config") or {}
    seed = opts.seed if opts.seed is not None else meta.get("seed", rc.get("seed", 0))
    tf = opts.test_fraction if opts.test_fraction is not None else meta.get(
        "test_fraction", rc.get("test-fraction", 0.2))
    return int(seed or 0), float(tf or 0.2)


def resolve_catalog(explicit, meta: dict | None, log) -> tuple[Path, str]:
    """(root, how it was chosen): --calibration/--catalog, else the checkpoint's catalog,
    else the built-in sample catalog."""
    if explicit:
        root = Path(explicit)
        if not root.is_dir():
            raise FedcbirError(f"catalog not found: {root}")
        return root, "given"
    recorded = (meta or {}).get("catalog")
    if recorded and Path(recorded).is_dir():
        return Path(recorded), "checkpoint"
    from catalog.sample import ensure_default_sample

    if recorded:
        log(f"the checkpoint's catalog {recorded} is not here; using the built-in sample catalog")
    return ensure_default_sample(progress=False), "built-in sample"


def catalog_images(root: Path, pre, seed: int, test_fraction: float, n_calib: int,
                   n_parity: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(calibration images from training products, parity images from test products, info)."""
    from catalog.dataset import CatalogSplit
    from catalog.images import normalize

    split = CatalogSplit.load(root, seed=seed, test_fraction=test_fraction)

    def pick(products, n, salt):
        rng = np.random.default_rng([seed, salt])
        chosen, count = [], 0
        for i in rng.permutation(len(products)):
            chosen.append(products[int(i)])
            count += len(products[int(i)].images)
            if count >= n:
                break
        table = split.table(chosen, pre)
        if not len(table):
            raise FedcbirError(f"{root}: no readable images for calibration")
        idx = np.linspace(0, len(table) - 1, num=min(n, len(table))).round().astype(int)
        return normalize(table.images[idx], pre), len(chosen)

    calib, n_cp = pick(split.train, n_calib, 1)
    parity, n_pp = pick(split.test, n_parity, 2)
    info = {"catalog": str(root), "seed": seed, "test_fraction": test_fraction,
            "calibration": {"images": int(len(calib)), "products": n_cp, "from": "training products"},
            "parity": {"images": int(len(parity)), "products": n_pp, "from": "test products"}}
    return calib.astype(np.float32), parity.astype(np.float32), info


# ------------------------------------------------------------------------------ comparison
def compare(y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    cos = np.sum(y * ref, 1) / np.maximum(np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1), 1e-30)
    return {"max_abs_diff": float(np.abs(y - ref).max()), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()), "reference_max_abs": float(np.abs(ref).max())}


def parity_ok(precision: str, m: dict) -> bool:
    if precision == "fp32":
        return m["max_abs_diff"] <= FP32_MAX_ABS and m["min_cosine"] >= FP32_MIN_COS
    if precision == "fp16":
        return m["min_cosine"] >= FP16_MIN_COS
    return True  # int8 is judged by retrieval recall (verify)


# ------------------------------------------------------------------------------ the export
def _is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise FedcbirError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not _is_bundle(out):
            raise FedcbirError(f"refusing to overwrite {out}: it is a non-empty folder that is not a "
                               f"fedcbir bundle (no {MANIFEST})")


def _place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def export_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike,
                  opts: ExportOptions | None = None) -> dict[str, Any]:
    """Write the bundle; returns the manifest."""
    from catalog.images import Preprocess
    from models.checkpoint import checkpoint_paths, load_checkpoint
    from models.spec import ArchSpec

    opts = opts or ExportOptions()
    log = opts.log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    _check_out(out)
    weights, meta = load_checkpoint(checkpoint)
    spec = ArchSpec.from_dict(meta["arch"])
    from export.reference import export_spec, export_weights

    es = export_spec(spec)
    pre_d = meta.get("preprocessing") or {}
    if pre_d:
        pre = Preprocess.from_dict(pre_d)
    else:
        from models.spec import preprocess_kwargs

        pre = Preprocess(**preprocess_kwargs(spec))
    if pre.size != spec.input_size:
        raise FedcbirError(f"checkpoint preprocessing size {pre.size} differs from the model input "
                           f"size {spec.input_size}")
    if opts.int8_formats is None and spec.pretrained and "pte" in opts.formats and "int8" in opts.quantize:
        # a file known to be wrong is not written by default: pt2e's min/max activation ranges cost
        # the pretrained EfficientNet-Lite0 8 points of Recall@1 (README); --int8-formats forces it
        opts.int8_formats = tuple(f for f in opts.formats if f != "pte")
        if opts.log:
            opts.log(f"no int8 .pte for {spec.name} by default (its pt2e int8 file fails export verify); "
                     "--int8-formats tflite,onnx,pte writes it anyway")
    plan = plan_files(opts)
    opts.plan = plan
    need_calib = any(p == "int8" for _, _, p, _ in plan)
    seed, tfrac = _split_params(meta, opts)
    root, how = resolve_catalog(opts.calibration, meta, log)
    log(f"catalog for calibration/parity: {root} ({how})")
    calib, parity_x, data_info = catalog_images(root, pre, seed, tfrac, opts.calibration_images,
                                                opts.parity_images)
    data_info["chosen"] = how
    if not need_calib:
        data_info["calibration"] = None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    timings: dict[str, float] = {}
    try:
        files: dict[str, dict] = {}
        ew = export_weights(spec, weights)
        buf = io.BytesIO()
        np.savez(buf, **ew)
        (tmp / REFERENCE_FILE).write_bytes(buf.getvalue())
        facts = _convert_all(plan, spec, weights, calib, tmp, opts, log, timings)
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        npz_path, json_path = checkpoint_paths(checkpoint)
        versions = exporter_versions()
        for name, fmt, prec, src in plan:
            f = facts[name]
            dist = RUNTIMES[fmt][1]
            files[name] = {
                "role": "model", "format": fmt, "precision": prec, "source": src,
                "reference": "torch" if src == "torch" else src,
                "runtime": {"name": RUNTIMES[fmt][0], "package": dist, "module": RUNTIMES[fmt][2],
                            "min_version": dist_version(dist),
                            "note": _runtime_note(fmt)},
                "exporter": {"route": f.pop("route"), "versions": _route_versions(fmt, src, versions),
                             "seconds": round(timings.get(name, 0.0), 2)},
                "input": f.pop("input"),
                "output": {"name": "embedding", "shape": ["N", es.embedding_dim], "dtype": "float32",
                           "normalized": False},
                **f,
            }
        files[REFERENCE_FILE] = {"role": "reference", "format": "npz", "precision": "fp32",
                                 "description": "canonical float32 weights of the exported graph "
                                                "(PyTorch names/layouts), for 'fedcbir export verify'; "
                                                "not needed on a device"}
        for name, info in files.items():
            info["bytes"] = (tmp / name).stat().st_size
            info["sha256"] = sha256_file(tmp / name)
        manifest = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "created": created,
            "fedcbir_version": __version__,
            "architecture": es.to_dict(),
            "type_head": ("dropped: the product-type head is not part of the exported graph"
                          if spec.num_types else None),
            "input": {"size": es.input_size, "channels": 3, "dtype": "float32",
                      "value": "normalised: (pixel / 255 - mean) / std per channel (see preprocessing)",
                      "layouts": "per file (NHWC for .tflite, NCHW for .onnx/.pte); export.runtime "
                                 "takes NHWC and transposes"},
            "preprocessing": pre.to_dict(),
            "embedding": {"dim": es.embedding_dim, "dtype": "float32",
                          "normalization": "l2, applied outside the graph"},
            "source": {"checkpoint": str(json_path.resolve()), "weights_sha256": meta.get("npz_sha256"),
                       "framework": meta.get("framework"), "round": meta.get("round"),
                       "epoch": meta.get("epoch"), "metrics": meta.get("metrics") or {},
                       "route": opts.source},
            "data": data_info,
            "exporters": versions,
            "goals": {"fp32": {"max_abs_diff": FP32_MAX_ABS, "min_cosine": FP32_MIN_COS},
                      "fp16": {"min_cosine": FP16_MIN_COS},
                      "int8": _int8_goals()},
            "files": files,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        check_x = np.concatenate([parity_x, calib])[:INT8_CHECK_IMAGES] if need_calib else parity_x
        manifest["parity"] = _parity(tmp, manifest, spec, weights, parity_x, log, check_x)
        for name, res in manifest["parity"].items():
            check = res.pop("int8_check", None)
            if check is not None:
                manifest["files"][name]["int8_check"] = check
            manifest["files"][name]["parity"] = res
        del manifest["parity"]
        write_json_atomic(tmp / MANIFEST, manifest)
        os.chmod(tmp / MANIFEST, 0o644)  # mkstemp made it private
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _int8_goals() -> dict:
    from export.int8check import INT8_MIN_COS, KERNEL_MIN_COS

    return {"max_recall@1_drop": INT8_MAX_RECALL_DROP, "confidence": INT8_CONFIDENCE,
            "rule": "verify: pass when the one-sided lower confidence bound of Recall@1(int8) - "
                    "Recall@1(fp32) (paired queries) is >= -max_recall@1_drop; fail when the upper "
                    "bound is below it, or a check fails; otherwise 'not enough queries to judge'",
            "kernel_min_cosine": KERNEL_MIN_COS, "mean_cosine_vs_fp32": INT8_MIN_COS}


def _runtime_note(fmt: str) -> str:
    return {"tflite": "ai_edge_litert.interpreter (no TensorFlow needed); XNNPACK delegate by default",
            "onnx": "onnxruntime CPUExecutionProvider (no PyTorch needed)",
            "pte": "executorch.runtime with the XNNPACK backend; its Python runtime imports torch"}[fmt]


def _route_versions(fmt: str, src: str, v: dict) -> dict:
    keys = {"tflite": ["tensorflow-cpu", "tensorflow", "keras"] if src == "keras"
            else ["jax", "jaxlib", "flax", "tensorflow-cpu", "tensorflow"],
            "onnx": ["torch", "onnx", "onnxscript", "onnxruntime"],
            "pte": ["torch", "executorch", "torchao"]}[fmt]
    return {k: v[k] for k in keys if k in v}


def _convert_all(plan, spec, weights, calib, tmp: Path, opts: ExportOptions, log, timings) -> dict:
    from export import converters as C

    facts: dict[str, dict] = {}
    by_fmt: dict[str, list] = {}
    for name, fmt, prec, src in plan:
        by_fmt.setdefault(fmt, []).append((name, prec, src))
    if "tflite" in by_fmt:
        items = by_fmt["tflite"]
        precs = [p for _, p, _ in items]
        t = time.perf_counter()
        fn = C.jax_tflite if opts.source == "jax" else C.keras_tflite
        try:
            res = fn(spec, weights, precs, calib, int8_float_ops=tuple(opts.tflite_int8_float_ops),
                     int8_ranges=opts.tflite_int8_ranges, int8_float_stride=int(opts.tflite_int8_float_stride))
        except FedcbirError:
            raise
        except Exception as exc:
            raise FedcbirError(f"TFLite export ({opts.source}) failed: {' '.join(str(exc).split())[:400]}") from exc
        per = (time.perf_counter() - t) / len(items)
        for name, prec, _ in items:
            data, f = res[prec]
            (tmp / name).write_bytes(data)
            facts[name] = f
            timings[name] = per
            log(f"wrote {name} ({len(data) / 1e6:.2f} MB)")
    if "onnx" in by_fmt:
        for name, prec, _ in by_fmt["onnx"]:
            t = time.perf_counter()
            try:
                if prec == "fp32":
                    facts[name] = C.torch_onnx(spec, weights, tmp / name)
                else:
                    src = tmp / FILE_NAMES[("onnx", "fp32")]
                    made = src.exists()
                    if not made:
                        facts["_fp32"] = C.torch_onnx(spec, weights, src)
                    facts[name] = C.onnx_int8(src, tmp / name, calib, opts.onnx_int8)
                    if not made:
                        src.unlink()
            except FedcbirError:
                raise
            except Exception as exc:
                raise FedcbirError(f"ONNX export of {name} failed: {' '.join(str(exc).split())[:400]}") from exc
            timings[name] = time.perf_counter() - t
            log(f"wrote {name} ({(tmp / name).stat().st_size / 1e6:.2f} MB)")
    if "pte" in by_fmt:
        for name, prec, _ in by_fmt["pte"]:
            t = time.perf_counter()
            try:
                data, f = C.torch_pte(spec, weights, prec, calib, opts.pte_max_batch)
            except FedcbirError:
                raise
            except Exception as exc:
                raise FedcbirError(f"ExecuTorch export of {name} failed: {' '.join(str(exc).split())[:400]}") from exc
            (tmp / name).write_bytes(data)
            facts[name] = f
            timings[name] = time.perf_counter() - t
            log(f"wrote {name} ({len(data) / 1e6:.2f} MB)")
    facts.pop("_fp32", None)
    return facts


def _parity(folder: Path, manifest: dict, spec, weights, x: np.ndarray, log,
            check_x: np.ndarray | None = None) -> dict[str, dict]:
    """Embed the parity images with every file (through export.runtime) and its reference;
    int8 files also get the check of export.int8check on this CPU on ``check_x`` (recorded
    as ``int8_check``: the CPU model and flags, the runtime, the results)."""
    from export.int8check import check_int8_file, check_reason, cpu_info
    from export.reference import framework_version, reference_embedder
    from export.runtime import load_embedder, open_bundle

    bundle = open_bundle(folder)
    fns: dict[str, Any] = {}
    refs: dict[str, np.ndarray] = {}
    check_refs: dict[str, np.ndarray] = {}
    check_x = x if check_x is None else check_x
    out = {}
    cpu = None
    for rt, prec, name in bundle.models():
        src = bundle.files[name]["reference"]
        if src not in refs:
            fns[src] = reference_embedder(src, spec, weights)
            refs[src] = fns[src](x)
        emb = load_embedder(bundle, file=name, threads=1)
        y = emb.embed(x)
        m = compare(y, refs[src])
        m.update({"images": int(len(x)), "reference": framework_version(src),
                  "ok": parity_ok(prec, m) if prec != "int8" else None})
        if prec == "int8":
            m["note"] = ("int8 is judged by 'fedcbir export verify' (paired Recall@1 rule and this "
                         "file's int8_check), not by these numbers")
            cpu = cpu or cpu_info()
            if src not in check_refs:
                check_refs[src] = fns[src](check_x)
            m["int8_check"] = check_int8_file(bundle, name, check_x, emb.embed(check_x), check_refs[src],
                                              cpu=cpu)
        out[name] = m
        warn = ""
        if m["ok"] is False:
            warn = "  WARNING: outside the goal; 'fedcbir export verify' will fail"
        elif prec == "int8" and not m["int8_check"]["ok"]:
            warn = f"  WARNING: {check_reason(m['int8_check'])}; 'fedcbir export verify' will fail"
        log(f"parity {name}: max|diff| {m['max_abs_diff']:.2e}, min cos {m['min_cosine']:.6f}{warn}")
    return out
