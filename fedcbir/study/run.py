"""Running the federations: run (or reuse, or resume) one planned federation, and the
weight digests of its checkpoints.

``run_state`` says whether a run folder is done, resumable or fresh (settings conflicts are
errors); ``run_federation`` runs it on Flower's simulation runtime (``server.simulation``) or
in process (``server.federation.Federation`` over ``server.inprocess.InProcessGrid``) and
records its wall time in ``study-run.json``.

May import: ``common``, ``models``, ``server``, ``edge_client``, and ``fedcbir.study.plan`` /
``fedcbir.study.util``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from fedcbir.study.plan import Planned
from fedcbir.study.util import read_json, stdout_log


def run_state(run_dir: Path, rc: Mapping[str, Any]) -> tuple[str, str]:
    """("done" | "resume" | "fresh", why) for a planned federation's folder."""
    from server.federation import run_folder_state

    return run_folder_state(run_dir, rc, hint="use another --out or remove that folder")


def _fresh(run_dir: Path) -> None:
    """Leftovers of a run that died before its first checkpoint."""
    for name in ("metrics.jsonl", "summary.json", "study-run.json"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "client-state", ignore_errors=True)


def run_federation(fed: Planned, rc: dict[str, Any], clients: int, runtime: str,
                   log: Callable[[str], None] = stdout_log) -> dict[str, Any]:
    """Run (or reuse, or resume) one federation; returns its summary.json content plus
    ``study_run`` (wall seconds, runtime, state)."""
    state, why = run_state(fed.run_dir, rc)
    info_file = fed.run_dir / "study-run.json"
    if state == "done":
        summary = json.loads((fed.run_dir / "summary.json").read_text(encoding="utf-8"))
        summary["study_run"] = read_json(info_file) or {"wall_seconds": None, "runtime": None}
        summary["study_run"]["state"] = "reused"
        return summary
    previous = read_json(info_file) if state == "resume" else None
    if state == "fresh":
        _fresh(fed.run_dir)
    rc = dict(rc, resume=(state == "resume"))
    fed.run_dir.mkdir(parents=True, exist_ok=True)
    total = int(rc["num-server-rounds"])
    t0 = time.perf_counter()
    if runtime == "simulation":
        from common.flower import round_line
        from server.simulation import simulate

        simulate(rc, clients, on_row=lambda row: log(f"  {fed.name} {round_line(row, total)}"))
    else:
        import logging

        from edge_client.app import app as client_app
        from server.federation import Federation
        from server.inprocess import InProcessGrid
        from server.runconfig import RunConfig

        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.ERROR)  # the strategy's per-round lines; ours are enough
        try:
            grid = InProcessGrid(client_app, clients, rc)
            Federation(grid, RunConfig.from_flower(rc), fed.run_dir, run_id=fed.name,
                       log=lambda s: log(f"  {fed.name} {s}")).run()
        finally:
            flwr_logger.setLevel(level)
    wall = time.perf_counter() - t0
    prev_wall = (previous or {}).get("wall_seconds") or 0.0
    info = {"wall_seconds": wall + prev_wall, "runtime": runtime, "clients": clients,
            "resumed": state == "resume", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    from common.io import write_json_atomic

    write_json_atomic(info_file, info)
    summary = json.loads((fed.run_dir / "summary.json").read_text(encoding="utf-8"))
    summary["study_run"] = dict(info, state="resumed" if state == "resume" else "ran")
    return summary


def weights_digest(weights: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and bytes (independent of the .npz container)."""
    import numpy as np

    h = hashlib.sha256()
    for k in sorted(weights):
        a = np.ascontiguousarray(weights[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def checkpoint_digest(run_dir: Path, rnd: int | None = None) -> str | None:
    from models.checkpoint import load_checkpoint
    from server.federation import CHECKPOINT_DIR, latest_checkpoint

    ck = latest_checkpoint(run_dir) if rnd is None else run_dir / CHECKPOINT_DIR / f"round-{rnd:04d}.json"
    if ck is None or not ck.is_file():
        return None
    return weights_digest(load_checkpoint(ck)[0])
