"""``fedcbir study`` (fedcbir/study/): argument errors, the aggregation math, determinism
with the in-process runtime, and (slow) one real study on Flower's simulation runtime."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("flwr")

from fedcbir.study import cli as st_cli  # noqa: E402
from fedcbir.study import export as st_export  # noqa: E402
from fedcbir.study import plan as st_plan  # noqa: E402
from fedcbir.study import plots as st_plots  # noqa: E402
from fedcbir.study import report as st_report  # noqa: E402
from fedcbir.study import repro as st_repro  # noqa: E402
from fedcbir.study import stats as st_stats  # noqa: E402

TINY = ["--no-device-eval", "--scratch-arm", "none", "--set", "arch=mobilenetv3-small", "--set", "lr=0.002", "--set", "bn-policy=local", "--set", "width=0.35", "--set", "input-size=32", "--set", "embedding-dim=32",
        "--set", "products-per-batch=4", "--set", "fraction-evaluate=0"]



def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("extra,needle", [
    (["--seeds", "0"], "--seeds"),
    (["--rounds", "0"], "--rounds"),
    (["--clients", "0"], "--clients"),
    (["--target-recall", "0"], "--target-recall"),
    (["--target-recall", "1.5"], "--target-recall"),
    (["--frameworks", "torch,mxnet"], "mxnet"),
    (["--frameworks", "torch,pytorch"], "twice"),
    (["--frameworks", " , "], "empty"),
    (["--partition", "dirichlet:-1"], "alpha"),
    (["--partition", "zipf"], "zipf"),
    (["--profile", "toaster9000"], "toaster9000"),
    (["--set", "seed=3"], "--seeds"),
    (["--set", "frameworks=tf"], "--frameworks"),
    (["--set", "nope=1"], "unknown run-config key"),
    (["--set", "lr=fast"], "lr"),
    (["--set", "lr"], "KEY=VALUE"),
    (["--latency-repeats", "0"], "--latency-repeats"),
])
def test_argument_errors_are_one_line(tiny_catalog, tmp_path, capsys, extra, needle):
    rc = st_cli.main(["--catalog", str(tiny_catalog), "--out", str(tmp_path / "s"), *extra])
    assert rc == 2
    assert needle in _err(capsys)
    assert not (tmp_path / "s").exists()  # nothing written before the arguments are good


def test_catalog_errors_are_one_line(tiny_catalog, tmp_path, capsys):
    assert st_cli.main(["--out", str(tmp_path / "s")]) == 2
    assert "--sample" in _err(capsys)
    assert st_cli.main(["--catalog", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert "not found" in _err(capsys)
    assert st_cli.main(["--catalog", str(tiny_catalog), "--products", "500", "--out", str(tmp_path / "s")]) == 2
    assert "not both" in _err(capsys)
    # more clients than training products: refused before any federation starts
    assert st_cli.main(["--catalog", str(tiny_catalog), "--clients", "500", "--out", str(tmp_path / "s")]) == 2
    assert "500" in _err(capsys)
    assert not (tmp_path / "s").exists()


def test_products_option_generates_a_bigger_sample_into_the_cache(tmp_path, monkeypatch):
    """--products N (for bigger machines: e.g. 10000) makes a sample of N products once, in the cache."""
    import argparse

    monkeypatch.setenv("FEDCBIR_CACHE_DIR", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    st_cli.register(parser.add_subparsers())
    args = parser.parse_args(["study", "--products", "12", "--views", "3", "--out", str(tmp_path / "s")])
    root = st_plan.resolve_catalog(args)
    assert root.parent == tmp_path / "cache" and "12x3" in root.name
    from catalog.sample import read_sample_marker

    marker = read_sample_marker(root)
    assert marker["complete"] and marker["products"] == 12 and marker["views"] == 3
    assert st_plan.resolve_catalog(args) == root  # generated once, then reused


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exc:
        st_cli.main(["study", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example: fedcbir study --sample" in out and "--runtime" in out and "--products" in out


# ----------------------------------------------------------------------------- aggregation math


def _client(fw, sim, host, rss, status="ok", up=1000, down=1000):
    return {"framework": fw, "profile": "rpi4", "status": status, "simulated_seconds": sim, "host_seconds": host,
            "process_seconds": None if host is None else host + 5.0, "peak_rss_mb": rss, "bytes_up": up, "bytes_down": down}


def _rows(recalls, fw="torch", sim=(10.0, 20.0), rss=(400.0, 500.0)):
    rows = [{"round": 0, "recall@1": recalls[0], "map@r": recalls[0], "clients": []}]
    for r, rec in enumerate(recalls[1:], 1):
        clients = [_client(fw, sim[0] * r, 1.0 * r, rss[0]), _client(fw, sim[1] * r, 2.0 * r, rss[1]),
                   _client(fw, None, None, None, status="dropped", up=0, down=1000)]
        rows.append({"round": r, "recall@1": rec, "map@r": rec / 2, "seconds": 3.0 * r,
                     "simulated_round_seconds": max(c["simulated_seconds"] or 0 for c in clients),
                     "bytes_up": sum(c["bytes_up"] for c in clients),
                     "bytes_down": sum(c["bytes_down"] for c in clients), "clients": clients})
    return rows


def test_federation_stats_on_synthetic_rows():
    rows = _rows([0.02, 0.05, 0.12, 0.08])
    s = st_stats.federation_stats(list(reversed(rows)), target=0.10)  # order does not matter
    assert s["rounds"] == 3 and s["curve"]["round"] == [0, 1, 2, 3]
    assert s["final"]["recall@1"] == 0.08 and s["final"]["map@r"] == 0.04
    assert s["initial"]["recall@1"] == 0.02 and s["best_recall@1"] == 0.12
    assert s["rounds_to_target"] == 2  # first round at or above the target, even if it falls back
    assert s["simulated_seconds_per_round"] == pytest.approx((20 + 40 + 60) / 3)
    assert s["host_seconds_per_round"] == pytest.approx((3 + 6 + 9) / 3)
    assert s["client_train_seconds"] == pytest.approx((1 + 2 + 2 + 4 + 3 + 6) / 6)  # ok clients only
    assert s["client_process_seconds"] == pytest.approx(s["client_train_seconds"] + 5.0)
    assert s["peak_rss_mb"] == 500.0
    assert s["bytes_per_round"] == 5000 and s["bytes_up_per_round"] == 2000 and s["bytes_down_per_round"] == 3000
    assert s["client_status"] == {"ok": 6, "dropped": 3}
    assert s["by_framework"]["torch"]["client_rounds_ok"] == 6
    # never reached; exactly at the target counts; round 0 counts
    assert st_stats.rounds_to_target(_rows([0.0, 0.05, 0.09]), 0.10) is None
    assert st_stats.rounds_to_target(_rows([0.0, 0.1, 0.2]), 0.10) == 1
    assert st_stats.rounds_to_target(_rows([0.3, 0.1]), 0.10) == 0
    # the fields an ok client reports (runs made by different code versions differ here)
    schema = st_stats.client_schema(rows)
    assert "peak_rss_mb" in schema and "simulated_seconds" in schema and st_stats.client_schema(rows[:1]) == ()
    # a round written twice (resume after a crash): the last line wins
    dup = _rows([0.0, 0.05]) + [dict(_rows([0.0, 0.07])[1])]
    assert st_stats.federation_stats(dup, 0.1)["final"]["recall@1"] == 0.07


def test_mean_std_and_aggregate_over_seeds():
    m = st_stats.mean_std([1.0, 2.0, 3.0, None, float("nan")])
    assert m["mean"] == 2.0 and m["std"] == pytest.approx(1.0) and m["n"] == 3  # sample std (n-1)
    assert st_stats.mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1, "values": [0.5]}
    assert st_stats.mean_std([])["mean"] is None

    per_seed = {0: st_stats.federation_stats(_rows([0.02, 0.05, 0.12]), 0.10),
                1: st_stats.federation_stats(_rows([0.04, 0.07, 0.08]), 0.10),
                2: st_stats.federation_stats(_rows([0.03, 0.11, 0.20], rss=(600.0, 700.0)), 0.10)}
    a = st_stats.aggregate(per_seed, 0.10)
    assert a["n"] == 3 and a["seeds"] == [0, 1, 2]
    finals = [0.12, 0.08, 0.20]
    mean = sum(finals) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in finals) / 2)
    assert a["final_recall@1"]["mean"] == pytest.approx(mean) and a["final_recall@1"]["std"] == pytest.approx(std)
    assert a["peak_rss_mb"]["values"] == [500.0, 500.0, 700.0]
    assert a["rounds_to_target"]["per_seed"] == [2, None, 1] and a["rounds_to_target"]["reached"] == 2
    assert a["curve"]["round"] == [0, 1, 2]
    assert a["curve"]["recall@1_mean"][1] == pytest.approx((0.05 + 0.07 + 0.11) / 3)
    assert st_report._fmt_rounds(a["rounds_to_target"]) == "2, not reached, 1 (reached in 2/3 seeds)"
    none = st_stats.aggregate({0: st_stats.federation_stats(_rows([0.0, 0.01]), 0.10),
                         1: st_stats.federation_stats(_rows([0.0, 0.02]), 0.10)}, 0.10)
    assert st_report._fmt_rounds(none["rounds_to_target"]) == "not reached (2/2 seeds)"
    assert st_report._fmt(a["final_recall@1"]) == f"{mean:.3f} ± {std:.3f}"
    assert st_report._fmt(st_stats.mean_std([0.25])) == "0.250"  # one seed: no ± shown
    # seeds with different numbers of rounds: the curve keeps the rounds all of them have
    short = st_stats.aggregate({0: st_stats.federation_stats(_rows([0.0, 0.1, 0.2]), 0.1),
                          1: st_stats.federation_stats(_rows([0.0, 0.1]), 0.1)}, 0.1)
    assert short["curve"]["round"] == [0, 1]


def test_report_and_plots_from_synthetic_numbers(tmp_path):
    """render_report / make_plots on a hand-made study (with an export section and a failed
    repeat check): tables, honest 'not reached', the tolerance and every plot."""
    results = {}
    for label, fws, recs in (("torch", ["torch"], [0.02, 0.05, 0.12]), ("tf", ["tf"], [0.02, 0.04, 0.06]),
                             ("mixed", ["torch", "tf"], [0.02, 0.05, 0.09])):
        per_seed = {s: dict(st_stats.federation_stats(_rows([r + 0.01 * s for r in recs], fw=fws[0]), 0.10),
                            wall_seconds=60.0, run_state="ran") for s in (0, 1)}
        results[label] = {"frameworks": fws, "per_seed": per_seed, "aggregate": st_stats.aggregate(per_seed, 0.10)}
    eager = {"name": "torch eager", "path": "nn.Module", "median_ms": 8.0, "p90_ms": 9.0}
    f = {"file": "model.onnx", "runtime": "onnx", "format": "onnx", "bytes": 4_000_000, "median_ms": 1.0,
         "p90_ms": 1.2, "speedup_vs_eager": 8.0, "parity": {"max_abs_diff": 2e-6, "ok": True}}
    study = {
        "command": "fedcbir study --sample --out x", "wall_seconds": 90.0, "federation_wall_seconds": 360.0,
        "settings": {"catalog": "/c", "frameworks": ["torch", "tf"], "seeds": [0, 1], "rounds": 2, "clients": 3,
                     "profiles": "rpi4", "partition": "iid", "strategy": "fedavg", "local_epochs": 1,
                     "target_recall": 0.10, "runtime": "simulation",
                     "run_config": {"width": 1.0, "input-size": 96, "embedding-dim": 128, "client-isolation": "process",
                                    "bn-policy": "local"}},
        "data": {"0": {"train_products": 240, "test_products": 60, "test_queries": 300, "partition_products": [80] * 3},
                 "1": {"train_products": 240, "test_products": 60, "test_queries": 300, "partition_products": [80] * 3}},
        "tolerance": {"runtime": "simulation", **st_repro.tolerance_for("simulation", 300)},
        "initial_weights_identical": True, "results": results,
        "export": {"frameworks": {"torch": {"route": st_export.ROUTE_TEXT["torch"], "eager": eager, "files": [f]},
                                  "tf": {"route": st_export.ROUTE_TEXT["tf"], "eager": None, "files": []}},
                   "config": {"repeats": 100, "warmup": 10, "pinned_cpus": [1], "cpu": "x"},
                   "export_wall_seconds": 120.0},
        "repeat_check": {"federation": "torch-s0", "diff": {"recall@1": 0.03, "map@r": 0.0, "weights_max_abs_diff": 3e-3,
                                                            "identical_weights": False}, "within_tolerance": False},
        "notes": ["a note"],
    }
    assert not st_repro.within_tolerance(study["repeat_check"]["diff"], study["tolerance"])
    assert st_repro.within_tolerance({"recall@1": 0.02, "map@r": 0.0, "weights_max_abs_diff": 1.0}, study["tolerance"])
    assert st_repro.tolerance_for("simulation", 20)["recall@1"] == pytest.approx(0.1)  # 2 of 20 queries
    plots = st_plots.make_plots(study, tmp_path)
    assert set(plots) == {"recall", "seconds", "rss", "latency"}
    for name in plots.values():
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    md = st_report.render_report(study, plots)
    assert "| torch | 0.125 ± 0.007 |" in md  # final recall@1 0.12 / 0.13 over two seeds
    assert "| tf |" in md and "not reached (2/2 seeds)" in md
    assert "| mixed (torch/tf) |" in md and "### Inside the mixed federation" in md
    assert "`model.onnx` (onnx) | 4.00 MB | 1.00 | 1.20 | 8.0× | max abs 2.0e-06 |" in md
    assert "**OUTSIDE tolerance**" in md and "partition-id order" in md and "300 test queries" in md
    assert "- a note" in md and "![batch-1 latency](latency.png)" in md


def test_plan_extra_arms_on_the_first_seeds_only(tmp_path):
    feds = st_plan.plan(["torch", "tf"], [0, 1, 2], tmp_path, scratch="torch", iid_mixed=True, extra_seeds=1)
    assert [f.name for f in feds] == ["torch-s0", "tf-s0", "mixed-s0", "mixed-iid-s0", "scratch-torch-s0",
                                      "torch-s1", "tf-s1", "mixed-s1", "torch-s2", "tf-s2", "mixed-s2"]
    iid = next(f for f in feds if f.label == "mixed-iid")
    assert dict(iid.overrides) == {"partition": "iid"} and iid.frameworks == "torch,tf"
    assert len(st_plan.plan(["torch", "tf"], [0, 1], tmp_path, scratch="torch", iid_mixed=True)) == 10


def test_plan_is_seed_major_with_one_mixed_federation(tmp_path):
    feds = st_plan.plan(["torch", "tf", "jax"], [0, 1], tmp_path)
    assert [f.name for f in feds] == ["torch-s0", "tf-s0", "jax-s0", "mixed-s0",
                                      "torch-s1", "tf-s1", "jax-s1", "mixed-s1"]
    assert feds[3].frameworks == "torch,tf,jax" and feds[3].run_dir == tmp_path / "runs" / "mixed-s0"
    assert [f.name for f in st_plan.plan(["tf"], [3], tmp_path)] == ["tf-s3"]  # no mixed with one framework
    assert [f.label for f in st_plan.plan(["tf", "jax"], [0], tmp_path, mixed=False)] == ["tf", "jax"]


# ----------------------------------------------------------------------------- determinism (in-process)


def test_same_seed_same_numbers_in_process(tiny_catalog, tmp_path, capsys):
    """torch only, tiny model, in-process runtime with inline clients: the same seed gives
    bit-identical weights and metrics (the stated in-process tolerance is 0), across two
    study folders and in the study's own --repeat-check; re-running reuses the runs."""
    import numpy as np

    from models.checkpoint import load_checkpoint
    from server.federation import latest_checkpoint

    common = ["--catalog", str(tiny_catalog), "--frameworks", "torch", "--seeds", "1", "--rounds", "2",
              "--clients", "3", "--partition", "iid", "--runtime", "inprocess", "--no-export",
              *TINY, "--set", "client-isolation=inline"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert st_cli.main([*common, "--repeat-check", "--out", str(a)]) == 0
    assert st_cli.main([*common, "--out", str(b)]) == 0
    sa, sb = (json.loads((d / "study.json").read_text()) for d in (a, b))
    assert sa["tolerance"]["runtime"] == "inprocess" and sa["tolerance"]["weights_max_abs_diff"] == 0.0
    rep = sa["repeat_check"]
    assert rep["within_tolerance"] and rep["diff"]["identical_weights"]
    assert rep["diff"]["recall@1"] == 0.0 and rep["diff"]["weights_max_abs_diff"] == 0.0
    pa, pb = sa["results"]["torch"]["per_seed"]["0"], sb["results"]["torch"]["per_seed"]["0"]
    assert pa["curve"] == pb["curve"] and pa["final"] == pb["final"]
    assert pa["final_weights"] == pb["final_weights"] and pa["initial_weights"] == pb["initial_weights"]
    wa = load_checkpoint(latest_checkpoint(a / "runs" / "torch-s0"))[0]
    wb = load_checkpoint(latest_checkpoint(b / "runs" / "torch-s0"))[0]
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert any(not np.array_equal(wa[k], load_checkpoint(a / "runs" / "torch-s0" / "checkpoints" / "round-0000")[0][k])
               for k in wa)  # it did train
    # the report states the tolerance; plots exist
    report = (a / "report.md").read_text()
    assert "bit-identical" in report and "within tolerance" in report
    for png in ("recall_at_1.png", "seconds_per_round.png", "peak_rss.png"):
        assert (a / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in report
    assert sa["command"].startswith("fedcbir study --catalog ") and "--runtime inprocess" in sa["command"]

    # the same --out again: every federation is reused, the numbers are unchanged
    capsys.readouterr()
    assert st_cli.main([*common, "--out", str(b)]) == 0
    assert "reusing the finished run" in capsys.readouterr().out
    sb2 = json.loads((b / "study.json").read_text())
    assert sb2["results"]["torch"]["per_seed"]["0"]["run_state"] == "reused"
    assert sb2["results"]["torch"]["per_seed"]["0"]["final"] == pb["final"]
    # other settings in the same folder: refused, one line
    capsys.readouterr()
    assert st_cli.main([*common, "--set", "lr=0.01", "--out", str(b)]) == 2
    assert "other settings" in _err(capsys)


def test_interrupted_federation_resumes_to_identical_weights(tiny_catalog, tmp_path):
    """A run folder cut during round 2 (no round-2 checkpoint, no summary) is resumed after
    round 1, not redone, and ends with the weights of the uninterrupted run."""
    common = ["--catalog", str(tiny_catalog), "--frameworks", "torch", "--seeds", "1", "--rounds", "2",
              "--clients", "2", "--partition", "iid", "--runtime", "inprocess", "--no-export",
              *TINY, "--set", "client-isolation=inline", "--out", str(tmp_path / "s")]
    assert st_cli.main(common) == 0
    before = json.loads((tmp_path / "s" / "study.json").read_text())["results"]["torch"]["per_seed"]["0"]
    run = tmp_path / "s" / "runs" / "torch-s0"
    (run / "summary.json").unlink()  # what a crash during round 2 leaves behind
    for p in (run / "checkpoints").glob("round-0002.*"):
        p.unlink()
    for p in (run / "client-state").glob("*-round-00002.npz"):
        p.unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # a cut line too
    assert st_cli.main(common) == 0
    after = json.loads((tmp_path / "s" / "study.json").read_text())["results"]["torch"]["per_seed"]["0"]
    assert after["run_state"] == "resumed" and after["curve"] == before["curve"]
    assert after["final_weights"] == before["final_weights"]


# ----------------------------------------------------------------------------- the real study (slow)


@pytest.mark.slow
def test_real_study_on_the_simulation_runtime(tiny_catalog, tmp_path):
    import importlib.util
    import time

    if not all(importlib.util.find_spec(m) for m in ("tensorflow", "jax", "torch")):
        pytest.skip("needs torch, tensorflow and jax")
    out = tmp_path / "study"
    t0 = time.perf_counter()
    assert st_cli.main(["--catalog", str(tiny_catalog), "--frameworks", "torch,tf,jax", "--seeds", "1", "--rounds", "1",
                    "--clients", "3", "--profile", "rpi4", "--partition", "iid", "--no-export", *TINY,
                    "--out", str(out)]) == 0
    print(f"study took {time.perf_counter() - t0:.0f} s")
    s = json.loads((out / "study.json").read_text())
    assert s["labels"] == ["torch", "tf", "jax", "mixed"] and sorted(s["results"]) == sorted(s["labels"])
    assert s["settings"]["runtime"] == "simulation" and s["tolerance"]["runtime"] == "simulation"
    assert s["initial_weights_identical"] is True
    initial = {lb: r["per_seed"]["0"]["initial"]["recall@1"] for lb, r in s["results"].items()}
    assert len(set(initial.values())) == 1, initial  # same init, same evaluation
    bytes_per_round = set()
    for label, r in s["results"].items():
        p = r["per_seed"]["0"]
        summary = json.loads((out / "runs" / f"{label}-s0" / "summary.json").read_text())
        assert p["final"]["recall@1"] == summary["final"]["recall@1"]
        assert p["final"]["map@r"] == summary["final"]["map@r"]
        assert p["curve"]["round"] == [0, 1] and p["client_status"] == {"ok": 3}
        assert p["simulated_seconds_per_round"] > 0 and p["host_seconds_per_round"] > 0
        assert p["peak_rss_mb"] > 50
        fws = {c for c in p["by_framework"]}
        assert fws == ({"torch", "tf", "jax"} if label == "mixed" else {label})
        assert r["aggregate"]["final_recall@1"]["mean"] == p["final"]["recall@1"]
        bytes_per_round.add(p["bytes_per_round"])
    assert len(bytes_per_round) == 1  # one canonical weight set for every framework
    report = (out / "report.md").read_text()
    for label in ("| torch |", "| tf |", "| jax |", "| mixed (torch/tf/jax) |"):
        assert label in report
    for png in ("recall_at_1.png", "seconds_per_round.png", "peak_rss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in report
    assert not (out / "latency.png").exists() and s["export"] is None
    assert "simulation runtime" in report


def test_scratch_arm_device_protocol_and_paired_statistics(tiny_catalog, tmp_path):
    """Two seeds, torch + the from-scratch arm, in process: the scratch arm runs MobileNetV3-Small,
    every final model is exported and evaluated on the device protocol (all products in the
    gallery), and the report carries the paired comparison."""
    out = tmp_path / "s"
    tiny = [a for a in TINY if a not in ("--no-device-eval",)]
    tiny[tiny.index("--scratch-arm") + 1] = "torch"
    # the pretrained arm at a small size, the scratch arm with its own settings (tiny here)
    args = ["--catalog", str(tiny_catalog), "--frameworks", "torch", "--seeds", "2", "--rounds", "1",
            "--clients", "2", "--partition", "iid", "--runtime", "inprocess", "--no-export",
            "--set", "client-isolation=inline", "--set", "max-steps=2", "--out", str(out)]
    assert st_cli.main(args + ["--set", "input-size=64", "--set", "embedding-dim=16", "--scratch-arm", "torch"]) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["labels"] == ["torch", "scratch-torch"]
    rc = json.loads((out / "runs" / "scratch-torch-s0" / "summary.json").read_text())["run_config"]
    assert rc["arch"] == "mobilenetv3-small" and rc["bn-policy"] == "local"
    for label in study["labels"]:
        for seed, p in study["results"][label]["per_seed"].items():
            d = p["device"]
            assert d["gallery"] == 24 and d["queries"] > 0 and 0.0 <= d["recall@1"] <= 1.0
        assert study["results"][label]["device"]["recall@1"]["n"] == 2
    cmp_ = study["comparisons"]["device_recall@1"]["torch-scratch-torch"]
    assert len(cmp_["differences"]) == 2 and "p_value" in cmp_
    report = (out / "report.md").read_text()
    assert "device protocol" in report and "Paired differences" in report and "Where a device's time goes" in report


def test_study_statistics():
    from fedcbir.study.stats import ci95, paired

    c = ci95([0.5, 0.6, 0.7])
    assert abs(c["mean"] - 0.6) < 1e-12 and abs(c["ci95"] - 4.302653 * 0.1 / 3 ** 0.5) < 1e-5
    assert ci95([0.4])["ci95"] is None and ci95([])["mean"] is None
    d = paired({0: 0.8, 1: 0.7, 2: 0.9}, {0: 0.5, 1: 0.45, 2: 0.6})
    assert d["significant"] and d["p_value"] < 0.05 and abs(d["mean"] - 0.2833333) < 1e-6
    same = paired({0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})
    assert same["p_value"] == 1.0 and not same["significant"]
