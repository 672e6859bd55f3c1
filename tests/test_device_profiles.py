"""device_profiles: profile files, validation, virtual clock, links, availability, memory, calibration."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import device_profiles
from device_profiles import calibration as cal_mod
from device_profiles import emulator as emu_mod
from device_profiles import (
    DeviceOutOfMemory,
    Emulator,
    HostCalibration,
    apply_cgroup_limits,
    list_profiles,
    load_profile,
    measure,
    peak_rss_mb,
    remove_cgroup,
    thread_env,
)
from device_profiles.profiles import BUILTIN_DIR, NUMERIC_FIELDS
from common.errors import FedcbirError

EXPECTED = {"rpi3b", "rpi4", "rpi5", "jetson-nano-cpu", "android-mid", "host"}
HOST_REL = 4.0  # a fixed host relative compute, so clock tests do not depend on this machine

BASE_TOML = """
name = "mydev"
description = "a test device"
cores = 4
clock_ghz = 1.5
relative_compute = 1.0
ram_mb = 2048
usable_ram_mb = 1500
downlink_mbit = 8.0
uplink_mbit = 8.0
rtt_ms = 50.0
availability = 0.5
"""


def write_profile(tmp_path: Path, text: str, name: str = "dev.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def replace_line(text: str, key: str, new: str | None) -> str:
    out = []
    for line in text.splitlines():
        if line.split("=")[0].strip() == key:
            if new is not None:
                out.append(new)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- built-ins


def test_builtin_profiles_are_listed():
    assert EXPECTED <= set(list_profiles())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_profile_loads_and_every_number_has_a_source(name):
    p = load_profile(name)
    assert p.name == name and p.builtin
    raw = tomllib.loads((BUILTIN_DIR / f"{name}.toml").read_text(encoding="utf-8"))
    numeric = [k for k in NUMERIC_FIELDS if k in raw]
    assert numeric, "a profile without numbers?"
    for key in numeric:
        assert p.sources.get(key, "").strip(), f"{name}: '{key}' has no source"
    json.dumps(p.to_dict())  # JSON-ready
    if p.emulate:
        assert p.relative_compute > 0 and 0 < p.usable_ram_mb <= p.ram_mb
        assert p.downlink_mbit > 0 and p.uplink_mbit > 0
        assert p.notes.strip()


def test_published_anchors_are_respected():
    rc = {n: load_profile(n).relative_compute for n in ("rpi3b", "rpi4", "rpi5", "jetson-nano-cpu", "android-mid")}
    assert rc["rpi4"] == 1.0
    assert rc["rpi3b"] == pytest.approx(0.4)
    assert 2.5 <= rc["rpi5"] <= 3.0
    assert rc["jetson-nano-cpu"] == pytest.approx(0.7)
    assert 0.3 <= rc["android-mid"] <= 2.0
    assert load_profile("rpi3b").ram_mb == 1024


def test_host_profile_is_this_machine_unscaled():
    p = load_profile("host")
    assert not p.emulate
    assert p.cores >= 1 and p.ram_mb > 0 and "cores" in p.auto_fields
    e = Emulator(p)  # must not calibrate
    assert e.compute_seconds(3.5) == 3.5
    assert e.transfer_seconds(10**9, 10**9) == 0.0
    assert all(e.is_available(r, n) for r in range(20) for n in range(5))


def test_load_by_path_equals_by_name(tmp_path):
    by_name = load_profile("rpi4")
    assert load_profile(str(BUILTIN_DIR / "rpi4.toml")) == by_name
    assert load_profile(BUILTIN_DIR / "rpi4.toml") == by_name
    assert load_profile(by_name) is by_name
    user = write_profile(tmp_path, BASE_TOML)
    assert load_profile(str(user)).name == "mydev"


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "key, new_line, words",
    [
        ("ram_mb", None, ["ram_mb", "missing"]),
        ("name", None, ["name", "missing"]),
        ("cores", 'cores = "four"', ["cores", "integer", "four"]),
        ("cores", "cores = 2.5", ["cores", "integer"]),
        ("clock_ghz", "clock_ghz = true", ["clock_ghz", "number", "boolean"]),
        ("rtt_ms", "rtt_ms = -5.0", ["rtt_ms", "negative"]),
        ("uplink_mbit", "uplink_mbit = -1", ["uplink_mbit", "negative"]),
        ("availability", "availability = 1.5", ["availability", "[0, 1]"]),
        ("relative_compute", "relative_compute = 0", ["relative_compute", "greater than 0"]),
        ("usable_ram_mb", "usable_ram_mb = 4096", ["usable_ram_mb", "ram_mb"]),
        ("description", "description = 3", ["description", "string"]),
        ("name", 'name = "Bad Name"', ["name", "valid name"]),
        ("rtt_ms", "rtt_ms = 50.0\ncpu_count = 4", ["cpu_count", "unknown field"]),
        ("rtt_ms", "rtt_ms = nan", ["rtt_ms", "finite"]),
    ],
)
def test_bad_profile_names_file_and_field(tmp_path, key, new_line, words):
    path = write_profile(tmp_path, replace_line(BASE_TOML, key, new_line))
    with pytest.raises(FedcbirError) as info:
        load_profile(str(path))
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_sources_and_syntax(tmp_path):
    path = write_profile(tmp_path, BASE_TOML + '\n[sources]\ncores = ""\n')
    with pytest.raises(FedcbirError, match=r"sources\.cores"):
        load_profile(str(path))
    path = write_profile(tmp_path, BASE_TOML + "\ncores = = 3\n", "broken.toml")
    with pytest.raises(FedcbirError, match="invalid TOML") as info:
        load_profile(str(path))
    assert "broken.toml" in str(info.value)


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(FedcbirError, match="unknown device profile 'rpi9'.*rpi4"):
        load_profile("rpi9")
    with pytest.raises(FedcbirError, match="not found"):
        load_profile(str(tmp_path / "nope.toml"))


# ----------------------------------------------------------------------------- virtual clock


def test_clock_orders_devices_and_is_linear():
    secs = {n: Emulator(n, host_calibration=HOST_REL).compute_seconds(10.0) for n in ("rpi3b", "rpi4", "rpi5")}
    assert secs["rpi3b"] > secs["rpi4"] > secs["rpi5"] > 0
    e = Emulator("rpi4", host_calibration=HOST_REL)
    assert e.compute_seconds(0.0) == 0.0
    assert e.compute_seconds(7.0) == pytest.approx(7 * e.compute_seconds(1.0))
    assert e.compute_seconds(2.5) + e.compute_seconds(1.5) == pytest.approx(e.compute_seconds(4.0))
    # the formula: host thread vs Pi 4 with 4 cores at parallel efficiency 0.7
    assert e.slowdown() == pytest.approx(HOST_REL / (0.25 * (1 + 3 * 0.7)))
    # work that used 2 host threads is more work: the device needs longer for it
    assert e.compute_seconds(1.0, host_threads=2) > e.compute_seconds(1.0)
    # a faster host means the same host seconds are more device seconds
    assert Emulator("rpi4", host_calibration=2 * HOST_REL).compute_seconds(1.0) == pytest.approx(
        2 * e.compute_seconds(1.0)
    )
    with pytest.raises(ValueError):
        e.compute_seconds(-1.0)


def test_cpu_quota_matches_device_speed():
    e = Emulator("rpi4", host_calibration=HOST_REL)
    # running on this many host cores takes as long as the device would
    assert e.cpu_quota_cores() == pytest.approx(1.0 / e.slowdown())


# ----------------------------------------------------------------------------- network


def test_transfer_time_from_bytes_and_link(tmp_path):
    e = Emulator(str(write_profile(tmp_path, BASE_TOML)), host_calibration=HOST_REL)
    # 1 MB over 8 Mbit/s = 1 s, plus one 50 ms round trip
    assert e.transfer_seconds(1_000_000, 0) == pytest.approx(1.05)
    assert e.transfer_seconds(0, 1_000_000) == pytest.approx(1.05)
    assert e.transfer_seconds(1_000_000, 1_000_000) == pytest.approx(2.10)
    assert e.transfer_seconds(0, 0) == 0.0
    assert e.round_seconds(2.0, 1_000_000, 1_000_000) == pytest.approx(e.compute_seconds(2.0) + 2.10)
    slow_up = Emulator("android-mid", host_calibration=HOST_REL)
    assert slow_up.transfer_seconds(0, 10**7) > slow_up.transfer_seconds(10**7, 0)


# ----------------------------------------------------------------------------- availability


def test_availability_is_deterministic_and_order_independent():
    a = Emulator("android-mid", seed=7, host_calibration=HOST_REL)
    b = Emulator("android-mid", seed=7, host_calibration=HOST_REL)
    keys = [(r, n) for r in range(50) for n in (1, 2, 3, 123456789012345678)]
    forward = {k: a.is_available(*k) for k in keys}
    backward = {k: b.is_available(*k) for k in reversed(keys)}
    assert forward == backward
    other = Emulator("android-mid", seed=8, host_calibration=HOST_REL)
    assert forward != {k: other.is_available(*k) for k in keys}


@pytest.mark.parametrize("name", ["android-mid", "rpi4", "rpi3b"])
def test_availability_matches_probability(name):
    e = Emulator(name, seed=0, host_calibration=HOST_REL)
    draws = [e.is_available(r, n) for r in range(400) for n in range(50)]
    assert sum(draws) / len(draws) == pytest.approx(e.profile.availability, abs=0.015)


def test_availability_extremes(tmp_path):
    always = Emulator(str(write_profile(tmp_path, replace_line(BASE_TOML, "availability", "availability = 1.0"))), 0, HOST_REL)
    never = Emulator(
        str(write_profile(tmp_path, replace_line(BASE_TOML, "availability", "availability = 0.0"), "n.toml")), 0, HOST_REL
    )
    assert all(always.is_available(r, 1) for r in range(500))
    assert not any(never.is_available(r, 1) for r in range(500))


# ----------------------------------------------------------------------------- memory


def test_memory_check():
    with pytest.raises(DeviceOutOfMemory) as info:
        Emulator("rpi3b", host_calibration=HOST_REL).check_memory(1500)
    err = info.value
    assert isinstance(err, FedcbirError)
    assert "peak RSS 1500 MB exceeds rpi3b usable RAM 700 MB" in str(err)
    assert err.profile == "rpi3b" and err.peak_rss_mb == 1500 and err.usable_ram_mb == 700
    Emulator("rpi4", host_calibration=HOST_REL).check_memory(1500)  # fits
    Emulator("rpi3b", host_calibration=HOST_REL).check_memory(450)  # a PyTorch-sized client fits


def test_measure_block_and_peak_rss():
    import numpy as np

    assert peak_rss_mb() > 10
    with measure() as m:
        big = np.ones(40 * 2**20 // 8)  # 40 MB, touched
        big += 1
        time.sleep(0.01)
    del big
    assert m.host_seconds >= 0.01 and m.cpu_seconds >= 0
    assert m.peak_rss_mb > 40 and not m.block_peak
    assert m.peak_rss_mb <= peak_rss_mb() + 1
    json.dumps(m.to_dict())
    with measure(reset_peak=True) as m2:
        small = np.ones(2**20)
        small += 1
    if m2.block_peak:  # Linux: peak of the block, not of the process so far
        assert 0 < m2.peak_rss_mb <= m.peak_rss_mb


# ----------------------------------------------------------------------------- real time


def test_realtime_false_never_sleeps(monkeypatch):
    def boom(_):
        raise AssertionError("slept")

    monkeypatch.setattr(emu_mod.time, "sleep", boom)
    e = Emulator("rpi3b", host_calibration=HOST_REL, realtime=False)
    assert e.maybe_sleep(100.0, 1.0) == 0.0


def test_realtime_true_sleeps_the_remainder(monkeypatch):
    slept = []
    monkeypatch.setattr(emu_mod.time, "sleep", slept.append)
    e = Emulator("rpi3b", host_calibration=HOST_REL, realtime=True)
    assert e.maybe_sleep(5.0, 1.5) == pytest.approx(3.5)
    assert e.maybe_sleep(1.0, 2.0) == 0.0  # device faster than the host: no sleep
    assert slept == [pytest.approx(3.5)]


# ----------------------------------------------------------------------------- calibration


def fake_calibration(score: float = 40.0) -> HostCalibration:
    fp = cal_mod.host_fingerprint()
    return cal_mod._calibration_from_parts(
        {"gemm_f64": score, "gemm_f32": 2 * score, "depthwise": 3.0}, 0.1, fp
    )


def test_calibration_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCBIR_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_measure(*args, **kwargs):
        calls.append(1)
        return fake_calibration()

    monkeypatch.setattr(cal_mod, "measure_host", fake_measure)
    first = cal_mod.load_or_calibrate()
    second = cal_mod.load_or_calibrate()
    assert len(calls) == 1 and first == second
    path = tmp_path / "cache" / "host_calibration.json"
    assert cal_mod.calibration_path() == path and path.is_file()
    assert first.relative_compute == pytest.approx(40.0 / cal_mod.PI4_HPL_GFLOPS, rel=1e-3)
    # the emulator picks the cached value up lazily, without measuring
    e = Emulator("rpi4")
    assert e.host_relative_compute == first.relative_compute and len(calls) == 1
    assert e.describe()["host_calibration"]["score_gflops"] == first.score_gflops
    # a cache from another CPU (or calibration version) is ignored and replaced
    data = json.loads(path.read_text())
    data["cpu_model"] = "Some Other CPU"
    path.write_text(json.dumps(data))
    cal_mod.load_or_calibrate()
    assert len(calls) == 2
    assert json.loads(path.read_text())["cpu_model"] == cal_mod.cpu_model()
    # a damaged cache is measured again too
    path.write_text("{not json")
    cal_mod.load_or_calibrate()
    assert len(calls) == 3


def test_real_measurement_runs_single_threaded_and_is_sane():
    cal = cal_mod.measure_host(repeats=2)
    assert cal.threads == 1 and cal.version == cal_mod.CALIBRATION_VERSION
    assert cal.score_gflops == cal.gemm_f64_gflops > 0.1
    assert cal.gemm_f32_gflops > 0 and cal.depthwise_gflops > 0
    assert cal.relative_compute == pytest.approx(cal.score_gflops / cal_mod.PI4_HPL_GFLOPS, rel=1e-3)
    assert cal.measure_seconds < 15


# ----------------------------------------------------------------------------- limits


def test_thread_env():
    env = thread_env(1, base={"XLA_FLAGS": "--xla_foo=1 intra_op_parallelism_threads=4"})
    assert env["OMP_NUM_THREADS"] == "1" and env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["TF_NUM_INTRAOP_THREADS"] == "1"
    assert env["XLA_FLAGS"].split() == [
        "--xla_foo=1",
        "--xla_cpu_multi_thread_eigen=false",
        "intra_op_parallelism_threads=1",
    ]
    assert thread_env(2)["MKL_NUM_THREADS"] == "2" and "XLA_FLAGS" not in thread_env(2)
    with pytest.raises(ValueError):
        thread_env(0)


def test_apply_thread_limits_in_a_child_process():
    code = (
        "import json, os; from device_profiles import apply_thread_limits; "
        "r = apply_thread_limits(1, slot=1); "
        "print(json.dumps([r.to_dict(), os.environ['OMP_NUM_THREADS'], sorted(os.sched_getaffinity(0))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    record, omp, affinity = json.loads(out.stdout.strip().splitlines()[-1])
    assert omp == "1" and record["threads"] == 1
    if not record["affinity_error"]:
        assert len(affinity) == 1 and record["affinity"] == affinity


def test_cgroup_limits_apply_or_explain():
    assert apply_cgroup_limits().reason == "no limit requested"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        res = apply_cgroup_limits(cpu_cores=0.5, memory_mb=256, pid=child.pid, name=f"fedcbir-test-{child.pid}")
        if res.applied:
            assert Path(res.cpu_path, "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert int(Path(res.memory_path, "memory.limit_in_bytes").read_text()) == 256 * 2**20
            assert child.pid in [int(x) for x in Path(res.memory_path, "cgroup.procs").read_text().split()]
        else:
            assert res.reason  # says why (not root, no v1 controllers, ...)
    finally:
        child.kill()
        child.wait()
    assert remove_cgroup(res) == []
    for path in (res.cpu_path, res.memory_path):
        assert not path or not os.path.exists(path)


def test_package_imports_no_framework():
    code = (
        "import sys, device_profiles; from device_profiles import Emulator; "
        "Emulator('rpi4', host_calibration=4.0).compute_seconds(1.0); "
        "bad = [m for m in ('torch', 'tensorflow', 'jax', 'keras', 'flax') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
    assert device_profiles.__all__
