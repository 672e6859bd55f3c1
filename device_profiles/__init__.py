"""Device profiles (TOML, with sources) and the edge-device emulator.

Layer 1: imports only ``common``.  Light on purpose: it runs inside every client process, so it
imports no deep-learning framework (numpy is imported only when the host is calibrated).
"""
from .calibration import HostCalibration, calibration_path, load_or_calibrate
from .emulator import (
    DeviceOutOfMemory,
    Emulator,
    Measurement,
    measure,
    parallel_speedup,
    peak_rss_mb,
)
from .limits import (
    CgroupLimits,
    ThreadLimits,
    apply_cgroup_limits,
    apply_thread_limits,
    remove_cgroup,
    thread_env,
)
from .profiles import Profile, ProfileError, list_profiles, load_profile

__all__ = [
    "CgroupLimits",
    "DeviceOutOfMemory",
    "Emulator",
    "HostCalibration",
    "Measurement",
    "Profile",
    "ProfileError",
    "ThreadLimits",
    "apply_cgroup_limits",
    "apply_thread_limits",
    "calibration_path",
    "list_profiles",
    "load_or_calibrate",
    "load_profile",
    "measure",
    "parallel_speedup",
    "peak_rss_mb",
    "remove_cgroup",
    "thread_env",
]
