"""Host calibration for the virtual clock: measure this machine once, cache the result.

Score. The published anchor for the device scale is HPL (fp64 LINPACK, dominated by
double-precision matrix products): a whole Raspberry Pi 4 (BCM2711 @ 1.5 GHz) does
:data:`PI4_HPL_GFLOPS` = 11.433 GFLOPS, i.e. 2.86 per core. The host is measured like
for like: single-threaded float64 matrix products (numpy/OpenBLAS, 512x512, best of
several runs), and::

    host relative_compute (one host thread, whole Pi 4 = 1) = gemm_f64_gflops / PI4_HPL_GFLOPS

Why not a mixed "CNN-like" workload: a numpy workload of float32 pointwise GEMMs plus
shift-and-add depthwise convolutions (both still measured here, as diagnostics) is
dominated by numpy's memory traffic, scores about 19 GFLOP/s on the build host and, set
against the compute-bound HPL anchor, made a Pi 5 look 1.3x FASTER than one host thread.
Published MobileNetV2 fp32 latencies say otherwise: on a Raspberry Pi 5 eager PyTorch
takes 72.55 ms and ExecuTorch/XNNPACK 10.89 ms (Arm, "Optimize and deploy AI inference
with ExecuTorch on Arm", learn.arm.com, MobileNetV2 results table), against 25 ms and
7.5 ms for the same network single-threaded on the build host (AMD EPYC, Zen 4), i.e.
the Pi 5 delivers 0.35x (eager) to 0.69x (XNNPACK) of one host thread. The fp64 GEMM
score (48-52 GFLOP/s there) predicts 0.46-0.49x, between the two (each about 1.4x off);
for the Pi 4 it predicts 0.17-0.18x against 0.18x from XNNPACK's published 41 ms
(4 threads, 2020) for MobileNetV2.

The measurement runs in a child Python process with every BLAS/OpenMP thread pool
set to one thread, so it is single-threaded whatever the parent has imported, and
it is cached as JSON in ``$FEDCBIR_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fedcbir``
or ``~/.cache/fedcbir``). A cache written on another CPU model, numpy version or
calibration version is ignored and the host is measured again.

Run ``python -m device_profiles calibrate [--force] [--json]`` to (re)calibrate by
hand; do it on an idle machine, because a busy neighbour lowers the score.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import FedcbirError
from common.io import cache_dir, write_json_atomic

#: Bump when the reference workload or the scoring changes: old caches are then ignored.
CALIBRATION_VERSION = 2

#: HPL (fp64 LINPACK) result of a BCM2711 board at 1.5 GHz, all 4 Cortex-A72 cores:
#: 11.433 GFLOPS, Raspberry Pi CM4 (same SoC and clock as the Pi 4 Model B at launch),
#: https://github.com/geerlingguy/top500-benchmark/issues/33 .  On the profile scale this
#: is "relative_compute = 1"; a Pi 4 core is a quarter of it (2.86 GFLOP/s).
PI4_HPL_GFLOPS = 11.433
PI4_CORES = 4

#: Matrix size of the scored float64 GEMM (5 ms per product on a Zen 4 core).
GEMM_N = 512

CACHE_FILE = "host_calibration.json"
LOCK_FILE = "host_calibration.lock"

#: Environment variables that pin the thread pools of numpy's BLAS and friends.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "BLIS_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class HostCalibration:
    """One measurement of this host with the reference workload (single thread)."""

    #: single-thread float64 GEMM: the score, like for like with the HPL anchor
    gemm_f64_gflops: float
    #: diagnostics, not used by the clock: float32 pointwise-conv-shaped GEMMs and
    #: shift-and-add depthwise 3x3/5x5 convolutions (memory bound) in numpy
    gemm_f32_gflops: float
    depthwise_gflops: float
    score_gflops: float
    #: score on the profile scale (whole Pi 4 = 1) for ONE host thread
    relative_compute: float
    cpu_model: str
    machine: str
    numpy_version: str
    version: int
    measured_at: str
    measure_seconds: float
    threads: int = 1
    anchor_gflops: float = PI4_HPL_GFLOPS

    @property
    def pi4_cores_per_host_thread(self) -> float:
        """How many Raspberry Pi 4 cores one host thread is worth (HPL/4 anchor)."""
        return self.relative_compute * PI4_CORES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HostCalibration":
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(n for n in names if n not in data and n not in ("threads", "anchor_gflops"))
        if missing:
            raise ValueError(f"calibration record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def fingerprint(self) -> dict[str, Any]:
        return {
            "cpu_model": self.cpu_model,
            "machine": self.machine,
            "numpy_version": self.numpy_version,
            "version": self.version,
        }


# --------------------------------------------------------------------------- where


def calibration_path() -> Path:
    return cache_dir() / CACHE_FILE


# --------------------------------------------------------------------------- what CPU


def cpu_model() -> str:
    """A string that changes when the CPU does: model name, family/model/stepping, ISA flags."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if ":" not in line:
                    if fields:  # end of the first processor block
                        break
                    continue
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    name = (
        fields.get("model name")
        or fields.get("hardware")
        or fields.get("model")
        or platform.processor()
        or platform.machine()
        or "unknown"
    )
    parts = [name]
    ident = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    arm = [f"{k} {fields[k]}" for k in ("cpu implementer", "cpu part", "cpu variant") if k in fields]
    if ident or arm:
        parts.append("(" + ", ".join(ident + arm) + ")")
    flags = fields.get("flags") or fields.get("features")
    if flags:
        digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
        parts.append(f"isa:{digest}")
    return " ".join(parts)


def host_fingerprint() -> dict[str, Any]:
    import numpy as np

    return {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "numpy_version": np.__version__,
        "version": CALIBRATION_VERSION,
    }


# --------------------------------------------------------------------------- the workload


def run_reference_workload(repeats: int = 15) -> dict[str, float]:
    """Time the reference workload in THIS process and return GFLOP/s per part.

    Parts: ``gemm_f64`` (the score: 512x512 float64 products), ``gemm_f32`` (float32
    products shaped like the 1x1 convolutions of a MobileNetV3-Small-style network at
    96 px, batch 8, and a weight gradient) and ``depthwise`` (3x3 and 5x5 depthwise
    convolutions as shift-multiply-add over NHWC arrays). The caller is responsible for
    it running on one thread (see :func:`measure_host`). Deterministic: fixed shapes and
    seed; only the timings vary. Each part's best time over ``repeats`` runs is used.
    """
    import numpy as np

    rng = np.random.default_rng(20240611)
    f32 = np.float32

    a64 = rng.standard_normal((GEMM_N, GEMM_N))
    b64 = rng.standard_normal((GEMM_N, GEMM_N))
    c64 = np.empty((GEMM_N, GEMM_N))
    f64_flops = 2.0 * GEMM_N**3

    # (M, K, N): M = batch*H*W rows, K input channels, N output channels.
    gemm_shapes = [(4608, 24, 88), (1152, 40, 240), (1152, 240, 40), (288, 96, 576)]
    gemm_cases = []
    for m, k, n in gemm_shapes:
        a = rng.standard_normal((m, k), dtype=f32)
        b = rng.standard_normal((k, n), dtype=f32)
        gemm_cases.append((a, b, np.empty((m, n), f32), 2.0 * m * k * n))
    m, k, n = gemm_shapes[0]  # weight gradient of the first layer: a long reduction
    a_t = np.ascontiguousarray(rng.standard_normal((m, k), dtype=f32).T)
    dy = rng.standard_normal((m, n), dtype=f32)
    gemm_cases.append((a_t, dy, np.empty((k, n), f32), 2.0 * m * k * n))

    dw_cases = []
    for nb, h, w, c, ks in [(8, 24, 24, 88, 3), (8, 12, 12, 240, 5)]:
        pad = ks // 2
        x = rng.standard_normal((nb, h + 2 * pad, w + 2 * pad, c), dtype=f32)
        wt = rng.standard_normal((ks * ks, c), dtype=f32)
        out = np.empty((nb, h, w, c), f32)
        tmp = np.empty_like(out)
        dw_cases.append((x, wt, out, tmp, h, w, ks, 2.0 * ks * ks * nb * h * w * c))

    def gemm_f64() -> None:
        np.matmul(a64, b64, out=c64)

    def gemm_f32() -> None:
        for a, b, c, _ in gemm_cases:
            np.matmul(a, b, out=c)

    def depthwise() -> None:
        for x, wt, out, tmp, h, w, ks, _ in dw_cases:
            out.fill(0.0)
            tap = 0
            for i in range(ks):
                for j in range(ks):
                    np.multiply(x[:, i : i + h, j : j + w, :], wt[tap], out=tmp)
                    np.add(out, tmp, out=out)
                    tap += 1

    parts = {
        "gemm_f64": (gemm_f64, f64_flops),
        "gemm_f32": (gemm_f32, sum(c[-1] for c in gemm_cases)),
        "depthwise": (depthwise, sum(c[-1] for c in dw_cases)),
    }
    best = {name: float("inf") for name in parts}
    for fn, _ in parts.values():  # warm-up: page in buffers, pick BLAS kernels
        fn()
    # interleave the parts so a burst of interference does not hit one part only
    for _ in range(max(1, repeats)):
        for name, (fn, _) in parts.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if dt < best[name]:
                best[name] = dt
    return {name: flops / best[name] / 1e9 for name, (_, flops) in parts.items()}


def _calibration_from_parts(parts: dict[str, float], seconds: float, fingerprint: dict[str, Any]) -> HostCalibration:
    score = parts["gemm_f64"]
    return HostCalibration(
        gemm_f64_gflops=round(parts["gemm_f64"], 4),
        gemm_f32_gflops=round(parts["gemm_f32"], 4),
        depthwise_gflops=round(parts["depthwise"], 4),
        score_gflops=round(score, 4),
        relative_compute=round(score / PI4_HPL_GFLOPS, 4),
        cpu_model=fingerprint["cpu_model"],
        machine=fingerprint["machine"],
        numpy_version=fingerprint["numpy_version"],
        version=fingerprint["version"],
        measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        measure_seconds=round(seconds, 3),
    )


def measure_host(repeats: int = 15) -> HostCalibration:
    """Measure this host now (single thread, in a child process) and return the result."""
    t0 = time.perf_counter()
    env = dict(os.environ)
    env.update(SINGLE_THREAD_ENV)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = (
        "import json, sys; from device_profiles.calibration import run_reference_workload; "
        f"print(json.dumps(run_reference_workload({int(repeats)})))"
    )
    cmd = [sys.executable, "-c", code]
    parts: dict[str, float] | None = None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode == 0:
            parts = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        parts = None
    if parts is None:
        parts = _measure_in_process(repeats)
    return _calibration_from_parts(parts, time.perf_counter() - t0, host_fingerprint())


def _measure_in_process(repeats: int) -> dict[str, float]:
    """Fallback when no child process can be started: limit BLAS threads in place."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with the stack
        return run_reference_workload(repeats)
    with threadpool_limits(limits=1):
        return run_reference_workload(repeats)


# --------------------------------------------------------------------------- the cache


def read_cached(path: str | os.PathLike | None = None) -> HostCalibration | None:
    """The cached calibration if it exists, parses and matches this host; else None."""
    path = Path(path) if path is not None else calibration_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cal = HostCalibration.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None
    if cal.fingerprint() != host_fingerprint():
        return None
    if not (cal.score_gflops > 0 and cal.relative_compute > 0):
        return None
    return cal


def load_or_calibrate(path: str | os.PathLike | None = None, force: bool = False) -> HostCalibration:
    """Return the cached calibration of this host, measuring (once) when there is none.

    Concurrent callers (several client processes starting together) serialise on a
    lock file so the host is measured once and not while another copy is measuring.
    """
    path = Path(path) if path is not None else calibration_path()
    if not force:
        cached = read_cached(path)
        if cached is not None:
            return cached
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedcbirError(f"cannot create the calibration cache folder {path.parent}: {e.strerror}") from None
    with _locked(path.parent / LOCK_FILE):
        if not force:
            cached = read_cached(path)  # another process may have measured meanwhile
            if cached is not None:
                return cached
        cal = measure_host()
        try:
            write_json_atomic(path, cal.to_dict())
        except OSError as e:
            raise FedcbirError(f"cannot write the calibration cache {path}: {e.strerror}") from None
        return cal


class _locked:
    """Exclusive advisory lock on a file (no-op where fcntl is missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "_locked":
        try:
            import fcntl

            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- command line


def describe(cal: HostCalibration) -> str:
    return (
        f"{cal.cpu_model}: {cal.score_gflops:.1f} GFLOP/s single-thread float64 GEMM score "
        f"(diagnostics: float32 conv-shaped GEMM {cal.gemm_f32_gflops:.1f}, numpy depthwise "
        f"{cal.depthwise_gflops:.2f}) -> relative compute {cal.relative_compute:.2f} "
        f"(whole Pi 4 = 1; one host thread = {cal.pi4_cores_per_host_thread:.1f} Pi 4 cores)"
    )
