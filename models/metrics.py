"""Retrieval metrics, defined once: Recall@K, mAP@R and product-type precision@1.

Protocol (ABO multi-view retrieval): queries are photos of test products, the gallery
holds catalog photos; a hit is a gallery photo of the same ``item_id``.

- Recall@K: fraction of queries with at least one same-product photo in the top K.
- mAP@R (Musgrave et al., "A Metric Learning Reality Check"): with R the number of
  same-product photos in the gallery for that query, the mean over the top R ranks of
  precision@i counted only at relevant ranks, divided by R. With one gallery photo per
  product (the main image) it equals Recall@1.
- type_precision@1: the top-1 gallery photo has the query's product type.

Pure numpy; embeddings are L2-normalised here so that a dot product is the cosine.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def rank_gallery(queries: np.ndarray, gallery: np.ndarray, top: int, *,
                 block_elements: int = 1 << 20) -> np.ndarray:
    """Indices of the ``top`` most cosine-similar gallery rows for each query (ties: lower index).

    Queries are ranked in blocks of about ``block_elements`` similarities (4 MB of float32,
    16 MB with the sort's work arrays), so memory does not grow with queries x gallery."""
    q = l2_normalize(queries)
    g = l2_normalize(gallery)
    top = min(top, g.shape[0])
    step = max(1, int(block_elements) // max(1, g.shape[0]))
    out = np.empty((q.shape[0], top), np.int64)
    for i in range(0, q.shape[0], step):
        sims = q[i:i + step] @ g.T
        # stable sort on -sim keeps equal scores in gallery order, so results are deterministic
        out[i:i + step] = np.argsort(-sims, axis=1, kind="stable")[:, :top]
    return out


def retrieval_metrics_from_ranking(
    ranking: np.ndarray,
    query_labels: Sequence,
    gallery_labels: Sequence,
    ks: Sequence[int] = (1, 5, 10),
    query_types: Sequence | None = None,
    gallery_types: Sequence | None = None,
) -> dict[str, float]:
    """Metrics from a ranking (``[n_queries, >= max R]`` gallery indices, best first)."""
    qlab = np.asarray(query_labels)
    glab = np.asarray(gallery_labels)
    if ranking.shape[0] != qlab.shape[0]:
        raise ValueError("ranking and query_labels disagree on the number of queries")
    if qlab.shape[0] == 0:
        raise ValueError("no queries to evaluate")
    rel = glab[ranking] == qlab[:, None]  # [Q, top]
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(rel[:, :k].any(axis=1).mean())
    # R per query: number of gallery items that share the query label
    labels, counts = np.unique(glab, return_counts=True)
    count_of = dict(zip(labels.tolist(), counts.tolist()))
    aps = []
    for i, lab in enumerate(qlab.tolist()):
        r = count_of.get(lab, 0)
        if r == 0:
            aps.append(0.0)
            continue
        hits = rel[i, :r]
        prec_at = np.cumsum(hits) / np.arange(1, r + 1)
        aps.append(float((prec_at * hits).sum() / r))
    out["map@r"] = float(np.mean(aps))
    if query_types is not None and gallery_types is not None:
        gt = np.asarray(gallery_types)
        out["type_precision@1"] = float((gt[ranking[:, 0]] == np.asarray(query_types)).mean())
    out["queries"] = int(qlab.shape[0])
    out["gallery"] = int(glab.shape[0])
    return out


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: Sequence,
    gallery_emb: np.ndarray,
    gallery_labels: Sequence,
    ks: Sequence[int] = (1, 5, 10),
    query_types: Sequence | None = None,
    gallery_types: Sequence | None = None,
) -> dict[str, float]:
    """Recall@K, mAP@R (and type precision@1 if types are given) by exact cosine search."""
    glab = np.asarray(gallery_labels)
    _, counts = np.unique(glab, return_counts=True)
    top = max(max(ks), int(counts.max()) if counts.size else 1)
    ranking = rank_gallery(query_emb, gallery_emb, top)
    return retrieval_metrics_from_ranking(ranking, query_labels, glab, ks, query_types, gallery_types)
