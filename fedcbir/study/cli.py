"""``fedcbir study``: does the framework alone change accuracy, speed, memory and cost?

For every framework in ``--frameworks`` and every seed, one federation in which only the
clients' training framework differs: the same catalog, test split and client partitions (all
derived from the seed), the same initial weights (``models.canonical.init_weights``: seeded
numpy, loaded into every framework), the same hyper-parameters, device profile(s), strategy and
server-side evaluation (in PyTorch for all, so the measuring instrument is the same). Plus one
mixed federation per seed (clients round-robin over the frameworks) unless ``--no-mixed``.
Optionally (default on) each framework's final global model of the first seed is exported in its
natural route (torch -> ``model.onnx`` + ``model.pte``; tf -> ``model.tflite`` from Keras; jax ->
``model.tflite`` through jax2tf) and its batch-1 latency is measured beside the eager framework
model (``benchmarks.inference``: one thread, pinned, interleaved calls).

Output layout::

    DIR/runs/<label>-s<seed>/   one federation's run folder (metrics.jsonl, checkpoints/,
                                summary.json, study-run.json with its wall time)
    DIR/bundles/<framework>/    export bundles (not with --no-export)
    DIR/study.json              every number, the exact command, the settings, the tolerance
    DIR/report.md               tables and the plots below
    DIR/recall_at_1.png         Recall@1 per round per federation type (mean, +-std band)
    DIR/seconds_per_round.png   simulated device seconds and host seconds per round
    DIR/peak_rss.png            peak RSS of one client process
    DIR/latency.png             batch-1 latency, eager vs exported (only when exported)

Re-running with the same ``--out`` reuses every finished federation whose settings match and
resumes an interrupted one from its last checkpoint (bit-identical with the in-process runtime),
so an interrupted study continues where it stopped; a run folder with other settings is an error.

Runtimes: ``simulation`` (default) is Flower's simulation runtime (``server.simulation``: own
SuperLink, Ray, one CPU per client); ``inprocess`` drives the same ServerApp round loop
(``server.federation.Federation``) over ``server.inprocess.InProcessGrid``, which calls the same
ClientApp in this process (each client's work still runs in a fresh child process unless
``--set client-isolation=inline``): no SuperLink or Ray, fixed node ids, quick and bit-exact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from common.errors import FedcbirError

FRAMEWORKS = ("torch", "tf", "jax")
MIXED = "mixed"
#: The "no pretraining" arm: MobileNetV3-Small from random weights, all of it trained, with the
#: settings it was tuned with (its own learning rate, batch, FedBN).
SCRATCH = (("arch", "mobilenetv3-small"), ("lr", 0.002), ("products-per-batch", 8), ("bn-policy", "local"),
           ("input-size", 0), ("embedding-dim", 0), ("train-from", -1))
RUNTIMES = ("simulation", "inprocess")
DEFAULT_TARGET = 0.10
FORMAT = "fedcbir-study"
SCHEMA_VERSION = 1

#: Export route per framework: (ExportOptions.source, formats). tf's .tflite comes from the Keras
#: model (source "torch" means "the default route": Keras for .tflite, PyTorch for .onnx/.pte).
EXPORT_ROUTES = {"torch": ("torch", ("onnx", "pte")), "tf": ("torch", ("tflite",)), "jax": ("jax", ("tflite",))}
EAGER_CANDIDATE = {"torch": "torch eager", "tf": "keras tf.function", "jax": "jax jit"}
ROUTE_TEXT = {"torch": "PyTorch -> ONNX (dynamo) and ExecuTorch/XNNPACK", "tf": "Keras -> TFLite converter",
              "jax": "Flax -> jax2tf -> TFLite"}

#: Run-config keys the study sets itself (``--set`` may not override them).
OWN_KEYS = {"catalog": "--catalog/--sample", "num-server-rounds": "--rounds", "frameworks": "--frameworks",
            "profiles": "--profile", "partition": "--partition", "strategy": "--strategy",
            "local-epochs": "--local-epochs", "seed": "--seeds/--first-seed", "out": "--out",
            "client-state-dir": "--out", "resume": "(automatic)", "realtime": "(never: timing is emulated)"}
#: Study defaults that differ from the run-config defaults (overridable with --set).
STUDY_DEFAULTS = {"fraction-evaluate": 0.0}

#: Reproducibility: what "same seed -> same numbers" means, per runtime (checked by
#: ``--repeat-check`` and by tests/test_study.py). Metric tolerances are absolute, but never
#: below ``min_queries`` test queries' worth (one query is 1/Q of Recall@1).
TOLERANCE = {
    "inprocess": {
        "recall@1": 0.0, "map@r": 0.0, "min_queries": 0, "weights_max_abs_diff": 0.0,
        "text": "in-process runtime: bit-identical (fixed node ids, hence a fixed aggregation order; one "
                "thread per client; seeded partitions, batches and augmentation): |diff| = 0 for Recall@1, "
                "mAP@R and every weight, for torch, tf and jax clients alike",
    },
    "simulation": {
        "recall@1": 0.02, "map@r": 0.02, "min_queries": 2, "weights_max_abs_diff": None,
        "text": "simulation runtime: Flower draws random node ids for every run; the server used to average "
                "the replies in node-id order, in float32 (Flower's aggregate_arrayrecords), and float addition "
                "is not associative, so a different draw rounded some weights differently by about 1e-7, which "
                "local AdamW training amplified (seen here: 2.4e-7 after round 1 grew to 0.4 in a BatchNorm "
                "running variance and 3.9 % relative L2 in the other weights after round 3, Recall@1 2 of 300 "
                "queries apart). Replies are now aggregated in partition-id order (server.strategies), so a "
                "repeat is expected to be bit-identical; the stated tolerance keeps a margin for what the "
                "runtime may still reorder: |diff| <= 0.02 (and at least 2 queries' worth) for Recall@1 and "
                "mAP@R in every round; weight differences are reported, not bounded",
    },
}


def tolerance_for(runtime: str, queries: int | None) -> dict[str, Any]:
    """The runtime's tolerance with the metric bounds raised to ``min_queries / queries``."""
    tol = dict(TOLERANCE[runtime])
    if queries:
        floor = tol["min_queries"] / float(queries)
        for k in ("recall@1", "map@r"):
            tol[k] = max(tol[k], floor)
    tol["queries"] = queries
    return tol


def _log(msg: str) -> None:
    print(msg, flush=True)


# ============================================================================ plan


@dataclass(frozen=True)
class Planned:
    """One federation of the study."""
    label: str  # a framework, "mixed", or "scratch-<framework>"
    frameworks: str  # run-config "frameworks" (comma list)
    seed: int
    run_dir: Path
    overrides: tuple[tuple[str, Any], ...] = ()  # run-config keys of this federation type only

    @property
    def name(self) -> str:
        return f"{self.label}-s{self.seed}"


def parse_frameworks(text: str) -> list[str]:
    from models.api import normalize_framework

    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise FedcbirError("--frameworks is empty: give e.g. torch,tf,jax")
    out: list[str] = []
    for t in items:
        fw = normalize_framework(t)
        if fw in out:
            raise FedcbirError(f"--frameworks lists {fw} twice")
        out.append(fw)
    return out


def parse_set(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs -> run-config entries, typed like ``server.runconfig.DEFAULTS``."""
    from server.runconfig import parse_sets

    return parse_sets(items, OWN_KEYS)


def resolve_catalog(args: argparse.Namespace) -> Path:
    """``--catalog ROOT`` | ``--sample`` [``--products N --views V``] (generated once into the cache)."""
    sized = args.products is not None or args.views is not None
    if args.catalog and (args.sample or sized):
        raise FedcbirError("give either --catalog ROOT or --sample [--products N --views V], not both")
    if args.catalog:
        root = Path(args.catalog).expanduser()
        if not root.is_dir():
            raise FedcbirError(f"catalog not found: {root}")
        return root.resolve()
    if not (args.sample or sized):
        raise FedcbirError("give --catalog ROOT (ABO layout) or --sample (the built-in sample catalog)")
    from catalog.sample import ensure_default_sample

    products, views = args.products or 300, args.views or 6
    if products < 8 or views < 3:
        raise FedcbirError("--products must be >= 8 and --views >= 3 (queries need a second photo)")
    return ensure_default_sample(products=products, views=views, progress=sys.stderr.isatty()).resolve()


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without touching the catalog (one-line errors)."""
    if args.seeds < 1:
        raise FedcbirError("--seeds must be >= 1")
    if args.first_seed < 0:
        raise FedcbirError("--first-seed must be >= 0")
    if args.rounds < 1:
        raise FedcbirError("--rounds must be >= 1")
    if args.clients < 1:
        raise FedcbirError("--clients must be >= 1")
    if args.local_epochs < 1:
        raise FedcbirError("--local-epochs must be >= 1")
    if not 0.0 < args.target_recall <= 1.0:
        raise FedcbirError("--target-recall must be in (0, 1]")
    if args.runtime not in RUNTIMES:
        raise FedcbirError(f"--runtime must be one of {', '.join(RUNTIMES)}")
    if args.latency_repeats < 1:
        raise FedcbirError("--latency-repeats must be >= 1")
    from catalog.splits import parse_scheme

    try:
        parse_scheme(args.partition)
    except Exception as exc:  # noqa: BLE001 - PartitionError and friends
        raise FedcbirError(f"--partition {args.partition!r}: {exc}") from None
    profiles = [p.strip() for p in args.profile.split(",") if p.strip()]
    if not profiles:
        raise FedcbirError("--profile is empty")
    from device_profiles import load_profile

    for p in profiles:
        try:
            load_profile(p)
        except FedcbirError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise FedcbirError(f"--profile {p!r}: {exc}") from None


def base_run_config(args: argparse.Namespace, catalog: Path) -> dict[str, Any]:
    """The run config every federation shares (frameworks/seed/out are set per federation)."""
    rc: dict[str, Any] = dict(STUDY_DEFAULTS)
    rc.update(parse_set(args.set))
    rc.update({"catalog": str(catalog), "num-server-rounds": int(args.rounds),
               "profiles": ",".join(p.strip() for p in args.profile.split(",") if p.strip()),
               "partition": args.partition, "strategy": args.strategy, "local-epochs": int(args.local_epochs),
               "realtime": False, "resume": False})
    return rc


def federation_run_config(base: Mapping[str, Any], fed: Planned) -> dict[str, Any]:
    from server.runconfig import RunConfig

    rc = dict(base)
    rc.update(dict(fed.overrides))
    rc.update({"frameworks": fed.frameworks, "seed": fed.seed, "out": str(fed.run_dir.resolve()),
               "client-state-dir": str((fed.run_dir / "client-state").resolve())})
    return RunConfig.from_flower(rc).to_flower()


def plan(frameworks: Sequence[str], seeds: Sequence[int], out: Path, mixed: bool = True,
         scratch: str | None = None, iid_mixed: bool = False) -> list[Planned]:
    """Seed-major order (every federation type of seed s before seed s+1), so a study cut
    short still holds complete comparisons.  ``scratch``: one framework that also trains the
    from-scratch MobileNetV3-Small (what pretraining is worth).  ``iid_mixed``: the mixed
    federation once more on an IID partition (what the label skew costs)."""
    labels = [(fw, fw, ()) for fw in frameworks]
    if mixed and len(frameworks) > 1:
        labels.append((MIXED, ",".join(frameworks), ()))
        if iid_mixed:
            labels.append((f"{MIXED}-iid", ",".join(frameworks), (("partition", "iid"),)))
    if scratch:
        labels.append((f"scratch-{scratch}", scratch, SCRATCH))
    runs = out / "runs"
    return [Planned(label, fws, int(s), runs / f"{label}-s{int(s)}", ov) for s in seeds for label, fws, ov in labels]


def precheck_partitions(catalog: Path, base: Mapping[str, Any], seeds: Iterable[int], clients: int) -> dict:
    """Fail fast on a partition that cannot be made; returns per seed the test-set size."""
    from catalog.dataset import CatalogSplit
    from catalog.splits import partition
    from server.runconfig import RunConfig

    cfg = RunConfig.from_flower(dict(base))
    info = {}
    for s in seeds:
        split = CatalogSplit.load(catalog, seed=int(s), test_fraction=cfg.test_fraction)
        try:
            parts = partition(split.train, clients, cfg.partition, int(s))
        except FedcbirError:
            raise
        except Exception as exc:  # noqa: BLE001 - PartitionError is a ValueError
            raise FedcbirError(f"seed {s}: {exc}") from None
        queries = sum(len(p.other_images) for p in split.test if p.main_image)
        info[int(s)] = {"train_products": len(split.train), "test_products": len(split.test),
                        "test_queries": queries, "partition_products": [len(p) for p in parts]}
    return info


# ============================================================================ running


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
                   log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Run (or reuse, or resume) one federation; returns its summary.json content plus
    ``study_run`` (wall seconds, runtime, state)."""
    state, why = run_state(fed.run_dir, rc)
    info_file = fed.run_dir / "study-run.json"
    if state == "done":
        summary = json.loads((fed.run_dir / "summary.json").read_text(encoding="utf-8"))
        summary["study_run"] = _read_json(info_file) or {"wall_seconds": None, "runtime": None}
        summary["study_run"]["state"] = "reused"
        return summary
    previous = _read_json(info_file) if state == "resume" else None
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


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


# ============================================================================ numbers


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _mean(values: Iterable[Any]) -> float | None:
    xs = [v for v in (_num(x) for x in values) if v is not None]
    return sum(xs) / len(xs) if xs else None


def mean_std(values: Iterable[Any]) -> dict[str, Any]:
    """Mean and sample standard deviation (n-1); std is None for fewer than two values."""
    xs = [v for v in (_num(x) for x in values) if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0, "values": []}
    m = sum(xs) / len(xs)
    std = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": m, "std": std, "n": len(xs), "values": xs}


def clean_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl rows sorted by round, one per round (the last one written wins)."""
    by_round: dict[int, dict[str, Any]] = {}
    for r in rows:
        if isinstance(r, Mapping) and "round" in r:
            by_round[int(r["round"])] = dict(r)
    return [by_round[k] for k in sorted(by_round)]


def rounds_to_target(rows: Sequence[Mapping[str, Any]], target: float, key: str = "recall@1") -> int | None:
    """First round (0 = before training) whose ``key`` is >= ``target``; None if never."""
    for r in clean_rows(rows):
        v = _num(r.get(key))
        if v is not None and v >= target - 1e-12:
            return int(r["round"])
    return None


def federation_stats(rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Numbers of one federation from its metrics.jsonl rows."""
    rows = clean_rows(rows)
    if not rows:
        raise FedcbirError("a federation without any metrics row")
    train = [r for r in rows if int(r["round"]) >= 1]
    clients = [c for r in train for c in (r.get("clients") or [])]
    ok = [c for c in clients if c.get("status") == "ok"]
    status: dict[str, int] = {}
    for c in clients:
        status[str(c.get("status"))] = status.get(str(c.get("status")), 0) + 1
    rss = [v for v in (_num(c.get("peak_rss_mb")) for c in ok) if v is not None]
    by_fw: dict[str, dict[str, Any]] = {}
    for fw in sorted({str(c.get("framework")) for c in clients}):
        mine = [c for c in ok if str(c.get("framework")) == fw]
        frss = [v for v in (_num(c.get("peak_rss_mb")) for c in mine) if v is not None]
        by_fw[fw] = {"client_rounds_ok": len(mine),
                     "client_rounds": sum(1 for c in clients if str(c.get("framework")) == fw),
                     "peak_rss_mb": max(frss) if frss else None,
                     "client_train_seconds": _mean(c.get("host_seconds") for c in mine),
                     "client_process_seconds": _mean(c.get("process_seconds") for c in mine),
                     "client_simulated_seconds": _mean(c.get("simulated_seconds") for c in mine),
                     # where a client's time goes (host seconds; see edge_client.app)
                     "build_seconds": _mean(c.get("build_seconds") for c in mine),
                     "first_step_seconds": _mean(c.get("first_step_seconds") for c in mine),
                     "first_step_seconds_round1": _mean(c.get("first_step_seconds") for r in train
                                                        if int(r["round"]) == 1 for c in (r.get("clients") or [])
                                                        if c.get("status") == "ok" and str(c.get("framework")) == fw),
                     "first_step_seconds_later": _mean(c.get("first_step_seconds") for r in train
                                                       if int(r["round"]) > 1 for c in (r.get("clients") or [])
                                                       if c.get("status") == "ok" and str(c.get("framework")) == fw),
                     "steady_step_seconds": _mean(c.get("steady_step_seconds") for c in mine),
                     "cache_hit_rate": _ratio(sum(_num(c.get("cache_hits")) or 0 for c in mine),
                                              sum((_num(c.get("cache_hits")) or 0) + (_num(c.get("cache_misses")) or 0)
                                                  for c in mine))}
    final, first = rows[-1], rows[0]
    pick = ("recall@1", "recall@5", "recall@10", "map@r")
    return {
        "rounds": int(final["round"]),
        "curve": {"round": [int(r["round"]) for r in rows], "recall@1": [_num(r.get("recall@1")) for r in rows],
                  "map@r": [_num(r.get("map@r")) for r in rows]},
        "initial": {k: _num(first.get(k)) for k in pick},
        "final": {k: _num(final.get(k)) for k in pick},
        "best_recall@1": max((_num(r.get("recall@1")) or 0.0) for r in rows),
        "rounds_to_target": rounds_to_target(rows, target),
        "simulated_seconds_per_round": _mean(r.get("simulated_round_seconds") for r in train),
        "host_seconds_per_round": _mean(r.get("seconds") for r in train),
        "client_train_seconds": _mean(c.get("host_seconds") for c in ok),
        "client_process_seconds": _mean(c.get("process_seconds") for c in ok),
        "peak_rss_mb": max(rss) if rss else None,
        "bytes_up_per_round": _mean(r.get("bytes_up") for r in train),
        "bytes_down_per_round": _mean(r.get("bytes_down") for r in train),
        "bytes_per_round": _mean((_num(r.get("bytes_up")) or 0) + (_num(r.get("bytes_down")) or 0) for r in train),
        "client_status": status,
        "by_framework": by_fw,
        # device-level DP (run config dp): epsilon after the last round, at its delta; None without DP
        "epsilon": _num((final.get("dp") or {}).get("epsilon")) if final.get("dp") else None,
        "dp_delta": (final.get("dp") or {}).get("delta"),
    }


#: per-federation numbers that get mean +- std over seeds
SEED_METRICS = ("final_recall@1", "final_map@r", "final_recall@5", "initial_recall@1", "best_recall@1",
                "simulated_seconds_per_round", "host_seconds_per_round", "client_train_seconds",
                "client_process_seconds", "peak_rss_mb", "bytes_per_round", "bytes_up_per_round",
                "bytes_down_per_round", "wall_seconds")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _flat(stats: Mapping[str, Any]) -> dict[str, Any]:
    d = {k: stats.get(k) for k in SEED_METRICS}
    for k in ("recall@1", "map@r", "recall@5"):
        d[f"final_{k}"] = (stats.get("final") or {}).get(k)
    d["initial_recall@1"] = (stats.get("initial") or {}).get("recall@1")
    return d


def aggregate(stats_by_seed: Mapping[int, Mapping[str, Any]], target: float) -> dict[str, Any]:
    """Mean +- std over seeds of one federation type; the Recall@1 / mAP@R curves per round
    (over the rounds every seed has); rounds to the target per seed (None = not reached)."""
    seeds = sorted(stats_by_seed)
    flats = [_flat(stats_by_seed[s]) for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "n": len(seeds)}
    for k in SEED_METRICS:
        out[k] = mean_std(f[k] for f in flats)
    rt = [stats_by_seed[s].get("rounds_to_target") for s in seeds]
    reached = [r for r in rt if r is not None]
    out["rounds_to_target"] = {"target": target, "per_seed": rt, "reached": len(reached), "n": len(rt),
                               **{k: v for k, v in mean_std(reached).items() if k in ("mean", "std")}}
    common = None
    for s in seeds:
        rs = set(stats_by_seed[s]["curve"]["round"])
        common = rs if common is None else common & rs
    rounds = sorted(common or [])
    curve: dict[str, Any] = {"round": rounds}
    for key in ("recall@1", "map@r"):
        per_round = []
        for r in rounds:
            vals = []
            for s in seeds:
                c = stats_by_seed[s]["curve"]
                vals.append(c[key][c["round"].index(r)])
            per_round.append(mean_std(vals))
        curve[f"{key}_mean"] = [p["mean"] for p in per_round]
        curve[f"{key}_std"] = [p["std"] for p in per_round]
    out["curve"] = curve
    fws = sorted({fw for s in seeds for fw in (stats_by_seed[s].get("by_framework") or {})})
    out["by_framework"] = {}
    for fw in fws:
        got = [stats_by_seed[s]["by_framework"][fw] for s in seeds if fw in stats_by_seed[s]["by_framework"]]
        out["by_framework"][fw] = {k: mean_std(g.get(k) for g in got)
                                   for k in ("peak_rss_mb", "client_train_seconds", "client_process_seconds",
                                             "client_simulated_seconds", "build_seconds", "first_step_seconds",
                                             "first_step_seconds_round1", "first_step_seconds_later",
                                             "steady_step_seconds", "cache_hit_rate")}
    return out


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """Differences between two run folders of the same settings (reproducibility check)."""
    import numpy as np

    from common.flower import read_rows
    from models.checkpoint import load_checkpoint
    from server.federation import latest_checkpoint

    ra, rb = clean_rows(read_rows(a / "metrics.jsonl")), clean_rows(read_rows(b / "metrics.jsonl"))
    if [r["round"] for r in ra] != [r["round"] for r in rb]:
        raise FedcbirError(f"{a} and {b} hold different rounds")
    diff = {}
    for key in ("recall@1", "map@r"):
        diff[key] = max(abs((_num(x.get(key)) or 0.0) - (_num(y.get(key)) or 0.0)) for x, y in zip(ra, rb))
    from models import canonical
    from server.federation import CHECKPOINT_DIR

    def max_abs(x, y):
        return max(float(np.max(np.abs(x[k].astype(np.float64) - y[k]))) for k in x)

    wa, wb = load_checkpoint(latest_checkpoint(a))[0], load_checkpoint(latest_checkpoint(b))[0]
    if set(wa) != set(wb):
        raise FedcbirError(f"{a} and {b} hold different weight names")
    diff["weights_max_abs_diff"] = max_abs(wa, wb)
    diff["weights_max_abs_diff_at"] = max(wa, key=lambda k: float(np.max(np.abs(wa[k].astype(np.float64) - wb[k]))))
    diff["identical_weights"] = all(np.array_equal(wa[k], wb[k]) for k in wa)
    other = [k for k in wa if not canonical.is_bn(k)]
    num = sum(float(np.sum((wa[k].astype(np.float64) - wb[k]) ** 2)) for k in other)
    den = sum(float(np.sum(wa[k].astype(np.float64) ** 2)) for k in other)
    diff["non_bn_relative_l2_diff"] = math.sqrt(num / den) if den else 0.0
    by_round = []
    for r in ra:
        pa = a / CHECKPOINT_DIR / f"round-{int(r['round']):04d}"
        pb = b / CHECKPOINT_DIR / f"round-{int(r['round']):04d}"
        if pa.with_suffix(".json").is_file() and pb.with_suffix(".json").is_file():
            by_round.append(max_abs(load_checkpoint(pa)[0], load_checkpoint(pb)[0]))
    diff["weights_max_abs_diff_by_round"] = by_round
    return diff


def within_tolerance(diff: Mapping[str, Any], tol: Mapping[str, Any]) -> bool:
    return all(float(diff[k]) <= tol[k] + 1e-12 for k in ("recall@1", "map@r", "weights_max_abs_diff")
               if tol.get(k) is not None)


# ============================================================================ export + latency


def _child(fn: str, job: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``fedcbir.study.<fn>(job)`` in a fresh Python (thread limits and CPU pinning must
    be set before a framework starts; the study process itself stays light)."""
    from common.flower import flower_env

    with tempfile.TemporaryDirectory(prefix="fedcbir-study-") as tmp:
        jf, rf = Path(tmp) / "job.json", Path(tmp) / "result.json"
        jf.write_text(json.dumps(dict(job, result=str(rf))), encoding="utf-8")
        code = f"import sys; from fedcbir.study import _child_main; sys.exit(_child_main({fn!r}, {str(jf)!r}))"
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
        res = _read_json(rf)
        if proc.returncode != 0 or res is None or "error" in res:
            detail = (res or {}).get("error") or f"exit code {proc.returncode} (see its output above)"
            raise FedcbirError(f"{fn} failed: {detail}")
        return res


def _child_main(fn: str, job_file: str) -> int:
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    try:
        from fedcbir.study_device import device_eval_job

        res = {"_export": _export_job, "_latency": _latency_job, "_device": device_eval_job}[fn](job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(exc).__name__}: {exc}"}
    from common.io import write_json_atomic

    write_json_atomic(job["result"], res)
    return 0


def _export_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Export every requested bundle (reusing one whose manifest names the same checkpoint
    weights and route)."""
    from export.bundle import ExportOptions, export_bundle
    from export.runtime import open_bundle

    out: dict[str, Any] = {}
    for fw, spec in job["bundles"].items():
        bundle = Path(spec["out"])
        manifest = None
        if (bundle / "manifest.json").is_file():
            try:
                m = open_bundle(bundle).manifest  # checks every file's sha256 too
                if (m.get("source", {}).get("weights_sha256") == spec["weights_sha256"]
                        and m.get("source", {}).get("route") == spec["source"]
                        and sorted({f["format"] for f in m["files"].values() if f.get("role") == "model"})
                        == sorted(spec["formats"])):
                    manifest = m
                    print(f"export {fw}: reusing {bundle}", file=sys.stderr, flush=True)
            except Exception:  # noqa: BLE001 - a damaged bundle is rebuilt
                manifest = None
        t0 = time.perf_counter()
        if manifest is None:
            print(f"export {fw}: {spec['checkpoint']} -> {bundle} ({', '.join(spec['formats'])}, "
                  f"--from {spec['source']})", file=sys.stderr, flush=True)
            manifest = export_bundle(spec["checkpoint"], bundle, ExportOptions(
                formats=tuple(spec["formats"]), quantize=(), source=spec["source"],
                log=lambda s: print(f"  {s}", file=sys.stderr, flush=True)))
        files = {}
        for name, info in manifest["files"].items():
            if info.get("role") != "model":
                continue
            files[name] = {"format": info["format"], "precision": info["precision"], "source": info.get("source"),
                           "bytes": info["bytes"], "parity": info.get("parity"),
                           "export_seconds": (info.get("exporter") or {}).get("seconds")}
        out[fw] = {"bundle": str(bundle), "files": files, "seconds": time.perf_counter() - t0}
    return {"exports": out}


def _latency_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Batch-1 latency: per framework its eager model and its exported files, all candidates
    interleaved call by call in one pinned single-thread process."""
    from models.threads import set_threads

    info = set_threads(1, pin=True)  # before any framework import
    from export.int8check import cpu_info
    from export.latency import build_candidates, measure
    from export.runtime import open_bundle
    from models import parity

    import numpy as np

    cands = []
    for fw, path in job["bundles"].items():
        bundle = open_bundle(path)
        x = parity.synthetic_batch(bundle.input_size, products=1, photos=1)[0][:1]
        for name, meta, fn in build_candidates(bundle, x, 1, None):
            if meta["kind"] == "eager" and name != EAGER_CANDIDATE[fw]:
                continue
            cands.append((f"{fw}|{name}", dict(meta, framework_of_study=fw, candidate=name), fn))
    load_before = os.getloadavg()
    times = measure(cands, int(job["repeats"]), int(job["warmup"]))
    rows = []
    for name, meta, _ in cands:
        t = np.asarray(times[name]) * 1e3
        rows.append({**meta, "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
                     "min_ms": float(t.min())})
    return {"latency": rows, "config": {"batch": 1, "threads": 1, "repeats": int(job["repeats"]),
                                        "warmup": int(job["warmup"]), "interleaved": True,
                                        "pinned_cpus": info.get("cpu_affinity"), "cpu": cpu_info()["model"],
                                        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}}


def _manifest_sha(bundle: Path, name: str) -> str | None:
    m = _read_json(bundle / "manifest.json") or {}
    return ((m.get("files") or {}).get(name) or {}).get("sha256")


def export_and_measure(feds_by_fw: Mapping[str, Planned], out: Path, repeats: int, warmup: int,
                       log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Export each framework's final global model (its natural route) and time batch 1."""
    from models.checkpoint import load_checkpoint
    from server.federation import latest_checkpoint

    bundles = {}
    for fw, fed in feds_by_fw.items():
        ck = latest_checkpoint(fed.run_dir)
        if ck is None:
            raise FedcbirError(f"no checkpoint in {fed.run_dir} to export")
        _, meta = load_checkpoint(ck)
        source, formats = EXPORT_ROUTES[fw]
        bundles[fw] = {"checkpoint": str(ck.with_suffix("")), "out": str(out / "bundles" / fw), "source": source,
                       "formats": list(formats), "weights_sha256": meta.get("npz_sha256"), "round": meta.get("round")}
    log(f"exporting {', '.join(f'{fw} ({ROUTE_TEXT[fw]})' for fw in bundles)}")
    t0 = time.perf_counter()
    exported = _child("_export", {"bundles": bundles}, timeout=3600)["exports"]
    export_wall = time.perf_counter() - t0
    # latency of exactly these files (by sha256) and settings: measured once, reused on a re-run
    key = {"files": {fw: sorted((n, _manifest_sha(Path(e["bundle"]), n)) for n in e["files"])
                     for fw, e in exported.items()}, "repeats": repeats, "warmup": warmup}
    cache = out / "bundles" / "latency.json"
    old = _read_json(cache)
    if old and old.get("key") == json.loads(json.dumps(key)):
        log(f"batch-1 latency: reusing {cache}")
        lat = old["result"]
    else:
        log(f"measuring batch-1 latency ({repeats} interleaved calls per candidate, one pinned thread)")
        lat = _child("_latency", {"bundles": {fw: e["bundle"] for fw, e in exported.items()}, "repeats": repeats,
                                  "warmup": warmup}, timeout=1800)
        from common.io import write_json_atomic

        write_json_atomic(cache, {"key": key, "result": lat})
    per_fw: dict[str, Any] = {}
    for fw in feds_by_fw:  # the study's framework order (JSON round trips sort keys)
        e = exported[fw]
        mine = [r for r in lat["latency"] if r["framework_of_study"] == fw]
        eager = next((r for r in mine if r["kind"] == "eager"), None)
        files = []
        for r in mine:
            if r["kind"] != "file":
                continue
            f = dict(e["files"].get(r["file"], {}))
            f.update(file=r["file"], runtime=r.get("runtime"), median_ms=r["median_ms"], p90_ms=r["p90_ms"],
                     speedup_vs_eager=(eager["median_ms"] / r["median_ms"]) if eager else None)
            files.append(f)
        per_fw[fw] = {"route": ROUTE_TEXT[fw], "checkpoint": bundles[fw]["checkpoint"], "round": bundles[fw]["round"],
                      "bundle": e["bundle"], "eager": {"name": eager["candidate"], "path": eager.get("path"),
                                                      "median_ms": eager["median_ms"], "p90_ms": eager["p90_ms"]}
                      if eager else None, "files": files}
    return {"frameworks": per_fw, "config": lat["config"], "export_wall_seconds": export_wall}


# ============================================================================ report


def _fmt(ms: Mapping[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    m = ms["mean"] * scale
    if ms.get("std") is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def _fmt_rounds(rt: Mapping[str, Any]) -> str:
    n, k = rt["n"], rt["reached"]
    if k == 0:
        return f"not reached ({n}/{n} seeds)" if n > 1 else "not reached"
    if k == n:
        if rt.get("std") is None:
            return f"{rt['mean']:.0f}"
        return f"{rt['mean']:.1f} ± {rt['std']:.1f}"
    per = ", ".join("not reached" if r is None else str(r) for r in rt["per_seed"])
    return f"{per} (reached in {k}/{n} seeds)"


def _label(label: str, frameworks: Sequence[str]) -> str:
    if label in (MIXED, f"{MIXED}-iid"):
        return f"mixed ({'/'.join(frameworks)})" + (", IID" if label != MIXED else "")
    return label


def render_report(study: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    from common.report import markdown_table

    s = study["settings"]
    target = s["target_recall"]
    res = study["results"]
    labels = list(res)
    fws = s["frameworks"]
    n_seeds = len(s["seeds"])
    lines = ["# Framework study", ""]
    lines += [f"Same catalog, test split, client partitions, initial weights, hyper-parameters, device profile "
              f"and server-side evaluation for every federation; only the clients' training framework differs. "
              f"Seeds {', '.join(map(str, s['seeds']))} (mean ± sample std over {n_seeds} seed"
              f"{'s' if n_seeds > 1 else ''}; one seed sets the test split, the partitions, the initial weights "
              f"and the batch order).", ""]
    lines += ["```bash", study["command"], "```", ""]
    qs = sorted({v["test_queries"] for v in study["data"].values()})
    hit = 1.0 / min(qs) if qs and min(qs) else None
    lines += [f"Catalog `{s['catalog']}`: {_data_line(study['data'])}. "
              f"{s['clients']} clients on `{s['profiles']}`, partition `{s['partition']}`, strategy "
              f"`{s['strategy']}`, {s['rounds']} rounds × {s['local_epochs']} local epoch(s); model width "
              f"{s['run_config']['width']}, {s['run_config']['input-size']} px, {s['run_config']['embedding-dim']}-d; "
              f"runtime `{s['runtime']}`; client isolation `{s['run_config']['client-isolation']}`; "
              f"BN policy `{s['run_config']['bn-policy']}`. Wall time: {study['federation_wall_seconds'] / 60:.1f} "
              f"min for the federations" + (f" (+ {_export_seconds(study['export']) / 60:.1f} min of export "
                                            f"conversions)" if study.get("export") else "")
              + f", {study['wall_seconds'] / 60:.1f} min for the last invocation of the command."
              + (f" One query hit is {hit:.4f} of Recall@1." if hit else ""),
              ""]
    if study.get("initial_weights_identical") is not None:
        lines += ["Initial weights identical across federation types of each seed (sha256 of round-0 "
                  f"checkpoints): **{'yes' if study['initial_weights_identical'] else 'NO'}**.", ""]
    header = ["federation", "Recall@1", "mAP@R", f"rounds to Recall@1 ≥ {target:g}",
              f"simulated s/round ({s['profiles']})", "host s/round", "client train s", "client process s",
              "peak RSS MB", "MB/round (up+down)"]
    rows = []
    for label in labels:
        a = res[label]["aggregate"]
        rows.append([_label(label, fws), _fmt(a["final_recall@1"]), _fmt(a["final_map@r"]),
                     _fmt_rounds(a["rounds_to_target"]), _fmt(a["simulated_seconds_per_round"], 1),
                     _fmt(a["host_seconds_per_round"], 1), _fmt(a["client_train_seconds"], 1),
                     _fmt(a["client_process_seconds"], 1), _fmt(a["peak_rss_mb"], 0),
                     _fmt(a["bytes_per_round"], 2, 1e-6)])
    lines += ["## Results", "", markdown_table(header, rows)]
    lines += [
        "- **Recall@1, mAP@R**: server-side evaluation (PyTorch for every federation) of the global model after the "
        "last round on the test products (gallery = their main photos, queries = their other photos).",
        f"- **rounds to Recall@1 ≥ {target:g}**: first round (0 = before training) at or above the target; "
        "\"not reached\" within the rounds run.",
        "- **simulated s/round**: emulated seconds of the slowest device per round (compute scaled from this host "
        "to the profile by the calibrated virtual clock, plus transfer time); includes TF tracing and JAX "
        "compilation in every fresh client process, as on a device.",
        "- **host s/round**: wall-clock seconds of a round on this host (all clients, aggregation, server "
        "evaluation); **client train s** / **client process s**: mean per client and round of the training loop "
        "alone / of the whole child process (interpreter + framework import + data + training).",
        "- **peak RSS**: largest VmHWM of one client's child process (one framework each); "
        "**MB/round**: model bytes down + up summed over clients (same canonical arrays for every framework).",
        ""]
    lines += _device_section(study, labels, fws)
    lines += _cost_section(study, labels, fws)
    if plots.get("recall"):
        lines += [f"![Recall@1 per round]({plots['recall']})", ""]
    # per-round curve table
    rounds = res[labels[0]]["aggregate"]["curve"]["round"]
    header = ["round", *[_label(lb, fws) for lb in labels]]
    rows = []
    for i, r in enumerate(rounds):
        row = [str(r)]
        for lb in labels:
            c = res[lb]["aggregate"]["curve"]
            if r in c["round"]:
                j = c["round"].index(r)
                row.append(_fmt({"mean": c["recall@1_mean"][j], "std": c["recall@1_std"][j]}))
            else:
                row.append("–")
        rows.append(row)
    lines += ["### Recall@1 per round", "", markdown_table(header, rows)]
    rows = []
    for lb in labels:
        for seed, p in res[lb]["per_seed"].items():
            rt = p.get("rounds_to_target")
            wall = p.get("wall_seconds")
            rows.append([_label(lb, fws), str(seed), f"{p['initial']['recall@1']:.3f} → {p['final']['recall@1']:.3f}",
                         f"{p['final']['map@r']:.3f}", "not reached" if rt is None else str(rt),
                         ", ".join(f"{k} {v}" for k, v in sorted(p["client_status"].items())),
                         f"{wall:.0f}" if wall else "–", p.get("run_state") or ""])
    lines += ["### Per seed", "", markdown_table(["federation", "seed", "Recall@1 start → end", "mAP@R",
                                                  "rounds to target", "client rounds", "wall s", "run"], rows)]
    eps = [(lb, seed, p) for lb in labels for seed, p in res[lb]["per_seed"].items() if p.get("dp_delta")]
    if eps:
        lines += [f"Device-level differential privacy (run config `dp = {s.get('run_config', {}).get('dp', '?')}`; "
                  "README \"Privacy\"): epsilon after the last round, " + "; ".join(
                      f"{_label(lb, fws)} seed {seed}: "
                      f"{'inf' if p.get('epsilon') is None else format(p['epsilon'], '.3g')} at delta {p['dp_delta']:g}"
                      for lb, seed, p in eps) + ".", ""]
    for key, alt in (("seconds", "seconds per round"), ("rss", "peak RSS")):
        if plots.get(key):
            lines += [f"![{alt}]({plots[key]})", ""]
    mixed = res.get(MIXED)
    if mixed:
        bf = mixed["aggregate"]["by_framework"]
        rows = [[fw, _fmt(bf[fw]["client_train_seconds"], 1), _fmt(bf[fw]["client_process_seconds"], 1),
                 _fmt(bf[fw]["client_simulated_seconds"], 1), _fmt(bf[fw]["peak_rss_mb"], 0)] for fw in bf]
        lines += ["### Inside the mixed federation (per client framework)", "",
                  markdown_table(["client framework", "train s", "process s", "simulated s", "peak RSS MB"], rows)]
    ex = study.get("export")
    if ex:
        c = ex["config"]
        lines += ["## Exported models (first seed's final global model)", "",
                  f"Batch 1, one thread, process pinned to CPU {c.get('pinned_cpus')}, {c['repeats']} calls per "
                  f"candidate interleaved (warm-up {c['warmup']}), median and p90; CPU {c.get('cpu')}"
                  + (f"; 1-min load average {c['loadavg_before'][0]:.1f} before, {c['loadavg_after'][0]:.1f} after "
                     f"on {study.get('host', {}).get('cpus')} cores" if c.get("loadavg_before") else "")
                  + ". Exported files are fp32 (no quantization).", ""]
        rows = []
        for fw, e in ex["frameworks"].items():
            if e["eager"]:
                rows.append([fw, f"eager: {e['eager']['name']}", "", f"{e['eager']['median_ms']:.2f}",
                             f"{e['eager']['p90_ms']:.2f}", "1.0×", ""])
            for f in e["files"]:
                par = f.get("parity") or {}
                ptxt = (f"max abs {par['max_abs_diff']:.1e}" if par.get("max_abs_diff") is not None else
                        ("ok" if par.get("ok") else ""))
                rows.append([fw, f"`{f['file']}` ({f.get('runtime')})", f"{f['bytes'] / 1e6:.2f} MB",
                             f"{f['median_ms']:.2f}", f"{f['p90_ms']:.2f}",
                             f"{f['speedup_vs_eager']:.1f}×" if f.get("speedup_vs_eager") else "", ptxt])
        lines += [markdown_table(["framework", "model", "size", "median ms", "p90 ms", "vs own eager",
                                  "parity vs reference"], rows)]
        routes = "; ".join(f"{fw}: {e['route']}" for fw, e in ex["frameworks"].items())
        lines += [f"Routes: {routes}.", ""]
        if plots.get("latency"):
            lines += [f"![batch-1 latency]({plots['latency']})", ""]
    tol = study["tolerance"]
    bound = (f" Here: |ΔRecall@1| ≤ {tol['recall@1']:.4f}, |ΔmAP@R| ≤ {tol['map@r']:.4f}"
             + (f", weights max |Δ| ≤ {tol['weights_max_abs_diff']:g}" if tol.get("weights_max_abs_diff") is not None
                else "") + f" ({tol.get('queries')} test queries)." if tol.get("queries") else "")
    lines += ["## Reproducibility", "", f"Tolerance (stated): {tol['text']}.{bound}", ""]
    rep = study.get("repeat_check")
    if rep:
        d = rep["diff"]
        detail = ""
        if d.get("weights_max_abs_diff_by_round"):
            detail = (" Weights max |Δ| per round: " + ", ".join(f"{v:.1e}" for v in d["weights_max_abs_diff_by_round"])
                      + f"; after the last round the largest is in `{d.get('weights_max_abs_diff_at')}`, and the "
                      f"non-BatchNorm weights differ by {d.get('non_bn_relative_l2_diff', 0.0):.1%} (relative L2).")
        lines += [f"Repeat check: `{rep['federation']}` run twice → max |ΔRecall@1| over rounds "
                  f"{d['recall@1']:.4f}, max |ΔmAP@R| {d['map@r']:.4f}, weights max |Δ| "
                  f"{d['weights_max_abs_diff']:.2e} (identical: {d['identical_weights']}) → "
                  f"**{'within' if rep['within_tolerance'] else 'OUTSIDE'} tolerance**.{detail}", ""]
    else:
        lines += ["No repeat check in this study (`--repeat-check` reruns the first federation and compares).", ""]
    notes = study.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _device_section(study: Mapping[str, Any], labels: Sequence[str], fws: Sequence[str]) -> list[str]:
    """Device-protocol accuracy (mean ± 95 % CI over seeds) and the paired framework tests."""
    from common.report import markdown_table
    from fedcbir.study_stats import fmt_ci

    res = study["results"]
    if not study.get("comparisons"):
        return []
    n = len(study["settings"]["seeds"])
    rows = [[_label(lb, fws), fmt_ci(res[lb]["device"]["recall@1"]), fmt_ci(res[lb]["device"]["recall@5"]),
             fmt_ci(res[lb]["device"]["recall@10"]),
             ", ".join(f"{res[lb]['per_seed'][s]['device']['recall@1']:.3f}" for s in res[lb]["per_seed"])]
            for lb in labels]
    out = ["## Search quality on the device protocol", "",
           f"Each final global model exported to fp32 TFLite, the whole catalog indexed with LiteRT (f16 usearch), "
           f"`catalog-search eval`: queries = the test products' other photos, gallery = the main photos of every "
           f"catalog product. Mean ± 95 % confidence half-width over {n} seeds (Student t, {n - 1} d.f.).", "",
           markdown_table(["federation", "Recall@1", "Recall@5", "Recall@10", "Recall@1 per seed"], rows)]
    rows = []
    for key, what in (("device_recall@1", "device Recall@1"), ("server_recall@1", "server Recall@1")):
        for pair, d in study["comparisons"][key].items():
            p = d.get("p_value")
            verdict = ("–" if p is None else ("differs (p < 0.05)" if d.get("significant") else "no difference shown"))
            rows.append([what, f"{d['a']} − {d['b']}" if "a" in d else pair,
                         fmt_ci(d), ", ".join(f"{x:+.3f}" for x in d.get("differences", [])),
                         "–" if p is None else f"{p:.3f}", verdict])
    out += ["### Paired differences between federation types (same seed = same split, partitions, initial weights)",
            "", markdown_table(["metric", "a − b", "mean ± 95 % CI", "per seed", "paired t-test p", "verdict"],
                               rows),
            "With few seeds only large differences can show; \"no difference shown\" is not proof of equality.", ""]
    return out


def _cost_section(study: Mapping[str, Any], labels: Sequence[str], fws: Sequence[str]) -> list[str]:
    """Where a client's time goes, per framework (host seconds, mean over clients, rounds and seeds)."""
    from common.report import markdown_table

    res = study["results"]
    rows = []
    for lb in labels:
        for fw, d in res[lb]["aggregate"]["by_framework"].items():
            if d.get("steady_step_seconds", {}).get("mean") is None:
                continue
            proc, train = d["client_process_seconds"]["mean"], d["client_train_seconds"]["mean"]
            build = d["build_seconds"]["mean"]
            rows.append([_label(lb, fws), fw, _fmt(d["client_process_seconds"], 1), _fmt(d["build_seconds"], 1),
                         f"{max(0.0, (proc or 0) - (build or 0) - (train or 0)):.1f}" if proc else "–",
                         _fmt(d["first_step_seconds_round1"], 2), _fmt(d["first_step_seconds_later"], 2),
                         _fmt(d["steady_step_seconds"], 3), _fmt(d["client_train_seconds"], 1),
                         _fmt(d["cache_hit_rate"], 2), _fmt(d["peak_rss_mb"], 0)])
    if not rows:
        return []
    return ["## Where a device's time goes (host seconds per client and round)", "",
            markdown_table(["federation", "client framework", "whole process", "import + build",
                            "interpreter + data", "first step, round 1", "first step, later rounds",
                            "steady step", "training loop", "trunk cache hit rate", "peak RSS MB"], rows),
            "- **import + build**: framework import and model construction in the fresh client process; "
            "**first step**: tracing (TF) / XLA compilation (JAX; later rounds read XLA's persistent compilation "
            "cache on disk, which is what a real device can keep between rounds) plus the frozen trunk of its "
            "batch; **steady step**: median of the other steps (trunk output from the cache when hit).",
            ""]


def _export_seconds(export: Mapping[str, Any]) -> float:
    """Converter seconds of every exported file (recorded in the manifests, so also right
    when the bundles were reused)."""
    return sum(f.get("export_seconds") or 0.0 for e in export["frameworks"].values() for f in e["files"])


def _data_line(data: Mapping[Any, Mapping[str, Any]]) -> str:
    parts = []
    for s, d in data.items():
        parts.append(f"seed {s}: {d['train_products']} train / {d['test_products']} test products, "
                     f"{d['test_queries']} queries, partition sizes {d['partition_products']}")
    return "; ".join(parts)


def make_plots(study: Mapping[str, Any], out: Path) -> dict[str, str]:
    from common.report import grouped_bars, line_plot

    s = study["settings"]
    res = study["results"]
    labels = list(res)
    fws = s["frameworks"]
    names = [_label(lb, fws) for lb in labels]
    plots: dict[str, str] = {}
    series, bands = {}, {}
    for lb, name in zip(labels, names):
        c = res[lb]["aggregate"]["curve"]
        series[name] = (c["round"], c["recall@1_mean"])
        if any(v is not None for v in c["recall@1_std"]):
            bands[name] = [v or 0.0 for v in c["recall@1_std"]]
    line_plot(out / "recall_at_1.png", series, xlabel="round (0 = before training)", ylabel="Recall@1",
              title=f"Recall@1 per round (mean ± std over {len(s['seeds'])} seed(s))", bands=bands or None,
              hline=(s["target_recall"], f"target {s['target_recall']:g}"), integer_x=True)
    plots["recall"] = "recall_at_1.png"

    def col(key, scale=1.0):
        return [(res[lb]["aggregate"][key]["mean"] or 0.0) * scale for lb in labels]

    def err(key, scale=1.0):
        return [(res[lb]["aggregate"][key]["std"] or 0.0) * scale for lb in labels]

    grouped_bars(out / "seconds_per_round.png", names,
                 {f"simulated ({s['profiles']})": col("simulated_seconds_per_round"),
                  "host wall": col("host_seconds_per_round")},
                 errors={f"simulated ({s['profiles']})": err("simulated_seconds_per_round"),
                         "host wall": err("host_seconds_per_round")},
                 ylabel="seconds per round", title="Seconds per round")
    plots["seconds"] = "seconds_per_round.png"
    grouped_bars(out / "peak_rss.png", names, {"peak RSS": col("peak_rss_mb")}, errors={"peak RSS": err("peak_rss_mb")},
                 ylabel="MB", title="Peak RSS of one client process")
    plots["rss"] = "peak_rss.png"
    ex = study.get("export")
    if ex:
        groups, vals = [], []
        for fw, e in ex["frameworks"].items():
            if e["eager"]:
                groups.append(f"{fw}\neager")
                vals.append(e["eager"]["median_ms"])
            for f in e["files"]:
                groups.append(f"{fw}\n{f['file'].replace('model', '')}")
                vals.append(f["median_ms"])
        grouped_bars(out / "latency.png", groups, {"median ms": vals}, ylabel="ms (batch 1, one thread)",
                     title="Batch-1 latency: eager vs exported")
        plots["latency"] = "latency.png"
    return plots


# ============================================================================ the command


def canonical_command(args: argparse.Namespace) -> str:
    """The study's command with every option spelled out (reproduces it exactly)."""
    parts = ["fedcbir", "study"]
    if args.catalog:
        parts += ["--catalog", str(args.catalog)]
    else:
        parts += ["--sample"]
        if args.products is not None:
            parts += ["--products", str(args.products)]
        if args.views is not None:
            parts += ["--views", str(args.views)]
    parts += ["--frameworks", args.frameworks, "--seeds", str(args.seeds)]
    if args.first_seed:
        parts += ["--first-seed", str(args.first_seed)]
    parts += ["--rounds", str(args.rounds), "--clients", str(args.clients), "--profile", args.profile,
              "--partition", args.partition, "--strategy", args.strategy, "--local-epochs", str(args.local_epochs),
              "--target-recall", f"{args.target_recall:g}", "--runtime", args.runtime]
    if args.no_mixed:
        parts.append("--no-mixed")
    if getattr(args, "iid_mixed", False):
        parts.append("--iid-mixed")
    parts += ["--scratch-arm", args.scratch_arm or "none"]
    if args.no_device_eval:
        parts.append("--no-device-eval")
    if args.no_export:
        parts.append("--no-export")
    else:
        parts += ["--latency-repeats", str(args.latency_repeats)]
    if args.repeat_check:
        parts.append("--repeat-check")
    for item in args.set or []:
        parts += ["--set", item]
    parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(p) for p in parts)


def cmd_study(args: argparse.Namespace) -> int:
    from common.io import print_json, write_json_atomic
    from common.flower import read_rows
    from common.io import write_text_atomic

    check_args(args)
    frameworks = parse_frameworks(args.frameworks)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else _log
    t_study = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    catalog = resolve_catalog(args)
    base = base_run_config(args, catalog)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    scratch = None if args.scratch_arm in ("", "none") else parse_frameworks(args.scratch_arm)[0]
    feds = plan(frameworks, seeds, out, mixed=not args.no_mixed, scratch=scratch, iid_mixed=args.iid_mixed)
    rcs = {f.name: federation_run_config(base, f) for f in feds}
    for f in feds:  # settings conflicts before any work
        run_state(f.run_dir, rcs[f.name])
    data = precheck_partitions(catalog, base, seeds, args.clients)
    out.mkdir(parents=True, exist_ok=True)
    log(f"framework study: {len(feds)} federations ({', '.join(dict.fromkeys(f.label for f in feds))} × seeds "
        f"{', '.join(map(str, seeds))}), {args.clients} clients on {base['profiles']}, partition {args.partition}, "
        f"{args.rounds} rounds, runtime {args.runtime} -> {out}")

    summaries: dict[str, dict[str, Any]] = {}
    for i, f in enumerate(feds, 1):
        state, why = run_state(f.run_dir, rcs[f.name])
        verb = {"done": "reusing the finished run", "resume": f"resuming ({why})", "fresh": "running"}[state]
        log(f"[{i}/{len(feds)}] {f.label} seed {f.seed}: {verb} -> {f.run_dir}")
        summaries[f.name] = run_federation(f, rcs[f.name], args.clients, args.runtime, log)
        fin = summaries[f.name]["final"]
        log(f"[{i}/{len(feds)}] {f.name}: recall@1 {fin['recall@1']:.3f}, map@r {fin['map@r']:.3f}"
            + (f", {summaries[f.name]['study_run']['wall_seconds']:.0f} s"
               if summaries[f.name]["study_run"].get("wall_seconds") else ""))

    tol = tolerance_for(args.runtime, min(d["test_queries"] for d in data.values()))
    repeat = None
    if args.repeat_check:
        f0 = feds[0]
        twin = Planned(f0.label, f0.frameworks, f0.seed, f0.run_dir.with_name(f0.name + "-repeat"))
        log(f"repeat check: {f0.name} again -> {twin.run_dir}")
        run_federation(twin, federation_run_config(base, twin), args.clients, args.runtime, log)
        diff = compare_runs(f0.run_dir, twin.run_dir)
        repeat = {"federation": f0.name, "repeat": str(twin.run_dir), "diff": diff,
                  "within_tolerance": within_tolerance(diff, tol)}
        log(f"repeat check: max |d recall@1| {diff['recall@1']:.4f}, max |d map@r| {diff['map@r']:.4f}, "
            f"weights max |d| {diff['weights_max_abs_diff']:.2e} -> "
            f"{'within' if repeat['within_tolerance'] else 'OUTSIDE'} tolerance")

    results: dict[str, Any] = {}
    labels = list(dict.fromkeys(f.label for f in feds))
    for label in labels:
        mine = [f for f in feds if f.label == label]
        per_seed = {}
        for f in mine:
            st = federation_stats(read_rows(f.run_dir / "metrics.jsonl"), args.target_recall)
            st["wall_seconds"] = summaries[f.name]["study_run"].get("wall_seconds")
            st["run_dir"] = str(f.run_dir)
            st["run_state"] = summaries[f.name]["study_run"].get("state")
            st["initial_weights"] = checkpoint_digest(f.run_dir, 0)
            st["final_weights"] = checkpoint_digest(f.run_dir)
            per_seed[f.seed] = st
        results[label] = {"frameworks": mine[0].frameworks.split(","), "per_seed": per_seed,
                          "aggregate": aggregate(per_seed, args.target_recall)}
    same_init = all(len({results[lb]["per_seed"][s]["initial_weights"] for lb in labels
                         if not lb.startswith("scratch-")}) == 1 for s in seeds)
    comparisons = None
    if not args.no_device_eval:
        from fedcbir.study_device import device_eval
        from fedcbir.study_stats import ci95, pairwise

        for f in feds:
            results[f.label]["per_seed"][f.seed]["device"] = device_eval(f.name, f.run_dir, catalog, f.seed, out, log)
        for label in labels:
            ps = results[label]["per_seed"]
            results[label]["device"] = {k: ci95(ps[s]["device"][k] for s in ps) for k in ("recall@1", "recall@5",
                                                                                         "recall@10")}
        comparisons = {
            "device_recall@1": pairwise({lb: {s: results[lb]["per_seed"][s]["device"]["recall@1"]
                                              for s in results[lb]["per_seed"]} for lb in labels}, labels),
            "server_recall@1": pairwise({lb: {s: results[lb]["per_seed"][s]["final"]["recall@1"]
                                              for s in results[lb]["per_seed"]} for lb in labels}, labels),
        }
    schemas = {f.name: client_schema(read_rows(f.run_dir / "metrics.jsonl")) for f in feds}

    export = None
    if not args.no_export:
        export = export_and_measure({fw: next(f for f in feds if f.label == fw and f.seed == seeds[0])
                                     for fw in frameworks}, out, args.latency_repeats, max(5, args.latency_repeats // 10),
                                    log)

    from server.runconfig import RunConfig

    cfg_example = RunConfig.from_flower(rcs[feds[0].name])
    notes = []
    if cfg_example.client_isolation == "inline":
        notes.append("client-isolation=inline: clients ran in the server's process, so peak RSS is that shared "
                     "process's and says nothing about one framework.")
    if cfg_example.fraction_evaluate == 0:
        notes.append("Client-side evaluation is off (fraction-evaluate 0, the study default): it does not change "
                     "the model, only costs time; turn it on with --set fraction-evaluate=1.")
    if len({s for s in schemas.values() if s}) > 1:
        groups: dict[tuple, list[str]] = {}
        for name, s in schemas.items():
            groups.setdefault(s, []).append(name)
        notes.append("WARNING: the federations report different per-client fields ("
                     + "; ".join(f"{', '.join(names)}: {', '.join(s) or '-'}" for s, names in groups.items())
                     + "), so they ran with different code versions; remove the odd run folders and re-run.")
    if "jax" in frameworks:
        notes.append("JAX clients compile their train step; XLA's persistent cache (~/.cache/fedcbir/xla-cache) "
                     "makes later rounds and later federations with the same shapes cheaper, so the first JAX "
                     "federation of a study pays more compile time than the next ones.")
    study = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "command": canonical_command(args), "invoked_as": " ".join(shlex.quote(a) for a in sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"catalog": str(catalog), "frameworks": frameworks, "mixed": not args.no_mixed and len(frameworks) > 1,
                     "seeds": seeds, "rounds": args.rounds, "clients": args.clients, "profiles": base["profiles"],
                     "partition": args.partition, "strategy": args.strategy, "local_epochs": args.local_epochs,
                     "target_recall": args.target_recall, "runtime": args.runtime, "export": not args.no_export,
                     "run_config": {k: v for k, v in rcs[feds[0].name].items()
                                    if k not in ("frameworks", "seed", "out", "client-state-dir", "resume")}},
        "data": {str(k): v for k, v in data.items()},
        "tolerance": {"runtime": args.runtime, **tol},
        "initial_weights_identical": same_init, "labels": labels,
        "results": results, "comparisons": comparisons, "export": export, "repeat_check": repeat, "notes": notes,
        "host": _host_info(),
        "federation_wall_seconds": sum(p.get("wall_seconds") or 0.0 for r in results.values()
                                       for p in r["per_seed"].values()),
        "wall_seconds": time.perf_counter() - t_study,
    }
    plots = make_plots(study, out)
    study["plots"] = plots
    write_json_atomic(out / "study.json", _jsonable(study))
    write_text_atomic(out / "report.md", render_report(study, plots))
    for name in ("study.json", "report.md", *plots.values()):
        os.chmod(out / name, 0o644)  # atomic writes create private temp files; a report is for sharing
    if args.json:
        print_json(_jsonable(study))
    else:
        log("")
        log(_summary_table(study))
        log(f"study done in {study['wall_seconds'] / 60:.1f} min: {out / 'report.md'}, {out / 'study.json'}, "
            f"{', '.join(plots.values())}")
    return 0


def _summary_table(study: Mapping[str, Any]) -> str:
    from common.report import markdown_table

    fws = study["settings"]["frameworks"]
    rows = []
    for label, r in study["results"].items():
        a = r["aggregate"]
        rows.append([_label(label, fws), _fmt(a["final_recall@1"]), _fmt(a["final_map@r"]),
                     _fmt_rounds(a["rounds_to_target"]), _fmt(a["simulated_seconds_per_round"], 1),
                     _fmt(a["host_seconds_per_round"], 1), _fmt(a["peak_rss_mb"], 0)])
    return markdown_table(["federation", "Recall@1", "mAP@R", "rounds to target", "sim s/round", "host s/round",
                           "peak RSS MB"], rows)


def client_schema(rows: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The metric fields an ok client row carries (None-valued ones excluded): equal for runs
    made by the same code."""
    for r in clean_rows(rows):
        for c in r.get("clients") or []:
            if c.get("status") == "ok":
                return tuple(sorted(k for k, v in c.items() if v is not None))
    return ()


def _git_info() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "modified_files": [ln[3:] for ln in dirty.stdout.splitlines() if ln]}


def _host_info() -> dict[str, Any]:
    import platform

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "python": platform.python_version(), "platform": platform.platform(), "loadavg": load,
            "git_at_report": _git_info()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def register(sub) -> None:
    from models.centralized import add_catalog_args

    p = sub.add_parser(
        "study", help="the framework study: same federation in PyTorch, TensorFlow and JAX (+ mixed), "
                      "accuracy, speed, memory, bytes, exported size and latency",
        description="For each framework (and one mixed federation, clients round-robin over them) and each seed, "
                    "run the same federation: same catalog, partitions, initial weights, hyper-parameters, device "
                    "profile and server-side evaluation; only the clients' framework differs. Reports final "
                    "Recall@1 and mAP@R (mean ± std over seeds), rounds to a target Recall@1, simulated device "
                    "seconds and host seconds per round, peak RSS, bytes per round, and (unless --no-export) the "
                    "exported file sizes and batch-1 latencies. Writes OUT/runs/<label>-s<seed>/, OUT/study.json, "
                    "OUT/report.md and OUT/*.png. Re-running with the same --out reuses finished federations and "
                    "resumes an interrupted one.",
        epilog="example: fedcbir study --sample --frameworks torch,tf,jax --seeds 3 --rounds 5 --clients 3 "
               "--profile rpi4 --partition dirichlet:0.3 --out runs/study\n"
               "bigger machines: fedcbir study --sample --products 10000 --clients 20 --seeds 3 --rounds 20 "
               "--out runs/study-10k\n"
               "quick (no Ray, tiny model): fedcbir study --sample --frameworks torch --seeds 1 --rounds 2 "
               "--runtime inprocess --no-export --set width=0.35 --set input-size=32 --out /tmp/s",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog_args(p)
    p.add_argument("--products", type=int, metavar="N",
                   help="with the built-in sample: generate (once, into the cache) a sample of N products "
                        "(default 300; e.g. 10000 for a larger study)")
    p.add_argument("--views", type=int, metavar="V", help="photos per sample product (default 6)")
    p.add_argument("--frameworks", default="torch,tf,jax", help="frameworks to compare (default torch,tf,jax)")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed-framework federation")
    p.add_argument("--iid-mixed", action="store_true",
                   help="also run the mixed federation on an IID partition (label 'mixed-iid'), to show what "
                        "the --partition skew costs")
    p.add_argument("--scratch-arm", default="torch", metavar="FRAMEWORK",
                   help="also federate the from-scratch MobileNetV3-Small with this framework, to show what "
                        "pretraining is worth (default torch; 'none' to skip)")
    p.add_argument("--no-device-eval", action="store_true",
                   help="skip the device-protocol accuracy (each final model exported to TFLite, the whole "
                        "catalog indexed with LiteRT, catalog-search eval; ~1 min per federation)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="number of seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=0, metavar="S", help="seeds S..S+N-1 (default 0)")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    p.add_argument("--clients", type=int, default=3, help="simulated devices per federation (default 3)")
    p.add_argument("--profile", "--profiles", dest="profile", default="rpi4",
                   help="device profile of every client (default rpi4; a comma list is used round-robin)")
    p.add_argument("--partition", default="dirichlet:0.3", help="iid | dirichlet:ALPHA | country "
                                                                "(default dirichlet:0.3)")
    p.add_argument("--strategy", default="fedavg", help="fedavg | fedprox | fedadam | fedtrimmedavg | krum")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--target-recall", type=float, default=DEFAULT_TARGET, metavar="R",
                   help=f"report the first round whose Recall@1 >= R (default {DEFAULT_TARGET:g})")
    p.add_argument("--runtime", default="simulation", choices=RUNTIMES,
                   help="simulation: Flower's simulation runtime (SuperLink + Ray, default); inprocess: the same "
                        "ServerApp loop and ClientApp in this process (no Ray; quick and bit-exact, for tests)")
    p.add_argument("--no-export", action="store_true",
                   help="skip exporting the final models and timing batch-1 latency (saves ~2 min per framework)")
    p.add_argument("--latency-repeats", type=int, default=100, metavar="N",
                   help="interleaved batch-1 calls per candidate (default 100)")
    p.add_argument("--repeat-check", action="store_true",
                   help="run the first federation a second time and compare against the stated tolerance")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other run-config key for every federation, e.g. --set width=0.35 --set input-size=32 "
                        "(study default: fraction-evaluate=0)")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--json", action="store_true", help="print study.json at the end (progress goes to stderr)")
    p.set_defaults(func=cmd_study)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedcbir.study [study] ...`` = ``fedcbir study ...``."""
    from common.cli import run_one

    return run_one(register, "study", argv)


if __name__ == "__main__":
    sys.exit(main())
