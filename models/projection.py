"""The projection a run starts from: principal directions of the pooled features of the
catalog photos the server owns (the training products' main photos), centred by the bias.
Above models.api (it runs an encoder to get the features); imports models and catalog only."""
from __future__ import annotations

import numpy as np

from models.pretrained import orthogonal


def pca_projection(features: np.ndarray, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(weight [dim, F], bias [dim])``: the ``dim`` principal directions of ``features``
    (rows orthonormal; completed with seeded orthonormal directions when there are fewer
    samples than ``dim``), bias ``-weight @ mean`` (centering)."""
    f = np.asarray(features, np.float64)
    mu = f.mean(0)
    _, _, vt = np.linalg.svd(f - mu, full_matrices=False)
    rank = min(dim, vt.shape[0])
    w = np.zeros((dim, f.shape[1]))
    w[:rank] = vt[:rank]
    if rank < dim:  # complete with random directions orthogonal to the principal ones
        r = orthogonal(f.shape[1], f.shape[1], seed, "proj.weight.completion").astype(np.float64)
        r = r - (r @ w[:rank].T) @ w[:rank]
        q, _ = np.linalg.qr(r.T)
        w[rank:] = q.T[: dim - rank]
    w = w.astype(np.float32)
    return np.ascontiguousarray(w), np.ascontiguousarray(-(w @ mu.astype(np.float32)), dtype=np.float32)


def catalog_projection(spec, weights: dict[str, np.ndarray], images: np.ndarray, seed: int,
                       framework: str = "torch") -> dict[str, np.ndarray]:
    """Initialise the projection from the pooled features of catalog photos the server owns
    (the training products' main photos: no device photo is used).

    Measured on the default sample at 160 px, gallery = all 300 products, no training:
    Recall@1 0.577 with the raw 1280-d features, 0.523 through a random orthogonal 256-d
    projection, 0.603 through this one (``images``: normalised NHWC float32)."""
    from models.api import TrainConfig, make_trainer

    fspec = spec.replace(embedding_dim=_feature_dim(spec), num_types=0)
    fw = {k: v for k, v in weights.items() if not k.startswith(("proj.", "type_head."))}
    dim = _feature_dim(spec)
    fw["proj.weight"] = np.eye(dim, dtype=np.float32)
    fw["proj.bias"] = np.zeros(dim, np.float32)
    t = make_trainer(framework, fspec, TrainConfig(threads=1))
    t.set_weights(fw)
    feats = t.embed(images, batch_size=32)
    w, b = pca_projection(feats, spec.embedding_dim, seed)
    out = dict(weights)
    out["proj.weight"], out["proj.bias"] = w, b
    return out


def _feature_dim(spec) -> int:
    from models.spec import resolve

    return resolve(spec).feature_dim


def main_photos(split, pre, limit: int = 2000, seed: int = 0) -> np.ndarray:
    """Normalised main photos of up to ``limit`` training products (seeded choice) of a
    ``catalog.dataset.CatalogSplit``: the input of :func:`catalog_projection`."""
    import dataclasses

    from catalog.images import normalize

    products = [p for p in split.train if p.main_image]
    if len(products) > limit:
        pick = np.random.default_rng([int(seed), 17]).choice(len(products), limit, replace=False)
        products = [products[i] for i in sorted(pick)]
    only_main = [dataclasses.replace(p, other_images=[]) for p in products]
    table = split.table(only_main, pre)
    return normalize(table.images, pre)
