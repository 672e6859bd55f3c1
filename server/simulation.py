"""A whole federation on this machine, on Flower's simulation runtime (``simulate``; the command is ``fedcbir simulate``).

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

import json
import time
from pathlib import Path
from typing import Any, Callable

from common.errors import FedcbirError
from common.flower import (FLOWER_ENV, FlowerCLI, ManagedProcess, SuperLinkProcess, app_pyproject,  # noqa: F401
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
