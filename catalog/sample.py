"""The built-in sample catalog: a deterministic, synthetic product catalog in the ABO layout.

``generate_sample(out, products, views, seed)`` writes exactly what the real ABO
archives unpack to (``images/metadata/images.csv.gz``, ``images/small/xx/xxxxxxxx.jpg``,
``listings/metadata/listings_<hex>.json.gz`` with the ABO JSON schema), so every tool
runs the code path real data takes.

What is in it: products of 16 types, each an instance with its own palette, print
(stripes, dots, checks, ...), proportions and details, photographed ``views`` times.
The main photo is frontal, centred, on white (like ABO's main images); the other
photos change viewpoint (perspective, rotation, mirror, a turned pose), scale,
position and crop, lighting (brightness, contrast, colour cast, side light, blur,
sensor noise) and background (solid, gradient, textures, simple room scenes with
other objects, or white). Products of one type differ only by their instance
attributes, so finding a product from another photo of it is a real task.

Listings come from 13 marketplaces with skewed sizes (US largest, then IN, GB, DE,
JP, ...), local language tags (some products have no English name) and a product-type
mix that differs by country, so a natural split by country is non-IID.

Determinism: the same ``(seed, products, views)`` gives byte-identical metadata and
images on the same Pillow/libjpeg build (fixed JPEG quality, gzip mtime 0). Product
``i`` depends only on ``(seed, i)``, so a smaller sample is a prefix of a larger one.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from catalog import _shapes as shapes
from catalog._scenes import Banks, compose_photo
from catalog.abo import IMAGES_CSV, IMAGES_DIR, LISTINGS_DIR, SAMPLE_MARKER, CatalogError, read_sample_marker
from common.io import atomic_path, write_json_atomic
from common.progress import progress_bar

GENERATOR = "fedcbir catalog sample"
FORMAT_VERSION = 1
JPEG_QUALITY = 90
MAX_PRODUCTS = 1_000_000
MAX_VIEWS = 16

# ----------------------------------------------------------------------------- tables

# product type → slots per block of 22 products (a mild skew, like ABO's)
TYPE_SLOTS: dict[str, int] = {
    "CELLULAR_PHONE_CASE": 3, "CHAIR": 2, "SHOES": 2, "TABLE": 2, "PILLOW": 2, "SOFA": 1, "LAMP": 1, "MUG": 1,
    "BOTTLE": 1, "BACKPACK": 1, "BOOK": 1, "VASE": 1, "CLOCK": 1, "HEADPHONES": 1, "BOWL": 1, "RUG": 1,
}
PRODUCT_TYPES = tuple(TYPE_SLOTS)
_BLOCK = [t for t, k in TYPE_SLOTS.items() for _ in range(k)]

# (country, weight, domain, local language tag, English tag for bilingual listings, P(English name))
COUNTRIES: tuple[tuple[str, float, str, str, str, float], ...] = (
    ("US", 38.0, "amazon.com", "en_US", "en_US", 1.0),
    ("IN", 14.0, "amazon.in", "en_IN", "en_IN", 1.0),
    ("GB", 10.0, "amazon.co.uk", "en_GB", "en_GB", 1.0),
    ("DE", 8.0, "amazon.de", "de_DE", "en_GB", 0.35),
    ("JP", 7.0, "amazon.co.jp", "ja_JP", "en_US", 0.25),
    ("CA", 5.0, "amazon.ca", "en_CA", "en_CA", 1.0),
    ("FR", 4.0, "amazon.fr", "fr_FR", "en_GB", 0.3),
    ("IT", 4.0, "amazon.it", "it_IT", "en_GB", 0.3),
    ("ES", 3.0, "amazon.es", "es_ES", "en_GB", 0.3),
    ("MX", 2.5, "amazon.com.mx", "es_MX", "en_US", 0.3),
    ("AU", 2.0, "amazon.com.au", "en_AU", "en_AU", 1.0),
    ("AE", 1.5, "amazon.ae", "en_AE", "en_AE", 1.0),
    ("SG", 1.0, "amazon.sg", "en_SG", "en_SG", 1.0),
)


def _country_given_type() -> np.ndarray:
    """P(country | type): a fixed random type/country affinity, balanced (Sinkhorn) so that
    the country shares stay the weights above and the type shares stay TYPE_SLOTS."""
    affinity = np.random.default_rng(7919).lognormal(0.0, 0.7, size=(len(PRODUCT_TYPES), len(COUNTRIES)))
    type_w = np.array([TYPE_SLOTS[t] for t in PRODUCT_TYPES], np.float64)
    type_w /= type_w.sum()
    country_w = np.array([c[1] for c in COUNTRIES], np.float64)
    country_w /= country_w.sum()
    joint = affinity * type_w[:, None] * country_w[None, :]
    for _ in range(200):
        joint *= (type_w / joint.sum(axis=1))[:, None]
        joint *= (country_w / joint.sum(axis=0))[None, :]
    return joint / joint.sum(axis=1, keepdims=True)


_COUNTRY_GIVEN_TYPE = _country_given_type()

LANGS = ("en", "de", "fr", "it", "es", "ja")
NOUNS: dict[str, tuple[str, ...]] = {
    "MUG": ("Coffee Mug", "Kaffeebecher", "Mug à café", "Tazza da caffè", "Taza de café", "マグカップ"),
    "BOTTLE": ("Water Bottle", "Trinkflasche", "Gourde", "Borraccia", "Botella de agua", "水筒"),
    "CHAIR": ("Dining Chair", "Esszimmerstuhl", "Chaise de salle à manger", "Sedia da pranzo", "Silla de comedor", "ダイニングチェア"),
    "TABLE": ("Coffee Table", "Couchtisch", "Table basse", "Tavolino", "Mesa de centro", "センターテーブル"),
    "LAMP": ("Table Lamp", "Tischlampe", "Lampe de table", "Lampada da tavolo", "Lámpara de mesa", "テーブルランプ"),
    "SOFA": ("Sofa", "Sofa", "Canapé", "Divano", "Sofá", "ソファ"),
    "SHOES": ("Sneakers", "Turnschuhe", "Baskets", "Scarpe da ginnastica", "Zapatillas", "スニーカー"),
    "BACKPACK": ("Backpack", "Rucksack", "Sac à dos", "Zaino", "Mochila", "リュックサック"),
    "BOOK": ("Hardcover Notebook", "Notizbuch", "Carnet", "Quaderno", "Cuaderno", "ノート"),
    "VASE": ("Flower Vase", "Blumenvase", "Vase à fleurs", "Vaso per fiori", "Jarrón", "花瓶"),
    "CLOCK": ("Wall Clock", "Wanduhr", "Horloge murale", "Orologio da parete", "Reloj de pared", "掛け時計"),
    "HEADPHONES": ("Over-Ear Headphones", "Kopfhörer", "Casque audio", "Cuffie", "Auriculares", "ヘッドホン"),
    "PILLOW": ("Throw Pillow", "Zierkissen", "Coussin", "Cuscino", "Cojín", "クッション"),
    "BOWL": ("Serving Bowl", "Schüssel", "Saladier", "Ciotola", "Cuenco", "ボウル"),
    "CELLULAR_PHONE_CASE": ("Phone Case", "Handyhülle", "Coque de téléphone", "Cover per cellulare", "Funda para móvil", "スマホケース"),
    "RUG": ("Area Rug", "Teppich", "Tapis", "Tappeto", "Alfombra", "ラグ"),
}
PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("Solid", "Uni", "Uni", "Tinta unita", "Liso", "無地"),
    "stripes": ("Striped", "Gestreift", "Rayé", "A righe", "De rayas", "ストライプ"),
    "dots": ("Polka Dot", "Gepunktet", "À pois", "A pois", "De lunares", "水玉"),
    "checker": ("Checked", "Kariert", "À carreaux", "A quadri", "De cuadros", "チェック"),
    "gradient": ("Ombre", "Farbverlauf", "Dégradé", "Sfumato", "Degradado", "グラデーション"),
    "plaid": ("Plaid", "Schottenkaro", "Tartan", "Scozzese", "Escocés", "タータン"),
    "chevron": ("Chevron", "Zickzack", "Chevrons", "Chevron", "Zigzag", "シェブロン"),
    "bands": ("Color Block", "Blockfarben", "Color block", "Color block", "Bloques de color", "カラーブロック"),
    "speckle": ("Speckled", "Gesprenkelt", "Moucheté", "Maculato", "Moteado", "スペックル"),
}
COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "Black": ("Black", "Schwarz", "Noir", "Nero", "Negro", "ブラック"),
    "White": ("White", "Weiß", "Blanc", "Bianco", "Blanco", "ホワイト"),
    "Grey": ("Grey", "Grau", "Gris", "Grigio", "Gris", "グレー"),
    "Red": ("Red", "Rot", "Rouge", "Rosso", "Rojo", "レッド"),
    "Orange": ("Orange", "Orange", "Orange", "Arancione", "Naranja", "オレンジ"),
    "Yellow": ("Yellow", "Gelb", "Jaune", "Giallo", "Amarillo", "イエロー"),
    "Green": ("Green", "Grün", "Vert", "Verde", "Verde", "グリーン"),
    "Blue": ("Blue", "Blau", "Bleu", "Blu", "Azul", "ブルー"),
    "Purple": ("Purple", "Lila", "Violet", "Viola", "Morado", "パープル"),
    "Pink": ("Pink", "Rosa", "Rose", "Rosa", "Rosa", "ピンク"),
    "Brown": ("Brown", "Braun", "Marron", "Marrone", "Marrón", "ブラウン"),
    "Beige": ("Beige", "Beige", "Beige", "Beige", "Beige", "ベージュ"),
}
COLOR_ADJ = ("Deep", "Bright", "Soft", "Dusty", "Classic", "Midnight", "Pale", "Rich", "Muted", "Vivid")
MATERIALS: dict[str, tuple[str, ...]] = {
    "MUG": ("Ceramic", "Stoneware", "Porcelain", "Enamel"), "BOTTLE": ("Stainless Steel", "Glass", "Tritan"),
    "CHAIR": ("Wood", "Metal", "Plastic", "Velvet"), "TABLE": ("Wood", "Engineered Wood", "Metal", "Marble"),
    "LAMP": ("Metal", "Fabric", "Ceramic"), "SOFA": ("Polyester", "Velvet", "Linen", "Leather"),
    "SHOES": ("Mesh", "Leather", "Canvas", "Synthetic"), "BACKPACK": ("Nylon", "Polyester", "Canvas"),
    "BOOK": ("Paper", "Cardboard", "Faux Leather"), "VASE": ("Ceramic", "Glass", "Porcelain"),
    "CLOCK": ("Plastic", "Metal", "Wood"), "HEADPHONES": ("Plastic", "Aluminium", "Faux Leather"),
    "PILLOW": ("Cotton", "Polyester", "Velvet", "Linen"), "BOWL": ("Ceramic", "Melamine", "Stoneware", "Bamboo"),
    "CELLULAR_PHONE_CASE": ("Silicone", "TPU", "Polycarbonate", "Leather"), "RUG": ("Wool", "Polypropylene", "Jute", "Cotton"),
}
STYLES = ("Modern", "Classic", "Minimalist", "Scandinavian", "Industrial", "Bohemian", "Contemporary", "Retro")
NODES: dict[str, str] = {
    "MUG": "/Home & Kitchen/Kitchen & Dining/Cups, Mugs & Saucers/Mugs",
    "BOTTLE": "/Sports & Outdoors/Accessories/Water Bottles",
    "CHAIR": "/Home & Kitchen/Furniture/Dining Room Furniture/Chairs",
    "TABLE": "/Home & Kitchen/Furniture/Living Room Furniture/Tables/Coffee Tables",
    "LAMP": "/Tools & Home Improvement/Lighting/Lamps/Table Lamps",
    "SOFA": "/Home & Kitchen/Furniture/Living Room Furniture/Sofas & Couches",
    "SHOES": "/Clothing, Shoes & Jewelry/Shoes/Fashion Sneakers",
    "BACKPACK": "/Clothing, Shoes & Jewelry/Luggage & Travel Gear/Backpacks",
    "BOOK": "/Office Products/Paper/Notebooks & Writing Pads",
    "VASE": "/Home & Kitchen/Home Décor/Vases",
    "CLOCK": "/Home & Kitchen/Home Décor/Clocks/Wall Clocks",
    "HEADPHONES": "/Electronics/Headphones/Over-Ear Headphones",
    "PILLOW": "/Home & Kitchen/Bedding/Decorative Pillows",
    "BOWL": "/Home & Kitchen/Kitchen & Dining/Dining & Entertaining/Bowls",
    "CELLULAR_PHONE_CASE": "/Cell Phones & Accessories/Cases, Holsters & Sleeves/Basic Cases",
    "RUG": "/Home & Kitchen/Home Décor/Area Rugs, Runners & Pads/Area Rugs",
}
# rough real-world size ranges in inches: (length, width, height) lows and highs
DIMENSIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "MUG": ((3, 3, 3.5), (5, 4, 5)), "BOTTLE": ((2.5, 2.5, 8), (3.5, 3.5, 12)), "CHAIR": ((16, 17, 30), (22, 22, 40)),
    "TABLE": ((30, 18, 15), (55, 30, 20)), "LAMP": ((8, 8, 15), (14, 14, 28)), "SOFA": ((60, 30, 30), (90, 40, 38)),
    "SHOES": ((10, 4, 4), (13, 5, 8)), "BACKPACK": ((11, 5, 16), (14, 8, 20)), "BOOK": ((5, 0.5, 8), (7, 1, 10)),
    "VASE": ((4, 4, 8), (8, 8, 16)), "CLOCK": ((10, 1.5, 10), (16, 2, 16)), "HEADPHONES": ((6, 3, 7), (8, 4, 9)),
    "PILLOW": ((16, 5, 16), (22, 7, 22)), "BOWL": ((6, 6, 2.5), (12, 12, 5)), "CELLULAR_PHONE_CASE": ((5.8, 2.8, 0.4), (6.8, 3.4, 0.6)),
    "RUG": ((48, 24, 0.3), (120, 96, 0.8)),
}
_SYLLABLES = ("ko", "ra", "vi", "mo", "ta", "len", "sa", "ber", "lu", "na", "dex", "fi", "zo", "ar", "mi", "tro",
              "ve", "li", "pa", "quin", "do", "ri", "sun", "hal", "ny", "ox", "ka", "el", "bo", "tix")


def standard_color(c: tuple[int, int, int]) -> str:
    """The ABO-style standardized colour name of an RGB colour."""
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in c))
    deg = h * 360
    if v < 0.2:
        return "Black"
    if s < 0.14:
        return "White" if v > 0.85 else "Grey"
    if 20 <= deg < 50 and s < 0.4 and v > 0.7:
        return "Beige"
    if 10 <= deg < 45 and v < 0.6:
        return "Brown"
    if (deg >= 300 or deg < 15) and s < 0.5 and v > 0.65:
        return "Pink"
    if deg < 15 or deg >= 340:
        return "Red"
    if deg < 45:
        return "Orange"
    if deg < 70:
        return "Yellow"
    if deg < 170:
        return "Green"
    if deg < 255:
        return "Blue"
    if deg < 300:
        return "Purple"
    return "Pink"


# ----------------------------------------------------------------------------- ids


def _digest(text: str, n: int = 16) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=n).digest()


_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_B64 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+-"


def _encode(data: bytes, alphabet: str, n: int) -> str:
    v = int.from_bytes(data, "big")
    out = []
    for _ in range(n):
        v, k = divmod(v, len(alphabet))
        out.append(alphabet[k])
    return "".join(out)


class _Ids:
    """Unique ABO-looking ids: item ids ``B0xxxxxxxx``, image ids like ``81iZlv3bjp+L``, 8-hex paths."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.items: set[str] = set()
        self.images: set[str] = set()
        self.paths: set[str] = set()

    def _unique(self, make, used: set[str]) -> str:
        salt = 0
        while True:
            value = make(salt)
            if value not in used:
                used.add(value)
                return value
            salt += 1

    def item(self, i: int) -> str:
        return self._unique(lambda s: "B0" + _encode(_digest(f"item:{self.seed}:{i}:{s}"), _B36, 8), self.items)

    def image(self, i: int, v: int) -> str:
        def make(s: int) -> str:
            d = _digest(f"image:{self.seed}:{i}:{v}:{s}")
            return "5678"[d[0] % 4] + _encode(d[1:], _B64, 9) + "L"

        return self._unique(make, self.images)

    def path(self, image_id: str) -> str:
        def make(s: int) -> str:
            h = _digest(f"path:{image_id}:{s}", 4).hex()
            return f"{h[:2]}/{h}.jpg"

        return self._unique(make, self.paths)


u = shapes.u

# ----------------------------------------------------------------------------- listings


def _lang_index(tag: str) -> int:
    return LANGS.index(tag.split("_")[0])


def _brands(seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 31337])
    out: list[str] = []
    while len(out) < 48:
        name = "".join(shapes.pick(rng, _SYLLABLES) for _ in range(int(rng.integers(2, 4)))).capitalize()
        if name not in out:
            out.append(name)
    return out


def _measure(value: float, unit: str) -> dict[str, Any]:
    value = round(value, 2)
    return {"normalized_value": {"unit": unit, "value": value}, "unit": unit, "value": value}


def _listing(rng: np.random.Generator, item_id: str, ptype: str, country: tuple, brand: str, pal: shapes.Palette,
             main_id: str, other_ids: list[str], image_index: int) -> dict[str, Any]:
    code, _w, domain, local_tag, en_tag, p_en = country
    tags = [local_tag]
    if not local_tag.startswith("en_") and rng.random() < p_en:
        tags.append(en_tag)
    std = standard_color(pal.primary)
    std2 = standard_color(pal.secondary)
    adj = shapes.pick(rng, COLOR_ADJ)
    material = shapes.pick(rng, MATERIALS[ptype])

    def name_in(tag: str) -> str:
        k = _lang_index(tag)
        noun, pat, col = NOUNS[ptype][k], PATTERN_WORDS[pal.pattern][k], COLOR_WORDS[std][k]
        if k == 0:
            return f"{brand} {pat} {noun}, {adj} {col}" + (f" and {std2}" if pal.pattern != "solid" and std2 != std else "")
        if k == 5:
            return f"{brand} {noun} {col} {pat}"
        return f"{brand} {noun} {pat} {col}"

    def multi(fn) -> list[dict[str, str]]:
        return [{"language_tag": t, "value": fn(t)} for t in tags]

    rec: dict[str, Any] = {"item_id": item_id, "domain_name": domain, "marketplace": "Amazon", "country": code}
    if rng.random() < 0.95:
        rec["brand"] = [{"language_tag": t, "value": brand} for t in tags]
    rec["item_name"] = multi(name_in)
    if rng.random() < 0.97:
        color_value = f"{adj} {std}" + (f" & {std2}" if pal.pattern != "solid" and std2 != std else "")
        rec["color"] = [{"language_tag": tags[0], "standardized_values": [std], "value": color_value}]
    rec["product_type"] = [{"value": ptype}]
    rec["material"] = [{"language_tag": tags[0], "value": material}]
    rec["style"] = [{"language_tag": tags[0], "value": shapes.pick(rng, STYLES)}]
    kw = []
    for t in tags:
        k = _lang_index(t)
        kw += [{"language_tag": t, "value": NOUNS[ptype][k].lower()},
               {"language_tag": t, "value": PATTERN_WORDS[pal.pattern][k].lower()},
               {"language_tag": t, "value": COLOR_WORDS[std][k].lower()}]
    rec["item_keywords"] = kw
    if tags[-1].startswith("en_"):
        rec["bullet_point"] = [
            {"language_tag": tags[-1], "value": f"{PATTERN_WORDS[pal.pattern][0]} design in {adj.lower()} {std.lower()}"},
            {"language_tag": tags[-1], "value": f"Made of {material.lower()}"},
        ]
    rec["model_number"] = [{"value": f"{brand[:3].upper()}-{image_index:05d}"}]
    rec["node"] = [{"node_id": int.from_bytes(_digest(NODES[ptype], 4), "big") % 3_000_000_000 + 1_000_000,
                    "node_name": NODES[ptype]}]
    lo, hi = DIMENSIONS[ptype]
    if rng.random() < 0.8:
        dims = [u(rng, a, b) for a, b in zip(lo, hi)]
        rec["item_dimensions"] = {"height": _measure(dims[2], "inches"), "length": _measure(dims[0], "inches"),
                                  "width": _measure(dims[1], "inches")}
    if rng.random() < 0.6:
        rec["item_weight"] = [_measure(u(rng, 0.2, 3.0) * (1 + 15 * (ptype in ("SOFA", "TABLE", "CHAIR"))), "pounds")]
    rec["main_image_id"] = main_id
    rec["other_image_id"] = list(other_ids)
    if rng.random() < 0.04:
        rec["spin_id"] = _digest(f"spin:{item_id}", 16).hex()[:32]
    if rng.random() < 0.02:
        rec["3dmodel_id"] = item_id
    return rec


# ----------------------------------------------------------------------------- writer


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CatalogError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        marker = read_sample_marker(out)
        if marker is None or marker.get("generator") != GENERATOR:
            raise CatalogError(f"refusing to write into {out}: the folder is not empty and is not a fedcbir "
                               "sample catalog (choose an empty or new folder)")
        # a previous (possibly interrupted) sample: remove exactly what the generator writes
        for sub in ("images", "listings"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
        (out / SAMPLE_MARKER).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def _write_atomic(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def generate_sample(out: str | Path, products: int = 300, views: int = 6, seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Write a sample catalog to ``out`` and return its statistics.

    Refuses a non-empty folder unless it holds a previous sample (which is replaced).
    Images are written first; listings, ``images.csv.gz`` and the marker file are written
    last, each by rename, and the marker says ``complete`` only at the very end.
    """
    for name, value, lo, hi in (("products", products, 1, MAX_PRODUCTS), ("views", views, 1, MAX_VIEWS)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise CatalogError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CatalogError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    _prepare_out(out)
    marker = {"generator": GENERATOR, "format": FORMAT_VERSION, "seed": seed, "products": products,
              "views": views, "complete": False}
    write_json_atomic(out / SAMPLE_MARKER, marker)

    t0 = time.perf_counter()
    banks = Banks(seed)
    brands = _brands(seed)
    brand_p = 1.0 / np.arange(1, len(brands) + 1) ** 0.8
    brand_p /= brand_p.sum()
    ids = _Ids(seed)
    images_root = out / IMAGES_DIR
    made_dirs: set[str] = set()
    rows: list[tuple[str, int, int, str]] = []
    n_shards = min(16, max(1, -(-products // 40)))
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    type_counts: dict[str, int] = {}
    country_counts: dict[str, int] = {}

    bar = progress_bar(progress)
    task = bar.add_task("generating sample catalog", total=products) if bar else None
    try:
        if bar:
            bar.start()
        for i in range(products):
            block = i // len(_BLOCK)
            order = np.random.default_rng([seed, block, 4]).permutation(len(_BLOCK))
            ptype = _BLOCK[int(order[i % len(_BLOCK)])]
            cw = _COUNTRY_GIVEN_TYPE[PRODUCT_TYPES.index(ptype)]
            country = COUNTRIES[int(np.random.default_rng([seed, i, 5]).choice(len(COUNTRIES), p=cw))]
            pal = shapes.Palette(np.random.default_rng([seed, i, 1]))
            shape_seed = [seed, i, 2]
            sprites = [shapes.render_product(ptype, shape_seed, pal, 0.0)]
            if shapes.DRAWERS[ptype][3] and views > 1:
                sprites.append(shapes.render_product(ptype, shape_seed, pal, 1.0))
            bboxes = [sp.getchannel("A").getbbox() or (0, 0, shapes.SPRITE, shapes.SPRITE) for sp in sprites]

            item_id = ids.item(i)
            image_ids = []
            for v in range(views):
                photo = compose_photo(sprites, bboxes, None if v == 0 else np.random.default_rng([seed, i, 10 + v]), banks)
                image_id = ids.image(i, v)
                rel = ids.path(image_id)
                sub = rel[:2]
                if sub not in made_dirs:
                    (images_root / sub).mkdir(parents=True, exist_ok=True)
                    made_dirs.add(sub)
                photo.save(images_root / rel, "JPEG", quality=JPEG_QUALITY)
                rows.append((image_id, photo.height, photo.width, rel))
                image_ids.append(image_id)

            lrng = np.random.default_rng([seed, i, 3])
            brand = brands[int(lrng.choice(len(brands), p=brand_p))]
            rec = _listing(lrng, item_id, ptype, country, brand, pal, image_ids[0], image_ids[1:], i)
            shards[i * n_shards // products].append(json.dumps(rec, ensure_ascii=False))
            type_counts[ptype] = type_counts.get(ptype, 0) + 1
            country_counts[country[0]] = country_counts.get(country[0], 0) + 1
            if bar:
                bar.advance(task)
    finally:
        if bar:
            bar.stop()

    # metadata last: listings, then images.csv.gz, then the completed marker
    listing_dir = out / LISTINGS_DIR
    listing_dir.mkdir(parents=True, exist_ok=True)
    for k, lines in enumerate(shards):
        _write_atomic(listing_dir / f"listings_{k:x}.json.gz", _gzip_bytes(("\n".join(lines) + "\n").encode("utf-8")))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "height", "width", "path"])
    writer.writerows(rows)
    _write_atomic(out / IMAGES_CSV, _gzip_bytes(buf.getvalue().encode("utf-8")))
    seconds = time.perf_counter() - t0
    marker.update({"complete": True, "images": len(rows), "listing_files": n_shards,
                   "product_types": dict(sorted(type_counts.items())), "countries": dict(sorted(country_counts.items()))})
    write_json_atomic(out / SAMPLE_MARKER, marker)
    return {
        "root": str(out),
        "seed": seed,
        "products": products,
        "views": views,
        "images": len(rows),
        "listing_files": n_shards,
        "product_types": dict(sorted(type_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "countries": dict(sorted(country_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(rows) / seconds, 1) if seconds > 0 else None,
    }



def default_sample_path(products: int = 300, views: int = 6, seed: int = 0) -> Path:
    from common.io import cache_dir

    return cache_dir() / f"sample-v{FORMAT_VERSION}-{products}x{views}-seed{seed}"


def ensure_default_sample(products: int = 300, views: int = 6, seed: int = 0, progress: bool = True) -> Path:
    """The built-in sample catalog in the fedcbir cache, generated on first use only."""
    root = default_sample_path(products, views, seed)
    marker = read_sample_marker(root)
    wanted = {"products": products, "views": views, "seed": seed}
    if not (marker and marker.get("complete") and all(marker.get(k) == v for k, v in wanted.items())):
        generate_sample(root, products=products, views=views, seed=seed, progress=progress)
    return root
