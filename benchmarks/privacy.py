"""What device-level differential privacy costs in search quality, against its epsilon.

    python -m benchmarks.privacy [--sample | --catalog ROOT] [--devices 50] [--per-round 10]
        [--rounds 5] [--noise 0.5,1,2] [--clip 0.05] [--mode server-fixed] [--input-size 96]
        [--set KEY=VALUE ...] [--no-baseline] [--no-device-eval] [--out runs/privacy] [--json]
    python -m benchmarks.privacy --combine A/privacy.json B/privacy.json --out DIR

One federation without DP and one per noise multiplier, otherwise identical (catalog, split,
IID partitions over ``--devices`` devices, initial weights, hyper-parameters), each on the
in-process Grid (``server.inprocess``: the ServerApp's round loop, clients called inline, one
process) so that 50 devices fit on a small machine. Without DP ``clients-per-round`` devices
are drawn per round (a seeded fixed-size sample); with DP each device takes part with
probability ``per-round / devices`` (Poisson, as the accountant assumes).

Per federation: epsilon after the last round (delta 1e-5, RDP; ``dp-accountant`` via --set),
the server-side Recall@1 (the federation's evaluation: 60 test products, gallery = their
main photos) at round 0 and at the end, and with ``--device-eval`` (default) the
device-protocol Recall@1: the final checkpoint exported to ONNX, the whole catalog indexed
with ONNX Runtime, ``catalog-search eval`` (queries = the test products' other photos,
gallery = the main photo of every catalog product).

Writes ``OUT/privacy.json``, ``OUT/table.md`` and ``OUT/recall_vs_epsilon.png``; ``--combine``
merges sweeps (e.g. two clipping norms) into one table and plot. A federation
whose folder already holds a finished run with the same settings is reused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_NOISE = "0.5,1,2"


def _settings(args, catalog: Path, z: float | None, out: Path) -> dict[str, Any]:
    from server.runconfig import RunConfig, parse_sets

    rc = {"catalog": str(catalog), "num-server-rounds": args.rounds, "frameworks": "torch", "profiles": "rpi4",
          "partition": "iid", "client-isolation": "inline", "fraction-evaluate": 0.0,
          "clients-per-round": args.per_round, "seed": args.seed, "input-size": args.input_size,
          "out": str(out), **parse_sets(args.set, {})}
    if z is not None:
        rc.update({"dp": args.mode, "dp-noise": float(z), "dp-clip": args.clip})
    return RunConfig.from_flower(rc).to_flower()


def _device_eval(checkpoint: Path, catalog: Path, work: Path, seed: int) -> dict[str, Any]:
    from export.bundle import ExportOptions, export_bundle
    from common.io import stderr_to
    from retrieval.index import build_catalog_index
    from retrieval.search import Searcher, evaluate

    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        with stderr_to(work / "export.log"):
            export_bundle(checkpoint, bundle, ExportOptions(formats=("onnx",), quantize=(), calibration=str(catalog)))
        build_catalog_index(bundle, catalog, runtime="onnx", dtype="f32", progress=False)
    with Searcher(bundle, runtime="onnx") as s:
        ev = evaluate(s, catalog, seed=seed, progress=False)
    return {k: ev["index"][k] for k in ("recall@1", "recall@5", "recall@10")} | {
        "queries": ev["queries"], "gallery": ev["gallery"]}


def run_one(args, catalog: Path, name: str, z: float | None, say) -> dict[str, Any]:
    from edge_client.app import app as client_app
    from server.federation import Federation, run_folder_state
    from server.inprocess import InProcessGrid
    from server.runconfig import RunConfig

    out = (Path(args.out) / name).resolve()
    rc = _settings(args, catalog, z, out / "federation")
    state, _ = run_folder_state(out / "federation", rc, hint="remove it or use another --out")
    t0 = time.perf_counter()
    if state == "done":
        summary = json.loads((out / "federation" / "summary.json").read_text(encoding="utf-8"))
        say(f"{name}: reusing the finished federation in {out / 'federation'}")
    else:
        if state == "resume":
            rc["resume"] = True
        grid = InProcessGrid(client_app, args.devices, rc)
        summary = Federation(grid, RunConfig.from_flower(rc), out / "federation",
                             log=lambda line: say(f"{name}: {line}")).run()
    wall = time.perf_counter() - t0
    p = summary.get("privacy") or {}
    res = {"name": name, "noise_multiplier": z, "clip": args.clip if z is not None else None,
           "epsilon": p.get("epsilon"),  # None: no DP, or no noise (z = 0: clipping only, epsilon infinite)
           "delta": p.get("delta"), "accountant": p.get("accountant"),
           "server_recall@1_start": summary["initial"]["recall@1"], "server_recall@1": summary["final"]["recall@1"],
           "server_recall@5": summary["final"]["recall@5"], "best_server_recall@1": summary["best"]["recall@1"],
           "rounds": summary["rounds"], "client_status": summary["client_status_counts"],
           "federation_wall_seconds": round(wall, 1), "checkpoint": summary["checkpoint"]}
    if args.device_eval:
        t1 = time.perf_counter()
        ck = Path(summary["checkpoint"])
        dev = _device_eval(ck, catalog, out / "device", args.seed)
        res.update({"device_recall@1": dev["recall@1"], "device_recall@5": dev["recall@5"],
                    "device_queries": dev["queries"], "device_gallery": dev["gallery"],
                    "device_eval_seconds": round(time.perf_counter() - t1, 1)})
    say(f"{name}: epsilon {res['epsilon']}, server recall@1 {res['server_recall@1_start']:.3f} -> "
        f"{res['server_recall@1']:.3f}" + (f", device recall@1 {res['device_recall@1']:.3f}"
                                           if args.device_eval else ""))
    return res


def table(results: list[dict[str, Any]], device_eval: bool) -> str:
    from common.report import markdown_table

    def eps(r):
        if r["noise_multiplier"] is None:
            return "no DP"
        return "inf (no noise)" if r["epsilon"] is None else f"{r['epsilon']:.2f}"

    header = ["run", "clip", "noise multiplier z", "epsilon (delta 1e-5)", "server Recall@1 start -> end",
              "server Recall@5"]
    if device_eval:
        header += ["device Recall@1", "device Recall@5"]
    rows = []
    for r in results:
        row = [r["name"], "–" if r["clip"] is None else f"{r['clip']:g}",
               "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}", eps(r),
               f"{r['server_recall@1_start']:.3f} -> {r['server_recall@1']:.3f}", f"{r['server_recall@5']:.3f}"]
        if device_eval:
            row += [f"{r['device_recall@1']:.3f}", f"{r['device_recall@5']:.3f}"]
        rows.append(row)
    return markdown_table(header, rows)


def plot(results: list[dict[str, Any]], path: Path, title: str, device_eval: bool) -> None:
    """Recall@1 against epsilon: one line per clipping norm and metric; horizontal lines for
    no DP and for clipping without noise (epsilon infinite)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    keys = [("server_recall@1", "server", "o", "-")]
    if device_eval:
        keys.append(("device_recall@1", "device protocol", "s", "--"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    clips = sorted({r["clip"] for r in results if r["clip"] is not None}, reverse=True)
    xs = [r["epsilon"] for r in results if r["epsilon"] is not None]
    for i, clip in enumerate(clips):
        mine = [r for r in results if r["clip"] == clip]
        for key, label, marker, style in keys:
            pts = sorted((r["epsilon"], r[key]) for r in mine if r["epsilon"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style,
                        color=colors[i % len(colors)], label=f"DP, clip {clip:g}: {label}")
            for r in mine:
                if r["epsilon"] is None and key == "server_recall@1":
                    ax.axhline(r[key], color=colors[i % len(colors)], linestyle="-.", linewidth=0.9,
                               label=f"clip {clip:g}, no noise: server")
    for r in results:
        if r["noise_multiplier"] is None:
            ax.axhline(r["server_recall@1"], color="black", linestyle=":", label="no DP: server")
            if device_eval:
                ax.axhline(r["device_recall@1"], color="grey", linestyle=":", label="no DP: device protocol")
    if results:
        ax.axhline(results[0]["server_recall@1_start"], color="grey", linestyle="--", linewidth=0.8,
                   label="before training: server")
    ax.set_xscale("log")
    if xs:
        ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if min(xs) / 1.5 <= t <= max(xs) * 1.5]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epsilon at delta 1e-5 (device-level, after the last round)")
    ax.set_ylabel("Recall@1")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(doc: dict[str, Any]) -> str:
    return (f"{doc['devices']} devices, {doc['per_round']} per round, {doc['rounds']} rounds, "
            f"{doc['input_size']} px")


def combine(paths: list[str], out: Path) -> int:
    """One table and one plot from several sweeps' ``privacy.json`` (same federation settings)."""
    from common.io import write_text_atomic

    docs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    results = [r for d in docs for r in d["results"]]
    dev = all("device_recall@1" in r for r in results)
    md = table(results, dev)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "table.md", "\n".join(f"`{d['command']}`" for d in docs) + f"\n\n{md}")
    plot(results, out / "recall_vs_epsilon.png", _title(docs[0]), dev)
    print(md)
    print(f"{out / 'table.md'}, {out / 'recall_vs_epsilon.png'}")
    return 0


def main(argv=None) -> int:
    from common.errors import FedcbirError
    from common.io import print_json, write_json_atomic, write_text_atomic

    p = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.split("\n\n")[0])
    p.add_argument("--sample", action="store_true", help="the built-in sample catalog (default)")
    p.add_argument("--catalog", help="an ABO-layout catalog root")
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--per-round", type=int, default=10, help="devices per round (DP: expected number)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--noise", default=DEFAULT_NOISE, help=f"noise multipliers, comma-separated ({DEFAULT_NOISE})")
    p.add_argument("--clip", type=float, default=0.05, help="clipping norm (default 0.05)")
    p.add_argument("--mode", default="server-fixed", help="dp mode of the DP runs (default server-fixed)")
    p.add_argument("--input-size", type=int, default=96, help="image size (default 96; the encoder's own is 160)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other run-config key, for every run")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the federation without DP (e.g. a second sweep with another --clip)")
    p.add_argument("--no-device-eval", dest="device_eval", action="store_false",
                   help="skip the export + on-device catalog search of each final model")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="only merge earlier sweeps' privacy.json files into OUT/table.md and OUT/recall_vs_epsilon.png")
    p.add_argument("--out", default="runs/privacy")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    if args.combine:
        return combine(args.combine, Path(args.out))
    try:
        noise = [float(x) for x in args.noise.split(",") if x.strip()]
        if any(z < 0 for z in noise) or args.devices < 1 or args.per_round < 1 or args.rounds < 1:
            raise FedcbirError("--noise values must be >= 0; --devices, --per-round and --rounds >= 1")
        if args.catalog:
            catalog = Path(args.catalog).expanduser().resolve()
        else:
            from catalog.sample import ensure_default_sample

            catalog = ensure_default_sample(progress=False)
        t0 = time.perf_counter()
        results = [run_one(args, catalog, "no-dp", None, say)] if args.baseline else []
        results += [run_one(args, catalog, f"dp-z{z:g}", z, say) for z in noise]
    except FedcbirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: --noise: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    command = "python -m benchmarks.privacy " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = {"command": command.strip(), "devices": args.devices, "per_round": args.per_round, "rounds": args.rounds,
           "clip": args.clip, "mode": args.mode, "input_size": args.input_size, "catalog": str(catalog),
           "set": args.set or [], "results": results, "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(out / "privacy.json", doc)
    md = table(results, args.device_eval)
    write_text_atomic(out / "table.md", f"`{doc['command']}`\n\n{md}")
    plot(results, out / "recall_vs_epsilon.png", _title(doc), args.device_eval)
    if args.json:
        print_json(doc)
    else:
        print(md)
        print(f"{out / 'privacy.json'}, {out / 'table.md'}, {out / 'recall_vs_epsilon.png'} "
              f"({doc['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
