"""``catalog-search``: index a catalog with a model bundle and search it on the device."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fedcbir.cli import run
from fedcbir.errors import FedcbirError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catalog-search",
        description="On-device product search: index a catalog with a bundle, then query it with photos.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, text in [
        ("index", "embed the catalog and build a usearch index in the bundle"),
        ("query", "find the products in one or more photos"),
        ("eval", "retrieval metrics and latency on test products"),
        ("info", "describe a bundle and its index"),
        ("serve", "upload page and JSON API"),
    ]:
        p = sub.add_parser(name, help=f"{text} (not yet available)")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

        def not_yet(args, name=name):
            raise FedcbirError(f"'catalog-search {name}' is not yet available in this version of fedcbir")

        p.set_defaults(func=not_yet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
