"""``catalog-search``: index a catalog with a model bundle and search it on the device.

Only argparse is imported at start-up; each command imports what it needs, and the
query path never imports torch, TensorFlow or JAX for ``.tflite`` / ``.onnx`` files.

Imports: :mod:`common` at start-up; per command :mod:`retrieval.index` (index),
:mod:`retrieval.search` (query, evaluate), :mod:`retrieval.bundle_index` (info) and
:mod:`retrieval.server` (serve). It is the ``catalog-search`` entry point: no package module imports it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common.cli import run
from common.errors import FedcbirError

_FMT = argparse.RawDescriptionHelpFormatter
RUNTIMES = ("litert", "onnx", "pte")
PRECISIONS = ("fp32", "fp16", "int8")
DTYPES = ("f16", "i8", "f32")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _model_args(p: argparse.ArgumentParser, default_note: str) -> None:
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help=f"device runtime: litert (.tflite), onnx (.onnx), pte (.pte, imports torch) ({default_note})")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"which model file of that runtime: fp32, fp16 (tflite), int8 ({default_note})")
    p.add_argument("--threads", type=_positive, default=1, help="runtime threads (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catalog-search",
        description="On-device product search: index a catalog with a model bundle, then find products from photos.",
        formatter_class=_FMT,
        epilog="examples:\n"
               "  catalog-search index --bundle bundle/ --catalog runs/sample\n"
               "  catalog-search query --bundle bundle/ photo.jpg -k 5\n"
               "  catalog-search eval --bundle bundle/ --catalog runs/sample --json\n"
               "  catalog-search serve --bundle bundle/ --port 8080",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "index", help="embed the catalog's photos and build a usearch index + metadata store in the bundle",
        description="Decode and embed every photo of an ABO-layout catalog with the bundle's model through a device "
                    "runtime, build a usearch index (explicit uint64 keys, cosine) and a SQLite store (products, "
                    "photos, key -> photo -> product), and record them in the bundle's manifest (checksums, dtype, "
                    "count, model). Unreadable photos are skipped and reported. The bundle changes in one atomic step "
                    "at the end. --update applies added / removed / changed listings and photos without re-embedding "
                    "the rest (the graph is rebuilt when deleted slots exceed a quarter). Progress with an ETA goes "
                    "to stderr; an interrupted run (Ctrl-C, a kill) resumes from its last checkpoint when run "
                    "again with the same bundle, catalog and batch size.",
        formatter_class=_FMT,
        epilog="examples:\n  catalog-search index --bundle bundle/ --catalog ~/data/abo --runtime litert --dtype i8\n"
               "  catalog-search index --bundle bundle/ --catalog ~/data/abo --update")
    p.add_argument("--bundle", required=True, metavar="BUNDLE", help="bundle folder (from 'fedcbir export')")
    p.add_argument("--catalog", required=True, metavar="ROOT", help="catalog root in the ABO layout")
    _model_args(p, "default: onnx fp32 if present; with --update: the index's")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="vector storage: f16 (default: half the size, recall ~ f32), i8 (quarter size, "
                        "re-ranked with f16 copies), f32")
    p.add_argument("--update", action="store_true", help="apply catalog changes to the existing index")
    p.add_argument("--batch-size", type=_positive, default=32, help="images per runtime call (default: 32)")
    p.add_argument("--workers", type=_positive, default=2,
                   help="decoding threads, working ahead of the runtime (default: 2); with --threads, the cores "
                        "the build may use")
    p.add_argument("--save-every", type=_positive, default=1024, metavar="N",
                   help="photos per resume checkpoint (default: 1024): an interrupted build or update keeps "
                        "what it embedded in BUNDLE/index/.work/ and the next identical run continues from there")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_index)

    p = sub.add_parser(
        "query", help="find the products in one or more photos",
        description="Embed each photo with the bundle's model and return the best-matching products: photos of one "
                    "product collapse to its best score; --type keeps one product type. The index is checked "
                    "against its sha256 and memory-mapped.",
        formatter_class=_FMT,
        epilog="examples:\n  catalog-search query --bundle bundle/ photo.jpg\n"
               "  catalog-search query --bundle bundle/ a.jpg b.png -k 5 --type CHAIR --json")
    p.add_argument("--bundle", required=True, metavar="BUNDLE", help="bundle folder with an index")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photo files (JPEG, PNG, WebP, ...)")
    p.add_argument("-k", type=_positive, default=10, help="products per photo (default: 10)")
    p.add_argument("--type", dest="product_type", metavar="PRODUCT_TYPE", help="only products of this type")
    _model_args(p, "default: the one the index was built with")
    p.add_argument("--json", action="store_true",
                   help='print {"results": [{"query", "matches": [{"item_id", "score", "name", "product_type", '
                        '"brand", "image"}]}]}')
    p.set_defaults(func=_query)

    p = sub.add_parser(
        "eval", help="retrieval quality (Recall@K, mAP@R) and query latency on the test products",
        description="Queries: the non-main photos of the test products (the split of catalog/dataset.py: --seed, "
                    "--test-fraction), embedded like user photos. Gallery: the indexed main photo of every catalog "
                    "product (training products are distractors). A hit is the same item_id. Reports Recall@1/5/10, "
                    "mAP@R and type precision@1 through the index and by exact search, and latency p50/p99.",
        formatter_class=_FMT,
        epilog="example:\n  catalog-search eval --bundle bundle/ --catalog runs/sample --json")
    p.add_argument("--bundle", required=True, metavar="BUNDLE", help="bundle folder with an index")
    p.add_argument("--catalog", required=True, metavar="ROOT", help="the catalog the index was built from")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test product share (default: 0.2)")
    p.add_argument("--max-queries", type=_positive, default=None, help="stop after N query photos")
    _model_args(p, "default: the one the index was built with")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser("info", help="describe a bundle and its index (verifies every checksum)",
                       description="Model files, index dtype / size / counts / model / catalog, and whether every "
                                   "file matches its checksum. Exit status 1 when the index is damaged.",
                       formatter_class=_FMT, epilog="example:\n  catalog-search info --bundle bundle/ --json")
    p.add_argument("--bundle", required=True, metavar="BUNDLE", help="bundle folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "serve", help="upload page and JSON API (POST /api/search)",
        description="A web page where a person drops or picks a photo and sees the best products as cards, and "
                    "POST /api/search (multipart field 'image'; optional k, type) returning the query JSON.",
        formatter_class=_FMT, epilog="example:\n  catalog-search serve --bundle bundle/ --port 8080")
    p.add_argument("--bundle", required=True, metavar="BUNDLE", help="bundle folder with an index")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 = any free port)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default: 10 MB)")
    _model_args(p, "default: the one the index was built with")
    p.set_defaults(func=_serve)
    return parser


# ----------------------------------------------------------------------------- commands


def _index(args) -> int:
    from common.io import print_json
    from retrieval.index import build_catalog_index

    report = build_catalog_index(args.bundle, args.catalog, runtime=args.runtime, precision=args.precision,
                                 dtype=args.dtype, update=args.update, threads=args.threads, workers=args.workers,
                                 batch_size=args.batch_size, progress=not args.json,
                                 segment_images=args.save_every)
    if args.json:
        print_json(report)
        return 0
    if report.get("status") == "up to date":
        print(f"index in {report['bundle']} is up to date with {report['catalog']} ({report['products']} products)")
        return 0
    print(f"{report['status']} index {report['files']['index']} ({report['dtype']}, {report['images']} photos of "
          f"{report['indexed_products']} products, {report['bytes'] / 1e6:.2f} MB) with {report['model']['file']} "
          f"({report['model']['runtime']} {report['model']['precision']})")
    if report["update"]:
        print(f"  embedded {report['embedded']} photos, removed {report['removed_images']}, "
              f"changed listings {report['changed_listings']}" + (", compacted" if report["compacted"] else ""))
    if report.get("resumed"):
        print(f"  resumed an interrupted run: {report['resumed']} photos were embedded before, "
              f"{report['embedded_now']} now")
    if report.get("images_per_second"):
        print(f"  {report['images_per_second']} images/s (decode + preprocess + embed; {report['workers']} decoding "
              f"threads, {report['threads']} runtime threads), {report['seconds']} s in all")
    if report["skipped"]:
        print(f"  skipped {report['skipped']} unreadable photos, e.g.:", file=sys.stderr)
        for s in report["skipped_examples"][:5]:
            print(f"    {s['reason']}", file=sys.stderr)
    return 0


def _query(args) -> int:
    from common.io import print_json
    from retrieval.search import Searcher

    with Searcher(args.bundle, runtime=args.runtime, precision=args.precision, threads=args.threads) as s:
        out = s.search_paths(args.images, k=args.k, product_type=args.product_type)
    if args.json:
        print_json(out)
        return 0
    for res in out["results"]:
        print(res["query"])
        if not res["matches"]:
            print("  (no products)")
        for i, m in enumerate(res["matches"], 1):
            brand = f" [{m['brand']}]" if m.get("brand") else ""
            print(f"  {i:2d}. {m['score']:.4f}  {m['item_id']}  {m['product_type']}  {m['name']}{brand}")
    return 0


def _eval(args) -> int:
    from common.io import print_json
    from retrieval.search import Searcher, evaluate

    if not 0.0 < args.test_fraction < 1.0:
        raise FedcbirError("--test-fraction must be between 0 and 1")
    with Searcher(args.bundle, runtime=args.runtime, precision=args.precision, threads=args.threads) as s:
        res = evaluate(s, args.catalog, seed=args.seed, test_fraction=args.test_fraction,
                       max_queries=args.max_queries, progress=not args.json)
    if args.json:
        print_json(res)
        return 0
    print(f"{res['queries']} query photos of {res['test_products']} test products against {res['gallery']} "
          f"main photos ({res['index_dtype']} index, {res['model']['runtime']} {res['model']['precision']})")
    for name in ("index", "exact"):
        m = res[name]
        print(f"  {name:5s}  R@1 {m['recall@1']:.3f}  R@5 {m['recall@5']:.3f}  R@10 {m['recall@10']:.3f}  "
              f"mAP@R {m['map@r']:.3f}  type P@1 {m['type_precision@1']:.3f}")
    lat = res["latency_ms"]
    print(f"  latency per query: {lat['query_p50']:.2f} ms p50, {lat['query_p99']:.2f} ms p99 "
          f"(search alone {lat['search_p50']:.3f} / {lat['search_p99']:.3f} ms)")
    if res["skipped_count"]:
        print(f"  skipped {res['skipped_count']} unreadable query photos", file=sys.stderr)
    return 0


def _info(args) -> int:
    from common.io import print_json
    from retrieval.bundle_index import describe_bundle

    info = describe_bundle(args.bundle)
    if args.json:
        print_json(info)
    else:
        print(f"bundle {info['bundle']}: {info['embedding_dim']}-d embeddings, input {info['input_size']} px")
        for m in info["models"]:
            print(f"  model {m['file']:20s} {m['runtime']:6s} {m['precision']:5s} {m['bytes'] / 1e6:6.2f} MB")
        idx = info.get("index")
        if idx is None:
            print("  no catalog index (build one with 'catalog-search index')")
        else:
            print(f"  index  {idx['dtype']}, {idx['count']} photos of {idx['products']} products "
                  f"({idx['skipped']} skipped), {idx['bytes'] / 1e6:.2f} MB, built {idx['built']}"
                  + (f", updated {idx['updated']}" if idx.get("updated") else ""))
            print(f"         model {idx['model']['file']} ({idx['model']['runtime']} {idx['model']['precision']}), "
                  f"catalog {idx['catalog']['root']}")
            print(f"         status: {idx['status']}")
            if idx.get("product_types"):
                types = ", ".join(f"{t} {n}" for t, n in list(idx["product_types"].items())[:8])
                print(f"         types: {types}" + (" ..." if len(idx["product_types"]) > 8 else ""))
    idx = info.get("index")
    return 1 if idx is not None and idx["status"] != "ok" else 0


def _serve(args) -> int:
    from retrieval.server import serve

    return serve(args.bundle, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                 runtime=args.runtime, precision=args.precision, threads=args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
