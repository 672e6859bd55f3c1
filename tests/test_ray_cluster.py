"""`fedcbir simulate` on an existing Ray cluster: many more virtual clients than cores.

The test starts a Ray head itself (``ray start --head --block`` on 127.0.0.1, free ports, its
own temp folder, 2 CPUs), runs a 50-client federation that samples 5 clients per round
(``clients-per-round``) with ``--ray-address`` pointing at that head, checks that the simulation really ran on
that cluster (its actors' processes belong to the cluster's session), and stops the
cluster by PID (SIGTERM to the ``ray start --block`` process, which stops everything it
started; any leftover of the session is then killed by PID).

Why this works with Flower 1.42 (read in its source): the simulation runtime's Ray backend
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``) calls
``ray.init(runtime_env=..., **init_args)`` with no address, and the only init arguments a
federation config can carry are num-cpus, num-gpus, logging-level and log-to-driver; Ray
2.55's ``ray.init`` then takes the cluster address from ``$RAY_ADDRESS``. The SuperLink
starts the ``flwr-simulation`` process that builds the backend with its own environment,
so ``RAY_ADDRESS`` in the SuperLink's environment is enough.

Slow (a minute or two on 2 cores): ``pytest -m slow``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]


def _session_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line names the cluster's temp folder (its session)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _actors_of(marker: str) -> set[int]:
    """PIDs of Flower's ClientAppActor workers started by this cluster's raylet (workers
    retitle themselves ``ray::ClientAppActor...``, so they are found as the raylet's children)."""
    out = set()
    for raylet in _session_processes(marker):
        try:
            if "raylet" not in raylet.name():
                continue
            for child in raylet.children(recursive=True):
                if "ClientAppActor" in " ".join(child.cmdline() or []):
                    out.add(child.pid)
        except psutil.Error:
            continue
    return out


@pytest.fixture
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 (free ports, own temp folder), yielded as its GCS address;
    stopped by PID at the end."""
    from common.flower import bin_dir, flower_env, free_port

    temp = Path(f"/tmp/fr{os.getpid()}")  # Ray's socket paths must stay short
    temp.mkdir(exist_ok=True)
    ports = {"port": free_port(), "node-manager-port": free_port(), "object-manager-port": free_port(),
             "ray-client-server-port": free_port(), "dashboard-agent-listen-port": free_port(),
             "dashboard-agent-grpc-port": free_port(), "metrics-export-port": free_port(),
             "runtime-env-agent-port": free_port()}
    cmd = [str(Path(bin_dir()) / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--object-store-memory", str(100 * 2**20), "--include-dashboard", "false",
           "--disable-usage-stats", "--temp-dir", str(temp), "--min-worker-port", "0", "--max-worker-port", "0",
           *[a for k, v in ports.items() for a in (f"--{k}", str(v))]]
    env = flower_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{ports['port']}"
    try:
        deadline = time.monotonic() + 120
        while True:  # ready once a client can see the head's 2 CPUs
            assert head.poll() is None, f"ray start exited with {head.returncode}"
            probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(); "
                                    "print(int(ray.cluster_resources().get('CPU', 0))); ray.shutdown()"],
                                   env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
            if probe.returncode == 0 and probe.stdout.strip().endswith("2"):
                break
            assert time.monotonic() < deadline, probe.stderr[-2000:]
            time.sleep(2)
        yield {"address": address, "temp": str(temp), "pid": head.pid}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        deadline = time.monotonic() + 30
        while (left := _session_processes(str(temp))) and time.monotonic() < deadline:
            time.sleep(1)
        for p in _session_processes(str(temp)):  # by PID, only this cluster's processes
            try:
                p.kill()
            except psutil.Error:
                pass
        subprocess.run(["rm", "-rf", str(temp)], check=False)


@pytest.mark.slow
def test_simulate_50_clients_on_an_existing_ray_cluster(ray_head, tmp_path):
    from catalog.sample import generate_sample

    catalog = tmp_path / "catalog"
    generate_sample(catalog, products=80, views=3, seed=0, progress=False)  # 64 training products >= 50 clients
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "fedcbir.simulate", "--catalog", str(catalog), "--clients", "50",
           "--frameworks", "torch", "--profiles", "host", "--partition", "iid", "--rounds", "1", "--out", str(out),
           "--ray-address", ray_head["address"], "--json",
           "--set", "clients-per-round=5", "--set", "fraction-evaluate=0", "--set", "arch=mobilenetv3-small",
           "--set", "width=0.35", "--set", "input-size=32", "--set", "embedding-dim=32", "--set", "max-steps=2",
           "--set", "products-per-batch=2"]
    seen_on_cluster: set[int] = set()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:  # the ClientApps run in workers of the cluster's raylet
        seen_on_cluster.update(_actors_of(ray_head["temp"]))
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, stderr[-3000:]
    res = json.loads(stdout)
    print(f"50-client simulation on the Ray cluster took {seconds:.0f} s")
    assert res["ray_address"] == ray_head["address"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    clients = rows[1]["clients"]
    assert len(clients) == 5 and rows[1]["accepted"] == 5, clients
    assert all(c["status"] == "ok" and 0 <= c["partition"] < 50 for c in clients)
    assert len({c["partition"] for c in clients}) == 5
    log = (out / "flower.log").read_text()
    assert "50 node(s) connected" in log, log[-2000:]
    assert seen_on_cluster, "no ClientAppActor process of the cluster's session was seen"
