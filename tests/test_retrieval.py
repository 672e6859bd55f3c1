"""catalog-search on REAL bundles: index, query, update, eval, info, bad input.

A small model (width 0.35, untrained weights) is exported once per session to an ONNX
bundle by the export package and indexed over the session's sample catalog (60
products x 5 photos). Untrained embeddings still make "find this exact photo" and
"same photo, other runtime path" exact tests; quality numbers are only range-checked.
Tests that change a bundle work on a copy.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from retrieval.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures


def _export(out: Path, embedding_dim: int, sample_catalog: Path) -> None:
    from export.bundle import ExportOptions, export_bundle
    from models.initial import init_weights
    from models.checkpoint import save_checkpoint
    from models.spec import ArchSpec

    spec = ArchSpec(width=0.35, embedding_dim=embedding_dim)
    ckpt = out.parent / f"{out.name}-ckpt"
    save_checkpoint(ckpt, init_weights(spec, 0), {"arch": spec, "preprocessing": {"size": spec.input_size}})
    export_bundle(ckpt, out, ExportOptions(formats=("onnx",), quantize=(), calibration=str(sample_catalog),
                                           calibration_images=8, parity_images=4, log=lambda m: None))


def shared_bundle(tmp_path_factory, sample_catalog, embedding_dim: int = 128, indexed: bool = False) -> Path:
    """A real ONNX bundle of a small untrained model (width 0.35), exported once per session
    (other test modules import this helper; the session's base temp folder is the cache).
    ``indexed``: a copy with an f16 index of the sample catalog. Never modify these: copy them."""
    base = tmp_path_factory.getbasetemp() / "search-bundles"
    base.mkdir(exist_ok=True)
    plain = base / f"onnx{embedding_dim}"
    if not (plain / "manifest.json").is_file():
        _export(plain, embedding_dim, sample_catalog)
    if not indexed:
        return plain
    out = base / f"onnx{embedding_dim}-indexed"
    if not (out / "manifest.json").is_file():
        tmp = base / f".onnx{embedding_dim}-indexing"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(plain, tmp)
        assert main(["index", "--bundle", str(tmp), "--catalog", str(sample_catalog), "--json"]) == 0
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def onnx_bundle(tmp_path_factory, sample_catalog) -> Path:
    """A freshly exported bundle (no index)."""
    return shared_bundle(tmp_path_factory, sample_catalog)


@pytest.fixture(scope="session")
def other_bundle(tmp_path_factory, sample_catalog) -> Path:
    """A bundle of ANOTHER model (64-d embeddings)."""
    return shared_bundle(tmp_path_factory, sample_catalog, embedding_dim=64)


@pytest.fixture(scope="session")
def indexed_bundle(tmp_path_factory, sample_catalog) -> Path:
    """The 128-d bundle + an f16 index of the sample catalog."""
    return shared_bundle(tmp_path_factory, sample_catalog, indexed=True)


@pytest.fixture
def bundle_copy(tmp_path, indexed_bundle) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(indexed_bundle, out)
    return out


@pytest.fixture
def catalog_copy(tmp_path, sample_catalog) -> Path:
    out = tmp_path / "catalog"
    shutil.copytree(sample_catalog, out)
    return out


def products_of(root):
    from catalog.abo import load_products

    return load_products(root)


def run_cli(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} | \
           {p.relative_to(folder).as_posix() + "/": "dir" for p in folder.rglob("*") if p.is_dir()}


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


# ----------------------------------------------------------------------------- index


def test_index_is_recorded_in_the_manifest_and_keeps_the_export_checks(indexed_bundle, sample_catalog):
    from export.runtime import open_bundle
    from retrieval.vectors import sha256_file
    from retrieval.store import Store

    m = manifest(indexed_bundle)
    entry = m["index"]
    assert entry["dtype"] == "f16" and entry["metric"] == "cos" and entry["ndim"] == 128
    assert entry["count"] == 300 and entry["products"] == 60 and entry["skipped"] == 0
    assert entry["model"]["file"] == "model.onnx" and entry["model"]["runtime"] == "onnx"
    assert entry["model"]["sha256"] == m["files"]["model.onnx"]["sha256"]
    assert entry["catalog"]["root"] == str(Path(sample_catalog).resolve())
    assert set(entry["files"]) == {"index", "store"}
    for rec in entry["files"].values():
        path = indexed_bundle / rec["path"]
        assert path.is_file() and path.stat().st_size == rec["bytes"] and sha256_file(path) == rec["sha256"]
    open_bundle(indexed_bundle, check="all")  # the export package's own checks still pass
    store = Store.open_readonly(indexed_bundle / entry["files"]["store"]["path"])
    try:
        keys = store.keys()
        assert len(keys) == 300 and len(set(keys)) == 300 and min(keys) >= 1
        rows = store.rows_for_keys(keys)
        by_item = {}
        for r in rows.values():
            by_item.setdefault(r.item_id, []).append(r)
        expected = {p.item_id: p for p in products_of(sample_catalog)}
        assert set(by_item) == set(expected)
        for item_id, rs in by_item.items():
            p = expected[item_id]
            assert sorted(r.path for r in rs) == sorted(p.images)
            assert [r.path for r in rs if r.is_main] == [p.main_image]
            assert rs[0].name == p.name and rs[0].product_type == p.product_type and rs[0].brand == p.brand
    finally:
        store.close()
    # nothing but the index files was added
    assert sorted(p.name for p in indexed_bundle.iterdir()) == ["index", "manifest.json", "model.onnx", "reference.npz"]


def test_index_skips_and_reports_unreadable_photos(tmp_path, onnx_bundle, catalog_copy, capsys):
    from catalog.abo import IMAGES_DIR

    products = products_of(catalog_copy)
    bad = {products[0].other_images[0]: b"", products[1].other_images[0]: b"not a jpeg at all"}
    jpeg = (catalog_copy / IMAGES_DIR / products[2].other_images[0]).read_bytes()
    bad[products[2].other_images[0]] = jpeg[: len(jpeg) // 3]
    for rel, data in bad.items():
        (catalog_copy / IMAGES_DIR / rel).write_bytes(data)
    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)
    rc, out, err = run_cli(["index", "--bundle", bundle, "--catalog", catalog_copy, "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["skipped"] == 3 and report["images"] == 297 and report["indexed_products"] == 60
    assert {s["image"] for s in report["skipped_examples"]} == set(bad)
    assert all("cannot read image" in s["reason"] for s in report["skipped_examples"])
    assert manifest(bundle)["index"]["skipped"] == 3
    # human output names them on stderr
    shutil.rmtree(bundle)
    shutil.copytree(onnx_bundle, bundle)
    rc, out, err = run_cli(["index", "--bundle", bundle, "--catalog", catalog_copy], capsys)
    assert rc == 0 and "skipped 3 unreadable photos" in err and "297 photos of 60 products" in out


# ----------------------------------------------------------------------------- query


def test_query_finds_the_product_of_an_indexed_photo(indexed_bundle, sample_catalog, capsys):
    from catalog.abo import IMAGES_DIR

    products = products_of(sample_catalog)
    p = products[5]
    photo = sample_catalog / IMAGES_DIR / p.other_images[1]
    rc, out, err = run_cli(["query", "--bundle", indexed_bundle, photo, "-k", "7", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)["results"]
    assert len(res) == 1 and res[0]["query"] == str(photo)
    matches = res[0]["matches"]
    assert len(matches) == 7
    assert len({m["item_id"] for m in matches}) == 7  # photos collapsed to products
    top = matches[0]
    assert top["item_id"] == p.item_id and top["score"] == pytest.approx(1.0, abs=2e-3)
    assert top["name"] == p.name and top["product_type"] == p.product_type and top["brand"] == p.brand
    assert top["image"] == str(Path(sample_catalog).resolve() / IMAGES_DIR / p.other_images[1])
    scores = [m["score"] for m in matches]
    assert scores == sorted(scores, reverse=True)
    for m in matches:
        assert {"item_id", "score", "name", "product_type", "image"} <= set(m)
        assert Path(m["image"]).is_file()


def test_query_type_filter_several_images_and_text_output(indexed_bundle, sample_catalog, capsys):
    from catalog.abo import IMAGES_DIR

    products = products_of(sample_catalog)
    a, b = products[0], products[1]
    photos = [sample_catalog / IMAGES_DIR / a.main_image, sample_catalog / IMAGES_DIR / b.main_image]
    wanted = b.product_type
    n_of_type = sum(p.product_type == wanted for p in products)
    rc, out, err = run_cli(["query", "--bundle", indexed_bundle, *photos, "-k", "50",
                            "--type", wanted.lower(), "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)["results"]
    assert [r["query"] for r in res] == [str(p) for p in photos]
    for r in res:
        assert len(r["matches"]) == n_of_type  # fewer of this type than k: all of them
        assert {m["product_type"] for m in r["matches"]} == {wanted}
    assert res[1]["matches"][0]["item_id"] == b.item_id
    rc, out, err = run_cli(["query", "--bundle", indexed_bundle, photos[0], "-k", "3"], capsys)
    assert rc == 0 and out.splitlines()[0] == str(photos[0]) and f"1. 1.0000  {a.item_id}" in out
    rc, out, err = run_cli(["query", "--bundle", indexed_bundle, photos[0], "--type", "SPACESHIP"], capsys)
    assert rc == 2 and err.startswith("error: no indexed products of type 'SPACESHIP'") and out == ""


@pytest.mark.parametrize("dtype", ["i8", "f32"])
def test_other_dtypes_agree_with_f16(dtype, tmp_path, onnx_bundle, indexed_bundle, sample_catalog, capsys):
    from catalog.abo import IMAGES_DIR
    from retrieval.search import Searcher

    bundle = tmp_path / dtype
    shutil.copytree(onnx_bundle, bundle)
    rc, out, err = run_cli(["index", "--bundle", bundle, "--catalog", sample_catalog, "--dtype", dtype, "--json"], capsys)
    assert rc == 0, err
    entry = manifest(bundle)["index"]
    assert entry["dtype"] == dtype
    assert set(entry["files"]) == ({"index", "store", "keys", "vectors"} if dtype == "i8" else {"index", "store"})
    photos = [sample_catalog / IMAGES_DIR / p.other_images[0] for p in products_of(sample_catalog)[:8]]
    with Searcher(indexed_bundle) as ref, Searcher(bundle) as s:
        q = s.embed_paths(photos)
        for v in q:
            a = ref.search_vector(v, 5)
            b = s.search_vector(v, 5)
            assert a[0].item_id == b[0].item_id
            # i8 re-ranks with f16 copies, f32 is exact: scores within f16 rounding of each other
            assert [m.score for m in b] == pytest.approx([m.score for m in a], abs=3e-3)
        if dtype == "i8":
            assert s.vectors.exact is not None and s.vectors.exact.vectors.dtype == np.float16
            exact = s.vectors.exact.get(np.array([b[0].key], dtype=np.uint64))[0]
            assert b[0].score == pytest.approx(float(exact @ q[-1]), abs=1e-5)


def test_query_uses_the_model_the_index_was_built_with_and_memory_maps(indexed_bundle):
    from retrieval.search import Searcher

    with Searcher(indexed_bundle) as s:
        d = s.embedder.describe()
        assert d["file"] == "model.onnx" and d["threads"] == 1
        assert s.timings["open_index_ms"] < 5000
        assert len(s.vectors) == 300
        # a viewed (memory-mapped) usearch index refuses nothing on search but is read-only
        assert s.store.writable is False


# ----------------------------------------------------------------------------- update


def _rewrite_listings(root: Path, edit) -> None:
    """Apply ``edit(list of dicts) -> list of dicts`` to all listing lines (first file gets them all)."""
    files = sorted((root / "listings" / "metadata").glob("listings_*.json.gz"))
    recs = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            recs += [json.loads(line) for line in fh if line.strip()]
        f.unlink()
    recs = edit(recs)
    with gzip.open(files[0], "wt", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")


def _image_ids(root: Path) -> dict[str, str]:
    from catalog.abo import read_image_index

    return {v: k for k, v in read_image_index(root).items()}  # path -> image id


def test_update_applies_added_removed_and_changed_listings(tmp_path, onnx_bundle, catalog_copy, capsys):
    from catalog.abo import IMAGES_DIR
    from retrieval.search import Searcher

    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)
    assert run_cli(["index", "--bundle", bundle, "--catalog", catalog_copy, "--json"], capsys)[0] == 0
    first = manifest(bundle)["index"]
    before = products_of(catalog_copy)
    removed, renamed, rephotographed = before[0], before[1], before[2]
    donor = before[3]
    ids = _image_ids(catalog_copy)

    def edit(recs):
        out = []
        for r in recs:
            if r["item_id"] == removed.item_id:
                continue
            if r["item_id"] == renamed.item_id:
                r["item_name"] = [{"language_tag": "en_US", "value": "Renamed Product"}]
            out.append(r)
        new = dict(next(r for r in recs if r["item_id"] == donor.item_id))
        new["item_id"] = "BNEWITEM01"
        new["item_name"] = [{"language_tag": "en_US", "value": "A new listing"}]
        new["main_image_id"] = ids[donor.other_images[0]]
        new["other_image_id"] = [ids[donor.other_images[1]]]
        out.append(new)
        return out

    _rewrite_listings(catalog_copy, edit)
    # one photo's content changes (same path): the product now looks like the donor's main photo
    changed_rel = rephotographed.other_images[0]
    target = catalog_copy / IMAGES_DIR / changed_rel
    target.write_bytes((catalog_copy / IMAGES_DIR / donor.main_image).read_bytes())
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10_000_000_000))
    # one photo is touched but keeps its content: not re-embedded
    touched = catalog_copy / IMAGES_DIR / rephotographed.other_images[1]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10_000_000_000))

    rc, out, err = run_cli(["index", "--bundle", bundle, "--catalog", catalog_copy, "--update", "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["status"] == "updated"
    assert rep["embedded"] == 3  # 2 photos of the new listing + 1 changed photo
    assert rep["removed_images"] == len(removed.images) + 1
    assert rep["changed_listings"] == 1 and rep["compacted"] is False
    entry = manifest(bundle)["index"]
    assert entry["count"] == 300 - len(removed.images) + 2 and entry["products"] == 60
    assert entry["generation"] != first["generation"] and entry["updated"] and entry["built"] == first["built"]
    # the previous generation's files are gone, the new ones are all there is
    assert sorted(p.name for p in (bundle / "index").iterdir()) == sorted(Path(f["path"]).name for f in entry["files"].values())
    with Searcher(bundle) as s:
        hit = s.search_paths([catalog_copy / IMAGES_DIR / removed.main_image], k=60)["results"][0]["matches"]
        assert removed.item_id not in {m["item_id"] for m in hit}
        top = s.search_paths([catalog_copy / IMAGES_DIR / renamed.main_image], k=1)["results"][0]["matches"][0]
        assert top["item_id"] == renamed.item_id and top["name"] == "Renamed Product"
        new = s.search_paths([catalog_copy / IMAGES_DIR / donor.other_images[0]], k=2)["results"][0]["matches"]
        assert {m["item_id"] for m in new} == {"BNEWITEM01", donor.item_id}
        # the changed photo now embeds as the donor's main photo: both products score ~1
        hits = s.search_paths([catalog_copy / IMAGES_DIR / donor.main_image], k=3)["results"][0]["matches"]
        assert {donor.item_id, rephotographed.item_id} <= {m["item_id"] for m in hits[:2]}
        assert min(m["score"] for m in hits[:2]) == pytest.approx(1.0, abs=2e-3)
    # a full rebuild gives the same listing -> photo mapping
    full = tmp_path / "full"
    shutil.copytree(onnx_bundle, full)
    assert run_cli(["index", "--bundle", full, "--catalog", catalog_copy, "--json"], capsys)[0] == 0
    with Searcher(bundle) as a, Searcher(full) as b:
        rows_a = {(r.item_id, r.path, r.is_main) for r in a.store.rows_for_keys(a.store.keys()).values()}
        rows_b = {(r.item_id, r.path, r.is_main) for r in b.store.rows_for_keys(b.store.keys()).values()}
        assert rows_a == rows_b
    # nothing changed since: "up to date", the bundle is untouched
    snap = tree_hashes(bundle)
    rc, out, err = run_cli(["index", "--bundle", bundle, "--catalog", catalog_copy, "--update", "--json"], capsys)
    assert rc == 0 and json.loads(out)["status"] == "up to date" and tree_hashes(bundle) == snap


def test_update_compacts_when_many_photos_are_deleted(tmp_path, onnx_bundle, catalog_copy, capsys):
    from retrieval.vectors import header

    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)
    assert run_cli(["index", "--bundle", bundle, "--catalog", catalog_copy, "--dtype", "i8", "--json"], capsys)[0] == 0
    keep = {p.item_id for p in products_of(catalog_copy)[:40]}
    _rewrite_listings(catalog_copy, lambda recs: [r for r in recs if r["item_id"] in keep])
    rc, out, err = run_cli(["index", "--bundle", bundle, "--catalog", catalog_copy, "--update", "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["compacted"] is True and rep["deleted_slots"] == 0 and rep["images"] == 200
    entry = manifest(bundle)["index"]
    meta = header(bundle / entry["files"]["index"]["path"])
    assert meta["count_present"] == 200 and meta["count_deleted"] == 0
    from retrieval.vectors import ExactVectors

    ev = ExactVectors.load(bundle / entry["files"]["keys"]["path"], bundle / entry["files"]["vectors"]["path"])
    assert len(ev.keys) == 200


def test_update_refuses_changing_dtype_or_catalog_and_needs_an_index(tmp_path, onnx_bundle, bundle_copy, catalog_copy,
                                                                     sample_catalog, capsys):
    snap = tree_hashes(bundle_copy)
    rc, out, err = run_cli(["index", "--bundle", bundle_copy, "--catalog", sample_catalog, "--update", "--dtype", "i8"], capsys)
    assert rc == 2 and "keeps the index dtype" in err
    rc, out, err = run_cli(["index", "--bundle", bundle_copy, "--catalog", catalog_copy, "--update"], capsys)
    assert rc == 2 and "was built from catalog" in err
    assert tree_hashes(bundle_copy) == snap
    fresh = tmp_path / "fresh"
    shutil.copytree(onnx_bundle, fresh)
    rc, out, err = run_cli(["index", "--bundle", fresh, "--catalog", sample_catalog, "--update"], capsys)
    assert rc == 2 and "no index to update" in err


# ----------------------------------------------------------------------------- eval and info


def test_eval_reports_recall_map_and_latency(indexed_bundle, sample_catalog, capsys):
    from catalog.dataset import CatalogSplit

    rc, out, err = run_cli(["eval", "--bundle", indexed_bundle, "--catalog", sample_catalog, "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    split = CatalogSplit.load(sample_catalog, seed=0, test_fraction=0.2)
    assert res["test_products"] == len(split.test)
    assert res["queries"] == sum(len(p.other_images) for p in split.test)
    assert res["gallery"] == 60
    for name in ("index", "exact"):
        for k in ("recall@1", "recall@5", "recall@10", "map@r", "type_precision@1"):
            assert 0.0 <= res[name][k] <= 1.0
        assert res[name]["recall@1"] <= res[name]["recall@5"] <= res[name]["recall@10"]
        assert res[name]["map@r"] == pytest.approx(res[name]["recall@1"])  # one main photo per product
    # on 60 vectors the graph search is exact
    assert res["index"] == pytest.approx(res["exact"], abs=1e-9)
    lat = res["latency_ms"]
    assert 0 < lat["search_p50"] <= lat["search_p99"] and lat["search_p50"] <= lat["query_p50"]
    rc, out, err = run_cli(["eval", "--bundle", indexed_bundle, "--catalog", sample_catalog, "--max-queries", "5"], capsys)
    assert rc == 0 and "5 query photos" in out and "R@1" in out


def test_info_describes_and_verifies(indexed_bundle, bundle_copy, onnx_bundle, capsys):
    rc, out, err = run_cli(["info", "--bundle", indexed_bundle, "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["embedding_dim"] == 128 and info["models"][0]["status"] == "ok"
    idx = info["index"]
    assert idx["status"] == "ok" and idx["count"] == 300 and sum(idx["product_types"].values()) == 60
    rc, out, err = run_cli(["info", "--bundle", indexed_bundle], capsys)
    assert rc == 0 and "status: ok" in out
    rc, out, err = run_cli(["info", "--bundle", onnx_bundle], capsys)
    assert rc == 0 and "no catalog index" in out
    store = bundle_copy / manifest(bundle_copy)["index"]["files"]["store"]["path"]
    store.write_bytes(store.read_bytes()[:-10] + b"0123456789")
    rc, out, err = run_cli(["info", "--bundle", bundle_copy, "--json"], capsys)
    assert rc == 1 and json.loads(out)["index"]["status"].startswith("damaged:")


# ----------------------------------------------------------------------------- bad input


def _big_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG of side x side pixels (tiny on disk, 400 M pixels when decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, sample_catalog):
    from catalog.abo import IMAGES_DIR

    d = tmp_path_factory.mktemp("bad")
    (d / "not_an_image.jpg").write_text("this is text, not a photo\n")
    (d / "empty.jpg").write_bytes(b"")
    jpeg = next((Path(sample_catalog) / IMAGES_DIR).rglob("*.jpg")).read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    _big_png(d / "huge.png")
    (d / "a_directory.jpg").mkdir()
    return d


@pytest.mark.parametrize("name, reason", [
    ("not_an_image.jpg", "not an image"),
    ("empty.jpg", "empty"),
    ("truncated.jpg", "damaged"),
    ("huge.png", "refusing image"),
    ("a_directory.jpg", "directory"),
    ("missing.jpg", "no such file"),
])
def test_bad_query_images_fail_with_one_line_and_leave_the_bundle(name, reason, bad_files, indexed_bundle, capsys):
    snap = tree_hashes(indexed_bundle)
    rc, out, err = run_cli(["query", "--bundle", indexed_bundle, bad_files / name, "--json"], capsys)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0] and name in lines[0]
    assert tree_hashes(indexed_bundle) == snap


def test_bundle_of_another_model_is_refused(tmp_path, other_bundle, indexed_bundle, sample_catalog, capsys):
    """An index grafted into a bundle whose model gives 64-d embeddings (the index holds 128-d)."""
    from catalog.abo import IMAGES_DIR

    graft = tmp_path / "graft"
    shutil.copytree(other_bundle, graft)
    shutil.copytree(indexed_bundle / "index", graft / "index")
    m = manifest(graft)
    m["index"] = manifest(indexed_bundle)["index"]
    (graft / "manifest.json").write_text(json.dumps(m))
    snap = tree_hashes(graft)
    photo = sample_catalog / IMAGES_DIR / products_of(sample_catalog)[0].main_image
    for args in (["query", "--bundle", graft, photo], ["index", "--bundle", graft, "--catalog", sample_catalog, "--update"],
                 ["eval", "--bundle", graft, "--catalog", sample_catalog]):
        rc, out, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "128-d" in lines[0] and "64-d" in lines[0], err
    assert tree_hashes(graft) == snap


@pytest.mark.parametrize("role", ["index", "store"])
def test_tampered_index_files_are_refused(role, bundle_copy, sample_catalog, capsys):
    from catalog.abo import IMAGES_DIR

    photo = sample_catalog / IMAGES_DIR / products_of(sample_catalog)[0].main_image
    # a good query first: the files are verified once and remembered by their stat (inode, size, mtime, ctime)
    assert run_cli(["query", "--bundle", bundle_copy, photo], capsys)[0] == 0
    path = bundle_copy / manifest(bundle_copy)["index"]["files"][role]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(data))
    snap = tree_hashes(bundle_copy)
    for args in (["query", "--bundle", bundle_copy, photo], ["index", "--bundle", bundle_copy, "--catalog",
                                                            sample_catalog, "--update"]):
        rc, out, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "sha256" in lines[0] and "damaged or was modified" in lines[0], err
    assert tree_hashes(bundle_copy) == snap


def test_missing_bundle_index_or_files(tmp_path, onnx_bundle, bundle_copy, sample_catalog, capsys):
    from catalog.abo import IMAGES_DIR

    photo = sample_catalog / IMAGES_DIR / products_of(sample_catalog)[0].main_image
    rc, out, err = run_cli(["query", "--bundle", tmp_path / "nope", photo], capsys)
    assert rc == 2 and err.startswith("error: bundle not found")
    rc, out, err = run_cli(["query", "--bundle", onnx_bundle, photo], capsys)
    assert rc == 2 and "no catalog index yet" in err
    (bundle_copy / manifest(bundle_copy)["index"]["files"]["index"]["path"]).unlink()
    rc, out, err = run_cli(["query", "--bundle", bundle_copy, photo], capsys)
    assert rc == 2 and "is missing" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run_cli(["index", "--bundle", onnx_bundle, "--catalog", tmp_path / "no-catalog"], capsys)
    assert rc == 2 and "does not exist" in err


# ----------------------------------------------------------------------------- device constraints


def test_query_does_not_import_torch_tensorflow_or_jax_and_starts_fast(indexed_bundle, sample_catalog, tmp_path):
    from catalog.abo import IMAGES_DIR

    photo = sample_catalog / IMAGES_DIR / products_of(sample_catalog)[3].main_image
    report = tmp_path / "modules.json"
    code = (
        "import sys, json, time\n"
        "t0 = time.perf_counter()\n"
        "from retrieval.cli import main\n"
        f"rc = main(['query', '--bundle', {str(indexed_bundle)!r}, {str(photo)!r}, '--json'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'jax', 'jaxlib', 'keras', 'flax'))\n"
        f"open({str(report)!r}, 'w').write(json.dumps({{'rc': rc, 'heavy': heavy, 'seconds': time.perf_counter() - t0}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(report.read_text())
    assert res["rc"] == 0 and res["heavy"] == []
    assert json.loads(proc.stdout)["results"][0]["matches"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    print(f"catalog-search query: start-up to first result {res['seconds']:.2f} s")
    assert res["seconds"] < 30  # generous: a shared 2-core machine; measured ~0.6 s when idle


def test_usearch_then_onnxruntime_import_order_is_handled():
    """usearch imported first used to crash onnxruntime's import; retrieval.index imports it first."""
    code = "from retrieval.vectors import usearch_index; usearch_index(); import onnxruntime; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_index_of_a_catalog_without_usable_photos_changes_nothing(tmp_path, onnx_bundle, catalog_copy, capsys):
    from catalog.abo import IMAGES_DIR

    for f in (catalog_copy / IMAGES_DIR).rglob("*.jpg"):
        f.write_bytes(b"")
    bundle = tmp_path / "b"
    shutil.copytree(onnx_bundle, bundle)
    snap = tree_hashes(bundle)
    rc, out, err = run_cli(["index", "--bundle", bundle, "--catalog", catalog_copy], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "none of the catalog's 300 photos could be used" in lines[0]
    assert tree_hashes(bundle) == snap


# ----------------------------------------------------------------------------- resuming an interrupted build


def _index_contents(bundle: Path) -> tuple[list, dict]:
    """(store rows in key order, {key: f16 vector bytes}) of a bundle's published index."""
    from retrieval.bundle_index import CatalogIndex

    entry = manifest(bundle)["index"]
    idx = CatalogIndex.open(bundle, entry, view=False)
    try:
        rows = [(r.key, r.item_id, r.path, r.is_main, r.file_sha256) for r in idx.store.iter_images()]
        keys = np.array([r[0] for r in rows], np.uint64)
        got = idx.vectors.index.get(keys, dtype=np.float16)
        vecs = np.stack(got) if isinstance(got, tuple) else np.asarray(got)
        return rows, {int(k): v.tobytes() for k, v in zip(keys, vecs)}
    finally:
        idx.close()


def test_killed_index_build_resumes_where_it_stopped(tmp_path, onnx_bundle, sample_catalog, capsys):
    """A real `catalog-search index` process is SIGKILLed once 6 of its 10 segments are saved;
    the rerun embeds only the rest and publishes the same index as an uninterrupted build."""
    import signal
    import time

    opts = ["--catalog", sample_catalog, "--json", "--save-every", "32", "--batch-size", "8"]
    whole = tmp_path / "whole"
    shutil.copytree(onnx_bundle, whole)
    rc, out, err = run_cli(["index", "--bundle", whole, *opts], capsys)
    assert rc == 0, err
    ref = json.loads(out)
    assert ref["resumed"] == 0 and ref["embedded_now"] == 300 and not (whole / "index" / ".work").exists()

    killed = tmp_path / "killed"
    shutil.copytree(onnx_bundle, killed)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDCBIR_INDEX_SEGMENT_PAUSE="0.4")
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "index", "--bundle", str(killed),
                             *[str(o) for o in opts]], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    work = killed / "index" / ".work"
    deadline = time.monotonic() + 180
    try:
        while len(list(work.glob("partial-*/seg-*.npz"))) < 6:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the build did not reach 60 %"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    saved = len(list(work.glob("partial-*/seg-*.npz")))
    assert 6 <= saved < 10
    assert "index" not in manifest(killed)  # nothing was published

    rc, out, err = run_cli(["index", "--bundle", killed, *opts], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["resumed"] == 32 * saved and rep["embedded_now"] == 300 - 32 * saved
    assert rep["embedded"] == ref["embedded"] == 300 and rep["images"] == ref["images"]
    assert not work.exists()  # the work folder goes once the index is published
    assert not list((killed / "index").glob(".*.tmp"))
    assert _index_contents(killed) == _index_contents(whole)


def test_interrupted_update_resumes_and_other_settings_start_over(tmp_path, onnx_bundle, catalog_copy, capsys,
                                                                  monkeypatch):
    """Ctrl-C during `--update` keeps the embedded segments; the rerun reuses them; a run with
    another batch size cannot, and removes them."""
    import retrieval.index as ri
    from catalog.abo import IMAGES_DIR

    base = tmp_path / "base"  # the same starting index for every bundle below: built once, then copied
    shutil.copytree(onnx_bundle, base)
    assert run_cli(["index", "--bundle", base, "--catalog", catalog_copy, "--json"], capsys)[0] == 0
    products = products_of(catalog_copy)
    donor = (catalog_copy / IMAGES_DIR / products[0].main_image).read_bytes()
    for rel in [rel for p in products[10:12] for rel in p.images]:  # 10 photos get new content
        f = catalog_copy / IMAGES_DIR / rel
        f.write_bytes(donor)
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10_000_000_000))

    opts = ["--catalog", catalog_copy, "--update", "--json", "--save-every", "4"]
    ref_bundle, cut, other = tmp_path / "ref", tmp_path / "cut", tmp_path / "other"
    for b in (ref_bundle, cut, other):
        shutil.copytree(base, b)
    ref = json.loads(run_cli(["index", "--bundle", ref_bundle, *opts], capsys)[1])
    assert ref["status"] == "updated" and ref["embedded_now"] == 10 == ref["embedded"]

    calls = []

    def interrupt(g):
        calls.append(g)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ri, "_segment_saved", interrupt)
    snap = manifest(cut)
    rc, out, err = run_cli(["index", "--bundle", cut, *opts], capsys)
    assert rc == 130 and manifest(cut) == snap
    assert len(list((cut / "index" / ".work").glob("partial-*/seg-*.npz"))) == 2
    monkeypatch.undo()
    rep = json.loads(run_cli(["index", "--bundle", cut, *opts], capsys)[1])
    assert rep["resumed"] == 8 and rep["embedded_now"] == 2 and rep["embedded"] == 10
    assert _index_contents(cut) == _index_contents(ref_bundle)
    assert not (cut / "index" / ".work").exists()

    # another batch size cannot reuse segments: they are removed and everything is embedded
    monkeypatch.setattr(ri, "_segment_saved", interrupt)
    calls.clear()
    assert run_cli(["index", "--bundle", other, *opts], capsys)[0] == 130
    monkeypatch.undo()
    rep = json.loads(run_cli(["index", "--bundle", other, *opts, "--batch-size", "16"], capsys)[1])
    assert rep["resumed"] == 0 and rep["embedded_now"] == 10
    assert not (other / "index" / ".work").exists()
