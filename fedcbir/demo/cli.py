"""The whole demo job (``run_demo``), its summary and the ``fedcbir demo`` command."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from common.errors import FedcbirError

from fedcbir.demo.report import _device_table, plots, report_md, results_html
from fedcbir.demo.stages import _FLAGGED, DEVICES, DemoSettings, Stage, _remove_tree, export, federate, index, search


def run_demo(out: Path, catalog: Path, settings: DemoSettings, *, fresh: bool = False,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    from common.flower import read_rows
    from common.io import write_json_atomic

    out = out.expanduser().resolve()
    if fresh:
        for name in ("federation", "bundle"):
            _remove_tree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stage(say)
    t0 = time.perf_counter()
    fed = stage.run("federation", "train the encoder on three emulated devices",
                    lambda: federate(settings, catalog, out / "federation", say, stage.marker("federation")))
    checkpoint = Path(fed["checkpoint"])
    man = stage.run("export", "bundle the global model for devices and verify every file",
                    lambda: export(settings, checkpoint, catalog, out / "bundle", say, stage.marker("export")))
    idx = stage.run("index", "embed the catalog on the device runtime into a usearch index",
                    lambda: index(settings, out / "bundle", catalog, say, stage.marker("index")))
    found = stage.run("search", "query the catalog with photos of test products",
                      lambda: search(settings, out / "bundle", catalog, say))
    rows = read_rows(out / "federation" / "metrics.jsonl")
    result = {"settings": asdict(settings), "catalog": str(catalog), "out": str(out),
              "federation": {k: fed.get(k) for k in ("initial", "final", "best", "client_status_counts", "checkpoint",
                                                     "test_products", "train_products", "bytes_up_total",
                                                     "bytes_down_total", "simulated_seconds_total", "privacy",
                                                     "stopped")},
              "rounds": rows, "bundle_dir": str(out / "bundle"),
              "bundle": {"files": man.get("files", {}), "verify": man.get("verify")},
              "index": {k: idx.get(k) for k in ("status", "images", "indexed_products", "embedded", "skipped",
                                                 "seconds", "images_per_second", "bytes") if k in idx},
              "search": found, "stage_seconds": stage.seconds, "reused_stages": sorted(stage.reused)}
    plots(rows, out)
    results_html(found, out)
    result["stage_seconds"]["total"] = round(time.perf_counter() - t0, 1)
    report_md(result, rows, out)
    write_json_atomic(out / "demo.json", result)
    return result


def print_summary(result: dict[str, Any], say) -> None:
    from common.report import markdown_table

    header, table = _device_table(result["rounds"])
    say("\n== summary (per round: global recall; each device's simulated training seconds and peak memory)")
    say(markdown_table(header, table).rstrip())
    i, f = result["federation"]["initial"], result["federation"]["final"]
    ev = result["search"]["eval"]["index"]
    from server.privacy import summary_line

    say(f"federated recall@1 {i['recall@1']:.3f} -> {f['recall@1']:.3f} (recall@10 {i['recall@10']:.3f} -> "
        f"{f['recall@10']:.3f}); on-device search recall@1 {ev['recall@1']:.3f}, recall@5 {ev['recall@5']:.3f}"
        f"{summary_line(result['federation'])}")
    out = Path(result["out"])
    say(f"report: {out / 'report.md'}  results page: {out / 'results.html'}  "
        f"({result['stage_seconds']['total']:.0f} s)")


def _precheck(catalog: Path, settings: DemoSettings) -> None:
    """Fail here, in one line, on a catalog or partition the federation could not use."""
    from catalog.dataset import CatalogSplit
    from catalog.splits import partition

    if not catalog.is_dir():
        raise FedcbirError(f"catalog {catalog} does not exist (give --catalog ROOT in the ABO layout, or --sample)")
    split = CatalogSplit.load(catalog, seed=settings.seed, test_fraction=0.2)
    partition(split.train, len(DEVICES), settings.partition, settings.seed)


def cmd_demo(args: argparse.Namespace) -> int:
    from common.io import print_json
    from models.centralized import _resolve_catalog

    if args.rounds < 1 or args.local_epochs < 1 or args.queries < 1:
        raise FedcbirError("--rounds, --local-epochs and --queries must be >= 1")
    args.sample = args.sample or not args.catalog
    catalog = _resolve_catalog(args).expanduser().resolve()
    from server.runconfig import parse_sets

    settings = DemoSettings(rounds=args.rounds, local_epochs=args.local_epochs, partition=args.partition,
                            queries=args.queries, overrides=parse_sets(args.set, _FLAGGED))
    _precheck(catalog, settings)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    result = run_demo(Path(args.out), catalog, settings, fresh=args.fresh, say=say)
    if args.json:
        print_json({k: result[k] for k in ("federation", "index", "stage_seconds", "out")}
                   | {"search": result["search"]["eval"]})
    else:
        print_summary(result, say)
    return 0


def register(sub) -> None:
    from models.centralized import add_catalog_args

    d = DemoSettings()
    p = sub.add_parser(
        "demo", help="the main job end to end on the built-in sample catalog",
        description="Federate three emulated devices (torch on rpi4, tf on rpi5, jax on jetson-nano-cpu) with "
                    "Flower's simulation runtime, export the global model (TFLite/ONNX/ExecuTorch), index the "
                    "catalog with usearch on the device runtime, run sample queries and write OUT/report.md "
                    "(plots), OUT/results.html and OUT/demo.json. Every stage is cached in OUT.",
        epilog="example: fedcbir demo --out runs/demo   (make demo)",
    )
    add_catalog_args(p)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"federated rounds (default {d.rounds})")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs,
                   help=f"local epochs per round and device (default {d.local_epochs})")
    p.add_argument("--partition", default=d.partition, help=f"iid | dirichlet:ALPHA | country (default {d.partition})")
    p.add_argument("--queries", type=int, default=d.queries, help=f"query photos in results.html (default {d.queries})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="another run-config key for the federation, e.g. --set width=0.5 --set fp16-upload=true")
    p.add_argument("--fresh", action="store_true", help="discard the cached federation and bundle in OUT first")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (progress goes to stderr)")
    p.set_defaults(func=cmd_demo)


def main(argv=None) -> int:
    """``python -m fedcbir.demo [demo] ...`` = ``fedcbir demo ...``."""
    from common.cli import run_one

    return run_one(register, "demo", argv)
