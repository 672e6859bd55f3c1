"""The whole device path on REAL ABO photos (tests/data/abo-real: 12 JPEGs of 3 products in
the ABO layout, CC BY 4.0, see its ATTRIBUTION.md).

* the ABO reader on the real files (products, photos, types, countries, languages);
* ``catalog-search index`` + ``query`` on the 3-product real catalog;
* ``fedcbir export`` (int8 calibration) + ``fedcbir export verify`` + ``catalog-search eval``:
  those commands split the catalog into training and test products and need at least 4
  products, so they run on the real catalog merged with the tiny sample catalog (24
  products), with a split that puts all 3 real products among the test products: their
  real photos are the verify/eval queries and gallery entries.

The model is chosen in ONE place, :func:`real_photo_weights`: the default encoder as a run
starts it (ImageNet EfficientNet-Lite0, no federated training, 128 px). Besides what holds
for any model (a catalog photo finds its own product first, results carry the catalog's
item ids, reports are complete and in range), a user's re-encoded, rotated photo of the
yoga bag that is not in the catalog must find the yoga bag first.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parent / "data" / "abo-real"

# what the listing and image files of tests/data/abo-real say (see its ATTRIBUTION.md)
EXPECTED = {
    "B074M5HPBD": dict(product_type="LIGHT_BULB", country="AU", name="AmazonBasics 6W LED bulb, bright white",
                       brand="AmazonBasics", color="Bright White", domain_name="amazon.com.au",
                       main_image="9e/9ea6992d.jpg", other_images=["dc/dcace9b5.jpg", "f5/f5047137.jpg"]),
    "B0799CK52K": dict(product_type="LUGGAGE", country="US", name="Starter Yoga Bag, Iron Grey",
                       brand="Starter", color="Iron Grey", domain_name="amazon.com",
                       main_image="25/25ffa37c.jpg",
                       other_images=["52/528c608a.jpg", "95/95f7ee92.jpg", "a8/a8a14cd2.jpg", "d8/d80a51d3.jpg"]),
    # French-only listing without a colour: the reader falls back to the one language given
    "B07GTFSCHB": dict(product_type="HEALTH_PERSONAL_CARE", country="FR", name="Solimo Vitamine E, 365 capsules",
                       brand="Solimo", color=None, domain_name="amazon.fr",
                       main_image="31/31afd5f5.jpg",
                       other_images=["32/3238d76f.jpg", "7e/7e487bec.jpg", "84/844a1cce.jpg"]),
}
ALL_PHOTOS = sorted(rel for e in EXPECTED.values() for rel in [e["main_image"], *e["other_images"]])


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.relative_to(folder).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _run(main, args, capsys):
    capsys.readouterr()  # drop what fixtures printed before
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- the ABO reader


def test_reader_parses_the_real_listings():
    from catalog.abo import AboCatalog

    cat = AboCatalog(REAL)
    products = list(cat.products())
    assert [p.item_id for p in products] == list(EXPECTED)  # file order
    for p in products:
        e = EXPECTED[p.item_id]
        got = {k: getattr(p, k) for k in e}
        assert got == e, p.item_id
        assert p.marketplace.lower() == "amazon"
        assert p.images == [e["main_image"], *e["other_images"]]
    s = cat.stats
    assert (s.products, s.images, s.missing_images, s.malformed_lines, s.duplicates, s.damaged_files) == \
           (3, 12, 0, 0, 0, [])


def test_catalog_info_on_real_photos(capsys):
    from catalog.abo import catalog_info
    from fedcbir.cli import main

    info = catalog_info(REAL)
    assert (info["products"], info["images"], info["product_types"], info["countries"]) == (3, 12, 3, 3)
    assert info["by_country"] == {"AU": 1, "FR": 1, "US": 1}
    assert info["by_product_type"] == {"HEALTH_PERSONAL_CARE": 1, "LIGHT_BULB": 1, "LUGGAGE": 1}
    assert info["missing_images"] == 0 and info["image_index_rows"] == 12
    rc, out, _ = _run(main, ["catalog", "info", REAL, "--json"], capsys)
    assert rc == 0
    cli = json.loads(out)
    assert {k: cli[k] for k in ("products", "images", "by_country", "by_product_type")} == \
           {k: info[k] for k in ("products", "images", "by_country", "by_product_type")}


def test_real_jpegs_decode_at_their_recorded_sizes():
    """Every photo decodes with the one safe loader at the size images.csv.gz records (portrait,
    landscape, a 256x52 strip) and preprocesses to a white-padded square."""
    import csv

    from catalog.abo import IMAGES_CSV, IMAGES_DIR
    from catalog.images import DEFAULT_PREPROCESS, load_image, to_uint8

    with gzip.open(REAL / IMAGES_CSV, "rt") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ALL_PHOTOS
    for rel, row in rows.items():
        img = load_image(REAL / IMAGES_DIR / rel)
        assert img.mode == "RGB" and img.size == (int(row["width"]), int(row["height"])), rel
        assert max(img.size) == 256
        arr = to_uint8(img, DEFAULT_PREPROCESS)
        s = DEFAULT_PREPROCESS.size
        assert arr.shape == (s, s, 3) and arr.dtype == np.uint8
    strip = to_uint8(load_image(REAL / IMAGES_DIR / "f5/f5047137.jpg"), DEFAULT_PREPROCESS)
    assert (strip[:5] == 255).all() and (strip[-5:] == 255).all()  # padded on white above and below


# ----------------------------------------------------------------------------- the model (ONE place)


@pytest.fixture(scope="module")
def real_photo_weights():
    """(spec, canonical weights, preprocessing) of the model every test below exports.

    THE one place to change the model of this module: the default encoder as a run starts it
    (ImageNet EfficientNet-Lite0, seeded orthogonal projection), at 128 px to keep the exports
    quick, with its own preprocessing (pad to a white square, inputs in [-1, 1])."""
    from catalog.images import Preprocess
    from models import initial
    from models.spec import preprocess_kwargs, preset

    spec = preset(input_size=128, embedding_dim=128)
    return spec, initial.init_weights(spec, 0), Preprocess(**preprocess_kwargs(spec))


# ----------------------------------------------------------------------------- catalogs, split, bundle


@pytest.fixture(scope="module")
def mixed_catalog(tmp_path_factory, tiny_catalog) -> Path:
    """The real catalog + the tiny sample catalog in one ABO root: two listing files, one
    images.csv.gz, all photos under images/small (no sample marker: it is not a sample)."""
    from catalog.abo import IMAGES_CSV, IMAGES_DIR, LISTINGS_DIR

    root = tmp_path_factory.mktemp("mixed") / "abo"
    for src in (REAL, Path(tiny_catalog)):
        for photo in sorted((src / IMAGES_DIR).rglob("*.jpg")):
            dst = root / IMAGES_DIR / photo.relative_to(src / IMAGES_DIR)
            assert not dst.exists(), f"photo path clash: {dst}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo, dst)
    rows, ids = [], set()
    for src in (REAL, Path(tiny_catalog)):
        with gzip.open(src / IMAGES_CSV, "rt") as f:
            header, *lines = f.read().splitlines()
        assert header == "image_id,height,width,path"
        for line in lines:
            image_id = line.split(",", 1)[0]
            assert image_id not in ids, f"image id clash: {image_id}"
            ids.add(image_id)
            rows.append(line)
    (root / IMAGES_CSV).parent.mkdir(parents=True)
    with gzip.open(root / IMAGES_CSV, "wt") as f:
        f.write("\n".join([header, *rows]) + "\n")
    (root / LISTINGS_DIR).mkdir(parents=True)
    shutil.copyfile(REAL / LISTINGS_DIR / "listings_0.json.gz", root / LISTINGS_DIR / "listings_0.json.gz")
    sample_listings = sorted((Path(tiny_catalog) / LISTINGS_DIR).glob("listings_*.json.gz"))
    assert len(sample_listings) == 1
    shutil.copyfile(sample_listings[0], root / LISTINGS_DIR / "listings_1.json.gz")
    return root


@pytest.fixture(scope="module")
def mixed_split(mixed_catalog):
    """(seed, test fraction, test products) of the first split, over a small fixed grid, whose
    test products include all 3 real products (the split is stratified by product type and
    each real product is alone in its type, so the default 0.2 never picks them)."""
    from catalog.abo import load_products
    from catalog.splits import split_products

    products = load_products(mixed_catalog)
    assert len(products) == 3 + 24
    for fraction in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        for seed in range(3):
            test = split_products(products, test_fraction=fraction, seed=seed).test
            if set(EXPECTED) <= {p.item_id for p in test}:
                return seed, fraction, test
    pytest.fail("no split in the grid puts all 3 real products among the test products")


@pytest.fixture(scope="module")
def real_bundle(real_photo_weights, mixed_catalog, mixed_split, tmp_path_factory) -> Path:
    """``fedcbir export`` of the model: LiteRT (fp32, fp16, int8) and ONNX (fp32, int8), int8
    calibrated on the mixed catalog's training products. Never modified: copy it."""
    from fedcbir.cli import main
    from models.checkpoint import save_checkpoint

    spec, weights, pre = real_photo_weights
    seed, fraction, _ = mixed_split
    base = tmp_path_factory.mktemp("real-bundle")
    ckpt = base / "ckpt" / "round-0000"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, weights, {"arch": spec, "preprocessing": pre.to_dict(), "framework": "torch",
                                    "round": 0, "catalog": str(mixed_catalog), "seed": seed,
                                    "test_fraction": fraction})
    out = base / "bundle"
    rc = main(["export", str(ckpt), "--out", str(out), "--formats", "tflite,onnx", "--quantize", "fp16,int8",
               "--calibration", str(mixed_catalog), "--calibration-images", "32", "--json"])
    assert rc == 0
    return out


def _indexed_copy(bundle: Path, catalog: Path, dest: Path) -> Path:
    """A copy of ``bundle`` indexed over ``catalog`` the way the device does it: the int8 LiteRT
    model and an f16 usearch index."""
    from retrieval.cli import main

    shutil.copytree(bundle, dest)
    assert main(["index", "--bundle", str(dest), "--catalog", str(catalog), "--runtime", "litert",
                 "--precision", "int8", "--dtype", "f16", "--json"]) == 0
    return dest


# ----------------------------------------------------------------------------- export + verify


def test_export_manifest_records_the_real_catalog(real_bundle, mixed_catalog, mixed_split):
    seed, fraction, test = mixed_split
    man = json.loads((real_bundle / "manifest.json").read_text())
    data = man["data"]
    assert (data["catalog"], data["chosen"], data["seed"]) == (str(mixed_catalog), "given", seed)
    assert data["test_fraction"] == pytest.approx(fraction)
    assert data["calibration"]["from"] == "training products" and 0 < data["calibration"]["images"] <= 32
    assert data["parity"]["from"] == "test products" and 0 < data["parity"]["products"] <= len(test)
    files = {p.name for p in real_bundle.iterdir()}
    assert {"model.tflite", "model.fp16.tflite", "model.int8.tflite", "model.onnx", "model.int8.onnx",
            "manifest.json"} <= files


def test_export_verify_on_real_photos(real_bundle, mixed_catalog, mixed_split, capsys):
    from fedcbir.cli import main

    seed, fraction, test = mixed_split
    before = _tree_digest(real_bundle)
    rc, out, _ = _run(main, ["export", "verify", real_bundle, "--catalog", mixed_catalog, "--json"], capsys)
    report = json.loads(out)
    assert _tree_digest(real_bundle) == before
    assert report["seed"] == seed and report["test_fraction"] == pytest.approx(fraction)
    assert report["test_products"] == len(test)
    assert report["queries"] == sum(len(p.other_images) for p in test)  # 9 of them real photos
    assert sorted(e["file"] for e in report["files"]) == sorted(
        ["model.tflite", "model.fp16.tflite", "model.int8.tflite", "model.onnx", "model.int8.onnx"])
    for e in report["files"]:
        assert 0.0 <= e["recall@1"] <= 1.0
        if e["precision"] in ("fp32", "fp16"):
            assert e["ok"], e  # the device runtimes compute the reference's function on real JPEGs
        else:  # int8: the paired rule's verdict (pass / fail / not enough queries) decides ok
            assert e["verdict"] in ("pass", "fail", "not enough queries") and e["ok"] == (e["verdict"] != "fail")
    assert rc == (0 if all(e["ok"] for e in report["files"]) else 1) and report["ok"] == (rc == 0)


# ----------------------------------------------------------------------------- catalog-search


@pytest.fixture(scope="module")
def real_index(real_bundle, tmp_path_factory) -> Path:
    """The bundle indexed over the 3-product real catalog (12 photos)."""
    return _indexed_copy(real_bundle, REAL, tmp_path_factory.mktemp("real-index") / "bundle")


def test_index_and_query_the_real_catalog(real_index, tmp_path, capsys):
    from catalog.abo import IMAGES_DIR
    from retrieval.cli import main

    before = _tree_digest(REAL)
    rc, out, _ = _run(main, ["info", "--bundle", real_index, "--json"], capsys)
    assert rc == 0
    idx = json.loads(out)["index"]
    assert (idx["status"], idx["count"], idx["products"], idx["skipped"]) == ("ok", 12, 3, 0)
    assert idx["catalog"] == {"root": str(REAL), "products": 3, "images": 12}
    assert idx["product_types"] == {"HEALTH_PERSONAL_CARE": 1, "LIGHT_BULB": 1, "LUGGAGE": 1}
    assert (idx["model"]["file"], idx["model"]["runtime"], idx["dtype"]) == ("model.int8.tflite", "litert", "f16")

    photos = [REAL / IMAGES_DIR / rel for rel in ALL_PHOTOS]
    rc, out, _ = _run(main, ["query", "--bundle", real_index, *photos, "-k", "3", "--json"], capsys)
    assert rc == 0
    results = json.loads(out)["results"]
    owner = {rel: item for item, e in EXPECTED.items() for rel in [e["main_image"], *e["other_images"]]}
    assert len(results) == 12
    for rel, res in zip(ALL_PHOTOS, results):
        matches = res["matches"]
        assert res["query"].endswith(rel)
        # three products in the catalog: each appears once, best first
        assert sorted(m["item_id"] for m in matches) == sorted(EXPECTED)
        scores = [m["score"] for m in matches]
        assert scores == sorted(scores, reverse=True) and all(-1.001 <= s <= 1.001 for s in scores)
        # the photo itself is indexed: its own product comes first at similarity ~1 (any model)
        assert matches[0]["item_id"] == owner[rel] and matches[0]["score"] == pytest.approx(1.0, abs=2e-3), rel
        assert matches[0]["image"].endswith(rel)
        e = EXPECTED[matches[0]["item_id"]]
        assert (matches[0]["name"], matches[0]["product_type"], matches[0]["brand"]) == \
               (e["name"], e["product_type"], e["brand"])

    # a user's photo that is not in the catalog: a smaller, rotated PNG re-encoding of a real photo
    from PIL import Image

    phone = tmp_path / "phone.png"
    with Image.open(REAL / IMAGES_DIR / "52/528c608a.jpg") as im:
        im.convert("RGB").resize((180, 200)).rotate(8, expand=True, fillcolor=(255, 255, 255)).save(phone)
    rc, out, _ = _run(main, ["query", "--bundle", real_index, phone, "-k", "5", "--json"], capsys)
    assert rc == 0
    matches = json.loads(out)["results"][0]["matches"]
    assert sorted(m["item_id"] for m in matches) == sorted(EXPECTED)  # k=5 > 3 products: all of them
    # the pretrained encoder recognises the product in a photo the catalog does not hold
    assert matches[0]["item_id"] == "B0799CK52K", matches
    rc, out, _ = _run(main, ["query", "--bundle", real_index, phone, "--type", "LUGGAGE", "--json"], capsys)
    assert rc == 0
    assert [m["item_id"] for m in json.loads(out)["results"][0]["matches"]] == ["B0799CK52K"]
    assert _tree_digest(REAL) == before  # the test data is only read


def test_eval_with_real_query_photos(real_bundle, mixed_catalog, mixed_split, tmp_path, capsys):
    """catalog-search eval on the mixed catalog: the real products are test products, so their
    9 non-main photos are among the queries and their main photos in the gallery of all 27."""
    from retrieval.cli import main

    seed, fraction, test = mixed_split
    bundle = _indexed_copy(real_bundle, mixed_catalog, tmp_path / "bundle")
    rc, out, _ = _run(main, ["eval", "--bundle", bundle, "--catalog", mixed_catalog, "--seed", seed,
                             "--test-fraction", fraction, "--json"], capsys)
    assert rc == 0
    res = json.loads(out)
    assert res["test_products"] == len(test) and res["gallery"] == 27
    assert res["queries"] == sum(len(p.other_images) for p in test) and res["skipped_count"] == 0
    assert res["model"]["runtime"] == "litert" and res["model"]["precision"] == "int8"
    assert res["index_dtype"] == "f16"
    for how in ("index", "exact"):
        m = res[how]
        assert 0.0 <= m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1.0, m
        assert m["map@r"] == pytest.approx(m["recall@1"])  # one gallery photo per product: R = 1
        assert 0.0 <= m["type_precision@1"] <= 1.0
    lat = res["latency_ms"]
    assert 0 <= lat["search_p50"] <= lat["query_p50"] and lat["query_p50"] <= lat["query_p99"]
    # the human-readable report prints the same numbers
    rc, out, _ = _run(main, ["eval", "--bundle", bundle, "--catalog", mixed_catalog, "--seed", seed,
                             "--test-fraction", fraction], capsys)
    assert rc == 0 and f"{res['queries']} query photos of {res['test_products']} test products" in out
