"""The sample-catalog generator: ABO layout, determinism, realism checks, safe overwrite."""
import csv
import gzip
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from catalog.abo import CatalogError, catalog_info, load_products
from catalog.images import load_image, to_uint8
from catalog.sample import PRODUCT_TYPES, generate_sample
from catalog.splits import retrieval_sets
from models.metrics import retrieval_metrics


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(root):
    out = []
    for f in sorted((root / "listings" / "metadata").glob("listings_*.json.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def test_same_seed_same_bytes_other_seed_other_catalog(tmp_path):
    a = generate_sample(tmp_path / "a", products=6, views=4, seed=3, progress=False)
    generate_sample(tmp_path / "b", products=6, views=4, seed=3, progress=False)
    generate_sample(tmp_path / "c", products=6, views=4, seed=4, progress=False)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert a["images"] == 24 and len([k for k in fa if k.endswith(".jpg")]) == 24
    assert fa["images/metadata/images.csv.gz"] != fc["images/metadata/images.csv.gz"]
    assert set(k for k in fa if k.endswith(".jpg")).isdisjoint(k for k in fc if k.endswith(".jpg"))
    # product i depends only on (seed, i): a smaller sample is a prefix of a larger one
    generate_sample(tmp_path / "d", products=3, views=4, seed=3, progress=False)
    assert [p.item_id for p in load_products(tmp_path / "d")] == [p.item_id for p in load_products(tmp_path / "a")][:3]


def test_layout_and_schema(sample_catalog):
    root = sample_catalog
    with gzip.open(root / "images" / "metadata" / "images.csv.gz", "rt") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["image_id", "height", "width", "path"]
    assert len(rows) == 1 + 60 * 5
    for image_id, h, w, path in rows[1:20]:
        assert len(path) == len("14/14fe8812.jpg") and path[:2] == path[3:5]
        with Image.open(root / "images" / "small" / path) as im:
            assert im.format == "JPEG" and max(im.size) == 256 and im.size == (int(w), int(h))
    shards = sorted(p.name for p in (root / "listings" / "metadata").iterdir())
    assert len(shards) >= 2 and all(n.startswith("listings_") and n.endswith(".json.gz") for n in shards)
    recs = _records(root)
    assert len(recs) == 60
    for r in recs:
        assert r["item_id"].startswith("B0") and len(r["item_id"]) == 10
        assert isinstance(r["main_image_id"], str) and len(r["other_image_id"]) == 4
        assert r["product_type"][0]["value"] in PRODUCT_TYPES
        assert all({"language_tag", "value"} <= set(e) for e in r["item_name"])
        assert r["marketplace"] == "Amazon" and r["domain_name"].startswith("amazon.")
        assert r["node"][0]["node_name"].startswith("/") and isinstance(r["node"][0]["node_id"], int)
        assert all(set(e) == {"language_tag", "value"} for e in r["item_keywords"])
    assert sum("color" in r and "standardized_values" in r["color"][0] for r in recs) >= 50
    no_english = [r for r in recs if not any(e["language_tag"].startswith("en_") for e in r["item_name"])]
    assert no_english, "some products must have no English name"
    countries = Counter(r["country"] for r in recs)
    assert countries.most_common(1)[0][0] == "US" and len(countries) >= 6


def test_reads_back_with_requested_counts(sample_catalog):
    products = load_products(sample_catalog)
    assert len(products) == 60
    assert all(p.main_image and len(p.other_images) == 4 for p in products)
    assert len({p.product_type for p in products}) == 16
    info = catalog_info(sample_catalog)
    assert (info["products"], info["images"], info["missing_images"], info["duplicates"]) == (60, 300, 0, 0)
    assert info["sample"]["complete"] is True and info["sample"]["seed"] == 0


def test_main_photo_is_centred_on_white(sample_catalog):
    for p in load_products(sample_catalog)[:10]:
        arr = np.asarray(load_image(sample_catalog / "images" / "small" / p.main_image)).astype(int)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        assert border.min() >= 235  # white around
        h, w, _ = arr.shape
        ys, xs = np.nonzero(arr.min(axis=2) < 230)  # the product: centred and large
        assert abs((ys.min() + ys.max()) / 2 - h / 2) < 0.06 * h and abs((xs.min() + xs.max()) / 2 - w / 2) < 0.06 * w
        assert max((ys.max() - ys.min()) / h, (xs.max() - xs.min()) / w) > 0.75


def test_untrained_encoder_fails_raw_pixels(sample_catalog):
    """Finding a product from another photo is not trivial: raw-pixel nearest neighbour is poor."""
    rs = retrieval_sets(load_products(sample_catalog))

    def embed(paths):
        x = np.stack([to_uint8(load_image(sample_catalog / "images" / "small" / p), 32).astype(np.float32).ravel()
                      for p in paths])
        return x - x.mean(axis=1, keepdims=True)

    m = retrieval_metrics(embed(rs.query_paths), rs.query_labels, embed(rs.gallery_paths), rs.gallery_labels)
    assert m["queries"] == 240 and m["gallery"] == 60
    assert m["recall@1"] < 0.35, m
    # ... while every catalogue photo is its own product: no two main photos are (near) identical
    g = embed(rs.gallery_paths)
    d = ((g[:, None, :] - g[None, :, :]) ** 2).mean(axis=2) + np.eye(len(g)) * 1e9
    assert d.min() > 50.0


def test_refuses_foreign_folder_replaces_previous_sample(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CatalogError, match="not empty"):
        generate_sample(foreign, products=2, views=2, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    out = tmp_path / "s"
    generate_sample(out, products=4, views=3, progress=False)
    generate_sample(out, products=2, views=2, seed=1, progress=False)
    assert catalog_info(out)["images"] == 4
    assert len(list((out / "images" / "small").rglob("*.jpg"))) == 4  # old photos are gone
    # an interrupted run (marker says incomplete) is refused by readers but may be regenerated
    marker = out / "fedcbir-sample.json"
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), complete=False)))
    with pytest.raises(CatalogError, match="incomplete"):
        load_products(out)
    generate_sample(out, products=2, views=2, progress=False)
    assert len(load_products(out)) == 2
    with pytest.raises(CatalogError):
        generate_sample(tmp_path / "x", products=0, progress=False)
    with pytest.raises(CatalogError):
        generate_sample(tmp_path / "x", views=99, progress=False)


def test_gzip_members_have_no_timestamp(sample_catalog):
    data = (sample_catalog / "images" / "metadata" / "images.csv.gz").read_bytes()
    assert data[4:8] == b"\x00\x00\x00\x00"  # mtime 0
    with gzip.open(io.BytesIO(data), "rt") as fh:
        assert fh.readline().strip() == "image_id,height,width,path"
