"""catalog-search through LiteRT (.tflite) on a real bundle exported with TFLite and ONNX.

Slow (the TFLite conversion imports TensorFlow): runs in CI with ``-m slow``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.cli import main
from test_retrieval import products_of

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runtime_bundle(tmp_path_factory, sample_catalog) -> Path:
    from export.bundle import ExportOptions, export_bundle
    from models.initial import init_weights
    from models.checkpoint import save_checkpoint
    from models.spec import ArchSpec

    tmp = tmp_path_factory.mktemp("litert")
    spec = ArchSpec(width=0.35)
    save_checkpoint(tmp / "ckpt", init_weights(spec, 0), {"arch": spec, "preprocessing": {"size": spec.input_size}})
    out = tmp / "bundle"
    export_bundle(tmp / "ckpt", out, ExportOptions(formats=("tflite", "onnx"), quantize=(),
                                                   calibration=str(sample_catalog), calibration_images=8,
                                                   parity_images=4, log=lambda m: None))
    return out


def test_litert_index_and_query_without_heavy_frameworks(two_runtime_bundle, sample_catalog, tmp_path, capsys):
    from catalog.abo import IMAGES_DIR
    from retrieval.search import Searcher

    bundle = two_runtime_bundle
    assert main(["index", "--bundle", str(bundle), "--catalog", str(sample_catalog), "--runtime", "litert",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"]["file"] == "model.tflite" and rep["images"] == 300
    p = products_of(sample_catalog)[9]
    photo = Path(sample_catalog) / IMAGES_DIR / p.other_images[0]
    report = tmp_path / "modules.json"
    code = (
        "import sys, json\n"
        "from retrieval.cli import main\n"
        f"rc = main(['query', '--bundle', {str(bundle)!r}, {str(photo)!r}, '--json'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'jax', 'jaxlib', 'keras', 'flax'))\n"
        f"open({str(report)!r}, 'w').write(json.dumps({{'rc': rc, 'heavy': heavy, 'litert': 'ai_edge_litert' in sys.modules}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(report.read_text())
    assert res == {"rc": 0, "heavy": [], "litert": True}
    top = json.loads(proc.stdout)["results"][0]["matches"][0]
    assert top["item_id"] == p.item_id and top["score"] == pytest.approx(1.0, abs=2e-3)
    # the ONNX file of the same weights may query a LiteRT-built index: same ranking
    with Searcher(bundle) as lite, Searcher(bundle, runtime="onnx") as onnx:
        assert lite.embedder.describe()["runtime"] == "litert" and onnx.embedder.describe()["runtime"] == "onnx"
        photos = [Path(sample_catalog) / IMAGES_DIR / q.other_images[1] for q in products_of(sample_catalog)[:6]]
        a, b = lite.embed_paths(photos), onnx.embed_paths(photos)
        assert abs(a - b).max() < 1e-3
        for va, vb in zip(a, b):
            assert [m.item_id for m in lite.search_vector(va, 3)] == [m.item_id for m in onnx.search_vector(vb, 3)]
