"""Export and latency: each framework's final global model exported in its natural route
and its batch-1 latency measured beside the eager framework model.

``export_and_measure`` (in the study process) hands two jobs to fresh child processes
(``fedcbir.study.child``): ``_export_job`` builds the bundles (``export.bundle``; a bundle whose
manifest names the same weights and route is reused) and ``_latency_job`` times every
candidate interleaved in one pinned single-thread process (``export.latency``); the latency
is cached beside the bundles, keyed by the files' sha256 and the settings.

May import: ``common``, ``models``, ``server``, ``export``, and ``fedcbir.study.plan`` /
``.child`` / ``.util``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from common.errors import FedcbirError
from fedcbir.study.child import run_child
from fedcbir.study.plan import Planned
from fedcbir.study.util import read_json, stdout_log

#: Export route per framework: (ExportOptions.source, formats). tf's .tflite comes from the Keras
#: model (source "torch" means "the default route": Keras for .tflite, PyTorch for .onnx/.pte).
EXPORT_ROUTES = {"torch": ("torch", ("onnx", "pte")), "tf": ("torch", ("tflite",)), "jax": ("jax", ("tflite",))}
EAGER_CANDIDATE = {"torch": "torch eager", "tf": "keras tf.function", "jax": "jax jit"}
ROUTE_TEXT = {"torch": "PyTorch -> ONNX (dynamo) and ExecuTorch/XNNPACK", "tf": "Keras -> TFLite converter",
              "jax": "Flax -> jax2tf -> TFLite"}


def _export_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Export every requested bundle (reusing one whose manifest names the same checkpoint
    weights and route)."""
    from export.bundle import ExportOptions, export_bundle
    from export.runtime import open_bundle

    out: dict[str, Any] = {}
    for fw, spec in job["bundles"].items():
        bundle = Path(spec["out"])
        manifest = None
        if (bundle / "manifest.json").is_file():
            try:
                m = open_bundle(bundle).manifest  # checks every file's sha256 too
                if (m.get("source", {}).get("weights_sha256") == spec["weights_sha256"]
                        and m.get("source", {}).get("route") == spec["source"]
                        and sorted({f["format"] for f in m["files"].values() if f.get("role") == "model"})
                        == sorted(spec["formats"])):
                    manifest = m
                    print(f"export {fw}: reusing {bundle}", file=sys.stderr, flush=True)
            except Exception:  # noqa: BLE001 - a damaged bundle is rebuilt
                manifest = None
        t0 = time.perf_counter()
        if manifest is None:
            print(f"export {fw}: {spec['checkpoint']} -> {bundle} ({', '.join(spec['formats'])}, "
                  f"--from {spec['source']})", file=sys.stderr, flush=True)
            manifest = export_bundle(spec["checkpoint"], bundle, ExportOptions(
                formats=tuple(spec["formats"]), quantize=(), source=spec["source"],
                log=lambda s: print(f"  {s}", file=sys.stderr, flush=True)))
        files = {}
        for name, info in manifest["files"].items():
            if info.get("role") != "model":
                continue
            files[name] = {"format": info["format"], "precision": info["precision"], "source": info.get("source"),
                           "bytes": info["bytes"], "parity": info.get("parity"),
                           "export_seconds": (info.get("exporter") or {}).get("seconds")}
        out[fw] = {"bundle": str(bundle), "files": files, "seconds": time.perf_counter() - t0}
    return {"exports": out}


def _latency_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Batch-1 latency: per framework its eager model and its exported files, all candidates
    interleaved call by call in one pinned single-thread process."""
    from models.threads import set_threads

    info = set_threads(1, pin=True)  # before any framework import
    from export.int8check import cpu_info
    from export.latency import build_candidates, measure
    from export.runtime import open_bundle
    from models import parity

    import numpy as np

    cands = []
    for fw, path in job["bundles"].items():
        bundle = open_bundle(path)
        x = parity.synthetic_batch(bundle.input_size, products=1, photos=1)[0][:1]
        for name, meta, fn in build_candidates(bundle, x, 1, None):
            if meta["kind"] == "eager" and name != EAGER_CANDIDATE[fw]:
                continue
            cands.append((f"{fw}|{name}", dict(meta, framework_of_study=fw, candidate=name), fn))
    load_before = os.getloadavg()
    times = measure(cands, int(job["repeats"]), int(job["warmup"]))
    rows = []
    for name, meta, _ in cands:
        t = np.asarray(times[name]) * 1e3
        rows.append({**meta, "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                     "min_ms": float(t.min())})
    return {"latency": rows, "config": {"batch": 1, "threads": 1, "repeats": int(job["repeats"]),
                                        "warmup": int(job["warmup"]), "interleaved": True,
                                        "pinned_cpus": info.get("cpu_affinity"), "cpu": cpu_info()["model"],
                                        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}}


def _manifest_sha(bundle: Path, name: str) -> str | None:
    m = read_json(bundle / "manifest.json") or {}
    return ((m.get("files") or {}).get(name) or {}).get("sha256")


def export_and_measure(feds_by_fw: Mapping[str, Planned], out: Path, repeats: int, warmup: int,
                       log: Callable[[str], None] = stdout_log) -> dict[str, Any]:
    """Export each framework's final global model (its natural route) and time batch 1."""
    from models.checkpoint import load_checkpoint
    from server.federation import latest_checkpoint

    bundles = {}
    for fw, fed in feds_by_fw.items():
        ck = latest_checkpoint(fed.run_dir)
        if ck is None:
            raise FedcbirError(f"no checkpoint in {fed.run_dir} to export")
        _, meta = load_checkpoint(ck)
        source, formats = EXPORT_ROUTES[fw]
        bundles[fw] = {"checkpoint": str(ck.with_suffix("")), "out": str(out / "bundles" / fw), "source": source,
                       "formats": list(formats), "weights_sha256": meta.get("npz_sha256"), "round": meta.get("round")}
    log(f"exporting {', '.join(f'{fw} ({ROUTE_TEXT[fw]})' for fw in bundles)}")
    t0 = time.perf_counter()
    exported = run_child("_export", _export_job, {"bundles": bundles}, timeout=3600)["exports"]
    export_wall = time.perf_counter() - t0
    # latency of exactly these files (by sha256) and settings: measured once, reused on a re-run
    key = {"files": {fw: sorted((n, _manifest_sha(Path(e["bundle"]), n)) for n in e["files"])
                     for fw, e in exported.items()}, "repeats": repeats, "warmup": warmup}
    cache = out / "bundles" / "latency.json"
    old = read_json(cache)
    if old and old.get("key") == json.loads(json.dumps(key)):
        log(f"batch-1 latency: reusing {cache}")
        lat = old["result"]
    else:
        log(f"measuring batch-1 latency ({repeats} interleaved calls per candidate, one pinned thread)")
        lat = run_child("_latency", _latency_job, {"bundles": {fw: e["bundle"] for fw, e in exported.items()},
                                                   "repeats": repeats, "warmup": warmup}, timeout=1800)
        from common.io import write_json_atomic

        write_json_atomic(cache, {"key": key, "result": lat})
    per_fw: dict[str, Any] = {}
    for fw in feds_by_fw:  # the study's framework order (JSON round trips sort keys)
        e = exported[fw]
        mine = [r for r in lat["latency"] if r["framework_of_study"] == fw]
        eager = next((r for r in mine if r["kind"] == "eager"), None)
        files = []
        for r in mine:
            if r["kind"] != "file":
                continue
            f = dict(e["files"].get(r["file"], {}))
            f.update(file=r["file"], runtime=r.get("runtime"), median_ms=r["median_ms"], p90_ms=r["p90_ms"],
                     speedup_vs_eager=(eager["median_ms"] / r["median_ms"]) if eager else None)
            files.append(f)
        per_fw[fw] = {"route": ROUTE_TEXT[fw], "checkpoint": bundles[fw]["checkpoint"], "round": bundles[fw]["round"],
                      "bundle": e["bundle"], "eager": {"name": eager["candidate"], "path": eager.get("path"),
                                                      "median_ms": eager["median_ms"], "p90_ms": eager["p90_ms"]}
                      if eager else None, "files": files}
    return {"frameworks": per_fw, "config": lat["config"], "export_wall_seconds": export_wall}
