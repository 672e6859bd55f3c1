"""``fedcbir study``: the command (``register``), its canonical spelling and ``cmd_study``,
which orchestrates the other modules of ``fedcbir.study`` and writes ``study.json``,
``report.md`` and the plots.

Order of work: check the arguments, plan the federations, refuse settings conflicts, run (or
reuse, or resume) every federation, the repeat check, the per-federation numbers and their
aggregate over seeds, the device protocol and paired tests, export and latency, then the
study file, report and plots.

May import: ``common``, ``models``, ``server`` and every other module of ``fedcbir.study``
(nothing imports this one but ``fedcbir.cli`` and ``fedcbir.study.__main__``).
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fedcbir.study.export import export_and_measure
from fedcbir.study.plan import (DEFAULT_TARGET, RUNTIMES, Planned, base_run_config, check_args,
                                federation_run_config, parse_frameworks, plan, precheck_partitions,
                                resolve_catalog)
from fedcbir.study.plots import make_plots
from fedcbir.study.report import render_report, summary_table
from fedcbir.study.repro import compare_runs, tolerance_for, within_tolerance
from fedcbir.study.run import checkpoint_digest, run_federation, run_state
from fedcbir.study.stats import aggregate, client_schema, federation_stats
from fedcbir.study.util import stdout_log

FORMAT = "fedcbir-study"
SCHEMA_VERSION = 1


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
    if getattr(args, "extra_arm_seeds", None) is not None:
        parts += ["--extra-arm-seeds", str(args.extra_arm_seeds)]
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
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else stdout_log
    t_study = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    catalog = resolve_catalog(args)
    base = base_run_config(args, catalog)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    scratch = None if args.scratch_arm in ("", "none") else parse_frameworks(args.scratch_arm)[0]
    feds = plan(frameworks, seeds, out, mixed=not args.no_mixed, scratch=scratch, iid_mixed=args.iid_mixed,
                extra_seeds=args.extra_arm_seeds)
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
                         if not lb.startswith("scratch-") and s in results[lb]["per_seed"]}) == 1 for s in seeds)
    comparisons = None
    if not args.no_device_eval:
        from fedcbir.study.device import device_eval
        from fedcbir.study.stats import ci95, pairwise

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
        notes.append("client-isolation=inline: each client trained inside its long-lived client process (a Ray "
                     "actor on the simulation runtime, shared by the clients it hosts; this process in process), "
                     "so framework import, model build and tracing happen once per process, not per round, and "
                     "peak RSS is that shared process's and says nothing about one framework.")
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
                     "seeds": seeds, "extra_arm_seeds": args.extra_arm_seeds, "rounds": args.rounds,
                     "clients": args.clients, "profiles": base["profiles"],
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
        log(summary_table(study))
        log(f"study done in {study['wall_seconds'] / 60:.1f} min: {out / 'report.md'}, {out / 'study.json'}, "
            f"{', '.join(plots.values())}")
    return 0


def _git_info() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[2]
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
    p.add_argument("--extra-arm-seeds", type=int, default=None, metavar="N",
                   help="run the extra arms (--iid-mixed, --scratch-arm) on the first N seeds only "
                        "(default: every seed)")
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
    """``python -m fedcbir.study [study] ...`` = ``fedcbir study ...`` (see ``__main__``)."""
    from common.cli import run_one

    return run_one(register, "study", argv)


if __name__ == "__main__":
    sys.exit(main())
