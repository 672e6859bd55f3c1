"""``fedcbir simulate``: a whole federation on this machine, on Flower's simulation runtime.

What it does (no deprecated Flower API, and nothing left running afterwards):

1. a private ``FLWR_HOME`` (temp dir) whose ``config.toml`` holds one connection ``sim``
   to a SuperLink on a free 127.0.0.1 port;
2. starts that SuperLink itself (``flower-superlink --insecure --simulation``, in-memory
   state, own process group) and waits for its ``/health``;
3. writes an app directory that contains only a ``pyproject.toml`` naming the installed
   components ``server.app:app`` / ``edge_client.app:app`` and declaring every run-config key
   (``server.runconfig.DEFAULTS``);
4. ``flwr run APPDIR sim --format json --federation-config "num-supernodes=N
   client-resources-num-cpus=1" --run-config FILE`` (Ray backend, one CPU per client);
5. polls ``RUN/metrics.jsonl`` (one line printed per round) and ``flwr ls sim --run-id``
   until the run is ``finished:*``; saves the run's log to ``RUN/flower.log``;
6. stops the SuperLink by PID (also on Ctrl-C or an error) and then any process it left
   (by PID), and exits non-zero with the status details if the run failed.

The equivalent for Flower users, from a directory holding fedcbir's ``pyproject.toml``
(``[tool.flwr.app]`` is there; ``flwr run`` never needs ``[tool.flwr.federations]``)::

    flwr run . local --stream --federation-config "num-supernodes=4 client-resources-num-cpus=1" \\
        --run-config "num-server-rounds=3 out='/abs/path/run1'"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fedcbir.errors import FedcbirError
from fedcbir.flower import (FLOWER_ENV, FlowerCLI, ManagedProcess, SuperLinkProcess, app_pyproject,  # noqa: F401
                            flower_env, free_port, read_rows, round_line, signals_as_exit, tail, tool, toml_value,
                            wait_healthy, watch_run)

CONNECTION = "sim"


# ----------------------------------------------------------------------------- the runtime


class SimulationRuntime(SuperLinkProcess):
    """Own FLWR_HOME + own SuperLink (simulation mode, in-memory state, a free 127.0.0.1
    port); use as a context manager."""

    def __init__(self, log_dir: Path | None = None, startup_timeout: float = 60.0, ray_address: str | None = None):
        self.local_host = "127.0.0.1"
        self.port = free_port()
        self.cli = FlowerCLI(CONNECTION, f"127.0.0.1:{self.port}", insecure=True)
        self.home = self.cli.home
        self.startup_timeout = startup_timeout
        self.log_file = self.home / "superlink.log"
        self.env = flower_env(self.home)
        self.env.setdefault("RAY_DEDUP_LOGS", "0")
        if ray_address:
            # Flower 1.42's Ray backend calls ray.init() without an address, and Ray then joins
            # the cluster named by RAY_ADDRESS; the SuperLink passes its environment on to the
            # flwr-simulation process that creates the backend (see the README, "Beyond one machine")
            self.env["RAY_ADDRESS"] = ray_address
        self.ray_address = self.env.get("RAY_ADDRESS") or None

    def command(self) -> list[str]:
        return [tool("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(self.port)]

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True):
        """Run the flwr CLI (always with the connection name, from the private home)."""
        return self.cli(*args, timeout=timeout, check=check)

    def submit(self, app_dir: Path, num_nodes: int, run_config_file: Path) -> str:
        return self.cli.submit(app_dir, run_config_file,
                               federation_config=f"num-supernodes={int(num_nodes)} client-resources-num-cpus=1")

    def status(self, run_id: str) -> dict[str, Any]:
        return self.cli.status(run_id)

    def logs(self, run_id: str) -> str:
        return self.cli.logs(run_id)

    def stop_run(self, run_id: str) -> None:
        self.cli.stop_run(run_id)


# ----------------------------------------------------------------------------- one simulation


def simulate(run_config: dict[str, Any], num_nodes: int, *, on_row: Callable[[dict[str, Any]], None] | None = None,
             poll: float = 1.0, ray_address: str | None = None) -> dict[str, Any]:
    """Run a federation on the simulation runtime; returns summary.json's content.

    ``run_config`` must contain an absolute ``out`` and ``catalog``. ``ray_address``
    (``HOST:PORT`` of a running Ray cluster's head, or ``$RAY_ADDRESS``): the virtual clients
    run on that cluster's nodes instead of a Ray instance started for this run; the catalog
    path must then exist on every node, and the clients' environment is that of
    ``ray start`` on each node."""
    from server.runconfig import DEFAULTS, RunConfig

    cfg = RunConfig.from_flower(run_config)  # validates early, in this process
    out = Path(cfg.out)
    if not out.is_absolute():
        raise FedcbirError("run config 'out' must be an absolute path")
    from server.privacy import precheck

    precheck(run_config, num_nodes, " simulated")  # target-epsilon: refuse before starting anything
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seen = {int(r["round"]) for r in read_rows(out / "metrics.jsonl")} if cfg.resume else set()
    with signals_as_exit(), SimulationRuntime(ray_address=ray_address) as rt:
        app_dir = rt.home / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(app_pyproject(DEFAULTS), encoding="utf-8")
        rc_file = rt.home / "run_config.toml"
        rc_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flower().items()), encoding="utf-8")
        run_id = rt.submit(app_dir, num_nodes, rc_file)
        status: dict[str, Any] = {}
        try:
            status = watch_run(rt.cli, run_id, out / "metrics.jsonl", seen=seen, on_row=on_row, poll=poll)
        except BaseException:
            rt.stop_run(run_id)
            raise
        finally:
            try:
                (out / "flower.log").write_text(rt.logs(run_id), encoding="utf-8")
            except Exception:  # noqa: BLE001 - the log is a convenience
                pass
    if status.get("status") != "finished:completed":
        raise FedcbirError(f"simulation run {run_id} ended {status.get('status')}: "
                           f"{status.get('status-details', '')}\n{tail(out / 'flower.log', 25)}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["flower_run_id"] = run_id
    summary["flwr_home"] = str(rt.home)  # removed by now; processes started there are gone
    summary["superlink_pid"] = rt.pid
    summary["ray_address"] = rt.ray_address
    return summary


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
    from fedcbir.io import print_json

    ray_address = None
    if args.ray_address:  # checked before anything starts
        from fedcbir.flower import parse_address

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
    from fedcbir.cli import run_one

    return run_one(register, "simulate", argv)


if __name__ == "__main__":
    sys.exit(main())
