"""Centralized baseline: ``fedcbir train --framework torch|tf|jax --catalog ROOT``.

One epoch here is what one federated round is for a single client holding all training
products: the optimizer state starts fresh each epoch (``set_weights`` resets it), so
``--resume`` from an epoch checkpoint continues exactly where an uninterrupted run would
be. After each epoch the encoder is evaluated on the held-out test products (gallery =
main photos, queries = other photos) and a checkpoint is written atomically.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FedcbirError
from common.io import append_jsonl, print_json, write_json_atomic

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainSettings:
    framework: str
    catalog: Path
    out: Path
    epochs: int = 10
    optimizer: str = "adamw"
    lr: float | None = None  # None: 3e-4 (pretrained arch) | 2e-3 (from scratch)
    p: int | None = None  # None: 16 | 8
    k: int = 4
    arch: str = "efficientnet-lite0"
    train_from: int = -1  # -1 = the architecture's default
    views: int = 4
    size: int = 0  # 0 = the architecture's input size
    width: float = 1.0
    embedding_dim: int = 0  # 0 = the architecture's
    type_head: bool = True
    seed: int = 0
    test_fraction: float = 0.2
    threads: int = 1
    resume: bool = False
    progress: bool = True


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / CHECKPOINT_DIR).glob("epoch-*.json"))
    return ckpts[-1] if ckpts else None


def _stepper(batches, bar, task):
    for b in batches:
        yield b
        if bar is not None:
            bar.advance(task)


def train(s: TrainSettings) -> dict[str, Any]:
    from catalog.dataset import CatalogSplit
    from catalog.batches import PKBatches
    from catalog.images import Preprocess
    from common.progress import progress_bar
    from models.api import TrainConfig, make_trainer, normalize_framework
    from models.initial import init_weights
    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.optim import OptimConfig
    from models.spec import preprocess_kwargs, preset
    from models.evaluate import RetrievalEval

    fw = normalize_framework(s.framework)
    if s.epochs < 1:
        raise FedcbirError("--epochs must be >= 1")
    split = CatalogSplit.load(s.catalog, seed=s.seed, test_fraction=s.test_fraction)
    spec = preset(s.arch, width=s.width, input_size=s.size or None, embedding_dim=s.embedding_dim or None,
                  num_types=len(split.type_names) if s.type_head else 0)
    pre = Preprocess(**preprocess_kwargs(spec))
    train_from = spec.default_train_from if s.train_from < 0 else s.train_from
    lr = s.lr if s.lr is not None else (3e-4 if spec.pretrained else 2e-3)
    p_batch = s.p if s.p is not None else (16 if spec.pretrained else 8)
    cfg = TrainConfig(optim=OptimConfig(name=s.optimizer, lr=lr), seed=s.seed, threads=s.threads,
                      train_from=train_from)
    out = Path(s.out)
    start_epoch = 1
    history: list[dict[str, Any]] = []
    if s.resume:
        ck = _latest_checkpoint(out)
        if ck is None:
            raise FedcbirError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}")
        weights, meta = load_checkpoint(ck)
        if meta["arch"] != spec.to_dict() or meta.get("framework") != fw:
            raise FedcbirError(f"--resume: {ck} was trained with other settings "
                               f"(framework {meta.get('framework')}); use another --out")
        start_epoch = int(meta["epoch"]) + 1
        history = list(meta.get("history", []))
    else:
        if _latest_checkpoint(out) is not None:
            raise FedcbirError(f"{out} already holds a run: pass --resume or another --out")
        weights = init_weights(spec, s.seed)
        if spec.pretrained:
            from models.projection import catalog_projection, main_photos

            weights = catalog_projection(spec, weights, main_photos(split, pre, seed=s.seed), s.seed, fw)

    train_table = split.table(split.train, pre, progress=s.progress)
    evaluator = RetrievalEval.from_split(split, pre=pre)
    batches = PKBatches(train_table, p=p_batch, k=s.k, seed=s.seed, augment=True, views=s.views)
    trainer = make_trainer(fw, spec, cfg)

    def evaluate(w) -> dict[str, float]:
        trainer.set_weights(w)
        return evaluator.evaluate(trainer.embed)

    if not history:
        m0 = evaluate(weights)
        history.append({"epoch": 0, **m0})
        append_jsonl(out / "metrics.jsonl", history[-1])
    bar = progress_bar(s.progress, transient=False)
    ctx = bar if bar is not None else _Null()
    with ctx:
        for epoch in range(start_epoch, s.epochs + 1):
            task = bar.add_task(f"{fw} epoch {epoch}/{s.epochs}", total=batches.steps_per_epoch) if bar else None
            trainer.set_weights(weights)  # fresh optimizer state each epoch (see module doc)
            t0 = time.perf_counter()
            tm = trainer.train(_stepper(batches.epoch(epoch - 1), bar, task))
            weights = trainer.get_weights()
            m = evaluator.evaluate(trainer.embed)
            row = {"epoch": epoch, "loss": tm["loss"], "train_seconds": tm["seconds"],
                   "epoch_seconds": time.perf_counter() - t0, "peak_rss_mb": tm["peak_rss_mb"], **m}
            history.append(row)
            append_jsonl(out / "metrics.jsonl", row)
            save_checkpoint(out / CHECKPOINT_DIR / f"epoch-{epoch:04d}", weights, {
                "arch": spec, "preprocessing": pre.to_dict(), "framework": fw, "epoch": epoch,
                "metrics": m, "train_config": cfg.to_dict(), "catalog": str(s.catalog),
                "seed": s.seed, "history": history,
            })
            if bar is not None:
                bar.update(task, description=f"{fw} epoch {epoch}/{s.epochs} loss {tm['loss']:.3f} "
                                             f"R@1 {m['recall@1']:.3f}")
    final = history[-1]
    summary = {
        "framework": fw, "epochs": s.epochs, "catalog": str(s.catalog),
        "train_products": len(split.train), "test_products": len(split.test),
        "initial": history[0], "final": final, "history": history,
        "raw_pixels": evaluator.raw_pixels(),
        "checkpoint": str(_latest_checkpoint(out)),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cmd_train(args: argparse.Namespace) -> int:
    catalog = _resolve_catalog(args)
    s = TrainSettings(framework=args.framework, catalog=catalog, out=Path(args.out), epochs=args.epochs,
                      optimizer=args.optimizer, lr=args.lr, p=args.products_per_batch,
                      k=args.photos_per_product, arch=args.arch, train_from=args.train_from,
                      views=args.views, size=args.size, width=args.width, type_head=not args.no_type_head,
                      seed=args.seed, threads=args.threads, resume=args.resume,
                      progress=not args.json)
    summary = train(s)
    if args.json:
        print_json(summary)
    else:
        f, i, r = summary["final"], summary["initial"], summary["raw_pixels"]
        raw = f"{r['recall@1']:.3f}" if r else "n/a"
        print(f"{summary['framework']}: {summary['epochs']} epochs on {summary['train_products']} products; "
              f"test Recall@1 {f['recall@1']:.3f} (untrained {i['recall@1']:.3f}, raw pixels {raw}), "
              f"mAP@R {f['map@r']:.3f}; checkpoint {summary['checkpoint']}")
    return 0


def _resolve_catalog(args) -> Path:
    if args.sample and args.catalog:
        raise FedcbirError("give either --catalog ROOT or --sample, not both")
    if args.catalog:
        return Path(args.catalog)
    if args.sample:
        from catalog.sample import ensure_default_sample

        return ensure_default_sample()
    raise FedcbirError("give --catalog ROOT (ABO layout) or --sample (the built-in sample catalog)")


def add_catalog_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", metavar="ROOT", help="catalog root in the ABO layout")
    p.add_argument("--sample", action="store_true",
                   help="use the built-in sample catalog (generated once into the fedcbir cache)")


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="centralized baseline training with per-epoch evaluation and checkpoints",
        description="Train the encoder centrally on the training products of a catalog, evaluate "
                    "Recall@K / mAP@R on the held-out test products after every epoch, and write "
                    "a checkpoint (canonical .npz + JSON) per epoch.",
        epilog="example: fedcbir train --framework torch --sample --epochs 10 --out runs/central-torch",
    )
    p.add_argument("--framework", required=True, help="torch | tf | jax")
    add_catalog_args(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", required=True, help="run folder (metrics.jsonl, checkpoints/, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 3e-4 for the pretrained encoder, 2e-3 from scratch)")
    p.add_argument("--products-per-batch", type=int, default=None, metavar="P",
                   help="products per batch (default 16 pretrained, 8 from scratch)")
    from models.spec import DEFAULT_ARCH, PRESETS

    p.add_argument("--arch", choices=sorted(PRESETS), default=DEFAULT_ARCH,
                   help=f"architecture (default {DEFAULT_ARCH}, ImageNet-pretrained)")
    p.add_argument("--train-from", type=int, default=-1, metavar="K",
                   help="train blocks >= K + head + projection (default: the architecture's: "
                        "11 for efficientnet-lite0; 0 = everything)")
    p.add_argument("--views", type=int, default=4,
                   help="augmented views per photo (frozen activations are cached per view; 0 = "
                        "fresh augmentation every epoch)")
    p.add_argument("--size", type=int, default=0, help="input size (default: the architecture's, 160)")
    p.add_argument("--photos-per-product", type=int, default=4, metavar="K")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier")
    p.add_argument("--no-type-head", action="store_true", help="train without the product-type head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)
