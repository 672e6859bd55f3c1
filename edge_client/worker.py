"""The part of a client round that touches a deep-learning framework.

The ClientApp (``edge_client.app``) runs every train/evaluate message in a FRESH CHILD
PROCESS, ``python -m edge_client.worker JOBDIR``, with one thread, like Flower's
deployment runtime starts a fresh ``flwr-clientapp`` per message. So the child's peak
RSS is that framework's alone (Ray actors in the simulation runtime are shared by
clients of different frameworks, and Flower's simulation imports TensorFlow in every
actor) and the device memory check is honest.

Job folder protocol::

    JOBDIR/job.json     what to do (see ``run_job``): mode train|evaluate, framework,
                        arch, train config, catalog root, preprocessing, type names,
                        products (item id, type, main and other photos), batch settings
    JOBDIR/in.npz       canonical float32 weights (and ``anchor/<name>`` for FedProx)
    JOBDIR/out.npz      trained weights (train only)
    JOBDIR/result.json  {"metrics": {...}} or {"error": "...", "kind": "..."}

``run_job`` is also called in-process (run config ``client-isolation = "inline"``,
used by the fast tests), where trainers are cached per process.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common.memory import peak_rss_mb

ANCHOR_PREFIX = "anchor/"
_TRAINERS: dict[tuple, Any] = {}


def products_to_json(products) -> list[dict[str, Any]]:
    return [{"item_id": p.item_id, "product_type": p.product_type, "name": p.name,
             "main_image": p.main_image, "other_images": list(p.other_images)} for p in products]


def products_from_json(rows) -> list:
    from catalog.abo import Product

    return [Product(item_id=r["item_id"], product_type=r["product_type"], name=r.get("name", ""),
                    main_image=r.get("main_image"), other_images=list(r.get("other_images", [])))
            for r in rows]





def _table(job: Mapping[str, Any], key: str):
    from catalog.batches import ImageTable
    from catalog.images import Preprocess
    from common.io import cache_dir

    return ImageTable.load(job["catalog"], products_from_json(job[key]), Preprocess.from_dict(job["pre"]),
                           progress=False, cache_dir=cache_dir() / "images", type_names=job["type_names"])


def _trainer(job: Mapping[str, Any], cache: bool):
    from models.api import TrainConfig, make_trainer
    from models.spec import ArchSpec

    spec = ArchSpec.from_dict(job["arch"])
    cfg = TrainConfig.from_dict(job["train_config"])
    key = (job["framework"], spec, cfg)
    if cache and key in _TRAINERS:
        return _TRAINERS[key]
    trainer = make_trainer(job["framework"], spec, cfg)
    if cache:
        _TRAINERS[key] = trainer
    return trainer


def _activation_cache_file(job: Mapping[str, Any], trainer, table) -> Path | None:
    """Where this device keeps its frozen-trunk activations between rounds (None: no cache).

    The name hashes everything that decides a cached row: framework, the frozen weights,
    architecture, preprocessing, the photos in table order, the augmentation seed and views."""
    import hashlib

    from common.io import cache_dir

    if not trainer.train_from or not int(job.get("views", 0)) or trainer.cache.max_bytes <= 0:
        return None
    ident = json.dumps([job["framework"], trainer._frozen_sig, job["arch"], trainer.train_from, job["pre"],
                        hashlib.sha256("\n".join(table.paths).encode()).hexdigest(), int(job["batch_seed"]),
                        int(job["views"])], sort_keys=True)
    d = cache_dir() / "activations"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.npz"


def run_job(job: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, cache_trainers: bool = False
            ) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """Train or evaluate; returns ``(new weights or None, metrics)``.

    ``arrays``: canonical weights, plus ``anchor/<name>`` (FedProx reference) if any.
    """
    t0 = time.perf_counter()
    weights = {k: v for k, v in arrays.items() if not k.startswith(ANCHOR_PREFIX)}
    anchor = {k[len(ANCHOR_PREFIX):]: v for k, v in arrays.items() if k.startswith(ANCHOR_PREFIX)} or None
    trainer = _trainer(job, cache_trainers)
    t_build = time.perf_counter()
    metrics: dict[str, Any] = {}
    out = None
    if job["mode"] == "train":
        from catalog.batches import PKBatches

        table = _table(job, "products")
        batches = PKBatches(table, p=int(job["p"]), k=int(job["k"]), seed=int(job["batch_seed"]), augment=True,
                            views=int(job.get("views", 0)))
        trainer.set_weights(weights, anchor=anchor)
        cache_file = _activation_cache_file(job, trainer, table)
        if cache_file is not None:
            trainer.cache.load(cache_file)
        t_data = time.perf_counter()
        stream = itertools.chain.from_iterable(batches.epoch(int(e)) for e in job["epochs"])
        tm = trainer.train(stream)
        out = trainer.get_weights()
        if cache_file is not None:
            trainer.cache.save(cache_file)
        metrics.update(cache_hits=int(tm.get("cache_hits", 0)), cache_misses=int(tm.get("cache_misses", 0)),
                       first_step_seconds=float(tm["first_step_seconds"]),
                       steady_step_seconds=float(tm["steady_step_seconds"]))
        metrics.update(loss=float(tm["loss"]), examples=int(tm["examples"]), steps=int(tm["steps"]),
                       train_seconds=float(tm["seconds"]), train_cpu_seconds=float(tm["cpu_seconds"]),
                       train_images=len(table))
    elif job["mode"] == "evaluate":
        from catalog.batches import eval_batches
        from models.evaluate import RetrievalEval

        trainer.set_weights(weights)
        t_data = time.perf_counter()
        products = products_from_json(job["products"])
        table = _table(job, "products")
        main = {p.main_image for p in products if p.main_image}
        queries = sum(1 for p in table.paths if p not in main)
        if job.get("recalibrate_products"):
            bn_table = _table(job, "recalibrate_products")
            trainer.recalibrate_bn(eval_batches(bn_table, 32))
        if queries == 0 or queries == len(table):
            metrics.update(queries=0, gallery=len(table) - queries)
        else:
            metrics.update(RetrievalEval(table, main).evaluate(trainer.embed))
        metrics["train_seconds"] = 0.0
    else:
        raise ValueError(f"unknown job mode {job['mode']!r}")
    t_end = time.perf_counter()
    metrics.update(build_seconds=t_build - t0, data_seconds=t_data - t_build, work_seconds=t_end - t_data,
                   peak_rss_mb=peak_rss_mb(), pid=os.getpid())
    return out, metrics


# ----------------------------------------------------------------------------- child process


def write_job(job_dir: Path, job: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "job.json").write_text(json.dumps(job), encoding="utf-8")
    with open(job_dir / "in.npz", "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: np.array(z[k]) for k in z.files}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m edge_client.worker JOBDIR", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    job_dir = Path(argv[0])
    job = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
    from models.threads import set_threads

    set_threads(int(job.get("threads", 1)))  # before any framework import
    result: dict[str, Any]
    try:
        arrays = read_npz(job_dir / "in.npz")
        out, metrics = run_job(job, arrays)
        if out is not None:
            with open(job_dir / "out.tmp.npz", "wb") as f:
                np.savez(f, **out)
            os.replace(job_dir / "out.tmp.npz", job_dir / "out.npz")
        metrics["process_seconds"] = time.perf_counter() - t_start
        metrics["peak_rss_mb"] = peak_rss_mb()
        result = {"metrics": metrics}
    except Exception as exc:  # reported to the parent, which turns it into an Error reply
        result = {"error": f"{type(exc).__name__}: {exc}", "kind": type(exc).__name__,
                  "traceback": traceback.format_exc(limit=8), "peak_rss_mb": peak_rss_mb()}
    (job_dir / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
