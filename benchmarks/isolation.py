"""What keeping the client process alive saves: the same federations run twice, once with a fresh
child process per round (run config ``client-isolation = "process"``, the default: what
Flower's deployment runtime does, one ``flwr-clientapp`` per message) and once with the
ClientApp training in its long-lived process (``client-isolation = "inline"``: framework imported,
model built and train step traced/compiled once, then reused every round).

    python -m benchmarks.isolation --process STUDY_A --inline STUDY_B [--json]

``STUDY_A`` / ``STUDY_B``: two ``fedcbir study`` folders (or their ``runs/``) with federations of the
same names (``torch-s0``...) and the same settings but ``client-isolation``.  For every framework
present in both, per client and round (round 1 apart: the one that builds in both modes): wall
seconds of the client's work (``process_seconds``: start + import + build + train + hand-back),
the model build, the first and the steady training step, and CPU seconds; then process / inline
ratios.  Rounds are compared only where both runs have them (an interrupted run still counts).
Writes ``benchmarks/isolation.json`` with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common.flower import read_rows

KEYS = ("process_seconds", "build_seconds", "first_step_seconds", "steady_step_seconds", "cpu_seconds",
        "host_seconds")


def _runs(folder: Path) -> Path:
    return folder / "runs" if (folder / "runs").is_dir() else folder


def _client_rows(run_dir: Path) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """(round, framework) -> the ok clients' metric dicts."""
    out: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in read_rows(run_dir / "metrics.jsonl"):
        for c in row.get("clients") or []:
            if c.get("status") == "ok" and c.get("framework"):
                out.setdefault((int(row["round"]), c["framework"]), []).append(c)
    return out


def compare(process: Path, inline: Path) -> dict[str, Any]:
    a_runs, b_runs = _runs(process), _runs(inline)
    names = sorted(p.name for p in a_runs.iterdir() if (p / "metrics.jsonl").is_file()
                   and (b_runs / p.name / "metrics.jsonl").is_file())
    if not names:
        raise SystemExit(f"error: no federation folder is in both {a_runs} and {b_runs}")
    acc: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for name in names:
        a, b = _client_rows(a_runs / name), _client_rows(b_runs / name)
        for key in sorted(set(a) & set(b)):
            rnd, fw = key
            phase = "round 1" if rnd == 1 else "rounds 2+"
            for mode, rows in (("process", a[key]), ("inline", b[key])):
                d = acc.setdefault((fw, phase, mode), {k: [] for k in KEYS})
                for c in rows:
                    for k in KEYS:
                        if isinstance(c.get(k), (int, float)):
                            d[k].append(float(c[k]))
    table = []
    for fw in sorted({k[0] for k in acc}):
        for phase in ("round 1", "rounds 2+"):
            p, i = acc.get((fw, phase, "process")), acc.get((fw, phase, "inline"))
            if not p or not i:
                continue
            row: dict[str, Any] = {"framework": fw, "phase": phase, "client_rounds": len(p["process_seconds"])}
            for k in KEYS:
                pm = statistics.fmean(p[k]) if p[k] else None
                im = statistics.fmean(i[k]) if i[k] else None
                row[k] = {"process": pm, "inline": im,
                          "ratio": (pm / im) if pm is not None and im not in (None, 0.0) else None}
            table.append(row)
    return {"process": str(a_runs), "inline": str(b_runs), "federations": names, "rows": table}


def print_table(res: dict[str, Any]) -> None:
    print(f"client work per round, process vs inline ({', '.join(res['federations'])})")
    print("| framework | rounds | client-rounds | wall s process | wall s inline | ratio | build s process | "
          "build s inline | first step s process | first step s inline | steady step s process | "
          "steady step s inline | CPU s process | CPU s inline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def f(x, d=1):
        return "–" if x is None else f"{x:.{d}f}"

    for r in res["rows"]:
        ps, b, fs, ss, cpu = (r[k] for k in ("process_seconds", "build_seconds", "first_step_seconds",
                                             "steady_step_seconds", "cpu_seconds"))
        print(f"| {r['framework']} | {r['phase']} | {r['client_rounds']} | {f(ps['process'])} | {f(ps['inline'])} | "
              f"{f(ps['ratio'], 2)}× | {f(b['process'])} | {f(b['inline'])} | {f(fs['process'], 2)} | "
              f"{f(fs['inline'], 2)} | {f(ss['process'], 2)} | {f(ss['inline'], 2)} | {f(cpu['process'])} | "
              f"{f(cpu['inline'])} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.isolation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--process", required=True, type=Path, help="study (or runs) folder, client-isolation=process")
    p.add_argument("--inline", required=True, type=Path, help="study (or runs) folder, client-isolation=inline")
    p.add_argument("--out", type=Path, help="write the JSON here (e.g. benchmarks/isolation.json)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    args = p.parse_args(argv)
    for d in (args.process, args.inline):
        if not d.is_dir():
            print(f"error: {d} is not a folder", file=sys.stderr)
            return 2
    res = compare(args.process, args.inline)
    if args.out:
        from common.io import write_json_atomic

        write_json_atomic(args.out, res)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
