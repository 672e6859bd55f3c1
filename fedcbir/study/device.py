"""Accuracy of a study federation on the device protocol.

The final global model of one federation is exported to an fp32 ``.tflite`` (Keras route),
the whole catalog is indexed with LiteRT into an f16 usearch index, and ``catalog-search
eval`` measures Recall@K with the test products' other photos as queries and the main photos
of *every* catalog product as the gallery (what a device searches).  Runs in a fresh child
process (``fedcbir.study.child``); the result is cached beside the bundle, keyed by the
checkpoint's weights.

May import: ``common``, ``models``, ``server``, ``export``, ``retrieval``, and
``fedcbir.study.child`` / ``fedcbir.study.util``.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from fedcbir.study.child import run_child
from fedcbir.study.util import read_json


def device_eval_job(job: Mapping[str, Any]) -> dict[str, Any]:
    from export.bundle import ExportOptions, export_bundle
    from common.io import stderr_to
    from retrieval.index import build_catalog_index
    from retrieval.search import Searcher, evaluate

    t0 = time.perf_counter()
    bundle = Path(job["bundle"])
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with stderr_to(bundle.parent / "export.log"):
        export_bundle(job["checkpoint"], bundle, ExportOptions(formats=("tflite",), quantize=(),
                                                               calibration=job["catalog"], log=lambda m: None))
    build_catalog_index(bundle, job["catalog"], runtime="litert", precision="fp32", dtype="f16", progress=False)
    with Searcher(bundle, runtime="litert", precision="fp32") as s:
        ev = evaluate(s, job["catalog"], seed=int(job["seed"]))
    print(f"device eval {job['name']}: recall@1 {ev['index']['recall@1']:.3f}", file=sys.stderr, flush=True)
    return {"recall@1": ev["index"]["recall@1"], "recall@5": ev["index"]["recall@5"],
            "recall@10": ev["index"]["recall@10"], "queries": ev["queries"], "gallery": ev["gallery"],
            "seconds": time.perf_counter() - t0}


def device_eval(name: str, run_dir: Path, catalog: Path, seed: int, out: Path, log) -> dict[str, Any]:
    """The device-protocol numbers of one federation's final checkpoint (cached)."""
    from common.io import write_json_atomic
    from models.checkpoint import load_checkpoint
    from server.federation import latest_checkpoint

    ck = latest_checkpoint(run_dir)
    _, meta = load_checkpoint(ck)
    cache = out / "device" / f"{name}.json"
    old = read_json(cache)
    if old and old.get("weights_sha256") == meta.get("npz_sha256"):
        return old["result"]
    log(f"device protocol: {name} (fp32 TFLite on LiteRT, whole catalog in the gallery)")
    res = run_child("_device", device_eval_job, {"name": name, "checkpoint": str(ck.with_suffix("")),
                                                 "catalog": str(catalog), "seed": seed,
                                                 "bundle": str(out / "device" / name)}, timeout=3600)
    write_json_atomic(cache, {"weights_sha256": meta.get("npz_sha256"), "result": res})
    shutil.rmtree(out / "device" / name, ignore_errors=True)  # the numbers are kept, not the bundle
    return res
