"""The child-process job runner: a job (export, latency, device eval) runs in a fresh Python.

``run_child`` writes the job as JSON, starts ``python -c`` with Flower's quiet environment and
reads the result back (one-line ``FedcbirError`` on failure or timeout); ``child_main`` is the
child's side: it imports the job function by module and name (given by the caller, so this
module knows none of them), runs it and writes its result or its error.

May import: ``common`` and ``fedcbir.study.util``; nothing else of ``fedcbir.study`` (the job
modules import this one).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from common.errors import FedcbirError
from fedcbir.study.util import read_json


def run_child(fn: str, job_fn: Callable[[Mapping[str, Any]], dict[str, Any]], job: Mapping[str, Any],
              timeout: float) -> dict[str, Any]:
    """Run ``job_fn(job)`` in a fresh Python (thread limits and CPU pinning must be set before a
    framework starts; the study process itself stays light); ``fn`` names the job in errors."""
    from common.flower import flower_env

    with tempfile.TemporaryDirectory(prefix="fedcbir-study-") as tmp:
        jf, rf = Path(tmp) / "job.json", Path(tmp) / "result.json"
        jf.write_text(json.dumps(dict(job, result=str(rf))), encoding="utf-8")
        code = (f"import sys; from fedcbir.study.child import child_main; "
                f"sys.exit(child_main({job_fn.__module__!r}, {job_fn.__qualname__!r}, {str(jf)!r}))")
        try:
            sys.stderr.fileno()
            progress = sys.stderr
        except (AttributeError, OSError, ValueError):  # a captured stream (tests): inherit ours
            progress = None
        try:
            proc = subprocess.run([sys.executable, "-c", code], env=flower_env(), timeout=timeout,
                                  stdout=progress, stdin=subprocess.DEVNULL)  # its progress: on stderr
        except subprocess.TimeoutExpired:
            raise FedcbirError(f"{fn} did not finish within {timeout:.0f} s") from None
        res = read_json(rf)
        if proc.returncode != 0 or res is None or "error" in res:
            detail = (res or {}).get("error") or f"exit code {proc.returncode} (see its output above)"
            raise FedcbirError(f"{fn} failed: {detail}")
        return res


def child_main(module: str, fn: str, job_file: str) -> int:
    """In the child: ``module.fn(job)``, its result (or its error, one line) written where the
    job says."""
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    try:
        import importlib

        res = getattr(importlib.import_module(module), fn)(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(exc).__name__}: {exc}"}
    from common.io import write_json_atomic

    write_json_atomic(job["result"], res)
    return 0
