"""``fedcbir export verify``: every bundle file, run by its device runtime, against the
reference framework on a catalog's test products.

Rules (per file):
    fp32   max |file - reference| <= 1e-4 and min cosine >= 0.9999 (un-normalised embeddings)
    fp16   min cosine >= 0.999
    int8   Recall@1 on the test products >= the fp32 reference's Recall@1 - 0.02
           (a quantized file may score higher by chance; only a drop counts).  For
           information, int8 entries also report the paired outcome: queries lost / gained
           against the reference and the exact McNemar p-value — on a few hundred queries a
           2-point difference is often within chance (weakly trained models have many
           near-ties at rank 1).

The references: PyTorch for .onnx / .pte, Keras for Keras-made .tflite, Flax for
jax2tf-made .tflite — each built from ``reference.npz`` (the weights the files came
from), so a bundle can be verified anywhere those frameworks are installed.  The bundle
is only read.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from export.bundle import (FP16_MIN_COS, FP32_MAX_ABS, FP32_MIN_COS, INT8_MAX_RECALL_DROP, compare,
                           resolve_catalog)
from export.manifest import REFERENCE_FILE
from fedcbir.errors import FedcbirError


def judge(precision: str, max_abs_diff: float, min_cosine: float, recall: float,
          reference_recall: float) -> tuple[bool, str]:
    """(ok, reason) for one file by the rules above."""
    if precision == "fp32":
        ok = max_abs_diff <= FP32_MAX_ABS and min_cosine >= FP32_MIN_COS
        return ok, (f"max|diff| {max_abs_diff:.2e} (<= {FP32_MAX_ABS:g}), min cos {min_cosine:.6f} "
                    f"(>= {FP32_MIN_COS})")
    if precision == "fp16":
        return min_cosine >= FP16_MIN_COS, f"min cos {min_cosine:.6f} (>= {FP16_MIN_COS})"
    if precision == "int8":
        drop = reference_recall - recall
        # small epsilon: recall is a ratio of counts, 0.02 exactly must pass
        return drop <= INT8_MAX_RECALL_DROP + 1e-9, (
            f"Recall@1 {recall:.4f} vs fp32 {reference_recall:.4f} (drop {drop * 100:+.2f} points, "
            f"<= {INT8_MAX_RECALL_DROP * 100:g})")
    raise ValueError(precision)


def top1_hits(ev, emb: np.ndarray) -> np.ndarray:
    """Per query: is the top-1 gallery image the same product (bool array)."""
    from retrieval.metrics import rank_gallery

    q, g = ~ev.is_main, ev.is_main
    labels = ev.table.labels
    top = rank_gallery(emb[q], emb[g], 1)[:, 0]
    return labels[g][top] == labels[q]


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value for paired hit/miss outcomes (binomial on the
    discordant queries): how surprising the difference is if both files were equally good."""
    from math import comb

    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return float(min(1.0, 2.0 * tail))


def load_reference(bundle) -> dict[str, np.ndarray]:
    import zipfile

    path = bundle.file_path(REFERENCE_FILE)
    if REFERENCE_FILE not in bundle.files:
        raise FedcbirError(f"bundle {bundle.path} has no {REFERENCE_FILE}: cannot build the reference models")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.array(z[k]) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FedcbirError(f"{path} cannot be read: {exc}") from None


def verify_bundle(path, catalog=None, seed: int | None = None, test_fraction: float | None = None,
                  threads: int = 1, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    from catalog.dataset import CatalogSplit
    from export.reference import framework_version, reference_embedder
    from export.runtime import load_embedder, open_bundle
    from models.spec import ArchSpec
    from retrieval.evaluate import RetrievalEval

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    bundle = open_bundle(path, check="all")
    man = bundle.manifest
    spec = ArchSpec.from_dict(man["architecture"])
    weights = load_reference(bundle)
    data = man.get("data") or {}
    seed = int(data.get("seed", 0) if seed is None else seed)
    test_fraction = float(data.get("test_fraction", 0.2) if test_fraction is None else test_fraction)
    recorded = {"catalog": data.get("catalog")}
    root, how = resolve_catalog(catalog, recorded, log)
    split = CatalogSplit.load(root, seed=seed, test_fraction=test_fraction)
    ev = RetrievalEval.from_split(split, pre=bundle.preprocess)
    n_query = int((~ev.is_main).sum())
    n_gallery = int(ev.is_main.sum())
    log(f"verifying {bundle.path} on {root} ({how}): {len(split.test)} test products, "
        f"{n_gallery} gallery + {n_query} query images")

    refs: dict[str, dict] = {}
    entries = []
    for rt, prec, name in bundle.models():
        src = bundle.files[name]["reference"]
        if src not in refs:
            emb_ref = ev.embed_all(reference_embedder(src, spec, weights), batch_size=64)
            refs[src] = {"emb": emb_ref, "metrics": ev.metrics_for(emb_ref), "hits": top1_hits(ev, emb_ref)}
        emb_obj = load_embedder(bundle, file=name, threads=threads)
        emb = ev.embed_all(emb_obj.embed, batch_size=32)
        m = compare(emb, refs[src]["emb"])
        metrics = ev.metrics_for(emb)
        ref_r1 = float(refs[src]["metrics"]["recall@1"])
        ok, reason = judge(prec, m["max_abs_diff"], m["min_cosine"], float(metrics["recall@1"]), ref_r1)
        entry = {"file": name, "runtime": rt, "runtime_version": emb_obj.runtime_version,
                 "precision": prec, "reference": framework_version(src),
                 "max_abs_diff": m["max_abs_diff"], "min_cosine": m["min_cosine"],
                 "mean_cosine": m["mean_cosine"], "recall@1": float(metrics["recall@1"]),
                 "recall@5": float(metrics["recall@5"]), "reference_recall@1": ref_r1,
                 "ok": bool(ok), "rule": reason}
        if prec == "int8":  # paired view of the recall difference (information, not the rule)
            hits, ref_hits = top1_hits(ev, emb), refs[src]["hits"]
            lost, gained = int((ref_hits & ~hits).sum()), int((~ref_hits & hits).sum())
            entry.update({"queries_lost": lost, "queries_gained": gained,
                          "mcnemar_p": mcnemar_p(lost, gained)})
        entries.append(entry)
    return {"bundle": str(bundle.path), "catalog": str(root), "catalog_chosen": how, "seed": seed,
            "test_fraction": test_fraction, "test_products": len(split.test), "queries": n_query,
            "gallery": n_gallery, "threads": threads,
            "references": {k: {kk: float(vv) for kk, vv in v["metrics"].items()} for k, v in refs.items()},
            "files": entries, "ok": all(e["ok"] for e in entries)}
