"""``fedcbir demo``: argument errors (fast) and the whole job on a tiny catalog (slow: the real
Flower simulation runtime with torch, tf and jax clients, export, index, search, report)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedcbir.cli import main

TINY = ["--set", "arch=mobilenetv3-small", "--set", "bn-policy=local", "--set", "width=0.35", "--set", "input-size=32", "--set", "embedding-dim=32",
        "--set", "products-per-batch=4", "--set", "fraction-evaluate=0"]


@pytest.mark.parametrize("args,text", [
    (["--rounds", "0"], "must be >= 1"),
    (["--set", "num-server-rounds=3"], "use its own option (--rounds)"),
    (["--set", "frameworks=torch"], "fixed: torch,tf,jax"),
    (["--set", "nonsense=1"], "unknown run-config key"),
    (["--set", "width"], "expects KEY=VALUE"),
    (["--catalog", "/nonexistent/abo"], "does not exist"),
    (["--partition", "zipf:2"], "partition"),
])
def test_demo_refuses_bad_options_in_one_line(tmp_path, capsys, args, text):
    from catalog.sample import generate_sample

    cat = tmp_path / "cat"
    generate_sample(cat, products=12, views=3, seed=0, progress=False)
    rc = main(["demo", "--out", str(tmp_path / "d"), "--catalog", str(cat), *args])
    err = capsys.readouterr().err
    assert rc == 2 and text in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_demo_report_pieces(tmp_path):
    """The summary table and plots from metrics rows (no federation needed)."""
    from fedcbir.demo.report import _device_table, plots

    def client(fw, prof, sim, rss):
        return {"framework": fw, "profile": prof, "status": "ok", "simulated_seconds": sim, "peak_rss_mb": rss}

    rows = [{"round": 0, "recall@1": 0.1, "recall@5": 0.3, "recall@10": 0.4, "map@r": 0.1, "clients": []}]
    for r in (1, 2):
        rows.append({"round": r, "recall@1": 0.1 + r / 10, "recall@5": 0.4, "recall@10": 0.5, "map@r": 0.2,
                     "seconds": 12.0, "bytes_up": 3_000_000, "bytes_down": 3_000_000,
                     "clients": [client("torch", "rpi4", 10.0 * r, 350.0), client("tf", "rpi5", 5.0, 600.0),
                                 {"framework": "jax", "profile": "jetson-nano-cpu", "status": "dropped"}]})
    header, table = _device_table(rows)
    assert header[:2] == ["round", "recall@1"] and "jax/jetson-nano-cpu sim s" in header
    assert table[2][1] == "0.300" and table[2][4] == "20.0" and table[2][5] == "350"
    assert "dropped" in table[1]
    made = plots(rows, tmp_path)
    for name in made.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_catalog(tmp_path_factory):
    from catalog.sample import generate_sample

    root = tmp_path_factory.mktemp("democat") / "sample"
    generate_sample(root, products=30, views=4, seed=1, progress=False)
    return root


def _demo(out: Path, catalog: Path, *extra: str) -> subprocess.CompletedProcess:
    from common.flower import flower_env

    return subprocess.run([str(Path(sys.executable).parent / "fedcbir"), "demo", "--out", str(out), "--catalog",
                           str(catalog), "--rounds", "2", "--local-epochs", "1", "--queries", "3", *TINY, *extra],
                          capture_output=True, text=True, env=flower_env(), timeout=900)


@pytest.mark.slow
def test_demo_end_to_end_and_cached_rerun(tmp_path, demo_catalog):
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("tensorflow", "jax", "torch")):
        pytest.skip("needs torch, tensorflow and jax")
    out = tmp_path / "demo"
    p = _demo(out, demo_catalog)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    text = p.stdout
    assert "Traceback" not in text + p.stderr
    for stage in ("federation", "export", "index", "search"):
        assert f"== {stage} done in" in text, text
    assert re.search(r"round 2/2: 3 ok", text), text
    result = json.loads((out / "demo.json").read_text())
    rows = result["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert {c["framework"] for c in rows[1]["clients"]} == {"torch", "tf", "jax"}
    assert {c["profile"] for c in rows[1]["clients"]} == {"rpi4", "rpi5", "jetson-nano-cpu"}
    assert all(c["simulated_seconds"] > 0 and c["peak_rss_mb"] > 0 for c in rows[1]["clients"])
    assert {"model.tflite", "model.onnx", "model.pte", "model.int8.tflite"} <= set(result["bundle"]["files"])
    ev = result["search"]["eval"]
    assert ev["queries"] > 0 and 0.0 <= ev["index"]["recall@1"] <= 1.0 and ev["model"]["runtime"] == "litert"
    assert len(result["search"]["examples"]) == 3 and all(len(e["matches"]) == 5
                                                          for e in result["search"]["examples"])
    report = (out / "report.md").read_text()
    assert "recall_per_round.png" in report and "device_round_seconds.png" in report and "results.html" in report
    for png in ("recall_per_round.png", "device_round_seconds.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    page = (out / "results.html").read_text()
    assert page.count('class="row"') == 3 and page.count("data:image/jpeg;base64,") == 3 * 6
    assert "summary" in text and "report:" in text

    # a second run reuses the federation and the bundle, and updates nothing in the index
    bundle_manifest = (out / "bundle" / "model.onnx").stat().st_mtime_ns
    again = _demo(out, demo_catalog)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the finished federation" in again.stdout and "reusing the bundle" in again.stdout
    assert (out / "bundle" / "model.onnx").stat().st_mtime_ns == bundle_manifest
    assert json.loads((out / "demo.json").read_text())["stage_seconds"]["federation"] < 30

    # other settings in the same folder: refused in one line, nothing changed
    other = _demo(out, demo_catalog, "--partition", "dirichlet:0.5")
    assert other.returncode == 2 and "other settings" in other.stderr and "Traceback" not in other.stderr
    assert (out / "bundle" / "model.onnx").stat().st_mtime_ns == bundle_manifest

