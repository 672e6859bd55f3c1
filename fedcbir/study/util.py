"""Small helpers every study module shares: the progress line on stdout and a tolerant JSON read.

Imports nothing of fedcbir (standard library only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def stdout_log(msg: str) -> None:
    print(msg, flush=True)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
