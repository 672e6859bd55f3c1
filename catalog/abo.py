"""Reader for the Amazon Berkeley Objects layout (real archives or the built-in sample).

Layout under a catalog root::

    images/metadata/images.csv.gz        image_id,height,width,path   (path under images/small/)
    images/small/14/14fe8812.jpg         max side 256 px
    listings/metadata/listings_*.json.gz JSON lines, one product each (or plain .json)

Listings are streamed line by line: only the image-id → path map (a few hundred
thousand short strings for the full ABO) and the set of item ids seen are held in
memory. Damaged input never raises a traceback: blank and malformed lines, fields of
the wrong type, unknown image ids, duplicate item ids and products without a usable
image are skipped and counted in :class:`ReadStats`. Only a missing root or missing
metadata files are errors (:class:`CatalogError`).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

from common.errors import FedcbirError

IMAGES_CSV = PurePosixPath("images/metadata/images.csv.gz")
IMAGES_DIR = PurePosixPath("images/small")
LISTINGS_DIR = PurePosixPath("listings/metadata")
SAMPLE_MARKER = "fedcbir-sample.json"
UNKNOWN_TYPE = "UNKNOWN"

#: Name language preference: these tags in order, then any English tag, then any tag.
DEFAULT_LANGUAGES: tuple[str, ...] = ("en_US", "en_GB", "en_IN", "en_AU", "en_CA", "en_SG", "en_AE")


class CatalogError(FedcbirError):
    """A catalog root that cannot be read (missing folder or metadata files)."""


@dataclass
class Product:
    """One listing with at least one usable image; image paths are relative to ``images/small``."""

    item_id: str
    product_type: str
    name: str
    brand: str | None = None
    color: str | None = None
    country: str | None = None
    marketplace: str | None = None
    domain_name: str | None = None
    main_image: str | None = None
    other_images: list[str] = field(default_factory=list)

    @property
    def images(self) -> list[str]:
        """All image paths, the main image first."""
        return ([self.main_image] if self.main_image else []) + list(self.other_images)


@dataclass
class ReadStats:
    listing_files: int = 0
    lines: int = 0
    blank_lines: int = 0
    malformed_lines: int = 0
    missing_item_id: int = 0
    duplicates: int = 0
    missing_images: int = 0
    no_image_products: int = 0
    damaged_files: list[str] = field(default_factory=list)
    image_index_rows: int = 0
    bad_image_rows: int = 0
    products: int = 0
    images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- fields


def _text(value: Any) -> str | None:
    """A non-empty stripped string from a string or a number; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _entries(value: Any) -> list[tuple[str | None, Any]]:
    """A multilingual field → ``[(language_tag or None, entry dict or raw value)]``.

    Accepts the ABO form (a list of ``{language_tag, value}``), one such dict, plain
    strings or lists of strings; ignores everything else.
    """
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[tuple[str | None, Any]] = []
    for item in items:
        if isinstance(item, dict):
            tag = item.get("language_tag")
            out.append((tag.strip() if isinstance(tag, str) and tag.strip() else None, item))
        elif _text(item) is not None:
            out.append((None, item))
    return out


def _entry_text(entry: Any, standardized_fallback: bool = False) -> str | None:
    if not isinstance(entry, dict):
        return _text(entry)
    value = _text(entry.get("value"))
    if value is None and standardized_fallback:
        std = entry.get("standardized_values")
        for v in std if isinstance(std, list) else [std]:
            value = _text(v)
            if value:
                break
    return value


def _norm_tag(tag: str | None) -> str:
    return (tag or "").replace("-", "_").lower()


def pick_language(value: Any, languages: Sequence[str] = DEFAULT_LANGUAGES, *, standardized_fallback: bool = False) -> str | None:
    """The text of a multilingual field by preference: ``languages`` in order, then any
    English tag (``en`` / ``en_*``), then the first entry of any language (untagged
    entries count as any language)."""
    candidates = [
        (_norm_tag(tag), text)
        for tag, entry in _entries(value)
        if (text := _entry_text(entry, standardized_fallback)) is not None
    ]
    if not candidates:
        return None
    for want in languages:
        w = _norm_tag(want)
        for tag, text in candidates:
            if tag == w:
                return text
    for tag, text in candidates:
        if tag == "en" or tag.startswith("en_"):
            return text
    return candidates[0][1]


def _product_type(value: Any) -> str:
    for _, entry in _entries(value):
        text = _entry_text(entry)
        if text:
            return text
    return UNKNOWN_TYPE


def _code(value: Any, upper: bool = False) -> str | None:
    text = _text(value)
    if text is None:
        return None
    return text.upper() if upper else text


def _image_ids(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str) and item.strip():
            out.append(item.strip())
    return out


def _safe_rel_path(path: str) -> str | None:
    """A relative POSIX path that stays under images/small (no absolute, no '..')."""
    path = path.strip().replace("\\", "/")
    if not path:
        return None
    p = PurePosixPath(path)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or ":" in p.parts[0]:
        return None
    return p.as_posix()


# ----------------------------------------------------------------------------- files


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _open_text(path: Path) -> io.TextIOBase:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="replace", newline="")


def listing_files(root: str | Path) -> list[Path]:
    """The listing files of a catalog root (``listings_*.json.gz`` and plain ``.json``), sorted."""
    folder = Path(root) / LISTINGS_DIR
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and p.name.startswith("listings")
             and (p.name.endswith(".json.gz") or p.name.endswith(".json"))]
    return sorted(files, key=lambda p: p.name)


def images_csv_path(root: str | Path) -> Path | None:
    root = Path(root)
    for candidate in (root / IMAGES_CSV, root / IMAGES_CSV.with_suffix("")):
        if candidate.is_file():
            return candidate
    return None


def read_image_index(root: str | Path, stats: ReadStats | None = None) -> dict[str, str]:
    """image_id → path relative to ``images/small`` from ``images.csv.gz``."""
    path = images_csv_path(root)
    if path is None:
        raise CatalogError(f"{Path(root) / IMAGES_CSV} not found: not an ABO catalog root "
                           "(expected images/metadata/images.csv.gz)")
    stats = stats if stats is not None else ReadStats()
    index: dict[str, str] = {}
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise CatalogError(f"{path} is empty (expected the header image_id,height,width,path)")
            cols = {name.strip().lower(): i for i, name in enumerate(header)}
            if "image_id" not in cols or "path" not in cols:
                raise CatalogError(f"{path} has columns {','.join(header)}; expected image_id,height,width,path")
            i_id, i_path = cols["image_id"], cols["path"]
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                stats.image_index_rows += 1
                if len(row) <= max(i_id, i_path):
                    stats.bad_image_rows += 1
                    continue
                image_id, rel = row[i_id].strip(), _safe_rel_path(row[i_path])
                if not image_id or rel is None:
                    stats.bad_image_rows += 1
                    continue
                index.setdefault(image_id, rel)
    except CatalogError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, csv.Error) as exc:
        raise CatalogError(f"cannot read {path}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    return index


def read_sample_marker(root: str | Path) -> dict | None:
    """The generator's marker file of a built-in sample, or None for other catalogs."""
    path = Path(root) / SAMPLE_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"complete": False, "damaged": True}
    return marker if isinstance(marker, dict) else {"complete": False, "damaged": True}


def check_root(root: str | Path) -> Path:
    """Validate a catalog root; raise :class:`CatalogError` with what is missing."""
    root = Path(root)
    if not root.exists():
        raise CatalogError(f"catalog root {root} does not exist")
    if not root.is_dir():
        raise CatalogError(f"catalog root {root} is not a folder")
    marker = read_sample_marker(root)
    if marker is not None and not marker.get("complete", False):
        raise CatalogError(f"{root} holds an incomplete sample catalog (generation was interrupted); "
                           "generate it again with 'fedcbir catalog sample'")
    if images_csv_path(root) is None:
        raise CatalogError(f"{root / IMAGES_CSV} not found: not an ABO catalog root")
    if not listing_files(root):
        raise CatalogError(f"no listings found in {root / LISTINGS_DIR} (expected listings_*.json.gz)")
    return root


# ----------------------------------------------------------------------------- reader


class AboCatalog:
    """A catalog root. ``products()`` streams :class:`Product` records; ``stats`` counts what was skipped."""

    def __init__(self, root: str | Path, *, languages: Sequence[str] = DEFAULT_LANGUAGES) -> None:
        self.root = check_root(root)
        self.languages = tuple(languages)
        self.stats = ReadStats()
        self._index: dict[str, str] | None = None

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES_DIR

    def image_file(self, rel: str) -> Path:
        return self.images_dir / rel

    @property
    def image_index(self) -> dict[str, str]:
        if self._index is None:
            self._index = read_image_index(self.root, self.stats)
        return self._index

    def products(self) -> Iterator[Product]:
        """Stream the products (first occurrence of each item id wins). Resets ``stats``."""
        self.stats = ReadStats()
        self._index = None
        index = self.image_index
        stats = self.stats
        seen: set[str] = set()
        for path in listing_files(self.root):
            stats.listing_files += 1
            try:
                with _open_binary(path) as f:
                    for raw in f:
                        stats.lines += 1
                        product = self._parse_line(raw, index, seen)
                        if product is not None:
                            stats.products += 1
                            stats.images += len(product.images)
                            yield product
            except (OSError, EOFError, zlib.error) as exc:
                # a truncated or corrupt archive: keep what was read, record the damage
                stats.damaged_files.append(f"{path.name}: {' '.join(str(exc).split()) or type(exc).__name__}")

    def _parse_line(self, line: bytes, index: dict[str, str], seen: set[str]) -> Product | None:
        stats = self.stats
        if not line.strip():
            stats.blank_lines += 1
            return None
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # includes UnicodeDecodeError
            stats.malformed_lines += 1
            return None
        if not isinstance(rec, dict):
            stats.malformed_lines += 1
            return None
        item_id = _text(rec.get("item_id"))
        if item_id is None:
            stats.missing_item_id += 1
            return None
        if item_id in seen:
            stats.duplicates += 1
            return None
        seen.add(item_id)

        main_rel = None
        used: set[str] = set()
        for image_id in _image_ids(rec.get("main_image_id"))[:1]:
            used.add(image_id)
            main_rel = index.get(image_id)
            if main_rel is None:
                stats.missing_images += 1
        others: list[str] = []
        for image_id in _image_ids(rec.get("other_image_id")):
            if image_id in used:
                continue
            used.add(image_id)
            rel = index.get(image_id)
            if rel is None:
                stats.missing_images += 1
            elif rel != main_rel and rel not in others:
                others.append(rel)
        if main_rel is None and not others:
            stats.no_image_products += 1
            return None

        langs = self.languages
        return Product(
            item_id=item_id,
            product_type=_product_type(rec.get("product_type")),
            name=pick_language(rec.get("item_name"), langs) or item_id,
            brand=pick_language(rec.get("brand"), langs),
            color=pick_language(rec.get("color"), langs, standardized_fallback=True),
            country=_code(rec.get("country"), upper=True),
            marketplace=_code(rec.get("marketplace")),
            domain_name=_code(rec.get("domain_name")),
            main_image=main_rel,
            other_images=others,
        )


def iter_products(root: str | Path, *, languages: Sequence[str] = DEFAULT_LANGUAGES) -> Iterator[Product]:
    """Stream the products of a catalog root."""
    yield from AboCatalog(root, languages=languages).products()


def load_products(root: str | Path, *, languages: Sequence[str] = DEFAULT_LANGUAGES) -> list[Product]:
    """All products of a catalog root, in file order."""
    return list(iter_products(root, languages=languages))


def summarize(products: Iterable[Product]) -> dict[str, Any]:
    """Counts by product type and country for any collection of products."""
    by_type: Counter[str] = Counter()
    by_country: Counter[str] = Counter()
    n = images = 0
    for p in products:
        n += 1
        images += len(p.images)
        by_type[p.product_type] += 1
        by_country[p.country or UNKNOWN_TYPE] += 1
    return {
        "products": n,
        "images": images,
        "product_types": len(by_type),
        "countries": len(by_country),
        "by_product_type": dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_country": dict(sorted(by_country.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def catalog_info(root: str | Path, *, languages: Sequence[str] = DEFAULT_LANGUAGES) -> dict[str, Any]:
    """One pass over a catalog root: sizes, per-type and per-country counts, skipped records."""
    cat = AboCatalog(root, languages=languages)
    info = summarize(cat.products())
    s = cat.stats
    info.update({
        "root": str(cat.root),
        "listing_files": s.listing_files,
        "lines": s.lines,
        "image_index_rows": s.image_index_rows,
        "bad_image_rows": s.bad_image_rows,
        "missing_images": s.missing_images,
        "duplicates": s.duplicates,
        "malformed_lines": s.malformed_lines,
        "blank_lines": s.blank_lines,
        "missing_item_id": s.missing_item_id,
        "no_image_products": s.no_image_products,
        "damaged_files": list(s.damaged_files),
        "sample": read_sample_marker(cat.root),
    })
    return info
