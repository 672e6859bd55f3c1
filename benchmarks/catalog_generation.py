"""Sample-catalog generation speed (images/s on one core) and decode speed of the batch table.

    python -m benchmarks.catalog_generation [--products 200] [--views 6] [--json]

Generates a sample catalog into a temporary folder with the process pinned to one CPU
(where the OS allows it), and reports wall-clock and CPU-time images/s, then decodes
it once through ``ImageTable.load`` (the training/indexing path). Goal: >= 200 images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def run(products: int = 200, views: int = 6, seed: int = 0, one_core: bool = True) -> dict:
    import numpy as np
    import PIL

    from catalog.abo import load_products
    from catalog.batches import ImageTable
    from catalog.sample import generate_sample

    pinned = None
    if one_core and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        pinned = cpus[-1]
    with tempfile.TemporaryDirectory(prefix="fedcbir-bench-") as tmp:
        out = Path(tmp) / "sample"
        w0, c0 = time.perf_counter(), time.process_time()
        stats = generate_sample(out, products=products, views=views, seed=seed, progress=False)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        items = load_products(out)
        w1 = time.perf_counter()
        table = ImageTable.load(out, items, progress=False, workers=1)
        decode = time.perf_counter() - w1
    images = stats["images"]
    return {
        "benchmark": "catalog_generation",
        "products": products,
        "views": views,
        "images": images,
        "seconds_wall": round(wall, 3),
        "seconds_cpu": round(cpu, 3),
        "images_per_second_wall": round(images / wall, 1),
        "images_per_second_cpu": round(images / cpu, 1),
        "goal_images_per_second": 200,
        "bytes_on_disk": size,
        "decode_images_per_second": round(len(table) / decode, 1),
        "pinned_cpu": pinned,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-cores", action="store_true", help="do not pin the process to one CPU")
    ap.add_argument("--json", action="store_true", help="print JSON to stdout")
    args = ap.parse_args(argv)
    res = run(args.products, args.views, args.seed, one_core=not args.all_cores)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print(f"sample catalog: {res['images']} images ({res['products']} products x {res['views']} views)")
        print(f"  generation: {res['images_per_second_wall']} images/s wall, {res['images_per_second_cpu']} images/s "
              f"CPU time (goal {res['goal_images_per_second']}), pinned to CPU {res['pinned_cpu']}")
        print(f"  decode for batches (1 thread): {res['decode_images_per_second']} images/s")
        print(f"  on disk: {res['bytes_on_disk'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
