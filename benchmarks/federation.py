"""Federation overhead and upload size, float32 vs float16 uploads, side by side.

    python -m benchmarks.federation [--json] [--runtime simulation|inprocess] [--clients 3]
        [--rounds 2] [--frameworks torch] [--sample] [--width 0.35] [--input-size 64]

Two short federations that differ only in ``fp16-upload`` (same catalog, partition, seeds),
one after the other, on Flower's simulation runtime (SuperLink + Ray, clients in fresh
child processes, exactly what ``fedcbir simulate`` runs) or an in-process Grid (the
server logic alone). Client evaluation is off, so a round is: send, local training,
replies, validation + aggregation, server evaluation, checkpoint. Per training round:

- ``train_phase_s``: wall time from sending the model to having every reply;
- ``slowest_client_process_s``: the slowest client's child-process wall time (start,
  framework import, data, training, writing the result);
- ``slowest_client_train_s``: the slowest client's training loop alone;
- ``overhead_s`` = train_phase_s - slowest_client_process_s: what the federation
  machinery (Flower messaging, Ray, the ClientApp, serialisation) adds to the slowest
  client's work; ``overhead_incl_startup_s`` = train_phase_s - slowest_client_train_s
  also counts the per-message process start and framework import;
- ``round_s``: the whole round including server evaluation and the checkpoint;
- ``bytes_up`` / ``bytes_down``: all clients together (serialised arrays).

Reported: medians over rounds, and the ratios fp16/fp32 for bytes up and round time.
The first round is listed but excluded from the medians (it decodes the images and
fills caches). Run setup time (SuperLink, Ray, round-0 evaluation) is reported apart.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _round_stats(row: dict[str, Any]) -> dict[str, Any]:
    ok = [c for c in row["clients"] if c["status"] == "ok"]
    proc = max((c["process_seconds"] or 0.0 for c in ok), default=0.0)
    train = max((c["host_seconds"] or 0.0 for c in ok), default=0.0)
    return {
        "round": row["round"], "clients_ok": len(ok), "round_s": row["seconds"],
        "train_phase_s": row["train_seconds"], "slowest_client_process_s": proc, "slowest_client_train_s": train,
        "overhead_s": row["train_seconds"] - proc, "overhead_incl_startup_s": row["train_seconds"] - train,
        "server_eval_s": row["server_eval_seconds"], "bytes_up": row["bytes_up"], "bytes_down": row["bytes_down"],
    }


def _median(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows]
    return float(statistics.median(vals)) if vals else float("nan")


def run_one(args, catalog: Path, out: Path, fp16: bool) -> dict[str, Any]:
    from server.runconfig import RunConfig

    rc = RunConfig.from_flower({
        "catalog": str(catalog), "num-server-rounds": args.rounds, "frameworks": args.frameworks,
        "profiles": args.profiles, "partition": "iid", "width": args.width, "input-size": args.input_size,
        "fraction-evaluate": 0.0, "fp16-upload": fp16, "out": str(out), "seed": args.seed,
        "client-isolation": "process" if args.runtime == "simulation" else args.isolation,
    }).to_flower()
    t0 = time.perf_counter()
    if args.runtime == "simulation":
        from server.simulation import simulate

        summary = simulate(rc, args.clients)
    else:
        from edge_client.app import app as client_app
        from server.federation import Federation
        from server.inprocess import InProcessGrid

        grid = InProcessGrid(client_app, args.clients, rc)
        summary = Federation(grid, RunConfig.from_flower(rc), out, log=lambda s: None).run()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [_round_stats(r) for r in rows if r["round"] > 0]
    steady = rounds[1:] or rounds
    setup = wall - sum(r["seconds"] for r in rows if r["round"] > 0)
    return {
        "fp16_upload": fp16, "wall_s": wall, "setup_s": setup, "rounds": rounds,
        "median": {k: _median(steady, k) for k in ("round_s", "train_phase_s", "slowest_client_process_s",
                                                   "slowest_client_train_s", "overhead_s",
                                                   "overhead_incl_startup_s", "server_eval_s", "bytes_up",
                                                   "bytes_down")},
        "final_recall@1": summary["final"]["recall@1"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.federation", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", choices=["simulation", "inprocess"], default="simulation")
    p.add_argument("--isolation", choices=["process", "inline"], default="process",
                   help="client isolation for --runtime inprocess")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frameworks", default="torch")
    p.add_argument("--profiles", default="rpi4,rpi5,jetson-nano-cpu")
    p.add_argument("--sample", action="store_true", help="the built-in 300-product sample (default: 24 x 4)")
    p.add_argument("--width", type=float, default=0.35)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from common.cli import quiet_environment

    quiet_environment()
    with tempfile.TemporaryDirectory(prefix="fedcbir-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.sample:
            from catalog.sample import ensure_default_sample

            catalog = ensure_default_sample(progress=False)
        else:
            from catalog.sample import generate_sample

            catalog = tmp_path / "catalog"
            generate_sample(catalog, products=24, views=4, seed=0, progress=False)
        runs = {name: run_one(args, catalog, tmp_path / name, fp16) for name, fp16 in (("fp32", False),
                                                                                       ("fp16", True))}
    a, b = runs["fp32"]["median"], runs["fp16"]["median"]
    result = {
        "benchmark": "federation", "runtime": args.runtime,
        "setup": {"clients": args.clients, "rounds": args.rounds, "frameworks": args.frameworks,
                  "profiles": args.profiles, "catalog": "sample 300x6" if args.sample else "generated 24x4",
                  "width": args.width, "input_size": args.input_size, "client_evaluation": False},
        "runs": runs,
        "ratios": {
            "bytes_up_fp16_over_fp32": b["bytes_up"] / a["bytes_up"],
            "bytes_down_fp16_over_fp32": b["bytes_down"] / a["bytes_down"],
            "round_s_fp16_over_fp32": b["round_s"] / a["round_s"],
            "overhead_share_of_train_phase_fp32": a["overhead_s"] / a["train_phase_s"],
        },
    }
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for name, r in runs.items():
            m = r["median"]
            print(f"{name}: round {m['round_s']:.2f} s (train phase {m['train_phase_s']:.2f} s, slowest client "
                  f"process {m['slowest_client_process_s']:.2f} s / training {m['slowest_client_train_s']:.2f} s, "
                  f"overhead {m['overhead_s']:.2f} s), bytes up {m['bytes_up'] / 1e6:.2f} MB, down "
                  f"{m['bytes_down'] / 1e6:.2f} MB; setup {r['setup_s']:.1f} s")
        rt = result["ratios"]
        print(f"fp16/fp32: bytes up x{rt['bytes_up_fp16_over_fp32']:.3f}, round time x{rt['round_s_fp16_over_fp32']:.3f}; "
              f"overhead = {100 * rt['overhead_share_of_train_phase_fp32']:.0f}% of the fp32 train phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
