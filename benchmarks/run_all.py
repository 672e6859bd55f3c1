"""``make bench``: run every benchmark in this folder with --json, gather benchmarks/results.json.

A benchmark that fails is recorded with its exit code and last error line; the others
still run. Each benchmark prints ratios measured side by side in its own run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from fedcbir.io import write_json_atomic

HERE = Path(__file__).resolve().parent
SKIP = {"__init__", "run_all"}


def main() -> int:
    results: dict[str, object] = {}
    failed = 0
    for path in sorted(HERE.glob("*.py")):
        name = path.stem
        if name in SKIP:
            continue
        print(f"== benchmarks.{name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--json"],
                              capture_output=True, text=True, cwd=HERE.parent)
        seconds = round(time.perf_counter() - t0, 1)
        if proc.returncode == 0:
            try:
                results[name] = {"seconds": seconds, "result": json.loads(proc.stdout)}
                continue
            except json.JSONDecodeError:
                reason = "output is not JSON"
        else:
            lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
            reason = lines[-1] if lines else "no error output"
        failed += 1
        results[name] = {"seconds": seconds, "error": reason, "exit_code": proc.returncode}
        print(f"   failed: {reason}", file=sys.stderr)
    out = HERE / "results.json"
    write_json_atomic(out, results)
    print(f"wrote {out} ({len(results) - failed} ok, {failed} failed)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
