"""Pooling and projection of the pretrained encoder before any training.

    python -m benchmarks.pooling_projection [--sizes 128,160,224] [--json]

The default sample catalog (300 products x 6 photos), the ImageNet EfficientNet-Lite0 head
output (PyTorch, fp32, eval mode), queries = the other photos of the 60 test products, gallery
= the main photos of all 300 products (the device protocol's gallery). Recall@1 of:
average vs GeM (p = 3) pooling of the 1280 channels, raw and through a 256-d projection (seeded
random orthogonal, orthogonal 512-d, or PCA of the training products' main photos with a
centring bias, as ``models.projection.catalog_projection`` does).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def measure(size: int) -> dict:
    import torch

    from catalog.dataset import CatalogSplit
    from catalog.images import Preprocess, normalize
    from catalog.sample import ensure_default_sample
    from models import torch_model as T
    from models.initial import init_weights
    from models.pretrained import orthogonal
    from models.projection import pca_projection
    from models.spec import preprocess_kwargs, preset
    from models.metrics import retrieval_metrics

    split = CatalogSplit.load(ensure_default_sample(progress=False), seed=0)
    spec = preset(input_size=size)
    pre = Preprocess(**preprocess_kwargs(spec))
    products = split.train + split.test
    table = split.table(products, pre)
    mains = {p.main_image for p in products}
    test_ids = {p.item_id for p in split.test}
    is_main = np.array([p in mains for p in table.paths])
    is_test = np.array([table.item_ids[lab] in test_ids for lab in table.labels])
    x = normalize(table.images, pre)
    model = T.build(spec, init_weights(spec, 0))
    maps = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            h = model.head(model.trunk(T.to_input(x[i:i + 64]), len(model.blocks)))
            maps.append(h.permute(0, 2, 3, 1).numpy())
    h = np.concatenate(maps)
    q = (~is_main) & is_test

    def r1(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return float(retrieval_metrics(e[q], table.labels[q], e[is_main], table.labels[is_main])["recall@1"])

    avg = h.mean((1, 2))
    gem = (np.clip(h, 1e-6, None) ** 3).mean((1, 2)) ** (1 / 3)
    train_main = is_main & ~is_test
    out = {"input_size": size, "queries": int(q.sum()), "gallery": int(is_main.sum())}
    for name, f in (("avg", avg), ("gem3", gem)):
        out[f"{name}_raw_1280"] = r1(f)
        out[f"{name}_orthogonal_256"] = r1(f @ orthogonal(256, 1280, 0, "proj.weight").T)
        w, b = pca_projection(f[train_main], 256, 0)
        out[f"{name}_pca_256"] = r1(f @ w.T + b)
    out["avg_orthogonal_512"] = r1(avg @ orthogonal(512, 1280, 0, "proj.weight").T)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pooling_projection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128,160,224")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from models.threads import set_threads

    set_threads(1)
    rows = [measure(int(s)) for s in args.sizes.split(",")]
    if args.json:
        print(json.dumps({"benchmark": "pooling_projection", "rows": rows}, indent=2))
    else:
        keys = [k for k in rows[0] if k not in ("input_size", "queries", "gallery")]
        print("Recall@1 (all 300 products in the gallery) " + " ".join(f"{r['input_size']:>6d}px" for r in rows))
        for k in keys:
            print(f"{k:42s} " + " ".join(f"{r[k]:8.3f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
