"""``fedcbir catalog``: describe a catalog, generate the sample catalog, preview client partitions.

Only light imports at module level (argparse); numpy, Pillow, rich and the partitioners
are imported inside the commands.
"""
from __future__ import annotations

import argparse

from common.errors import FedcbirError

_FMT = argparse.RawDescriptionHelpFormatter


def register(sub) -> None:
    p = sub.add_parser(
        "catalog",
        help="product catalogs: describe, generate the built-in sample, preview client partitions",
        description="Work with a catalog root in the Amazon Berkeley Objects (ABO) layout: the real "
                    "archives unpacked, or the built-in sample catalog generated from a seed.",
        formatter_class=_FMT,
        epilog="examples:\n"
               "  fedcbir catalog sample runs/sample --products 300\n"
               "  fedcbir catalog info runs/sample\n"
               "  fedcbir catalog partitions runs/sample --clients 5 --scheme country",
    )
    csub = p.add_subparsers(dest="catalog_command", metavar="SUBCOMMAND")
    csub.required = True

    info = csub.add_parser(
        "info",
        help="count products, images, product types and countries of a catalog root",
        description="Read a catalog root (images/metadata/images.csv.gz and listings/metadata/listings_*.json.gz) "
                    "and report its size, product types, countries and everything that was skipped "
                    "(missing images, duplicate item ids, malformed lines).",
        formatter_class=_FMT,
        epilog="examples:\n  fedcbir catalog info ~/data/abo\n  fedcbir catalog info runs/sample --json",
    )
    info.add_argument("root", metavar="ROOT", help="catalog root folder (ABO layout)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_info)

    sample = csub.add_parser(
        "sample",
        help="generate the deterministic sample catalog in the ABO layout",
        description="Write a synthetic product catalog in exactly the ABO layout: products of 16 types, each "
                    "photographed VIEWS times (main photo on white, other photos with other viewpoints, scales, "
                    "crops, lighting and backgrounds). The same seed gives identical files. OUT must be empty, new, "
                    "or a previous sample (which is replaced).",
        formatter_class=_FMT,
        epilog="examples:\n  fedcbir catalog sample runs/sample\n"
               "  fedcbir catalog sample runs/big --products 10000 --views 6 --seed 1",
    )
    sample.add_argument("out", metavar="OUT", help="output folder")
    sample.add_argument("--products", type=int, default=300, help="number of products (default: 300)")
    sample.add_argument("--views", type=int, default=6, help="photos per product, 1-16 (default: 6)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sample.add_argument("--json", action="store_true", help="print the statistics as JSON")
    sample.set_defaults(func=_sample)

    parts = csub.add_parser(
        "partitions",
        help="preview how the training products are split among federated clients",
        description="Split the catalog into train/test products (seeded, by product), then partition the "
                    "training products among N clients: 'iid', 'dirichlet:ALPHA' (skewed over product type; "
                    "smaller ALPHA = more skew) or 'country' (the natural split by marketplace country). "
                    "Prints per-client sizes and product-type histograms.",
        formatter_class=_FMT,
        epilog="examples:\n  fedcbir catalog partitions runs/sample --clients 3 --scheme dirichlet:0.3\n"
               "  fedcbir catalog partitions runs/sample --clients 5 --scheme country --json",
    )
    parts.add_argument("root", metavar="ROOT", help="catalog root folder (ABO layout)")
    parts.add_argument("--clients", type=int, default=3, help="number of clients (default: 3)")
    parts.add_argument("--scheme", default="dirichlet:0.3", help="iid | dirichlet:ALPHA | country (default: dirichlet:0.3)")
    parts.add_argument("--seed", type=int, default=0, help="seed for the split and the partitions (default: 0)")
    parts.add_argument("--test-fraction", type=float, default=0.2, help="share of products held out for testing (default: 0.2)")
    parts.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parts.set_defaults(func=_partitions)


def _console():
    from rich.console import Console

    return Console()


def _hist(d: dict, top: int = 6) -> str:
    items = list(d.items())
    text = ", ".join(f"{k} {v}" for k, v in items[:top])
    return text + (f", … (+{len(items) - top})" if len(items) > top else "")


def _info(args: argparse.Namespace) -> int:
    from catalog.abo import catalog_info
    from common.io import print_json

    info = catalog_info(args.root)
    if args.json:
        print_json(info)
        return 0
    from rich.table import Table

    t = Table(title=f"catalog {info['root']}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for key in ("products", "images", "product_types", "countries", "listing_files", "image_index_rows",
                "missing_images", "duplicates", "malformed_lines", "blank_lines", "missing_item_id",
                "no_image_products"):
        t.add_row(key.replace("_", " "), str(info[key]))
    t.add_row("by product type", _hist(info["by_product_type"], 10))
    t.add_row("by country", _hist(info["by_country"], 10))
    if info["damaged_files"]:
        t.add_row("damaged files", "; ".join(info["damaged_files"]))
    if info.get("sample"):
        s = info["sample"]
        t.add_row("sample", f"seed {s.get('seed')}, {s.get('views')} views per product")
    _console().print(t)
    return 0


def _sample(args: argparse.Namespace) -> int:
    import sys

    from catalog.sample import generate_sample
    from common.io import print_json

    stats = generate_sample(args.out, products=args.products, views=args.views, seed=args.seed,
                            progress=sys.stderr.isatty())
    if args.json:
        print_json(stats)
    else:
        print(f"wrote {stats['products']} products, {stats['images']} images to {stats['root']} "
              f"in {stats['seconds']:.1f} s ({stats['images_per_second']} images/s)")
    return 0


def _partitions(args: argparse.Namespace) -> int:
    from catalog.abo import load_products
    from catalog.splits import partition, partition_summary, split_products
    from common.io import print_json

    products = load_products(args.root)
    if not products:
        raise FedcbirError(f"no products with images in {args.root}")
    split = split_products(products, args.test_fraction, args.seed)
    parts = partition(split.train, args.clients, args.scheme, args.seed)
    summary = partition_summary(parts)
    result = {
        "root": str(args.root),
        "scheme": args.scheme,
        "clients": args.clients,
        "seed": args.seed,
        "test_fraction": args.test_fraction,
        "train_products": len(split.train),
        "test_products": len(split.test),
        "partitions": summary,
    }
    if args.json:
        print_json(result)
        return 0
    from rich.table import Table

    t = Table(title=f"{args.scheme} over {args.clients} clients: {len(split.train)} training products "
                    f"({len(split.test)} held out for testing)")
    t.add_column("client", justify="right")
    t.add_column("products", justify="right")
    t.add_column("images", justify="right")
    t.add_column("types", justify="right")
    t.add_column("product types (most common)")
    t.add_column("countries")
    for row in summary:
        t.add_row(str(row["client"]), str(row["products"]), str(row["images"]), str(len(row["product_types"])),
                  _hist(row["product_types"], 4), _hist(row["countries"], 3))
    _console().print(t)
    return 0
