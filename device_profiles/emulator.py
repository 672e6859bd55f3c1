"""The edge-device emulator: a calibrated virtual clock, link model, availability and memory budget.

As FedScale does, the host is measured once (:mod:`device_profiles.calibration`), each
client's local work is timed on the host single-threaded, and the time is scaled to
the device of the profile. Transfer time comes from bytes and the profile's link;
availability per round is a seeded coin flip; the memory check compares the peak RSS
of the training process with what the device leaves to it. Real sleeping happens only
with ``realtime=True`` (demo mode).

Virtual clock
-------------
Compute capability on the profile scale (whole Raspberry Pi 4 = 1), with the parallel
speedup ``S(n, e) = 1 + (n - 1) * e`` (each extra thread adds ``e`` of a thread)::

    C_host(n) = r_host * S(n, HOST_PARALLEL_EFFICIENCY)      r_host = host score / PI4_HPL_GFLOPS
    C_dev     = relative_compute / cores * S(cores, parallel_efficiency)
    device_seconds = host_seconds * C_host(host_threads) / C_dev

``r_host`` comes from single-thread float64 GEMM GFLOP/s against the Pi 4's HPL result
(11.433 GFLOPS; see :mod:`device_profiles.calibration` for why, and for the check against
published MobileNetV2 latencies). A Pi 4 (relative_compute 1, 4 cores, e = 0.7) trains at
``0.25 * 3.1 = 0.775``; a Zen 4 host thread scoring 48.5 GFLOP/s (r_host = 4.24) makes it
5.5x slower than the host thread, a Pi 5 2.0x, a Pi 3B+ 13.7x.

Known bias (from the same check): framework kernels are not equally tuned on both ISAs.
Eager PyTorch on aarch64 runs about 1.4x slower than this clock predicts (Pi 5, MobileNetV2),
XNNPACK-based runtimes about 1.4x faster; the clock sits between them.
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from common.errors import FedcbirError
from common.memory import peak_rss_mb, vm_hwm_mb

from .calibration import PI4_HPL_GFLOPS, HostCalibration, load_or_calibrate
from .limits import (  # re-exported: helpers for the client process
    CgroupLimits,
    ThreadLimits,
    apply_cgroup_limits,
    apply_thread_limits,
    remove_cgroup,
    thread_env,
)
from .profiles import Profile, load_profile

__all__ = [
    "DeviceOutOfMemory",
    "Emulator",
    "Measurement",
    "measure",
    "peak_rss_mb",
    "parallel_speedup",
    "HOST_PARALLEL_EFFICIENCY",
    "CgroupLimits",
    "ThreadLimits",
    "apply_cgroup_limits",
    "apply_thread_limits",
    "remove_cgroup",
    "thread_env",
]

#: Parallel efficiency assumed when the HOST work itself used several threads
#: (DESIGN.md: simulated clients should use one, so this rarely matters).
HOST_PARALLEL_EFFICIENCY = 0.7


class DeviceOutOfMemory(FedcbirError):
    """The training process needed more memory than the emulated device has for it."""

    def __init__(self, message: str, *, profile: str = "", peak_rss_mb: float = 0.0, usable_ram_mb: int = 0):
        super().__init__(message)
        self.profile = profile
        self.peak_rss_mb = peak_rss_mb
        self.usable_ram_mb = usable_ram_mb


def parallel_speedup(threads: int, efficiency: float) -> float:
    """``1 + (threads - 1) * efficiency``: throughput of ``threads`` threads in single-thread units."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return 1.0 + (threads - 1) * efficiency


class Emulator:
    """Scales host measurements to a device profile.

    ``host_calibration``: a :class:`HostCalibration`, a bare host relative compute
    (float, one host thread on the profile scale), or None to load the cached
    calibration (measuring the host once if needed) on first use.
    """

    def __init__(
        self,
        profile: Profile | str | os.PathLike,
        seed: int = 0,
        host_calibration: HostCalibration | float | None = None,
        realtime: bool = False,
    ) -> None:
        self.profile = load_profile(profile)
        self.seed = int(seed)
        self.realtime = bool(realtime)
        self._calibration: HostCalibration | None = None
        self._host_relative: float | None = None
        if isinstance(host_calibration, HostCalibration):
            self._calibration = host_calibration
            self._host_relative = float(host_calibration.relative_compute)
        elif host_calibration is not None:
            value = float(host_calibration)
            if not value > 0:
                raise ValueError(f"host relative compute must be > 0, got {host_calibration!r}")
            self._host_relative = value

    # ------------------------------------------------------------------ compute

    @property
    def host_calibration(self) -> HostCalibration | None:
        """The host calibration (loaded or measured on first access); None if a bare number was given."""
        if self._calibration is None and self._host_relative is None:
            self._calibration = load_or_calibrate()
            self._host_relative = float(self._calibration.relative_compute)
        return self._calibration

    @property
    def host_relative_compute(self) -> float:
        """One host thread on the profile scale (whole Pi 4 = 1)."""
        if self._host_relative is None:
            self.host_calibration  # noqa: B018 - loads it
        assert self._host_relative is not None
        return self._host_relative

    def device_capability(self) -> float:
        """Training throughput of the device with all its cores, on the profile scale."""
        p = self.profile
        return p.relative_compute / p.cores * parallel_speedup(p.cores, p.parallel_efficiency)

    def host_capability(self, host_threads: int = 1) -> float:
        return self.host_relative_compute * parallel_speedup(int(host_threads), HOST_PARALLEL_EFFICIENCY)

    def slowdown(self, host_threads: int = 1) -> float:
        """Device seconds per host second (1.0 for a profile with ``emulate = false``)."""
        if not self.profile.emulate:
            return 1.0
        return self.host_capability(host_threads) / self.device_capability()

    def compute_seconds(self, host_seconds: float, host_threads: int = 1) -> float:
        """Seconds the device would need for work that took ``host_seconds`` on the host."""
        if host_seconds < 0:
            raise ValueError(f"host_seconds must be >= 0, got {host_seconds}")
        return float(host_seconds) * self.slowdown(host_threads)

    def cpu_quota_cores(self) -> float:
        """Host CPU share (cores) that runs about as fast as the device: for a cgroup CPU quota."""
        if not self.profile.emulate:
            return float(self.profile.cores)
        return self.device_capability() / self.host_relative_compute

    # ------------------------------------------------------------------ network

    def transfer_seconds(self, bytes_down: int | float, bytes_up: int | float) -> float:
        """Time to receive ``bytes_down`` and send ``bytes_up`` over the profile's link.

        Each direction that carries data costs one round trip plus its bytes at the
        link rate (Mbit/s = 1e6 bit/s); a rate of 0 means the link is not shaped.
        """
        if bytes_down < 0 or bytes_up < 0:
            raise ValueError("byte counts must be >= 0")
        p = self.profile
        total = 0.0
        for nbytes, mbit in ((bytes_down, p.downlink_mbit), (bytes_up, p.uplink_mbit)):
            if nbytes <= 0:
                continue
            total += p.rtt_ms / 1000.0
            if mbit > 0:
                total += float(nbytes) * 8.0 / (mbit * 1e6)
        return total

    def round_seconds(
        self,
        host_seconds: float,
        bytes_down: int | float = 0,
        bytes_up: int | float = 0,
        host_threads: int = 1,
    ) -> float:
        """Simulated duration of one round on the device: download + compute + upload."""
        return self.compute_seconds(host_seconds, host_threads) + self.transfer_seconds(bytes_down, bytes_up)

    # ------------------------------------------------------------------ availability

    def availability_draw(self, round: int, node_id: int | str) -> float:
        """The uniform [0, 1) number behind :meth:`is_available` (a hash of seed, round, node)."""
        key = f"fedcbir-availability:{self.seed}:{int(round)}:{node_id}".encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def is_available(self, round: int, node_id: int | str) -> bool:  # noqa: A002 - Flower's word
        """Whether the device is online in ``round``: Bernoulli(availability), a pure function
        of (seed, round, node_id), so independent of call order and of other nodes."""
        return self.availability_draw(round, node_id) < self.profile.availability

    # ------------------------------------------------------------------ memory

    def check_memory(self, peak_rss_mb: float) -> None:
        """Raise :class:`DeviceOutOfMemory` if ``peak_rss_mb`` exceeds the profile's usable RAM."""
        p = self.profile
        if peak_rss_mb > p.usable_ram_mb:
            raise DeviceOutOfMemory(
                f"peak RSS {peak_rss_mb:.0f} MB exceeds {p.name} usable RAM {p.usable_ram_mb} MB "
                f"(of {p.ram_mb} MB on the device)",
                profile=p.name,
                peak_rss_mb=float(peak_rss_mb),
                usable_ram_mb=p.usable_ram_mb,
            )

    # ------------------------------------------------------------------ real time

    def maybe_sleep(self, simulated_seconds: float, host_seconds: float) -> float:
        """In realtime mode, sleep until ``simulated_seconds`` have passed in total; return seconds slept.

        ``host_seconds`` is the real time already spent on the work. Never sleeps when
        ``realtime`` is false, or when the device would have been faster than the host.
        """
        if not self.realtime:
            return 0.0
        remaining = float(simulated_seconds) - float(host_seconds)
        if remaining <= 0:
            return 0.0
        time.sleep(remaining)
        return remaining

    # ------------------------------------------------------------------ records

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for run metadata (does not trigger a calibration for 'host')."""
        p = self.profile
        out: dict[str, Any] = {
            "profile": p.name,
            "emulate": p.emulate,
            "seed": self.seed,
            "realtime": self.realtime,
            "availability": p.availability,
            "usable_ram_mb": p.usable_ram_mb,
            "link": {"downlink_mbit": p.downlink_mbit, "uplink_mbit": p.uplink_mbit, "rtt_ms": p.rtt_ms},
        }
        if p.emulate:
            out.update(
                {
                    "device_capability": round(self.device_capability(), 6),
                    "host_relative_compute": self.host_relative_compute,
                    "slowdown_1_thread": round(self.slowdown(1), 6),
                    "anchor_gflops": PI4_HPL_GFLOPS,
                }
            )
            if self._calibration is not None:
                out["host_calibration"] = self._calibration.to_dict()
        return out

    def __repr__(self) -> str:
        return f"Emulator(profile={self.profile.name!r}, seed={self.seed}, realtime={self.realtime})"


# ---------------------------------------------------------------------- measuring a block


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    """Filled in when the :func:`measure` block ends."""

    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    #: True when the peak is that of the block (high-water mark reset at its start);
    #: False when it is the process's lifetime peak
    block_peak: bool = False

    @property
    def host_seconds(self) -> float:
        """Wall seconds of the block: the input of :meth:`Emulator.compute_seconds`."""
        return self.wall_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "host_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "block_peak": self.block_peak,
        }


@contextmanager
def measure(reset_peak: bool = False) -> Iterator[Measurement]:
    """Time a block (wall and process CPU seconds) and record the peak RSS at its end.

    By default the peak is the process's high-water mark when the block ends, which is
    what a device's memory must hold (it includes, e.g., a framework's import-time peak;
    each Flower message runs in a fresh process, so this is the peak of the round). With
    ``reset_peak`` (Linux), the kernel's high-water mark is first reset to the current RSS,
    so the peak is that of the block alone (still counting everything resident); this
    also lowers what :func:`peak_rss_mb` reports afterwards.
    """
    m = Measurement()
    local = _reset_peak_rss() if reset_peak else False
    t_wall = time.perf_counter()
    t_cpu = time.process_time()
    try:
        yield m
    finally:
        m.wall_seconds = time.perf_counter() - t_wall
        m.cpu_seconds = time.process_time() - t_cpu
        hwm = vm_hwm_mb() if local else None
        m.block_peak = hwm is not None
        m.peak_rss_mb = hwm if hwm is not None else peak_rss_mb()
