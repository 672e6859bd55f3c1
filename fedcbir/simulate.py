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
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from fedcbir.errors import FedcbirError

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION = "sim"


# ----------------------------------------------------------------------------- TOML helpers


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        text = repr(v)
        return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"
    return json.dumps(str(v))  # a TOML basic string (JSON escapes are valid TOML escapes)


def app_pyproject(config: dict[str, Any]) -> str:
    """pyproject.toml of a Flower app that runs fedcbir's installed components."""
    from fedcbir import __version__

    lines = [
        "[build-system]", 'requires = ["setuptools>=68"]', 'build-backend = "setuptools.build_meta"', "",
        "[project]", 'name = "fedcbir-sim"', f'version = "{__version__}"',
        'description = "fedcbir federation (components from the installed fedcbir package)"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "fedcbir"', "",
        "[tool.flwr.app.components]", 'serverapp = "server.app:app"', 'clientapp = "edge_client.app:app"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in config.items()]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the runtime


class SimulationRuntime:
    """Own FLWR_HOME + own SuperLink (simulation mode); use as a context manager."""

    def __init__(self, log_dir: Path | None = None, startup_timeout: float = 60.0):
        self.bin = Path(sys.executable).parent
        self.home = Path(tempfile.mkdtemp(prefix="fedcbir-flwr-"))
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.link: subprocess.Popen | None = None
        self.descendants: set[int] = set()
        self.log_file = self.home / "superlink.log"
        env = dict(os.environ)
        env.update(FLOWER_ENV)
        env["FLWR_HOME"] = str(self.home)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"  # superlink starts flower-superexec by name
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        env.setdefault("KERAS_BACKEND", "tensorflow")
        env.setdefault("RAY_DEDUP_LOGS", "0")
        self.env = env

    def _tool(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise FedcbirError(f"{name} not found next to {sys.executable}: is flwr[simulation] installed?")
        return str(path)

    def __enter__(self) -> "SimulationRuntime":
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n', encoding="utf-8")
        self.pid: int | None = None
        self.link = subprocess.Popen(
            [self._tool("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=self.env, cwd=self.home, stdout=open(self.log_file, "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid = self.link.pid
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.link.poll() is not None:
                raise FedcbirError(f"flower-superlink exited with code {self.link.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise FedcbirError(f"flower-superlink did not become healthy within {self.startup_timeout:.0f} s")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run the flwr CLI (always with the connection name, from the private home)."""
        proc = subprocess.run([self._tool("flwr"), *args], env=self.env, cwd=self.home, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise FedcbirError(f"flwr {' '.join(args[:2])} failed (code {proc.returncode}): "
                               f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
        return proc

    def submit(self, app_dir: Path, num_nodes: int, run_config_file: Path) -> str:
        proc = self.flwr("run", str(app_dir), CONNECTION, "--format", "json", "--federation-config",
                         f"num-supernodes={int(num_nodes)} client-resources-num-cpus=1",
                         "--run-config", str(run_config_file))
        try:
            res = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise FedcbirError(f"flwr run printed no JSON: {proc.stdout[-2000:]} {proc.stderr[-2000:]}") from None
        if not res.get("success", False) or "run-id" not in res:
            raise FedcbirError(f"flwr run failed: {res}")
        return str(res["run-id"])

    def status(self, run_id: str) -> dict[str, Any]:
        proc = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json", timeout=60)
        runs = json.loads(proc.stdout).get("runs", [])
        return runs[0] if runs else {}

    def logs(self, run_id: str) -> str:
        proc = self.flwr("log", run_id, CONNECTION, "--show", timeout=120, check=False)
        return proc.stdout + proc.stderr

    def stop_run(self, run_id: str) -> None:
        self.flwr("stop", run_id, CONNECTION, timeout=60, check=False)

    def _collect_descendants(self) -> None:
        import psutil

        if self.link is None:
            return
        try:
            self.descendants.update(p.pid for p in psutil.Process(self.link.pid).children(recursive=True))
        except psutil.Error:
            pass

    def stop(self) -> None:
        """SIGTERM the SuperLink (its superexec and flwr-simulation follow), then end any
        process it started that is still alive, each by PID."""
        import psutil

        if self.link is None:
            return
        self._collect_descendants()
        if self.link.poll() is None:
            self.link.terminate()
            try:
                self.link.wait(15)
            except subprocess.TimeoutExpired:
                self.link.kill()
                self.link.wait(5)
        left = []
        for pid in sorted(self.descendants):
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.Error:
                pass
        if left:
            _, alive = psutil.wait_procs(left, timeout=10)
            for p in alive:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(alive, timeout=5)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        self.link = None
        shutil.rmtree(self.home, ignore_errors=True)


# ----------------------------------------------------------------------------- one simulation


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # being written
    return rows


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM -> SystemExit, so the SuperLink (own session, not signalled with us) is
    still stopped by the ``finally`` blocks. Only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def round_line(row: dict[str, Any], total: int) -> str:
    if row["round"] == 0:
        return f"round 0/{total} (before training): recall@1 {row['recall@1']:.3f}  map@r {row['map@r']:.3f}"
    clients = row.get("clients", [])
    by: dict[str, int] = {}
    for c in clients:
        by[c["status"]] = by.get(c["status"], 0) + 1
    failed = ", ".join(f"{n} {s}" for s, n in sorted(by.items()) if s != "ok") or "0 failed"
    return (f"round {row['round']}/{total}: {by.get('ok', 0)} ok, {failed} | recall@1 {row['recall@1']:.3f}  "
            f"map@r {row['map@r']:.3f} | {row.get('seconds', 0):.1f} s wall, "
            f"{row.get('simulated_round_seconds', 0):.1f} s on the slowest device")


def simulate(run_config: dict[str, Any], num_nodes: int, *, on_row: Callable[[dict[str, Any]], None] | None = None,
             poll: float = 1.0) -> dict[str, Any]:
    """Run a federation on the simulation runtime; returns summary.json's content.

    ``run_config`` must contain an absolute ``out`` and ``catalog``."""
    from server.runconfig import DEFAULTS, RunConfig

    cfg = RunConfig.from_flower(run_config)  # validates early, in this process
    out = Path(cfg.out)
    if not out.is_absolute():
        raise FedcbirError("run config 'out' must be an absolute path")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seen = {int(r["round"]) for r in _read_rows(out / "metrics.jsonl")} if cfg.resume else set()
    with _sigterm_as_exit(), SimulationRuntime() as rt:
        app_dir = rt.home / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(app_pyproject(DEFAULTS), encoding="utf-8")
        rc_file = rt.home / "run_config.toml"
        rc_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flower().items()), encoding="utf-8")
        run_id = rt.submit(app_dir, num_nodes, rc_file)
        status: dict[str, Any] = {}
        try:
            last_ls = 0.0
            while True:
                for row in _read_rows(out / "metrics.jsonl"):
                    if int(row["round"]) not in seen:
                        seen.add(int(row["round"]))
                        if on_row:
                            on_row(row)
                if time.monotonic() - last_ls >= 3 * poll:
                    last_ls = time.monotonic()
                    status = rt.status(run_id)
                    if str(status.get("status", "")).startswith("finished"):
                        for row in _read_rows(out / "metrics.jsonl"):
                            if int(row["round"]) not in seen:
                                seen.add(int(row["round"]))
                                if on_row:
                                    on_row(row)
                        break
                time.sleep(poll)
        except BaseException:
            rt.stop_run(run_id)
            raise
        finally:
            try:
                (out / "flower.log").write_text(rt.logs(run_id), encoding="utf-8")
            except Exception:  # noqa: BLE001 - the log is a convenience
                pass
    if status.get("status") != "finished:completed":
        tail = "\n".join((out / "flower.log").read_text(errors="replace").splitlines()[-25:]) \
            if (out / "flower.log").is_file() else ""
        raise FedcbirError(f"simulation run {run_id} ended {status.get('status')}: "
                           f"{status.get('status-details', '')}\n{tail}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["flower_run_id"] = run_id
    summary["flwr_home"] = str(rt.home)  # removed by now; processes started there are gone
    summary["superlink_pid"] = rt.pid
    return summary


# ----------------------------------------------------------------------------- CLI


_FLAGGED = {"catalog": "--catalog/--sample", "num-server-rounds": "--rounds", "frameworks": "--frameworks",
            "profiles": "--profiles", "partition": "--partition", "strategy": "--strategy",
            "local-epochs": "--local-epochs", "seed": "--seed", "fp16-upload": "--fp16-upload",
            "realtime": "--realtime", "resume": "--resume", "out": "--out", "client-state-dir": "--out"}


def _run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from models.centralized import _resolve_catalog
    from server.runconfig import DEFAULTS

    rc: dict[str, Any] = {}
    for item in args.set or []:
        if "=" not in item:
            raise FedcbirError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if k in _FLAGGED:
            raise FedcbirError(f"--set {k}: use its own option ({_FLAGGED[k]})")
        if k not in DEFAULTS:
            raise FedcbirError(f"--set: unknown run-config key {k!r} (known: {', '.join(DEFAULTS)})")
        d = DEFAULTS[k]
        try:
            rc[k] = (v.strip().lower() in ("1", "true", "yes", "on")) if isinstance(d, bool) else type(d)(v)
        except ValueError:
            raise FedcbirError(f"--set {k}: expected a {type(d).__name__}, got {v!r}") from None
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

    rc = _run_config_from_args(args)
    _precheck(rc, args.clients)
    total = int(rc["num-server-rounds"])
    if not args.json:
        print(f"simulating {args.clients} clients ({rc['frameworks']} / {rc['profiles']}), partition "
              f"{rc['partition']}, strategy {rc['strategy']}, {total} rounds -> {rc['out']}", flush=True)

    def on_row(row):
        if not args.json:
            print(round_line(row, total), flush=True)

    summary = simulate(rc, args.clients, on_row=on_row)
    rows = _read_rows(Path(rc["out"]) / "metrics.jsonl")
    if args.json:
        print_json({
            "rounds": [{k: r.get(k) for k in ("round", "recall@1", "recall@5", "recall@10", "map@r", "seconds",
                                              "simulated_round_seconds", "bytes_up", "bytes_down", "client_eval",
                                              "clients")} for r in rows],
            "final": summary["final"], "initial": summary["initial"], "best": summary["best"],
            "client_status_counts": summary["client_status_counts"], "out": summary["out"],
            "checkpoint": summary["checkpoint"], "wall_seconds": summary["wall_seconds"],
            "flower_run_id": summary["flower_run_id"],
        })
    else:
        f, i = summary["final"], summary["initial"]
        print(f"done in {summary['wall_seconds']:.0f} s: recall@1 {i['recall@1']:.3f} -> {f['recall@1']:.3f}, "
              f"map@r {i['map@r']:.3f} -> {f['map@r']:.3f}; checkpoint {summary['checkpoint']}")
    return 0


def register(sub) -> None:
    from models.centralized import add_catalog_args

    p = sub.add_parser(
        "simulate", help="run a whole federation on this machine (Flower simulation runtime)",
        description="Federated training of the encoder with Flower's simulation runtime (Ray, one CPU per "
                    "client): clients emulate edge devices (profiles) and train in PyTorch, TensorFlow or "
                    "JAX (round-robin by partition). Writes RUN/metrics.jsonl (one line per round, round 0 = "
                    "before training), RUN/checkpoints/round-XXXX, RUN/summary.json and RUN/flower.log.",
        epilog="example: fedcbir simulate --sample --clients 4 --frameworks torch,tf,jax "
               "--profiles rpi4,rpi5,jetson-nano-cpu --rounds 3 --partition dirichlet:0.3 --out runs/fl1",
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
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other run-config key (see pyproject.toml [tool.flwr.app.config]), e.g. "
                        "--set bn-policy=shared --set fraction-evaluate=0")
    p.add_argument("--json", action="store_true", help="print rounds and the final metrics as JSON")
    p.set_defaults(func=cmd_simulate)


def main(argv=None) -> int:  # python -m fedcbir.simulate ... (before the lead wires it into fedcbir)
    from fedcbir.cli import run

    parser = argparse.ArgumentParser(prog="fedcbir")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
