"""``fedcbir server``: a real Flower deployment on this machine, devices join with ``edge-client``.

What it does (everything it starts is stopped again by PID, also on Ctrl-C / SIGTERM):

1. builds and checks the run config (``server.runconfig``): rounds, ``min-nodes`` = the
   number of clients to wait for, strategy, catalog (server-side evaluation), ``out``;
2. TLS (default): uses or creates ``--certs DIR`` (default ``RUN/certs``): a private CA and a
   server certificate for the names devices use (``--advertise``, default the ``--host`` or,
   for ``0.0.0.0``, this machine's name and IP) plus 127.0.0.1/localhost; prints where
   ``ca.pem`` is (devices need it: ``edge-client --root-certificates``);
3. starts ``flower-superlink`` on ``--host:--port`` (with ``--enable-supernode-auth`` when
   ``--require-auth``), waits for its ``/health``; its log goes to ``RUN/superlink.log``;
4. with ``--require-auth``, registers every ``*.pub`` in ``--authorized-keys`` (``flwr
   supernode register``): other devices are refused;
5. submits the ServerApp (``flwr run APPDIR deploy --run-config FILE``; the app directory
   holds only a ``pyproject.toml`` naming the installed components), prints how many
   devices are connected while it waits for ``min-nodes``, then one line per round from
   ``RUN/metrics.jsonl``;
6. exits 0 when the run finished and its final checkpoint exists, non-zero with the
   status details (and the tail of ``RUN/flower.log``) otherwise.

``--resume`` continues the run in ``--out`` after its newest checkpoint (the ServerApp
checks that the settings match); devices that were connected reconnect by themselves.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from common.errors import FedcbirError
from common.flower import SuperLinkProcess

CONNECTION = "deploy"
DEFAULT_PORT = 9092
_FLAGGED = {"catalog": "--catalog/--sample", "num-server-rounds": "--rounds", "min-nodes": "--min-clients",
            "strategy": "--strategy", "resume": "--resume", "out": "--out", "round-timeout": "--round-timeout",
            "wait-nodes-timeout": "--wait-clients"}


def run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from models.centralized import _resolve_catalog
    from server.runconfig import RunConfig

    if args.min_clients < 1:
        raise FedcbirError("--min-clients must be >= 1")
    from server.runconfig import parse_sets

    rc = parse_sets(args.set, _FLAGGED)
    rc.update({
        "catalog": str(_resolve_catalog(args).expanduser().resolve()), "num-server-rounds": args.rounds,
        "min-nodes": args.min_clients, "strategy": args.strategy, "resume": bool(args.resume),
        "out": str(Path(args.out).expanduser().resolve()), "round-timeout": float(args.round_timeout),
        "wait-nodes-timeout": float(args.wait_clients),
    })
    return RunConfig.from_flower(rc).to_flower()


def _precheck(rc: dict[str, Any]) -> None:
    from server.runconfig import RunConfig

    cfg = RunConfig.from_flower(rc)
    out = Path(cfg.out)
    ckpts = list((out / "checkpoints").glob("round-*.json")) if (out / "checkpoints").is_dir() else []
    if not cfg.resume and ckpts:
        raise FedcbirError(f"{out} already holds a federated run: pass --resume or another --out")
    if cfg.resume and not ckpts:
        raise FedcbirError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    root = cfg.catalog_root()
    if not root.is_dir():
        raise FedcbirError(f"catalog {root} does not exist")
    from server.privacy import precheck

    precheck(rc, cfg.min_nodes, " with --min-clients")


def authorized_keys(directory: str | None) -> list[Path]:
    from common.certs import read_public_key

    if not directory:
        raise FedcbirError("--require-auth needs --authorized-keys DIR (the devices' .pub files)")
    d = Path(directory).expanduser().resolve()
    if not d.is_dir():
        raise FedcbirError(f"--authorized-keys {d}: no such folder")
    keys = sorted(d.glob("*.pub"))
    if not keys:
        raise FedcbirError(f"--authorized-keys {d}: no *.pub files (make them with 'edge-client keygen')")
    for k in keys:
        read_public_key(k)
    return keys


STATE_FILE = ".fedcbir-server.json"  # in RUN: the processes of the running session, for a later cleanup


def _identity(pid: int) -> dict[str, Any] | None:
    import psutil

    try:
        p = psutil.Process(pid)
        return {"pid": pid, "create_time": p.create_time(), "name": " ".join(p.cmdline()[:2])[-120:]}
    except psutil.Error:
        return None


def stop_leftovers(out: Path, say=print) -> list[int]:
    """Stop what a previous ``fedcbir server`` session for this run left running (it was
    killed before it could clean up: e.g. Flower's ServerApp outlives a killed SuperLink
    while it retries). Only processes recorded in ``RUN/.fedcbir-server.json`` whose PID,
    start time and command still match, each by PID."""
    import psutil

    f = out / STATE_FILE
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    if state.get("server_pid") and psutil.pid_exists(int(state["server_pid"])):
        me = _identity(int(state["server_pid"]))
        if me and abs(me["create_time"] - float(state.get("server_create_time", 0))) < 1e-3:
            raise FedcbirError(f"another fedcbir server (pid {state['server_pid']}) is running for {out}")
    procs = []
    for rec in state.get("processes", []):
        cur = _identity(int(rec["pid"]))
        if cur and abs(cur["create_time"] - float(rec["create_time"])) < 1e-3 and cur["name"] == rec["name"]:
            procs.append(psutil.Process(int(rec["pid"])))
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    f.unlink(missing_ok=True)
    if procs:
        say(f"stopped {len(procs)} process(es) left by an earlier server session for this run: "
            f"{', '.join(str(p.pid) for p in procs)}")
    return [p.pid for p in procs]


class Deployment(SuperLinkProcess):
    """The SuperLink and the flwr CLI of one ``fedcbir server`` session (a context manager)."""

    tail_lines = 15

    def __init__(self, host: str, port: int, out: Path, *, certs=None, require_auth: bool = False,
                 say=print):
        from common.certs import WILDCARDS
        from common.flower import FlowerCLI

        self.host, self.port, self.out = host, int(port), out
        self.certs = certs
        self.require_auth = require_auth
        self.say = say
        self.local_host = "127.0.0.1" if host in WILDCARDS else host
        self.cli = FlowerCLI(CONNECTION, f"{self.local_host}:{self.port}", insecure=certs is None,
                             root_certificates=certs.ca if certs is not None else None, prefix="fedcbir-server-")
        self.env = self.cli.env
        self.log_file = out / "superlink.log"

    def command(self) -> list[str]:
        from common.flower import tool

        cmd = [tool("flower-superlink")]
        if self.certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert),
                    "--ssl-keyfile", str(self.certs.key)]
        if self.require_auth:
            cmd.append("--enable-supernode-auth")
        cmd += ["--host", self.host, "--port", str(self.port)]
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(f"\n==== fedcbir server {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        return cmd

    def ca_file(self) -> Path | None:
        return self.certs.ca if self.certs is not None else None

    def record(self) -> None:
        """Write RUN/.fedcbir-server.json: this session's processes (see :func:`stop_leftovers`)."""
        import os

        from common.io import write_json_atomic

        if self.link is None:
            return
        pids = [self.link.pid, *sorted(self.link.collect_descendants())]
        me = _identity(os.getpid())
        write_json_atomic(self.out / STATE_FILE, {
            "server_pid": os.getpid(), "server_create_time": me["create_time"] if me else 0,
            "processes": [i for i in (_identity(p) for p in pids) if i]})

    def stop(self) -> None:
        started = self.link is not None
        super().stop()
        if started:  # everything it recorded is stopped now
            (self.out / STATE_FILE).unlink(missing_ok=True)


def _close_run(cli, run_id: str, status: dict[str, Any], out: Path) -> None:
    """After the run ended or failed: stop it in Flower unless it finished, save its log as
    ``RUN/flower.log``; neither step may replace the error being raised (the Deployment stops the
    processes by PID anyway, and the log is a convenience). A second Ctrl-C is ignored meanwhile."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if not str(status.get("status", "")).startswith("finished"):
            try:
                cli.stop_run(run_id)
            except Exception:  # noqa: BLE001
                pass
        try:
            (out / "flower.log").write_text(cli.logs(run_id), encoding="utf-8")
        except Exception:  # noqa: BLE001
            pass
    finally:
        signal.signal(signal.SIGINT, previous)


def serve(rc: dict[str, Any], *, host: str, port: int, certs_dir: str | None, insecure: bool,
          advertise: list[str] | None, require_auth: bool, keys_dir: str | None, say=print,
          poll: float = 1.0) -> dict[str, Any]:
    """Run one deployment to the end; returns summary.json's content (plus server facts)."""
    from common.certs import default_names, ensure_server_certs
    from common.flower import (app_pyproject, port_in_use, read_rows, round_line, signals_as_exit, tail, toml_value,
                                watch_run)
    from server.runconfig import DEFAULTS, RunConfig

    cfg = RunConfig.from_flower(rc)
    out = Path(cfg.out)
    if require_auth and insecure:
        raise FedcbirError("--require-auth needs TLS: Flower authenticates devices only over TLS (drop --insecure)")
    keys = authorized_keys(keys_dir) if require_auth else []
    out.mkdir(parents=True, exist_ok=True)
    stop_leftovers(out, say)
    names = list(advertise or default_names(host))
    certs = None
    if not insecure:
        certs = ensure_server_certs(certs_dir or out / "certs", names)
        made = f" (created {', '.join(certs.created)})" if certs.created else ""
        say(f"TLS: CA certificate for the devices: {certs.ca}{made}; server certificate valid for "
            f"{', '.join(certs.names)}")
    if port_in_use(host if host else "0.0.0.0", port):
        raise FedcbirError(f"port {port} on {host} is in use (another SuperLink?): pass another --port")
    total = cfg.num_server_rounds
    seen = {int(r["round"]) for r in read_rows(out / "metrics.jsonl")} if cfg.resume else set()
    t0 = time.perf_counter()
    status: dict[str, Any] = {}
    run_id = ""
    with signals_as_exit(), Deployment(host, port, out, certs=certs, require_auth=require_auth, say=say) as dep:
        scheme = "https" if certs else "http (no TLS)"
        say(f"SuperLink on {host}:{port} ({scheme}{', device keys required' if require_auth else ''}), pid "
            f"{dep.link.pid}, log {dep.log_file}")
        for k in keys:
            node_id = dep.cli.register_node(k, name=k.stem)
            say(f"registered device key {k.name} as node {node_id}")
        app_dir = dep.cli.home / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(app_pyproject(DEFAULTS, name="fedcbir-deploy"), encoding="utf-8")
        rc_file = dep.cli.home / "run_config.toml"
        rc_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flower().items()), encoding="utf-8")
        run_id = dep.cli.submit(app_dir, rc_file)
        dep.record()
        hint = f"--superlink {names[0] if names else host}:{port}"
        hint += f" --root-certificates {certs.ca}" if certs else " --insecure"
        hint += " --auth-key KEY" if require_auth else ""
        say(f"run {run_id} submitted ({'resuming, ' if cfg.resume else ''}{total} rounds, strategy {cfg.strategy}); "
            f"waiting for {cfg.min_nodes} device(s): edge-client {hint} ...")
        progress = {"online": -1, "rows": 0}

        def count_devices():
            n = sum(1 for nd in dep.cli.nodes() if nd.get("status") == "online")
            if n != progress["online"]:
                progress["online"] = n
                say(f"{n}/{cfg.min_nodes} device(s) connected")

        def on_tick():
            dep.check_alive()
            dep.record()
            if progress["rows"] == 0:  # still waiting for devices (or for the first round)
                count_devices()

        def on_row(row):
            dep.record()
            if progress["rows"] == 0 and progress["online"] < cfg.min_nodes:
                count_devices()
            progress["rows"] += 1
            say(round_line(row, total))

        summary_file = out / "summary.json"
        before = summary_file.stat().st_mtime if summary_file.is_file() else 0.0

        def finished_hint():  # the ServerApp writes summary.json last
            return summary_file.is_file() and summary_file.stat().st_mtime != before

        # Ctrl-C / SIGTERM (KeyboardInterrupt / SystemExit, not Exceptions) skip _close_run: `flwr stop` and
        # `flwr log` are fresh CLI processes (10-20 s each on a busy machine), and leaving the Deployment
        # stops every process it started by PID anyway (within ≈ 30 s)
        try:
            status = watch_run(dep.cli, run_id, out / "metrics.jsonl", seen=seen, on_row=on_row, on_tick=on_tick,
                               poll=poll, status_every=10.0, finished_hint=finished_hint)
        except Exception:
            _close_run(dep.cli, run_id, status, out)
            raise
        _close_run(dep.cli, run_id, status, out)
    if status.get("status") != "finished:completed":
        raise FedcbirError(f"run {run_id} ended {status.get('status')}: {status.get('status-details', '')}\n"
                           f"{tail(out / 'flower.log', 25)}")
    final = out / "checkpoints" / f"round-{total:04d}.json"
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8")) \
        if (out / "summary.json").is_file() else {}
    if summary.get("stopped"):  # the privacy budget ended the run early: its last round is final
        final = out / "checkpoints" / f"round-{int(summary.get('rounds', 0)):04d}.json"
    if not summary or not final.is_file():
        raise FedcbirError(f"run {run_id} completed but {final} or summary.json is missing")
    summary.update(wall_seconds=time.perf_counter() - t0, flower_run_id=run_id,
                   superlink_pid=dep.link.pid if dep.link is not None else None)
    return summary


def cmd_server(args: argparse.Namespace) -> int:
    from common.io import print_json

    rc = run_config_from_args(args)
    _precheck(rc)
    say = (lambda s: None) if args.json else (lambda s: print(s, flush=True))

    try:
        summary = serve(rc, host=args.host, port=args.port, certs_dir=args.certs, insecure=args.insecure,
                        advertise=args.advertise, require_auth=args.require_auth, keys_dir=args.authorized_keys,
                        say=say)
    except SystemExit as exc:  # SIGTERM/SIGHUP (signals_as_exit): everything was stopped on the way out
        code = exc.code if isinstance(exc.code, int) else 1
        if code > 128:
            print(f"error: stopped by {signal.Signals(code - 128).name}; the SuperLink and the run were stopped "
                  f"(continue later with --resume)", file=sys.stderr, flush=True)
        return code
    if args.json:
        print_json({k: summary.get(k) for k in ("final", "initial", "best", "client_status_counts", "out",
                                                "checkpoint", "wall_seconds", "flower_run_id", "resumed_from",
                                                "privacy", "stopped")})
    else:
        from server.privacy import summary_line

        f, i = summary["final"], summary["initial"]
        print(f"done in {summary['wall_seconds']:.0f} s: recall@1 {i['recall@1']:.3f} -> {f['recall@1']:.3f}, "
              f"map@r {i['map@r']:.3f} -> {f['map@r']:.3f}; checkpoint {summary['checkpoint']}"
              f"{summary_line(summary)}", flush=True)
    return 0


def register(sub) -> None:
    from models.centralized import add_catalog_args

    p = sub.add_parser(
        "server", help="start a real Flower SuperLink and run the federation (TLS, device auth)",
        description="Start a Flower SuperLink (TLS by default; certificates made on first use), optionally "
                    "register the devices' public keys, submit the federation (the ServerApp), wait for "
                    "--min-clients devices ('edge-client') and print one line per round. Writes "
                    "RUN/metrics.jsonl, RUN/checkpoints/, RUN/summary.json, RUN/superlink.log, RUN/flower.log (not "
                    "after Ctrl-C / SIGTERM, which stop everything at once). "
                    "Exits 0 when the run finished with its final checkpoint; stops everything it started on "
                    "exit, Ctrl-C or SIGTERM.",
        epilog="example: fedcbir server --sample --rounds 5 --min-clients 3 --host 0.0.0.0 --port 9092 "
               "--require-auth --authorized-keys keys/ --out runs/fleet1",
    )
    add_catalog_args(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-clients", type=int, required=True, help="devices to wait for before round 1")
    p.add_argument("--strategy", default="fedavg", help="fedavg | fedprox | fedadam | fedtrimmedavg | krum")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"SuperLink port (default {DEFAULT_PORT})")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--certs", metavar="DIR", help="ca.pem, server.pem, server.key; missing ones are created "
                                                    "(default RUN/certs)")
    tls.add_argument("--insecure", action="store_true", help="no TLS (a trusted lab network only)")
    p.add_argument("--advertise", action="append", metavar="NAME",
                   help="host name or IP the devices use (repeatable); goes into a new server certificate "
                        "(default: --host, or this machine's name and IP for 0.0.0.0)")
    p.add_argument("--require-auth", action="store_true", help="only registered devices may join")
    p.add_argument("--authorized-keys", metavar="DIR", help="the devices' public keys (*.pub from edge-client keygen)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last checkpoint")
    p.add_argument("--round-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a round goes on without devices that have not answered by then (default 600)")
    p.add_argument("--wait-clients", type=float, default=3600.0, metavar="SECONDS",
                   help="how long to wait for --min-clients devices before failing (default 3600)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other run-config key, e.g. --set width=0.5 --set fraction-evaluate=0")
    p.add_argument("--json", action="store_true", help="print only the final metrics as JSON")
    p.set_defaults(func=cmd_server)


def main(argv=None) -> int:  # python -m server.deploy ... = fedcbir server ...
    from common.cli import run_one

    return run_one(register, "server", argv)


if __name__ == "__main__":
    sys.exit(main())
