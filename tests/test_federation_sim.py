"""One real federation on Flower's simulation runtime (SuperLink + Ray), mixed frameworks.

Slow (about 2-3 minutes on 2 cores): run with ``pytest -m slow``.
"""
from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")



def _processes_using(text: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            env = p.environ()
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if text in env.get("FLWR_HOME", "") or text in cmd:
            found.append(f"{p.info['pid']}: {cmd[:120]}")
    return found


@pytest.mark.slow
def test_simulation_runtime_mixed_frameworks(tiny_catalog, tmp_path):
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("tensorflow", "jax", "torch")):
        pytest.skip("needs torch, tensorflow and jax")
    from server.simulation import simulate
    from server.runconfig import RunConfig

    out = tmp_path / "run"
    rc = RunConfig.from_flower({
        "catalog": str(tiny_catalog), "num-server-rounds": 2, "frameworks": "torch,tf,jax",
        "arch": "mobilenetv3-small", "lr": 0.002, "bn-policy": "local", "products-per-batch": 8,
        "profiles": "rpi4,rpi5,jetson-nano-cpu", "partition": "iid", "width": 0.35, "input-size": 32,
        "embedding-dim": 32, "fraction-evaluate": 1.0, "fp16-upload": True, "out": str(out),
        "client-state-dir": str(out / "client-state"),
    }).to_flower()
    rows_seen = []
    t0 = time.perf_counter()
    summary = simulate(rc, 3, on_row=rows_seen.append)
    seconds = time.perf_counter() - t0
    print(f"simulation took {seconds:.1f} s")

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] == [r["round"] for r in rows_seen]
    for r in rows[1:]:
        assert {c["framework"] for c in r["clients"]} == {"torch", "tf", "jax"}
        for c in r["clients"]:
            assert c["status"] in ("ok", "offline"), c
            if c["status"] == "ok":
                assert 0.45 < c["bytes_up"] / c["bytes_down"] < 0.55  # fp16 upload
                assert c["peak_rss_mb"] > 0 and c["simulated_seconds"] > 0
        assert r["accepted"] >= 1
    s = json.loads((out / "summary.json").read_text())
    assert s["final"]["round"] == 2 and summary["final"] == s["final"]
    assert (out / "checkpoints" / "round-0002.json").is_file()
    assert (out / "flower.log").stat().st_size > 0
    # nothing left running: the SuperLink, its superexec, flwr-simulation, Ray
    assert not psutil.pid_exists(summary["superlink_pid"]) or \
        psutil.Process(summary["superlink_pid"]).status() == psutil.STATUS_ZOMBIE
    deadline = time.time() + 20
    while _processes_using(summary["flwr_home"]) and time.time() < deadline:
        time.sleep(1)
    assert _processes_using(summary["flwr_home"]) == []
