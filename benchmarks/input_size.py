"""Input size of the default encoder: search quality, device training time and query latency.

    python -m benchmarks.input_size [--sizes 128,160,224] [--json] [--out FILE]

For each input size, on the default sample catalog (300 products x 6 photos), the default
encoder as a run starts it (ImageNet EfficientNet-Lite0, PCA projection from the training
products' main photos, no federated training):

- **search quality on the device protocol**: the bundle's int8 TFLite model on LiteRT, a f16
  usearch index of the whole catalog, ``catalog-search eval`` (queries: the other photos of
  the 60 test products; gallery: the main photos of all 300 products);
- **device training time per round**: host CPU seconds (one thread, PyTorch) of one local
  epoch of a 1/3 IID partition (80 products x K=4 photos, P=16) trained from block 11 on,
  (a) computing the frozen trunk for every photo, (b) with every trunk output cached;
  then 4 local epochs scaled to a Raspberry Pi 4 by the device profile's virtual clock;
- **query latency**: decode + embed + search p50 from the same eval, and the int8 model's
  batch-1 latency alone.

Everything runs in this process, one size after the other (sizes are not interleaved: the
numbers of one size are comparable, across sizes the machine's load may differ — the
recorded load average says how busy it was).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(size: int, root: Path, work: Path, epochs: int = 4) -> dict:
    from catalog.batches import PKBatches
    from catalog.dataset import CatalogSplit
    from catalog.images import Preprocess
    from device_profiles import Emulator, load_profile
    from export.bundle import ExportOptions, export_bundle
    from export.runtime import load_embedder, open_bundle
    from common.io import stderr_to
    from models import initial
    from models.api import TrainConfig, make_trainer
    from models.checkpoint import save_checkpoint
    from models.optim import OptimConfig
    from models.projection import catalog_projection, main_photos
    from models.spec import preprocess_kwargs, preset
    from retrieval.index import build_catalog_index
    from retrieval.search import Searcher, evaluate

    split = CatalogSplit.load(root, seed=0)
    spec = preset(input_size=size, num_types=len(split.type_names))
    pre = Preprocess(**preprocess_kwargs(spec))
    t0 = time.perf_counter()
    w = catalog_projection(spec, initial.init_weights(spec, 0), main_photos(split, pre), 0)
    ck = work / f"ckpt-{size}"
    save_checkpoint(ck, w, {"arch": spec, "preprocessing": pre.to_dict(), "framework": "torch",
                            "catalog": str(root)})
    bundle = work / f"bundle-{size}"
    _log(f"[{size}px] export int8 TFLite")
    with stderr_to(work / "export.log"):
        export_bundle(ck, bundle, ExportOptions(formats=("tflite",), quantize=("int8",), calibration=str(root),
                                                log=lambda m: None))
    _log(f"[{size}px] index + eval (device protocol)")
    build_catalog_index(bundle, root, runtime="litert", precision="int8", dtype="f16", progress=False)
    with Searcher(bundle, runtime="litert", precision="int8") as s:
        ev = evaluate(s, root, seed=0)
    # batch-1 latency of the int8 model alone
    b = open_bundle(bundle)
    emb = load_embedder(b, runtime="litert", precision="int8", threads=1)
    x = np.zeros((1, size, size, 3), np.float32)
    for _ in range(10):
        emb.embed(x)
    lat = []
    for _ in range(100):
        t = time.perf_counter()
        emb.embed(x)
        lat.append((time.perf_counter() - t) * 1e3)
    # device training time per round (torch, 1 thread)
    _log(f"[{size}px] local training time")
    from catalog.dataset import CatalogSplit as _S  # noqa: F401

    part = split.train[: len(split.train) // 3]
    table = split.table(part, pre)
    cfg = TrainConfig(optim=OptimConfig(name="adamw", lr=3e-4), train_from=spec.default_train_from,
                      cache_mb=4096, threads=1)
    tr = make_trainer("torch", spec, cfg)
    tr.set_weights(w)
    pk = PKBatches(table, p=16, k=4, seed=0, views=1)  # one view: epoch 2 hits the cache everywhere
    c0 = time.process_time()
    m1 = tr.train(pk.epoch(0))
    cold = time.process_time() - c0
    c0 = time.process_time()
    m2 = tr.train(pk.epoch(0))
    warm = time.process_time() - c0
    emu = Emulator(load_profile("rpi4"), seed=0)
    return {
        "input_size": size,
        "device_recall@1": ev["index"]["recall@1"], "device_recall@5": ev["index"]["recall@5"],
        "device_recall@10": ev["index"]["recall@10"], "queries": ev["queries"], "gallery": ev["gallery"],
        "query_p50_ms": ev["latency_ms"]["query_p50"], "int8_batch1_ms": statistics.median(lat),
        "int8_bytes": int(b.files["model.int8.tflite"]["bytes"]) if "bytes" in b.files.get("model.int8.tflite", {})
        else (bundle / "model.int8.tflite").stat().st_size,
        "epoch_images": m1["examples"], "epoch_cpu_s_trunk_computed": cold, "epoch_cpu_s_trunk_cached": warm,
        "cache_hits_second_epoch": m2["cache_hits"],
        "rpi4_round_s_trunk_computed": emu.compute_seconds(cold * epochs),
        "rpi4_round_s_trunk_cached": emu.compute_seconds(warm * epochs),
        "seconds": time.perf_counter() - t0,
        "loadavg": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.input_size", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128,160,224")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    args = p.parse_args(argv)
    from models.threads import set_threads

    set_threads(1)
    from catalog.sample import ensure_default_sample

    root = ensure_default_sample(progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedcbir-size-") as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            rows.append(measure(size, root, Path(tmp)))
            _log(json.dumps(rows[-1]))
    rep = {"benchmark": "input_size", "arch": "efficientnet-lite0", "catalog": "default sample (300 x 6)",
           "protocol": "device: int8 TFLite on LiteRT, f16 usearch index of all 300 products",
           "local_epochs_per_round": 4, "rows": rows}
    if args.out:
        from common.io import write_json_atomic

        write_json_atomic(args.out, rep)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"{'size':>5s} {'R@1':>6s} {'R@10':>6s} {'int8 ms':>8s} {'query ms':>9s} "
              f"{'epoch cpu s':>12s} {'cached':>7s} {'Pi4 s/round':>12s} {'cached':>7s}")
        for r in rows:
            print(f"{r['input_size']:5d} {r['device_recall@1']:6.3f} {r['device_recall@10']:6.3f} "
                  f"{r['int8_batch1_ms']:8.2f} {r['query_p50_ms']:9.1f} {r['epoch_cpu_s_trunk_computed']:12.1f} "
                  f"{r['epoch_cpu_s_trunk_cached']:7.1f} {r['rpi4_round_s_trunk_computed']:12.0f} "
                  f"{r['rpi4_round_s_trunk_cached']:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
