"""``make bench``: run every benchmark in this folder with --json, gather benchmarks/results.json,
and write the table of ratios to benchmarks/results.md and into README.md (between the
``<!-- bench:start -->`` / ``<!-- bench:end -->`` markers).

A benchmark that fails is recorded with its exit code and last error line; the others
still run. Each benchmark measures its ratios side by side in its own run. Long optional
benchmarks (``scale``: 1k and 5k product catalogs through every step, ~1 h on 2 shared
cores) run only when named: ``--only scale`` or ``--with scale`` (= ``make bench-scale``).

    python -m benchmarks.run_all [--only train_step,inference] [--with scale] [--table-only] [--no-readme]
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.io import write_json_atomic

HERE = Path(__file__).resolve().parent
SKIP = {"__init__", "run_all"}
OPTIONAL = {"scale"}  # long: not part of a plain `make bench`


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _f(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def ratio_rows(results: dict[str, Any]) -> list[list[str]]:
    """(benchmark, measured, ratio, goal) rows from the benchmarks' JSON (missing ones skipped)."""
    rows: list[list[str]] = []

    def res(name):
        r = results.get(name) or {}
        return r.get("result") if isinstance(r, dict) else None

    if (t := res("train_step")):
        for r in t.get("results", []):
            if "ratio_to_fastest_default" in r:
                rows.append(["train step (batch %d, 1 core)" % t.get("batch", 0), r.get("variant", "?"),
                             f"{r['median_ms']:.0f} ms", f"{r['ratio_to_fastest_default']:.2f}x fastest",
                             "<= 1.5x"])
    if (t := res("inference")):
        g = t.get("goals", {})
        for r in t.get("results", []):
            size = f", size {r['size_vs_fp32']:.0%} of fp32" if r.get("size_vs_fp32") not in (None, 1.0) else ""
            rows.append(["inference batch 1 (1 thread)", r["name"], f"{r['median_ms']:.2f} ms",
                         f"{r['speedup_vs_torch_eager']:.1f}x eager torch{size}",
                         f">= {g.get('speedup_goal', 3):g}x (best)" if r["name"] == g.get("best_runtime") else ""])
    if (t := res("search")):
        for row in t.get("results", []):
            for dtype in ("f32", "f16", "i8"):
                d = row.get(dtype)
                if not d:
                    continue
                rows.append([f"search {row['n']:,} vectors", dtype,
                             f"recall@10 {d['recall@10']:.3f}, p50 {d['single_p50_ms']:.3f} ms, open "
                             f"{d['open_view_ms']:.0f} ms",
                             f"{d['speedup_vs_exact_single_p50']:.0f}x exact (single), size "
                             f"{d.get('size_vs_f32', 1):.0%} of f32",
                             "f16 at 400k: >= 0.99, <= 1 ms, open <= 50 ms" if row["n"] == 400_000 and dtype == "f16"
                             else ""])
    if (t := res("federation")):
        r = t.get("ratios", {})
        rows.append(["federation (%s, %s clients)" % (t.get("runtime"), t.get("setup", {}).get("clients")),
                     "fp16 vs fp32 upload", f"bytes up {_f(r.get('bytes_up_fp16_over_fp32'))}x",
                     f"round time {_f(r.get('round_s_fp16_over_fp32'))}x; overhead "
                     f"{_f(r.get('overhead_share_of_train_phase_fp32'), '.0%')} of the training phase", ""])
    if (t := res("scale")):
        from benchmarks.scale import _duration

        sizes = "/".join(f"{s['products'] // 1000}k" if s["products"] >= 1000 else str(s["products"])
                         for s in t.get("sizes", []))
        for r in t.get("summary", []):
            if r["step"] not in ("training_data", "train_torch", "index", "update"):
                continue
            rows.append([f"scale ({sizes} products, 1 thread)", r["step"],
                         f"{r.get('ms_per_image_fit', 0):.2f} ms per catalog photo (fit)",
                         f"peak RSS {r.get('rss_mb_per_100k_images', 0):+.0f} MB per 100k photos; all of ABO "
                         f"~{_duration(r['abo_seconds'])}",
                         "time linear, RSS flat"])
    if (t := res("catalog_generation")):
        rows.append(["catalog generation (1 core)", f"{t.get('images')} images",
                     f"{t.get('images_per_second_wall')} images/s",
                     f"decode {t.get('decode_images_per_second')} images/s",
                     f">= {t.get('goal_images_per_second')} images/s"])
    for name, r in sorted(results.items()):
        if isinstance(r, dict) and "error" in r:
            rows.append([name, "FAILED", r["error"][:120], "", ""])
    return rows


def ratio_table(results: dict[str, Any]) -> str:
    from common.report import markdown_table

    header = ["benchmark", "candidate", "measured", "ratio", "goal"]
    return markdown_table(header, ratio_rows(results))


def update_readme(table: str, readme: Path) -> bool:
    """Replace the text between the bench markers; False if the markers are missing."""
    from common.io import write_text_atomic

    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    stamp = time.strftime("%Y-%m-%d")
    write_text_atomic(readme, f"{head}{START}\n_`make bench`, {stamp}, this machine:_\n\n{table}{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated benchmark names (default: all but the optional ones)")
    p.add_argument("--with", dest="with_", metavar="NAMES",
                   help=f"also run these optional benchmarks ({', '.join(sorted(OPTIONAL))})")
    p.add_argument("--table-only", action="store_true", help="rebuild the tables from benchmarks/results.json")
    p.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    args = p.parse_args(argv)
    out = HERE / "results.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if args.table_only and not results:
        print(f"error: --table-only: no {out} yet (run the benchmarks first)", file=sys.stderr)
        return 2
    failed = 0
    names = [q.stem for q in sorted(HERE.glob("*.py")) if q.stem not in SKIP]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"error: unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(names)})", file=sys.stderr)
            return 2
        names = wanted
    else:
        extra = [n.strip() for n in (args.with_ or "").split(",") if n.strip()]
        unknown = [n for n in extra if n not in OPTIONAL]
        if unknown:
            print(f"error: --with: unknown optional benchmark(s) {', '.join(unknown)} "
                  f"(optional: {', '.join(sorted(OPTIONAL))})", file=sys.stderr)
            return 2
        names = [n for n in names if n not in OPTIONAL or n in extra]
    for name in ([] if args.table_only else names):
        print(f"== benchmarks.{name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", "--json"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=HERE.parent)
        stdout: list[str] = []
        reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
        reader.start()
        last = ""
        for line in proc.stderr:  # the benchmark's progress, shown as it runs
            print(f"   {line.rstrip()}", file=sys.stderr, flush=True)
            last = line.strip() or last
        proc.wait()
        reader.join()
        seconds = round(time.perf_counter() - t0, 1)
        if proc.returncode == 0:
            try:
                results[name] = {"seconds": seconds, "result": json.loads("".join(stdout))}
                continue
            except json.JSONDecodeError:
                reason = "output is not JSON"
        else:
            reason = last or "no error output"
        failed += 1
        results[name] = {"seconds": seconds, "error": reason, "exit_code": proc.returncode}
        print(f"   failed: {reason}", file=sys.stderr)
    if not args.table_only:
        write_json_atomic(out, results)
    table = ratio_table(results)
    from common.io import write_text_atomic

    write_text_atomic(HERE / "results.md", "# Benchmark ratios (`make bench`)\n\n" + table)
    print(table)
    readme = HERE.parent / "README.md"
    if not args.no_readme and update_readme(table, readme):
        print(f"updated the table in {readme}", file=sys.stderr)
    ran = "" if args.table_only else f" ({len(names) - failed} ran ok, {failed} failed)"
    print(f"wrote {out} and {HERE / 'results.md'}{ran}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
