"""The ABO reader on small hand-written catalogs in the real schema, edge cases included."""
import gzip
import json

import pytest

from catalog.abo import (
    AboCatalog,
    CatalogError,
    Product,
    catalog_info,
    iter_products,
    load_products,
    pick_language,
)

IMAGES = [
    ("img0001", 256, 256, "00/0000aaaa.jpg"),
    ("img0002", 256, 200, "01/0101bbbb.jpg"),
    ("img0003", 180, 256, "02/0202cccc.jpg"),
    ("img0004", 256, 256, "03/0303dddd.jpg"),
    ("img0005", 256, 256, "04/0404eeee.jpg"),
    ("img0006", 256, 256, "05/0505ffff.jpg"),
    ("evil", 10, 10, "../../etc/passwd"),
]


def _name(*pairs):
    return [{"language_tag": t, "value": v} for t, v in pairs]


FULL = {
    "item_id": "B000000001",
    "main_image_id": "img0001",
    "other_image_id": ["img0002", "img0003", "img0001"],
    "product_type": [{"value": "CHAIR"}],
    "item_name": _name(("de_DE", "Stuhl"), ("en_GB", "Chair (GB)"), ("en_US", "Chair (US)"), ("ja_JP", "椅子")),
    "brand": _name(("de_DE", "Marke"), ("en_US", "Brand")),
    "color": [{"language_tag": "en_US", "standardized_values": ["Blue"], "value": "Navy Blue"}],
    "item_keywords": _name(("en_US", "chair"), ("en_US", "seat")),
    "bullet_point": _name(("en_US", "Comfortable")),
    "style": _name(("en_US", "Modern")),
    "material": _name(("en_US", "Wood")),
    "country": "us",
    "marketplace": "Amazon",
    "domain_name": "amazon.com",
    "node": [{"node_id": 123, "node_name": "/Furniture/Chairs"}],
    "spin_id": "abc",
    "3dmodel_id": "B000000001",
    "item_dimensions": {"height": {"unit": "inches", "value": 30}},
    "item_weight": [{"unit": "pounds", "value": 12}],
}


def write_catalog(root, listings, images=IMAGES, plain=False):
    """``listings``: {file stem: [record dict or raw line str or bytes]}."""
    (root / "images" / "metadata").mkdir(parents=True)
    (root / "listings" / "metadata").mkdir(parents=True)
    lines = ["image_id,height,width,path"] + [f"{i},{h},{w},{p}" for i, h, w, p in images]
    with gzip.open(root / "images" / "metadata" / "images.csv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    for stem, records in listings.items():
        data = b""
        for r in records:
            if isinstance(r, bytes):
                data += r + b"\n"
            elif isinstance(r, str):
                data += r.encode() + b"\n"
            else:
                data += json.dumps(r, ensure_ascii=False).encode() + b"\n"
        if plain:
            (root / "listings" / "metadata" / f"{stem}.json").write_bytes(data)
        else:
            with gzip.open(root / "listings" / "metadata" / f"{stem}.json.gz", "wb") as f:
                f.write(data)
    return root


def test_full_record(tmp_path):
    root = write_catalog(tmp_path / "c", {"listings_0": [FULL]})
    (p,) = load_products(root)
    assert p == Product(
        item_id="B000000001", product_type="CHAIR", name="Chair (US)", brand="Brand", color="Navy Blue",
        country="US", marketplace="Amazon", domain_name="amazon.com", main_image="00/0000aaaa.jpg",
        other_images=["01/0101bbbb.jpg", "02/0202cccc.jpg"],
    )
    assert p.images == ["00/0000aaaa.jpg", "01/0101bbbb.jpg", "02/0202cccc.jpg"]


def test_language_preference_chain():
    assert pick_language(_name(("fr_FR", "Chaise"), ("en_GB", "Chair GB"), ("en_IN", "Chair IN"))) == "Chair GB"
    assert pick_language(_name(("fr_FR", "Chaise"), ("en_ZA", "Chair ZA"))) == "Chair ZA"  # any en_*
    assert pick_language(_name(("de_DE", "Stuhl"), ("ja_JP", "椅子"))) == "Stuhl"  # any language
    assert pick_language(_name(("en-us", "dash tag"))) == "dash tag"
    assert pick_language(_name(("de_DE", "Stuhl"), ("ja_JP", "椅子")), ["ja_JP"]) == "椅子"
    assert pick_language("plain string") == "plain string"
    assert pick_language([{"language_tag": "en_US"}, {"value": "untagged"}]) == "untagged"
    assert pick_language([{"language_tag": "en_US", "standardized_values": ["Red"]}], standardized_fallback=True) == "Red"
    for bad in (None, 5.5j, {}, [], [None, 3.0j, {"value": None}], True):
        assert pick_language(bad) is None


def test_missing_and_wrongly_typed_fields(tmp_path):
    records = [
        {"item_id": "B1", "main_image_id": "img0001"},  # nothing else at all
        {"item_id": "B2", "main_image_id": "img0002", "item_name": {"oops": 1}, "product_type": "SOFA",
         "brand": 42, "color": [{"language_tag": "en_US", "standardized_values": ["Red"]}],
         "country": ["US"], "marketplace": None, "domain_name": {"x": 1}, "node": "nonsense",
         "other_image_id": "img0003"},
        {"item_id": "B3", "main_image_id": ["img0004"], "other_image_id": [None, 7, "img0005", {"a": 1}],
         "product_type": [{"value": None}, {"value": "LAMP"}], "item_name": _name(("de_DE", "Lampe"), ("ja_JP", "ランプ"))},
        {"item_id": 12345, "main_image_id": "img0006", "product_type": [], "item_name": []},
    ]
    root = write_catalog(tmp_path / "c", {"listings_0": records})
    ps = {p.item_id: p for p in load_products(root)}
    assert ps["B1"].name == "B1" and ps["B1"].product_type == "UNKNOWN" and ps["B1"].brand is None
    assert ps["B1"].country is None and ps["B1"].other_images == []
    b2 = ps["B2"]
    assert (b2.name, b2.product_type, b2.brand, b2.color) == ("B2", "SOFA", "42", "Red")
    assert b2.country is None and b2.marketplace is None and b2.domain_name is None
    assert b2.other_images == ["02/0202cccc.jpg"]
    b3 = ps["B3"]
    assert b3.main_image == "03/0303dddd.jpg" and b3.other_images == ["04/0404eeee.jpg"]
    assert b3.product_type == "LAMP" and b3.name == "Lampe"  # no English name: first language
    assert ps["12345"].name == "12345" and ps["12345"].product_type == "UNKNOWN"


def test_missing_images_duplicates_blank_and_malformed_lines(tmp_path):
    records = [
        FULL,
        "",
        "   ",
        '{"item_id": "B9", "main_image_id": ',  # truncated JSON
        "[1, 2, 3]",  # JSON, but not an object
        b"\xff\xfe not utf-8 \x80",
        {"main_image_id": "img0002"},  # no item id
        dict(FULL, item_name=_name(("en_US", "second copy"))),  # duplicate: first wins
        {"item_id": "B5", "main_image_id": "nope1", "other_image_id": ["nope2", "img0006"]},  # main missing
        {"item_id": "B6", "main_image_id": "nope3", "other_image_id": ["nope4"]},  # no usable image
        {"item_id": "B7", "main_image_id": "evil"},  # path escaping images/small is rejected
    ]
    root = write_catalog(tmp_path / "c", {"listings_0": records})
    cat = AboCatalog(root)
    ps = list(cat.products())
    assert [p.item_id for p in ps] == ["B000000001", "B5"]
    assert ps[0].name == "Chair (US)"
    assert ps[1].main_image is None and ps[1].other_images == ["05/0505ffff.jpg"] and ps[1].images == ["05/0505ffff.jpg"]
    s = cat.stats
    assert s.blank_lines == 2
    assert s.malformed_lines == 3
    assert s.missing_item_id == 1
    assert s.duplicates == 1
    assert s.missing_images == 5  # nope1, nope2, nope3, nope4, evil
    assert s.no_image_products == 2
    assert s.bad_image_rows == 1
    assert s.products == 2 and s.images == 4


def test_plain_json_and_gz_files_together(tmp_path):
    root = write_catalog(tmp_path / "c", {"listings_0": [FULL]})
    (root / "listings" / "metadata" / "listings_1.json").write_text(
        json.dumps({"item_id": "B2", "main_image_id": "img0004", "product_type": [{"value": "VASE"}],
                    "country": "JP", "item_name": _name(("ja_JP", "花瓶"))}, ensure_ascii=False) + "\n")
    ps = load_products(root)
    assert [p.item_id for p in ps] == ["B000000001", "B2"]
    assert ps[1].name == "花瓶"
    plain = write_catalog(tmp_path / "p", {"listings_a": [FULL]}, plain=True)
    assert [p.item_id for p in load_products(plain)] == ["B000000001"]


def test_many_files_and_streaming(tmp_path):
    listings = {f"listings_{k:x}": [dict(FULL, item_id=f"B{k}{j}") for j in range(3)] for k in range(16)}
    root = write_catalog(tmp_path / "c", listings)
    it = iter_products(root)
    first = next(it)  # a generator: products arrive before the rest is read
    assert first.item_id == "B00"
    assert len(list(it)) == 47


def test_truncated_archive_keeps_what_was_read(tmp_path):
    root = write_catalog(tmp_path / "c", {"listings_0": [dict(FULL, item_id=f"B{j}", item_name=_name(("en_US", "x" * 200)))
                                                        for j in range(200)]})
    f = root / "listings" / "metadata" / "listings_0.json.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    cat = AboCatalog(root)
    ps = list(cat.products())
    assert 0 < len(ps) < 200
    assert cat.stats.damaged_files and "listings_0.json.gz" in cat.stats.damaged_files[0]


def test_catalog_info(tmp_path):
    records = [FULL, dict(FULL, item_id="B2", country="IN", product_type=[{"value": "SOFA"}]),
               dict(FULL, item_id="B3", country=None), FULL, "not json",
               {"item_id": "B4", "main_image_id": "missing"}]
    root = write_catalog(tmp_path / "c", {"listings_0": records})
    info = catalog_info(root)
    for key in ("products", "images", "product_types", "countries", "missing_images", "duplicates", "malformed_lines"):
        assert isinstance(info[key], int), key
    assert info["products"] == 3 and info["images"] == 9
    assert info["product_types"] == 2 and info["countries"] == 3
    assert info["missing_images"] == 1 and info["duplicates"] == 1 and info["malformed_lines"] == 1
    assert info["no_image_products"] == 1
    assert info["by_product_type"] == {"CHAIR": 2, "SOFA": 1}
    assert info["by_country"] == {"IN": 1, "UNKNOWN": 1, "US": 1}
    assert info["sample"] is None
    json.dumps(info)


def test_missing_root_and_metadata_are_clear_errors(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        load_products(tmp_path / "nowhere")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CatalogError, match="not a folder"):
        catalog_info(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="images.csv.gz"):
        catalog_info(tmp_path / "empty")
    root = write_catalog(tmp_path / "nolistings", {})
    with pytest.raises(CatalogError, match="listings"):
        catalog_info(root)
    bad = write_catalog(tmp_path / "badcsv", {"listings_0": [FULL]})
    with gzip.open(bad / "images" / "metadata" / "images.csv.gz", "wt") as fh:
        fh.write("id,url\nx,y\n")
    with pytest.raises(CatalogError, match="image_id"):
        catalog_info(bad)


def test_interrupted_sample_is_not_mistaken_for_complete(tmp_path):
    root = write_catalog(tmp_path / "c", {"listings_0": [FULL]})
    (root / "fedcbir-sample.json").write_text(json.dumps({"generator": "fedcbir catalog sample", "complete": False}))
    with pytest.raises(CatalogError, match="incomplete"):
        load_products(root)
