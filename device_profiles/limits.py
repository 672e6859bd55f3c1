"""Resource limits for the current process: threads, CPU affinity, cgroup v1 quota and memory.

Thread limits are what the emulator relies on (one thread per simulated client, see
DESIGN.md); cgroup limits are for the real-deployment path, where a machine is made to
look like a device. Nothing here imports a deep-learning framework: frameworks read the
environment variables set by :func:`apply_thread_limits` when they are imported, so call
it before importing them (or also set their own thread counts).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)
_XLA_SINGLE_THREAD = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")


def thread_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables limiting BLAS/OpenMP/TensorFlow (and XLA for 1 thread) to ``threads``.

    ``base`` (default ``os.environ``) is only read to merge ``XLA_FLAGS``.
    """
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    threads = int(threads)
    env = {name: str(threads) for name in THREAD_ENV_VARS}
    env["TF_NUM_INTEROP_THREADS"] = "1" if threads == 1 else str(min(2, threads))
    if threads == 1:
        base = os.environ if base is None else base
        flags = base.get("XLA_FLAGS", "").split()
        kept = [f for f in flags if not f.startswith(("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads"))]
        env["XLA_FLAGS"] = " ".join(kept + list(_XLA_SINGLE_THREAD))
    return env


def allowed_cpus() -> list[int]:
    """CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


@dataclass
class ThreadLimits:
    """What :func:`apply_thread_limits` did."""

    threads: int
    env: dict[str, str]
    affinity: list[int] | None = None
    affinity_error: str = ""
    blas_limited: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "env": dict(self.env),
            "affinity": self.affinity,
            "affinity_error": self.affinity_error,
            "blas_limited": self.blas_limited,
        }


def apply_thread_limits(
    threads: int,
    cpus: Sequence[int] | None = None,
    slot: int | None = None,
    pin: bool = True,
) -> ThreadLimits:
    """Limit the current process to ``threads`` threads (and pin it to as many CPUs).

    * sets the thread environment variables (:func:`thread_env`) in ``os.environ``;
    * limits already-loaded BLAS/OpenMP pools through threadpoolctl when it is installed;
    * with ``pin``, restricts CPU affinity to ``cpus`` or, if not given, to ``threads``
      allowed CPUs starting at position ``slot * threads`` (wrapping), so clients given
      slots 0, 1, ... land on different cores. Affinity failures (not permitted, not
      Linux) are recorded, never raised.
    """
    threads = int(threads)
    env = thread_env(threads)
    os.environ.update(env)
    result = ThreadLimits(threads=threads, env=env)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
        result.blas_limited = True
    except Exception:  # noqa: BLE001 - optional; nothing loaded or not installed
        result.blas_limited = False
    if pin:
        try:
            available = allowed_cpus()
            if cpus is None:
                start = (slot or 0) * threads
                chosen = [available[(start + i) % len(available)] for i in range(min(threads, len(available)))]
            else:
                chosen = sorted(set(int(c) for c in cpus))
            os.sched_setaffinity(0, chosen)
            result.affinity = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError, ValueError, IndexError) as e:
            result.affinity_error = f"{type(e).__name__}: {e}"
    return result


# --------------------------------------------------------------------------- cgroup v1

CGROUP_ROOT = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000


@dataclass
class CgroupLimits:
    """Outcome of :func:`apply_cgroup_limits`; ``applied`` is true when every requested limit is in force."""

    applied: bool
    cpu_applied: bool = False
    memory_applied: bool = False
    cpu_path: str = ""
    memory_path: str = ""
    cpu_cores: float | None = None
    memory_mb: int | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "cpu_applied": self.cpu_applied,
            "memory_applied": self.memory_applied,
            "cpu_path": self.cpu_path,
            "memory_path": self.memory_path,
            "cpu_cores": self.cpu_cores,
            "memory_mb": self.memory_mb,
            "reason": self.reason,
        }


def _v1_mounts(root: Path) -> dict[str, Path]:
    """controller -> mount point of the cgroup v1 hierarchies (from /proc/self/mountinfo)."""
    mounts: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype, _, rest = right.partition(" ")
        if fstype != "cgroup":
            continue
        mount_point = Path(left.split()[4].replace("\\040", " "))
        super_opts = rest.split()[-1].split(",") if rest.split() else []
        for opt in super_opts:
            if opt in ("cpu", "memory", "cpuacct", "cpuset"):
                mounts.setdefault(opt, mount_point)
    if not mounts:  # no mountinfo: fall back to the conventional layout
        for name in ("cpu", "memory"):
            p = root / name
            if p.is_dir():
                mounts[name] = p
    return mounts


def _own_cgroup(pid: int, controller: str) -> str:
    """The cgroup path of ``pid`` in the v1 hierarchy that has ``controller``."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text(encoding="utf-8")
    except OSError:
        return "/"
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return parts[2] or "/"
    return "/"


def _write(path: Path, value: str | int) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(str(value))


def _make_child(mount: Path, pid: int, controller: str, name: str) -> Path:
    """Create ``<current cgroup of pid>/<name>`` (a child, so parent limits still apply)."""
    parent = mount / _own_cgroup(pid, controller).lstrip("/")
    child = parent / name
    child.mkdir(exist_ok=True)
    return child


def apply_cgroup_limits(
    cpu_cores: float | None = None,
    memory_mb: int | None = None,
    pid: int | None = None,
    name: str | None = None,
    root: str | os.PathLike = CGROUP_ROOT,
) -> CgroupLimits:
    """Try to confine ``pid`` (default: this process) with cgroup v1 CPU quota and memory limit.

    ``cpu_cores`` = CPU time per wall second (e.g. 0.4 = 40 % of one core, 2 = two cores);
    ``memory_mb`` caps memory (+swap where the kernel accounts it), beyond which the
    kernel's OOM killer ends the process, as on a real device. The cgroup is created as
    a child of the process's current cgroup. Needs root and mounted v1 controllers;
    returns a :class:`CgroupLimits` saying what worked and why not, never raises for a
    missing or read-only cgroup file system. Undo with :func:`remove_cgroup`.
    """
    pid = os.getpid() if pid is None else int(pid)
    name = name or f"fedcbir-{pid}"
    result = CgroupLimits(applied=False, cpu_cores=cpu_cores, memory_mb=memory_mb)
    if cpu_cores is None and memory_mb is None:
        result.reasons.append("no limit requested")
        return result
    if not sys.platform.startswith("linux"):
        result.reasons.append("cgroups need Linux")
        return result
    mounts = _v1_mounts(Path(root))

    if cpu_cores is not None:
        if not cpu_cores > 0:
            result.reasons.append(f"cpu_cores must be > 0, got {cpu_cores}")
        elif "cpu" not in mounts:
            result.reasons.append("no cgroup v1 'cpu' controller mounted")
        else:
            try:
                child = _make_child(mounts["cpu"], pid, "cpu", name)
                result.cpu_path = str(child)
                _write(child / "cpu.cfs_period_us", CFS_PERIOD_US)
                _write(child / "cpu.cfs_quota_us", max(1000, int(round(cpu_cores * CFS_PERIOD_US))))
                _write(child / "cgroup.procs", pid)
                result.cpu_applied = True
            except OSError as e:
                result.reasons.append(f"cpu quota: {e.strerror or e} ({getattr(e, 'filename', '') or ''})")

    if memory_mb is not None:
        if not memory_mb > 0:
            result.reasons.append(f"memory_mb must be > 0, got {memory_mb}")
        elif "memory" not in mounts:
            result.reasons.append("no cgroup v1 'memory' controller mounted")
        else:
            try:
                child = _make_child(mounts["memory"], pid, "memory", name)
                result.memory_path = str(child)
                limit = int(memory_mb) * 2**20
                _write(child / "memory.limit_in_bytes", limit)
                memsw = child / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    try:  # no swap escape; absent when swap accounting is off
                        _write(memsw, limit)
                    except OSError:
                        pass
                _write(child / "cgroup.procs", pid)
                result.memory_applied = True
            except OSError as e:
                result.reasons.append(f"memory limit: {e.strerror or e} ({getattr(e, 'filename', '') or ''})")

    result.applied = (cpu_cores is None or result.cpu_applied) and (memory_mb is None or result.memory_applied)
    return result


def cgroup_pids(path: str | os.PathLike) -> list[int]:
    try:
        return [int(x) for x in Path(path, "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def remove_cgroup(limits: CgroupLimits) -> list[str]:
    """Move any remaining processes back to the parent cgroup and delete the cgroups.

    Returns the problems met (empty when everything was removed).
    """
    problems: list[str] = []
    for path in (limits.cpu_path, limits.memory_path):
        if not path:
            continue
        child = Path(path)
        if not child.is_dir():
            continue
        for p in cgroup_pids(child):
            try:
                _write(child.parent / "cgroup.procs", p)
            except OSError as e:
                problems.append(f"move {p} out of {child}: {e.strerror}")
        try:
            child.rmdir()
        except OSError as e:
            problems.append(f"remove {child}: {e.strerror}")
    return problems


def cgroup_memory_limit_mb(pid: int | None = None) -> int | None:
    """The cgroup v1 memory limit that applies to ``pid`` (None when unlimited/unknown)."""
    pid = os.getpid() if pid is None else int(pid)
    mount = _v1_mounts(CGROUP_ROOT).get("memory")
    if mount is None:
        return None
    path = mount / _own_cgroup(pid, "memory").lstrip("/") / "memory.limit_in_bytes"
    try:
        value = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return None if value >= 2**62 else value // 2**20

