"""Device profiles: TOML files describing an edge device, loaded into a frozen :class:`Profile`.

A profile file (see the built-in ``device_profiles/*.toml``) holds::

    name, description                     strings
    cores                                 int   >= 1, or "auto" (this machine)
    clock_ghz                             float >= 0, or "auto"
    relative_compute                      float > 0: whole-device peak compute, Raspberry Pi 4
                                          (4x Cortex-A72 @ 1.5 GHz) = 1; required when emulate
    parallel_efficiency                   float in (0, 1], default 0.7: each extra core adds this
                                          fraction of a core to training throughput
    sustained_gflops                      optional float > 0: published HPL result, informational
    ram_mb, usable_ram_mb                 int >= 0, or "auto"; usable_ram_mb <= ram_mb
    downlink_mbit, uplink_mbit            float >= 0 (Mbit/s = 1e6 bit/s; 0 = not shaped)
    rtt_ms                                float >= 0
    availability                          float in [0, 1]: probability the device is online in a round
    emulate                               bool, default true (false: the machine as it is, no scaling)
    notes                                 string
    [sources]                             one citation string per numeric field

Every problem is reported as one :class:`~common.errors.FedcbirError` line naming
the file and the field.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import FedcbirError

BUILTIN_DIR = Path(__file__).resolve().parent
PROFILE_SUFFIX = ".toml"

#: Numeric fields every emulated profile file must have.
REQUIRED_NUMERIC = (
    "cores",
    "clock_ghz",
    "relative_compute",
    "ram_mb",
    "usable_ram_mb",
    "downlink_mbit",
    "uplink_mbit",
    "rtt_ms",
    "availability",
)
OPTIONAL_NUMERIC = ("parallel_efficiency", "sustained_gflops")
NUMERIC_FIELDS = REQUIRED_NUMERIC + OPTIONAL_NUMERIC
INT_FIELDS = ("cores", "ram_mb", "usable_ram_mb")
AUTO_FIELDS = ("cores", "clock_ghz", "ram_mb", "usable_ram_mb")
STRING_FIELDS = ("name", "description", "notes")
KNOWN_FIELDS = frozenset(NUMERIC_FIELDS + STRING_FIELDS + ("emulate", "sources"))

DEFAULT_PARALLEL_EFFICIENCY = 0.7
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ProfileError(FedcbirError):
    """A device profile that cannot be found or is not valid."""


@dataclass(frozen=True)
class Profile:
    """An edge device as the emulator sees it (all numbers already validated)."""

    name: str
    description: str
    cores: int
    clock_ghz: float
    relative_compute: float
    ram_mb: int
    usable_ram_mb: int
    downlink_mbit: float
    uplink_mbit: float
    rtt_ms: float
    availability: float
    parallel_efficiency: float = DEFAULT_PARALLEL_EFFICIENCY
    sustained_gflops: float | None = None
    emulate: bool = True
    notes: str = ""
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    #: the file it was read from
    path: str = field(default="", compare=False)
    #: fields given as "auto" and filled in from this machine
    auto_fields: tuple[str, ...] = ()

    @property
    def builtin(self) -> bool:
        return bool(self.path) and Path(self.path).resolve().parent == BUILTIN_DIR

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (for run metadata)."""
        d = asdict(self)
        d["sources"] = dict(self.sources)
        d["auto_fields"] = list(self.auto_fields)
        return d


# --------------------------------------------------------------------------- lookup


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in BUILTIN_DIR.glob(f"*{PROFILE_SUFFIX}"))


def builtin_profile_path(name: str) -> Path:
    return BUILTIN_DIR / f"{name}{PROFILE_SUFFIX}"


def _looks_like_path(text: str) -> bool:
    return text.endswith(PROFILE_SUFFIX) or os.sep in text or (os.altsep is not None and os.altsep in text)


def load_profile(name_or_path: str | os.PathLike | Profile) -> Profile:
    """Load a built-in profile by name (``"rpi4"``) or a user profile from a TOML path.

    A :class:`Profile` is returned unchanged, so callers may accept either.
    """
    if isinstance(name_or_path, Profile):
        return name_or_path
    if isinstance(name_or_path, os.PathLike):
        return load_profile_file(Path(name_or_path))
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ProfileError(f"a device profile is a built-in name or a .toml path, got {name_or_path!r}")
    text = name_or_path.strip()
    if _looks_like_path(text):
        return load_profile_file(Path(text).expanduser())
    path = builtin_profile_path(text)
    if not _NAME_RE.match(text) or not path.is_file():
        raise ProfileError(
            f"unknown device profile '{text}' (built-in: {', '.join(list_profiles())}; "
            f"or give the path of a {PROFILE_SUFFIX} file)"
        )
    return load_profile_file(path)


def load_profile_file(path: str | os.PathLike) -> Profile:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProfileError(f"{path}: device profile file not found") from None
    except IsADirectoryError:
        raise ProfileError(f"{path}: is a folder, not a device profile file") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read device profile: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: device profile is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: {e}") from None
    return profile_from_dict(data, source=str(path))


# --------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def profile_from_dict(data: dict[str, Any], source: str = "<profile>") -> Profile:
    """Validate a parsed profile table and build the :class:`Profile`."""

    def fail(key: str, problem: str) -> ProfileError:
        return ProfileError(f"{source}: field '{key}': {problem}")

    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a device profile must be a TOML table")
    unknown = sorted(k for k in data if k not in KNOWN_FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (known: {', '.join(sorted(KNOWN_FIELDS))})")

    emulate = data.get("emulate", True)
    if not isinstance(emulate, bool):
        raise fail("emulate", f"expected true or false, got {_type_name(emulate)}")

    strings: dict[str, str] = {}
    for key in STRING_FIELDS:
        if key not in data:
            if key == "notes":
                strings[key] = ""
                continue
            raise fail(key, "missing")
        value = data[key]
        if not isinstance(value, str):
            raise fail(key, f"expected a string, got {_type_name(value)}")
        strings[key] = value
    if not _NAME_RE.match(strings["name"]):
        raise fail("name", f"'{strings['name']}' is not a valid name (lower-case letters, digits, '.', '_', '-')")

    numbers: dict[str, Any] = {}
    auto: list[str] = []
    required = [k for k in REQUIRED_NUMERIC if emulate or k != "relative_compute"]
    for key in NUMERIC_FIELDS:
        if key not in data:
            if key in required:
                raise fail(key, "missing")
            continue
        value = data[key]
        if isinstance(value, str) and value == "auto" and key in AUTO_FIELDS:
            auto.append(key)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ' or "auto"' if key in AUTO_FIELDS else ""
            kind = "an integer" if key in INT_FIELDS else "a number"
            raise fail(key, f"expected {kind}{hint}, got {_type_name(value)}")
        if key in INT_FIELDS and not isinstance(value, int):
            if float(value).is_integer():
                value = int(value)
            else:
                raise fail(key, f"expected an integer, got {_type_name(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(key, f"must be a finite number, got {value!r}")
        if value < 0:
            raise fail(key, f"must not be negative, got {value!r}")
        numbers[key] = float(value) if key not in INT_FIELDS else int(value)

    numbers.update(_resolve_auto(auto))

    # ranges
    if numbers["cores"] < 1:
        raise fail("cores", f"must be at least 1, got {numbers['cores']}")
    if emulate and not numbers.get("relative_compute", 0.0) > 0:
        raise fail("relative_compute", "must be greater than 0")
    if not 0.0 <= numbers["availability"] <= 1.0:
        raise fail("availability", f"must be a probability in [0, 1], got {numbers['availability']!r}")
    eff = numbers.get("parallel_efficiency", DEFAULT_PARALLEL_EFFICIENCY)
    if not 0.0 < eff <= 1.0:
        raise fail("parallel_efficiency", f"must be in (0, 1], got {eff!r}")
    if "sustained_gflops" in numbers and not numbers["sustained_gflops"] > 0:
        raise fail("sustained_gflops", "must be greater than 0")
    if numbers["usable_ram_mb"] > numbers["ram_mb"]:
        raise fail(
            "usable_ram_mb",
            f"{numbers['usable_ram_mb']} MB is more than the device's ram_mb {numbers['ram_mb']} MB",
        )

    sources_raw = data.get("sources", {})
    if not isinstance(sources_raw, dict):
        raise fail("sources", f"expected a table of citations, got {_type_name(sources_raw)}")
    sources: dict[str, str] = {}
    for key, value in sources_raw.items():
        if not isinstance(value, str) or not value.strip():
            raise fail(f"sources.{key}", f"expected a non-empty citation string, got {_type_name(value)}")
        sources[key] = value.strip()

    return Profile(
        name=strings["name"],
        description=strings["description"],
        notes=strings["notes"],
        cores=int(numbers["cores"]),
        clock_ghz=float(numbers["clock_ghz"]),
        relative_compute=float(numbers.get("relative_compute", 0.0)),
        parallel_efficiency=float(eff),
        sustained_gflops=numbers.get("sustained_gflops"),
        ram_mb=int(numbers["ram_mb"]),
        usable_ram_mb=int(numbers["usable_ram_mb"]),
        downlink_mbit=float(numbers["downlink_mbit"]),
        uplink_mbit=float(numbers["uplink_mbit"]),
        rtt_ms=float(numbers["rtt_ms"]),
        availability=float(numbers["availability"]),
        emulate=emulate,
        sources=sources,
        path=source,
        auto_fields=tuple(auto),
    )


# --------------------------------------------------------------------------- "auto" values


def _resolve_auto(keys: list[str]) -> dict[str, Any]:
    """Fill ``"auto"`` fields from this machine."""
    out: dict[str, Any] = {}
    if not keys:
        return out
    if "cores" in keys:
        try:
            out["cores"] = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            out["cores"] = os.cpu_count() or 1
    if "clock_ghz" in keys:
        out["clock_ghz"] = _clock_ghz()
    if "ram_mb" in keys or "usable_ram_mb" in keys:
        total, available = _memory_mb()
        if "ram_mb" in keys:
            out["ram_mb"] = total
        if "usable_ram_mb" in keys:
            out["usable_ram_mb"] = available
    return out


def _memory_mb() -> tuple[int, int]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total // 2**20), int(vm.available // 2**20)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        pass
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0])  # kB
    except (OSError, ValueError, IndexError):
        return 0, 0
    total = info.get("MemTotal", 0) // 1024
    return total, info.get("MemAvailable", total * 1024) // 1024


def _clock_ghz() -> float:
    try:
        import psutil

        freq = psutil.cpu_freq()
        if freq is not None and (freq.max or freq.current):
            return round((freq.max or freq.current) / 1000.0, 3)
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return round(float(line.split(":")[1]) / 1000.0, 3)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0
