"""How every step grows with the catalog: time and peak RSS at 1k, 5k (and 20k) products.

    python -m benchmarks.scale [--sizes 1000,5000] [--views 6] [--input-size 64] [--json]
    python -m benchmarks.scale --sizes 1000,5000,20000      # the optional 20k size (long)

For each size a sample catalog of N products x ``--views`` photos is generated
(``catalog.sample.generate_sample``, seed 0) into a work folder, and then each step runs in
its own fresh process (so its peak RSS, ``VmHWM``, is its own; processes run one at a time):

- ``read``: ``CatalogSplit.load`` (listings + images.csv, the train/test split);
- ``partitions``: IID and Dirichlet(0.3) partitions of the training products over 10 clients;
- ``training_data``: decoding every training photo into the on-disk ``ImageTable`` (cold cache);
- ``train_torch`` / ``train_tf`` / ``train_jax``: one epoch of centralized training, one
  thread pinned to one CPU, the default encoder (EfficientNet-Lite0, ImageNet weights, trained
  from block 11 on with the frozen-trunk cache) at ``--input-size`` px (64 by default, so
  that the benchmark fits a small machine; the device default is 160), P=16 x K=4; the first
  step (tracing / XLA compilation) is timed apart;
- ``export``: the torch checkpoint to a TFLite bundle (fp32 + int8, the int8 file calibrated
  on 256 catalog photos);
- ``index``: ``catalog-search index`` with the int8 LiteRT model (1 runtime thread, 1 decoding
  thread), f16 index of every photo;
- ``update``: ``catalog-search index --update`` after 1 % of the listings changed (new name and
  one photo with new content each; the catalog edit itself is not timed);
- ``eval``: ``catalog-search eval`` on the first ``--eval-queries`` query photos;
- ``serve``: a fresh ``Searcher`` (what ``catalog-search serve`` holds) answering
  ``--serve-queries`` one-photo queries (decode + embed + search).

It reports seconds, seconds per 1,000 catalog photos and peak RSS per step and size, a
least-squares line through the sizes for each, and its projection to all of ABO (398,212
photos, 147,702 listings). The goal: time linear in photos, peak RSS flat apart from the
index itself. Nothing here needs the network.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ABO_IMAGES = 398_212
ABO_LISTINGS = 147_702
STEPS = ["read", "partitions", "training_data", "train_torch", "train_tf", "train_jax", "export", "index",
         "update", "eval", "serve"]
FRAMEWORKS = ("torch", "tf", "jax")


# ----------------------------------------------------------------------------- the steps (child processes)


def _split(ctx):
    from catalog.dataset import CatalogSplit

    return CatalogSplit.load(ctx["root"], seed=0)


def _pre(ctx, split=None):
    from catalog.images import Preprocess
    from models.spec import preprocess_kwargs

    return Preprocess(**preprocess_kwargs(_spec(ctx, split)))


def _spec(ctx, split=None):
    from models.spec import preset

    types = len(split.type_names) if split is not None else 0
    return preset(ctx["arch"], input_size=ctx["input_size"], num_types=types)


def step_read(ctx) -> dict:
    t0 = time.perf_counter()
    split = _split(ctx)
    return {"seconds": time.perf_counter() - t0, "products": len(split.products), "train": len(split.train),
            "test": len(split.test), "types": len(split.type_names)}


def step_partitions(ctx) -> dict:
    from catalog.splits import partition

    split = _split(ctx)
    t0 = time.perf_counter()
    sizes = {}
    for scheme in ("iid", "dirichlet:0.3"):
        parts = partition(split.train, 10, scheme, 0)
        sizes[scheme] = [len(p) for p in parts]
    return {"seconds": time.perf_counter() - t0, "clients": 10, "partition_sizes": sizes}


def step_training_data(ctx) -> dict:
    split = _split(ctx)
    pre = _pre(ctx, split)
    t0 = time.perf_counter()
    table = split.table(split.train, pre)
    return {"seconds": time.perf_counter() - t0, "rows": len(table), "bytes_on_disk": table.nbytes,
            "input_size": pre.size}


def _train(ctx, fw: str) -> dict:
    import itertools

    from models.threads import set_threads

    set_threads(1, pin=True)
    from catalog.batches import PKBatches
    from models.api import TrainConfig, make_trainer
    from models.initial import init_weights
    from models.checkpoint import save_checkpoint
    from models.optim import OptimConfig

    split = _split(ctx)
    spec = _spec(ctx, split)
    pre = _pre(ctx, split)
    table = split.table(split.train, pre)  # the cache of step training_data
    cfg = TrainConfig(optim=OptimConfig(name="adamw", lr=3e-4), threads=1, train_from=spec.default_train_from)
    batches = PKBatches(table, p=16, k=4, seed=0, augment=True, views=4)
    t0 = time.perf_counter()
    trainer = make_trainer(fw, spec, cfg)
    trainer.set_weights(init_weights(spec, 0))
    build_s = time.perf_counter() - t0
    epoch = batches.epoch(0)
    t0 = time.perf_counter()
    first = trainer.train(itertools.islice(epoch, 1))
    t1 = time.perf_counter()
    rest = trainer.train(epoch)
    t2 = time.perf_counter()
    steps = first["steps"] + rest["steps"]
    out = {"seconds": t2 - t0, "first_step_seconds": t1 - t0, "build_seconds": build_s, "steps": steps,
           "images": steps * batches.batch_size, "step_ms": (t2 - t1) / max(1, rest["steps"]) * 1e3,
           "loss": rest["loss"], "threads": 1, "input_size": spec.input_size, "arch": spec.name,
           "train_from": spec.default_train_from,
           # the frozen-trunk activation cache grows with the distinct photos seen, up to cache-mb
           "activation_cache_mb": trainer.cache.bytes / 2**20, "activation_cache_cap_mb": cfg.cache_mb}
    if fw == "torch":  # the checkpoint the export step reads
        save_checkpoint(Path(ctx["work"]) / "ckpt", trainer.get_weights(), {
            "arch": spec, "preprocessing": pre.to_dict(), "framework": fw, "epoch": 1, "catalog": str(ctx["root"]),
            "seed": 0, "train_config": cfg.to_dict()})
    return out


def step_export(ctx) -> dict:
    from export.bundle import ExportOptions, export_bundle

    out = Path(ctx["work"]) / "bundle"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    export_bundle(Path(ctx["work"]) / "ckpt", out, ExportOptions(
        formats=("tflite",), quantize=("int8",), calibration=str(ctx["root"]), log=lambda m: None))
    files = {p.name: p.stat().st_size for p in out.glob("*.tflite")}
    return {"seconds": time.perf_counter() - t0, "files": files}


def _index(ctx, update: bool) -> dict:
    from retrieval.index import build_catalog_index

    t0 = time.perf_counter()
    rep = build_catalog_index(Path(ctx["work"]) / "bundle", ctx["root"], runtime="litert", precision="int8",
                              dtype="f16", update=update, threads=1, workers=1, progress=False)
    return {"seconds": time.perf_counter() - t0, "embedded": rep["embedded_now"], "images": rep["images"],
            "embed_seconds": rep["embed_seconds"], "index_seconds": rep["index_seconds"],
            "index_bytes": rep["bytes"], "images_per_second": rep["images_per_second"],
            "compacted": rep.get("compacted"), "status": rep["status"]}


def step_eval(ctx) -> dict:
    from retrieval.search import Searcher, evaluate

    t0 = time.perf_counter()
    with Searcher(Path(ctx["work"]) / "bundle", threads=1) as s:
        res = evaluate(s, ctx["root"], max_queries=ctx["eval_queries"])
    return {"seconds": time.perf_counter() - t0, "queries": res["queries"], "gallery": res["gallery"],
            "recall@1": res["index"]["recall@1"], "exact_recall@1": res["exact"]["recall@1"],
            "query_p50_ms": res["latency_ms"]["query_p50"], "search_p50_ms": res["latency_ms"]["search_p50"]}


def step_serve(ctx) -> dict:
    import numpy as np

    from catalog.abo import IMAGES_DIR
    from retrieval.search import Searcher

    split = _split(ctx)
    photos = [Path(ctx["root"]) / IMAGES_DIR / rel for p in split.test for rel in p.other_images]
    photos = photos[:ctx["serve_queries"]]
    t0 = time.perf_counter()
    s = Searcher(Path(ctx["work"]) / "bundle", threads=1)
    open_s = time.perf_counter() - t0
    lat = []
    try:
        for path in photos:
            q0 = time.perf_counter()
            s.search_paths([str(path)], k=10)
            lat.append((time.perf_counter() - q0) * 1e3)
    finally:
        s.close()
    return {"seconds": time.perf_counter() - t0, "open_seconds": open_s, "queries": len(lat),
            "query_p50_ms": float(np.percentile(lat, 50)), "query_p99_ms": float(np.percentile(lat, 99))}


def run_step(name: str, ctx: dict) -> dict:
    from common.memory import vm_hwm_mb

    fn = {"read": step_read, "partitions": step_partitions, "training_data": step_training_data,
          "export": step_export, "index": lambda c: _index(c, False), "update": lambda c: _index(c, True),
          "eval": step_eval, "serve": step_serve}
    for fw in FRAMEWORKS:
        fn[f"train_{fw}"] = lambda c, fw=fw: _train(c, fw)
    out = fn[name](ctx)
    out["peak_rss_mb"] = vm_hwm_mb()
    return out


# ----------------------------------------------------------------------------- the driver


def _child(name: str, ctx: dict, log) -> dict:
    env = dict(os.environ, FEDCBIR_CACHE_DIR=str(Path(ctx["work"]) / "cache"))
    for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}.items():
        env.setdefault(k, v)
    ctx_file = Path(ctx["work"]) / "ctx.json"
    ctx_file.write_text(json.dumps(ctx), encoding="utf-8")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--step", name, "--ctx", str(ctx_file)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        log(f"  {name}: FAILED ({tail})")
        return {"error": tail, "process_seconds": wall}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = wall
    log(f"  {name}: {res['seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB")
    return res


def change_listings(root: Path, fraction: float = 0.01, seed: int = 0) -> dict:
    """Change ``fraction`` of the listings in place: a new name and one photo with new content
    each (the photo gets another product's main photo, with a later mtime)."""
    import random

    from catalog.abo import IMAGES_DIR, read_image_index

    files = sorted((root / "listings" / "metadata").glob("listings_*.json.gz"))
    recs = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            recs.append((f, [json.loads(line) for line in fh if line.strip()]))
    everyone = [r for _, rs in recs for r in rs]
    pick = random.Random(seed).sample(range(len(everyone)), max(1, round(fraction * len(everyone))))
    path_of = read_image_index(root)  # image id -> relative path
    photos = 0
    for n, i in enumerate(pick):
        r = everyone[i]
        r["item_name"] = [{"language_tag": "en_US", "value": f"Changed listing {n}"}]
        others = r.get("other_image_id") or []
        donor = everyone[(i + 1) % len(everyone)].get("main_image_id")
        if others and donor and others[0] in path_of and donor in path_of:
            dest = root / IMAGES_DIR / path_of[others[0]]
            dest.write_bytes((root / IMAGES_DIR / path_of[donor]).read_bytes())
            st = dest.stat()
            os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
            photos += 1
    for f, rs in recs:
        with gzip.open(f, "wt", encoding="utf-8") as fh:
            for r in rs:
                fh.write(json.dumps(r) + "\n")
    return {"listings": len(pick), "photos": photos}


def run_size(products: int, views: int, work: Path, args, log) -> dict:
    from catalog.sample import generate_sample
    from common.memory import vm_hwm_mb  # noqa: F401  (fails early where /proc is missing)

    work.mkdir(parents=True, exist_ok=True)
    root = work / "catalog"
    log(f"== {products} products x {views} photos")
    t0 = time.perf_counter()
    from catalog.abo import read_sample_marker

    marker = read_sample_marker(root) or {}
    if args.fresh or not marker.get("complete") or marker.get("products") != products or marker.get("views") != views:
        shutil.rmtree(root, ignore_errors=True)
        stats = generate_sample(root, products=products, views=views, seed=0, progress=False)
    else:
        from catalog.abo import load_products

        stats = {"images": sum(len(p.images) for p in load_products(root))}
    gen_s = time.perf_counter() - t0
    if "training_data" in args.steps:
        shutil.rmtree(work / "cache", ignore_errors=True)  # training data is measured cold
    ctx = {"root": str(root), "work": str(work), "arch": args.arch, "input_size": args.input_size,
           "eval_queries": args.eval_queries, "serve_queries": args.serve_queries}
    steps: dict[str, Any] = {}
    for name in args.steps:
        if name == "update":
            steps["update_edit"] = change_listings(root, 0.01)
        steps[name] = _child(name, ctx, log)
    return {"products": products, "views": views, "images": int(stats["images"]),
            "generate_seconds": round(gen_s, 1), "steps": steps}


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) of y = a + b x; None with fewer than two sizes."""
    if len(xs) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def summarize(sizes: list[dict]) -> list[dict]:
    """Per step: seconds and peak RSS per size, per 1k photos, fitted lines, projection to ABO."""
    rows = []
    names = [n for n in STEPS if any(n in s["steps"] for s in sizes)]
    for name in names:
        pts = [(s["images"], s["steps"][name]) for s in sizes if "error" not in s["steps"].get(name, {"error": 1})]
        if not pts:
            continue
        xs = [float(i) for i, _ in pts]
        t_fit = _fit(xs, [float(r["seconds"]) for _, r in pts])
        # training: the frozen-trunk activation cache grows with the photos seen up to its cap
        # (cache-mb); the line is fitted to the rest, and the projection adds the whole cap
        cache = all("activation_cache_mb" in r for _, r in pts)
        cap = max(float(r.get("activation_cache_cap_mb", 0)) for _, r in pts) if cache else 0.0
        m_fit = _fit(xs, [float(r["peak_rss_mb"]) - (float(r["activation_cache_mb"]) if cache else 0.0)
                          for _, r in pts])
        row = {"step": name,
               "by_size": [{"images": i, "seconds": round(r["seconds"], 2),
                            "ms_per_image": round(r["seconds"] / i * 1e3, 3), "peak_rss_mb": round(r["peak_rss_mb"])}
                           for i, r in pts]}
        # projections never go below what was measured at the largest size (a slightly
        # negative slope is noise, e.g. a step whose work does not depend on the catalog)
        largest = pts[-1][1]
        if t_fit:
            row["seconds_fixed"], row["ms_per_image_fit"] = round(t_fit[0], 2), round(t_fit[1] * 1e3, 4)
            row["abo_seconds"] = round(max(t_fit[0] + t_fit[1] * ABO_IMAGES, largest["seconds"]), 0)
        else:  # one size: proportional
            i, r = pts[0]
            row["abo_seconds"] = round(r["seconds"] / i * ABO_IMAGES, 0)
        if m_fit:
            row["rss_fixed_mb"], row["rss_mb_per_100k_images"] = round(m_fit[0]), round(m_fit[1] * 1e5, 1)
            row["abo_peak_rss_mb"] = round(max(m_fit[0] + m_fit[1] * ABO_IMAGES + cap, largest["peak_rss_mb"]))
        if cache:
            row["activation_cache_mb"] = [round(float(r["activation_cache_mb"])) for _, r in pts]
            row["activation_cache_cap_mb"] = round(cap)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    from common.report import markdown_table

    sizes = result["sizes"]
    header = ["step"] + [f"{s['products']:,} products ({s['images']:,} photos): s / ms per photo / peak MB"
                         for s in sizes] + ["fit: fixed s + ms per photo", "peak RSS growth per 100k photos",
                                            "projected to 398,212 photos"]
    rows = []
    for r in result["summary"]:
        cells = [r["step"]]
        by = {b["images"]: b for b in r["by_size"]}
        for s in sizes:
            b = by.get(s["images"])
            cells.append(f"{b['seconds']:.1f} / {b['ms_per_image']:.2f} / {b['peak_rss_mb']}" if b else "failed")
        cells.append(f"{r['seconds_fixed']:.1f} + {r['ms_per_image_fit']:.3f}" if "ms_per_image_fit" in r else "")
        growth = f"{r['rss_mb_per_100k_images']:+.0f} MB" if "rss_mb_per_100k_images" in r else ""
        if "activation_cache_cap_mb" in r:
            growth += (f" + cache ({' / '.join(str(c) for c in r['activation_cache_mb'])} MB, "
                       f"cap {r['activation_cache_cap_mb']})")
        cells.append(growth)
        proj = _duration(r["abo_seconds"])
        if "abo_peak_rss_mb" in r:
            proj += f", {r['abo_peak_rss_mb']:,} MB"
        cells.append(proj)
        rows.append(cells)
    return markdown_table(header, rows)


def _duration(seconds: float) -> str:
    s = float(seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000", help="products per catalog, comma-separated "
                                                         "(default 1000,5000; add 20000 on a bigger machine)")
    ap.add_argument("--views", type=int, default=6, help="photos per product (default 6)")
    ap.add_argument("--arch", default="efficientnet-lite0")
    ap.add_argument("--input-size", type=int, default=64, help="encoder input in px (default 64)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"subset of {','.join(STEPS)} (in this order)")
    ap.add_argument("--eval-queries", type=int, default=1000)
    ap.add_argument("--serve-queries", type=int, default=200)
    ap.add_argument("--work", help="work folder (default: a temporary one, removed at the end); catalogs "
                                   "generated there are reused on a later run")
    ap.add_argument("--fresh", action="store_true", help="generate the catalogs again even if --work has them")
    ap.add_argument("--json", action="store_true", help="print the JSON result to stdout")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        print(json.dumps(run_step(args.step, json.loads(Path(args.ctx).read_text(encoding="utf-8")))))
        return 0
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        if not sizes or min(sizes) < 10:
            raise ValueError
    except ValueError:
        print(f"error: --sizes must be products per catalog (>= 10), comma-separated, got {args.sizes!r}",
              file=sys.stderr)
        return 2
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)} (known: {', '.join(STEPS)})", file=sys.stderr)
        return 2
    needs = {"train_tf": "train_torch", "train_jax": "train_torch", "export": "train_torch", "index": "export",
             "update": "index", "eval": "index", "serve": "index"}
    for s in args.steps:  # with --work, earlier runs may have left what a step needs
        if not args.work and s in needs and needs[s] not in args.steps and s not in ("train_tf", "train_jax"):
            print(f"error: step {s} needs step {needs[s]}", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tmp = None
    work = Path(args.work) if args.work else Path(tmp := tempfile.mkdtemp(prefix="fedcbir-scale-"))
    t0 = time.perf_counter()
    try:
        results = [run_size(n, args.views, work / f"n{n}", args, log) for n in sizes]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    import platform

    out = {"benchmark": "scale", "sizes": results, "summary": summarize(results),
           "settings": {"views": args.views, "arch": args.arch, "input_size": args.input_size, "threads": 1,
                        "decoding_threads": 1, "index": "f16, LiteRT int8 model", "eval_queries": args.eval_queries,
                        "serve_queries": args.serve_queries, "train": "one epoch, P=16 x K=4, AdamW 3e-4, from "
                        "block 11 on (frozen-trunk cache), 1 thread pinned to one CPU"},
           "abo": {"images": ABO_IMAGES, "listings": ABO_LISTINGS},
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
           "seconds": round(time.perf_counter() - t0, 1)}
    out["table"] = markdown(out)
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(out["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
