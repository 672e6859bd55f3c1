"""Training-step speed of the same encoder in PyTorch, Keras/TF and Flax, side by side.

    python -m benchmarks.train_step [--json] [--threads 1] [--repeats 20] [--all-variants]

Same canonical weights, same batch (P=16 products x K=4 photos = 64 images of 160 px, the
parity check's synthetic batch), same loss and optimizer (AdamW).  The default encoder
(EfficientNet-Lite0) is timed as devices train it: from block ``--train-from`` (11) on,
on the frozen trunk's cached output (``--train-from 0``: everything, from the images);
``--arch mobilenetv3-small --size 96 --products 8`` times the from-scratch model.  Each framework/variant
runs in its own fresh process (isolated imports, thread settings and peak RSS), with one
thread by default; the processes take turns (interleaved rounds), so load changes on a
shared machine affect all alike.  The first step (tracing / XLA compilation) is timed
separately and excluded; the reported time is the median of ``--repeats`` steps.  Achieved GFLOP/s uses
the FLOPs counted from the spec, training step = 3 x forward (``models.spec.flops``).

Variants (kernel path / memory format are recorded with every number):
    torch:channels_last   (default)  NHWC strides end to end, input is a free NCHW view
    torch:contiguous                 classic NCHW
    tf:default            (default)  Keras functional model in tf.function, native depthwise
    jax:shift             (default)  depthwise as shift-and-add of strided slices with a
                                     hand-written backward; 1x1 convs as matmuls; jax.jit
    jax:shift_autodiff               same forward, XLA-differentiated backward
    jax:shift/lax1x1                 1x1 convs through lax.conv instead of matmul
    jax:lax                          lax.conv_general_dilated(feature_group_count=C)

Each worker is pinned to ``--threads`` CPUs (``--no-pin`` to disable): XLA:CPU ignores
thread limits and would otherwise use both cores of this machine at "1 thread".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from export.int8check import cpu_info

DEFAULT_VARIANTS = ["torch:channels_last", "tf:default", "jax:shift"]
ALL_VARIANTS = ["torch:channels_last", "torch:contiguous", "tf:default", "jax:shift",
                "jax:shift_autodiff", "jax:shift/lax1x1", "jax:lax"]


def _options(variant: str) -> dict:
    fw, _, v = variant.partition(":")
    if fw == "torch":
        return {"memory_format": v or "channels_last"}
    if fw == "jax":
        dw, _, pw = (v or "shift").partition("/")
        return {"depthwise_impl": dw, "pointwise_impl": "lax" if pw == "lax1x1" else "matmul"}
    return {}


def worker(variant: str, args) -> None:
    """A fresh process for one framework/variant: build, compile, then run steps on
    request (``run N`` on stdin -> one JSON line of step times), ``quit`` -> final info.
    The parent interleaves the workers round by round, so load changes on a shared
    machine hit every framework alike."""
    from models.threads import set_threads

    set_threads(args.threads, pin=not args.no_pin)
    from models import initial, parity
    from models.api import TrainConfig, make_trainer
    from models.optim import OptimConfig
    from models.threads import thread_info
    from common.memory import peak_rss_mb

    spec = _spec(args)
    x, labels, types = parity.synthetic_batch(spec.input_size, args.products, args.photos, 0)
    weights = initial.init_weights(spec, 0)
    cfg = TrainConfig(optim=OptimConfig(name="adamw", lr=1e-4), threads=args.threads,
                      train_from=_train_from(args, spec))
    fw = variant.partition(":")[0]
    t0 = time.perf_counter()
    trainer = make_trainer(fw, spec, cfg, **_options(variant))
    trainer.set_weights(weights)
    if cfg.train_from:  # what a device trains: the cached output of the frozen trunk
        x = trainer._trunk_batch(x)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer._train_step(x, labels, types)  # trace / compile
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        trainer._train_step(x, labels, types)
    _say({"ready": True, "build_s": build_s, "first_step_s": first_s})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        times = []
        for _ in range(int(cmd[1])):
            t0 = time.perf_counter()
            trainer._train_step(x, labels, types)
            times.append(time.perf_counter() - t0)
        _say({"times": times})
    _say({"variant": variant, "framework": fw, "kernels": trainer.describe(),
          "peak_rss_mb": peak_rss_mb(), "threads": thread_info(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")})


def _spec(args):
    from models.spec import preset

    return preset(args.arch, width=args.width, input_size=args.size or None)


def _train_from(args, spec) -> int:
    return spec.default_train_from if args.train_from < 0 else args.train_from


def _say(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _read(proc) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"worker exited: {err[-1500:]}")
        if line.startswith("{"):
            return json.loads(line)


def run_all(args) -> dict:
    from models.spec import train_flops

    variants = args.variants.split(",") if args.variants else (
        ALL_VARIANTS if args.all_variants else DEFAULT_VARIANTS)
    spec = _spec(args)
    k = _train_from(args, spec)
    batch = args.products * args.photos
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    procs, info, errors = {}, {}, {}
    for v in variants:  # start and compile one at a time (no oversubscription)
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", v,
               "--threads", str(args.threads), "--warmup", str(args.warmup),
               *(["--no-pin"] if args.no_pin else []),
               "--width", str(args.width), "--size", str(args.size), "--arch", args.arch,
               "--train-from", str(args.train_from),
               "--products", str(args.products), "--photos", str(args.photos)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            info[v] = _read(proc)
            procs[v] = proc
        except RuntimeError as exc:
            errors[v] = str(exc)
    times = {v: [] for v in procs}
    per_round = max(1, args.repeats // args.rounds)
    for _ in range(args.rounds):
        for v, proc in procs.items():
            proc.stdin.write(f"run {per_round}\n")
            proc.stdin.flush()
            times[v] += _read(proc)["times"]
    results = []
    for v in variants:
        if v in errors:
            results.append({"variant": v, "error": errors[v]})
            continue
        proc = procs[v]
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        final = _read(proc)
        proc.wait(timeout=60)
        med = statistics.median(times[v])
        results.append({**final, **info[v], "median_ms": med * 1e3,
                        "min_ms": min(times[v]) * 1e3,
                        "images_per_s": batch / med,
                        "gflops_per_s": train_flops(spec, batch, k) / med / 1e9,
                        "steps_timed": len(times[v])})
    ok = [r for r in results if "error" not in r]
    defaults = [r for r in ok if r["variant"] in DEFAULT_VARIANTS]
    fastest = min((r["median_ms"] for r in ok), default=None)
    fastest_default = min((r["median_ms"] for r in defaults), default=None)
    for r in ok:
        r["ratio_to_fastest"] = r["median_ms"] / fastest
        if r in defaults:
            r["ratio_to_fastest_default"] = r["median_ms"] / fastest_default
    slowest_default = max((r["median_ms"] for r in defaults), default=None)
    return {
        "benchmark": "train_step", "threads": args.threads, "pinned": not args.no_pin,
        "batch": batch,
        "arch": spec.name, "train_from": k,
        "input_size": spec.input_size, "width": args.width, "optimizer": "adamw",
        "train_step_gflop": train_flops(spec, batch, k) / 1e9,
        "timing": f"median of {args.rounds} interleaved rounds x {per_round} steps, "
                  f"after compile + {args.warmup} warm-up steps",
        "results": results,
        "slowest_over_fastest_default": (slowest_default / fastest_default
                                         if defaults else None),
        "cpu": cpu_info()["model"],
    }


def print_table(rep: dict) -> None:
    print(f"train step: {rep.get('arch', '')} from block {rep.get('train_from', 0)}, "
          f"batch {rep['batch']} x {rep['input_size']}px, width {rep['width']}, "
          f"{rep['train_step_gflop']:.2f} GFLOP/step (3x fwd), {rep['threads']} thread(s), "
          f"{rep['cpu']}")
    hdr = (f"{'variant':22s} {'ms/step':>9s} {'img/s':>7s} {'GFLOP/s':>8s} {'x fastest':>9s} "
           f"{'compile s':>9s} {'RSS MB':>7s}  kernel path")
    print(hdr)
    for r in rep["results"]:
        if "error" in r:
            print(f"{r['variant']:22s} FAILED: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        mark = "*" if "ratio_to_fastest_default" in r else " "
        print(f"{r['variant'] + mark:22s} {r['median_ms']:9.1f} {r['images_per_s']:7.1f} "
              f"{r['gflops_per_s']:8.2f} {r['ratio_to_fastest']:9.2f} {r['first_step_s']:9.1f} "
              f"{r['peak_rss_mb']:7.0f}  {r['kernels'].get('depthwise', '')}")
    if rep["slowest_over_fastest_default"]:
        print(f"* default path; slowest/fastest default = "
              f"{rep['slowest_over_fastest_default']:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=5, help="interleaving rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--width", type=float, default=1.0)
    from models.spec import DEFAULT_ARCH, PRESETS

    p.add_argument("--arch", choices=sorted(PRESETS), default=DEFAULT_ARCH)
    p.add_argument("--train-from", type=int, default=-1,
                   help="first trained block (-1: the architecture's default, 11 for efficientnet-lite0)")
    p.add_argument("--size", type=int, default=0, help="input size (0: the architecture's)")
    p.add_argument("--products", type=int, default=16)
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--all-variants", action="store_true",
                   help="also the non-default kernel paths (torch NCHW, jax lax.conv)")
    p.add_argument("--variants", default=None, help="comma list, e.g. torch:contiguous,jax:lax")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--no-pin", action="store_true",
                   help="don't pin each worker to --threads CPUs (XLA then uses more cores "
                        "than asked)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return 0
    rep = run_all(args)
    if args.out:
        from common.io import write_json_atomic

        write_json_atomic(args.out, rep)
    if args.json:
        print(json.dumps(rep, indent=2, sort_keys=True))
    else:
        print_table(rep)
    return 0 if all("error" not in r for r in rep["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
