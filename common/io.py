"""Small I/O helpers shared by every package: atomic writes and JSON."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _read_umask() -> int:
    """The process umask without changing it (Linux reports it in /proc/self/status; elsewhere
    os.umask must set it to read it, briefly, at import)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it over ``dest`` on success.

    On any exception the temporary file is removed and ``dest`` is untouched. The result
    keeps ``dest``'s permissions if it existed, else gets the usual ones (0666 minus the
    umask) rather than the private 0600 of a temporary file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            mode = dest.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike, text: str) -> Path:
    write_bytes_atomic(dest, text.encode("utf-8"))
    return Path(dest)


def write_json_atomic(dest: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(dest, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(dest: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and fsync, so a crash loses at most the line being written."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def cache_dir() -> Path:
    """``$FEDCBIR_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedcbir``, else ``~/.cache/fedcbir``."""
    env = os.environ.get("FEDCBIR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedcbir"


@contextmanager
def stderr_to(path: str | os.PathLike) -> Iterator[Path]:
    """Send file descriptor 2 (C++ libraries' logs, Python warnings) to ``path`` (appended)
    while the block runs, e.g. the exporters' converter chatter; restored afterwards."""
    import sys

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
            try:
                yield path
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
