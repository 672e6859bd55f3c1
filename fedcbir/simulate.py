"""``fedcbir simulate``: a whole federation on this machine, on Flower's simulation runtime.

The command only: flags, checks and the summary line.  What it runs (a private SuperLink, ``flwr run``
on the Ray backend, one line per round, nothing left running) is :func:`server.simulation.simulate`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.errors import FedcbirError
from common.flower import read_rows, round_line
from server.simulation import simulate


# ----------------------------------------------------------------------------- CLI


_FLAGGED = {"catalog": "--catalog/--sample", "num-server-rounds": "--rounds", "frameworks": "--frameworks",
            "profiles": "--profiles", "partition": "--partition", "strategy": "--strategy",
            "local-epochs": "--local-epochs", "seed": "--seed", "fp16-upload": "--fp16-upload",
            "realtime": "--realtime", "resume": "--resume", "out": "--out", "client-state-dir": "--out"}


def _run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from models.centralized import _resolve_catalog
    from server.runconfig import parse_sets

    rc = parse_sets(args.set, _FLAGGED)
    rc.update({
        "catalog": str(_resolve_catalog(args).resolve()), "num-server-rounds": args.rounds,
        "frameworks": args.frameworks, "profiles": args.profiles, "partition": args.partition,
        "strategy": args.strategy, "local-epochs": args.local_epochs, "seed": args.seed,
        "fp16-upload": bool(args.fp16_upload), "realtime": bool(args.realtime), "resume": bool(args.resume),
        "out": str(Path(args.out).resolve()),
        "client-state-dir": str((Path(args.out) / "client-state").resolve()),
    })
    return rc


def _precheck(rc: dict[str, Any], clients: int) -> None:
    """Fail fast (here, not in every client) on a partition that cannot be made."""
    from catalog.dataset import CatalogSplit
    from catalog.splits import partition
    from server.runconfig import RunConfig

    cfg = RunConfig.from_flower(rc)
    if clients < 1:
        raise FedcbirError("--clients must be >= 1")
    split = CatalogSplit.load(cfg.catalog_root(), seed=cfg.seed, test_fraction=cfg.test_fraction)
    partition(split.train, clients, cfg.partition, cfg.seed)
    out = Path(cfg.out)
    if not cfg.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("round-*.json")):
        raise FedcbirError(f"{out} already holds a federated run: pass --resume or another --out")
    if cfg.resume and not any((out / "checkpoints").glob("round-*.json")):
        raise FedcbirError(f"--resume: no checkpoint in {out / 'checkpoints'}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from common.io import print_json

    ray_address = None
    if args.ray_address:  # checked before anything starts
        from common.flower import parse_address

        host, port = parse_address(args.ray_address, "--ray-address")
        ray_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    rc = _run_config_from_args(args)
    _precheck(rc, args.clients)
    total = int(rc["num-server-rounds"])
    if not args.json:
        print(f"simulating {args.clients} clients ({rc['frameworks']} / {rc['profiles']}), partition "
              f"{rc['partition']}, strategy {rc['strategy']}, {total} rounds -> {rc['out']}", flush=True)

    def on_row(row):
        if not args.json:
            print(round_line(row, total), flush=True)

    summary = simulate(rc, args.clients, on_row=on_row, ray_address=ray_address)
    rows = read_rows(Path(rc["out"]) / "metrics.jsonl")
    if args.json:
        print_json({
            "rounds": [{k: r.get(k) for k in ("round", "recall@1", "recall@5", "recall@10", "map@r", "seconds",
                                              "simulated_round_seconds", "bytes_up", "bytes_down", "client_eval",
                                              "clients", "dp")} for r in rows],
            "final": summary["final"], "initial": summary["initial"], "best": summary["best"],
            "client_status_counts": summary["client_status_counts"], "out": summary["out"],
            "checkpoint": summary["checkpoint"], "wall_seconds": summary["wall_seconds"],
            "flower_run_id": summary["flower_run_id"], "ray_address": summary.get("ray_address"),
            "privacy": summary.get("privacy"),
            "stopped": summary.get("stopped"),
        })
    else:
        from server.privacy import summary_line

        f, i = summary["final"], summary["initial"]
        print(f"done in {summary['wall_seconds']:.0f} s: recall@1 {i['recall@1']:.3f} -> {f['recall@1']:.3f}, "
              f"map@r {i['map@r']:.3f} -> {f['map@r']:.3f}; checkpoint {summary['checkpoint']}"
              f"{summary_line(summary)}")
    return 0


def register(sub) -> None:
    from models.centralized import add_catalog_args

    p = sub.add_parser(
        "simulate", help="run a whole federation on this machine (Flower simulation runtime)",
        description="Federated training of the encoder with Flower's simulation runtime (Ray, one CPU per "
                    "client): clients emulate edge devices (profiles) and train in PyTorch, TensorFlow or "
                    "JAX (round-robin by partition). Writes RUN/metrics.jsonl (one line per round, round 0 = "
                    "before training), RUN/checkpoints/round-XXXX, RUN/summary.json and RUN/flower.log.",
        epilog="examples:\n  fedcbir simulate --sample --clients 4 --frameworks torch,tf,jax "
               "--profiles rpi4,rpi5,jetson-nano-cpu --rounds 3 --partition dirichlet:0.3 --out runs/fl1\n"
               "  fedcbir simulate --sample --clients 50 --set clients-per-round=5 --ray-address 10.0.0.5:6379 "
               "--out runs/fl50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog_args(p)
    p.add_argument("--clients", type=int, default=4, help="number of simulated devices (default 4)")
    p.add_argument("--frameworks", default="torch,tf,jax", help="round-robin over clients (default torch,tf,jax)")
    p.add_argument("--profiles", default="rpi4,rpi5,jetson-nano-cpu", help="device profiles, round-robin")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--partition", default="dirichlet:0.3", help="iid | dirichlet:ALPHA | country")
    p.add_argument("--strategy", default="fedavg", help="fedavg | fedprox | fedadam | fedtrimmedavg | krum")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp16-upload", action="store_true", help="clients upload float16 (half the bytes)")
    p.add_argument("--realtime", action="store_true", help="sleep as long as the emulated devices would take")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last checkpoint")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="run the virtual clients on an existing Ray cluster (its head's GCS address, as printed "
                        "by 'ray start --head'; default: $RAY_ADDRESS if set, else a Ray instance for this run "
                        "only); the catalog must be at the same path on every node")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other run-config key (see pyproject.toml [tool.flwr.app.config]), e.g. "
                        "--set bn-policy=shared --set fraction-evaluate=0")
    p.add_argument("--json", action="store_true", help="print rounds and the final metrics as JSON")
    p.set_defaults(func=cmd_simulate)


def main(argv=None) -> int:  # python -m fedcbir.simulate ... = fedcbir simulate ...
    from common.cli import run_one

    return run_one(register, "simulate", argv)


if __name__ == "__main__":
    sys.exit(main())
