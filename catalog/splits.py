"""Train/test split by product, retrieval sets, and client partitions of the training products.

- :func:`split_products`: seeded, disjoint by product, stratified by product type.
- :func:`retrieval_sets`: the ABO multi-view protocol on test products: the main image
  of each product goes to the gallery, its other images are the queries; a hit is the
  same ``item_id``.
- :func:`partition`: training products → ``num_clients`` partitions with the
  flwr-datasets partitioners on an in-memory ``datasets.Dataset``:

  ``iid``             IidPartitioner on the products in a seeded random order;
  ``dirichlet:ALPHA`` DirichletPartitioner over ``product_type`` (smaller ALPHA = more skew;
                      self-balancing, at least ``min(10, n / (2 * clients))`` products per
                      client, relaxed to 1 and re-drawn with derived seeds if impossible);
  ``country``         NaturalIdPartitioner over a derived ``client`` column (the natural split
                      by marketplace country). With as many clients as countries each client
                      is one country. With fewer clients, countries are taken largest first
                      (ties by code) and each goes to the client with the fewest products so
                      far (ties: lowest client index). With more clients, every country gets one
                      client and each extra client goes to the country with the most products
                      per client (ties by code); a country's products (in seeded random order)
                      are then dealt into its clients in near-equal contiguous chunks.
                      Products without a country form the country ``UNKNOWN``.

Every training product lands in exactly one partition; no partition is empty (or a
:class:`PartitionError` says why that is impossible). Results depend only on the set of
products and the seed, not on their input order.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from catalog.abo import UNKNOWN_TYPE, Product
from common.errors import FedcbirError

SCHEMES = ("iid", "dirichlet:ALPHA", "country")


class PartitionError(FedcbirError):
    """A split or partition that cannot be made (too few products, a bad scheme)."""


@dataclass
class Split:
    train: list[Product]
    test: list[Product]


@dataclass
class RetrievalSets:
    """Image paths (relative to ``images/small``) with item-id labels and product types."""

    gallery_paths: list[str] = field(default_factory=list)
    gallery_labels: list[str] = field(default_factory=list)
    gallery_types: list[str] = field(default_factory=list)
    query_paths: list[str] = field(default_factory=list)
    query_labels: list[str] = field(default_factory=list)
    query_types: list[str] = field(default_factory=list)


def _sorted(products: Sequence[Product]) -> list[Product]:
    ps = sorted(products, key=lambda p: p.item_id)
    for a, b in zip(ps, ps[1:]):
        if a.item_id == b.item_id:
            raise PartitionError(f"item id {a.item_id} appears twice")
    return ps


def split_products(products: Sequence[Product], test_fraction: float = 0.2, seed: int = 0,
                   stratify: bool = True) -> Split:
    """Disjoint train/test products, both sorted by item id.

    The test count is ``round(n * test_fraction)`` (at least 1 and at most n - 1), spread
    over product types in proportion (largest remainders first) when ``stratify``.
    """
    try:
        fraction = float(test_fraction)
    except (TypeError, ValueError):
        raise PartitionError(f"test fraction must be a number, got {test_fraction!r}") from None
    if not 0.0 < fraction < 1.0:
        raise PartitionError(f"test fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    ps = _sorted(products)
    n = len(ps)
    if n < 2:
        raise PartitionError(f"need at least 2 products to split into train and test, got {n}")
    n_test = min(n - 1, max(1, round(n * fraction)))
    rng = np.random.default_rng([int(seed), 7001])
    if not stratify:
        test_idx = set(rng.permutation(n)[:n_test].tolist())
    else:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(ps):
            groups.setdefault(p.product_type, []).append(i)
        names = sorted(groups)
        exact = {t: len(groups[t]) * n_test / n for t in names}
        take = {t: int(math.floor(exact[t])) for t in names}
        rest = n_test - sum(take.values())
        for t in sorted(names, key=lambda t: (-(exact[t] - take[t]), t))[:rest]:
            take[t] += 1
        test_idx = set()
        for t in names:
            members = groups[t]
            order = rng.permutation(len(members))
            test_idx.update(members[j] for j in order[: take[t]].tolist())
    train = [p for i, p in enumerate(ps) if i not in test_idx]
    test = [p for i, p in enumerate(ps) if i in test_idx]
    return Split(train=train, test=test)


def retrieval_sets(test_products: Sequence[Product]) -> RetrievalSets:
    """Gallery = the main image of each product (its first image when the main one is
    missing); queries = its other images. A one-image product is a gallery distractor."""
    out = RetrievalSets()
    for p in test_products:
        images = p.images
        if not images:
            continue
        out.gallery_paths.append(images[0])
        out.gallery_labels.append(p.item_id)
        out.gallery_types.append(p.product_type)
        for rel in images[1:]:
            out.query_paths.append(rel)
            out.query_labels.append(p.item_id)
            out.query_types.append(p.product_type)
    return out


# ----------------------------------------------------------------------------- partitions


def parse_scheme(scheme: str) -> tuple[str, float | None]:
    """``'iid'`` | ``'dirichlet:ALPHA'`` | ``'country'`` → (kind, alpha)."""
    text = str(scheme).strip().lower()
    if text in ("iid", "country"):
        return text, None
    if text.startswith("dirichlet"):
        _, _, value = text.partition(":")
        try:
            alpha = float(value) if value else 0.3
        except ValueError:
            raise PartitionError(f"bad Dirichlet alpha in scheme {scheme!r} (expected e.g. dirichlet:0.3)") from None
        if not (alpha > 0 and math.isfinite(alpha)):
            raise PartitionError(f"Dirichlet alpha must be a positive number, got {value!r}")
        return "dirichlet", alpha
    raise PartitionError(f"unknown partition scheme {scheme!r}; use one of: iid, dirichlet:ALPHA, country")


def country_assignment(countries: Sequence[str], num_clients: int, seed: int = 0) -> list[int]:
    """The client index of each product for the ``country`` scheme (rule in the module doc)."""
    counts = Counter(countries)
    names = sorted(counts, key=lambda c: (-counts[c], c))
    client_of = [0] * len(countries)
    if num_clients <= len(names):
        load = [0] * num_clients
        target: dict[str, int] = {}
        for c in names:
            k = min(range(num_clients), key=lambda j: (load[j], j))
            target[c] = k
            load[k] += counts[c]
        return [target[c] for c in countries]
    slots = {c: 1 for c in names}
    for _ in range(num_clients - len(names)):
        c = min(names, key=lambda c: (-counts[c] / slots[c], c))
        slots[c] += 1
    rng = np.random.default_rng([int(seed), 7003])
    first = 0
    for c in names:
        members = [i for i, x in enumerate(countries) if x == c]
        members = [members[j] for j in rng.permutation(len(members)).tolist()]
        k = slots[c]
        for j, i in enumerate(members):
            client_of[i] = first + j * k // len(members)
        first += k
    return client_of


def partition(products: Sequence[Product], num_clients: int, scheme: str = "iid", seed: int = 0) -> list[list[Product]]:
    """Training products → ``num_clients`` non-empty partitions (lists of products)."""
    kind, alpha = parse_scheme(scheme)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise PartitionError(f"the number of clients must be a positive integer, got {num_clients!r}")
    ps = _sorted(products)
    n = len(ps)
    if n < num_clients:
        raise PartitionError(f"cannot make {num_clients} non-empty partitions from {n} training products")

    import datasets  # heavy: imported only when partitioning
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if kind == "dirichlet":
        ds = datasets.Dataset.from_dict({"idx": list(range(n)), "product_type": [p.product_type for p in ps]})
        parts = _dirichlet(ds, DirichletPartitioner, num_clients, float(alpha), seed, n)
    else:
        if kind == "iid":
            order = np.random.default_rng([int(seed), 7002]).permutation(n).tolist()
            ds = datasets.Dataset.from_dict({"idx": order})
            partitioner: Any = IidPartitioner(num_partitions=num_clients)
        else:
            countries = [p.country or UNKNOWN_TYPE for p in ps]
            clients = country_assignment(countries, num_clients, seed)
            ds = datasets.Dataset.from_dict({"idx": list(range(n)), "client": clients})
            partitioner = NaturalIdPartitioner(partition_by="client")
        partitioner.dataset = ds
        if partitioner.num_partitions != num_clients:
            raise PartitionError(f"scheme {scheme!r} made {partitioner.num_partitions} partitions "
                                 f"for {num_clients} clients")
        with _quiet():
            parts = [list(partitioner.load_partition(k)["idx"]) for k in range(num_clients)]

    if sorted(i for idx in parts for i in idx) != list(range(n)):
        raise PartitionError("internal error: the partitions do not cover every training product exactly once")
    empty = [k for k, idx in enumerate(parts) if not idx]
    if empty:
        raise PartitionError(f"partition scheme {scheme!r} left client(s) {empty} without products; "
                             "use fewer clients or another scheme")
    return [[ps[i] for i in idx] for idx in parts]


class _quiet:
    """Silence warnings, numpy floating-point chatter and tqdm bars from the partitioners."""

    def __enter__(self):
        self._err = contextlib.redirect_stderr(io.StringIO())
        self._err.__enter__()
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._np = np.seterr(all="ignore")
        return self

    def __exit__(self, *exc):
        np.seterr(**self._np)
        self._w.__exit__(*exc)
        self._err.__exit__(*exc)
        return False


def _dirichlet(ds, cls, num_clients: int, alpha: float, seed: int, n: int) -> list[list[int]]:
    wanted = max(1, min(10, n // (2 * num_clients)))
    attempts = [(wanted, int(seed))] + [(1, int(seed) * 1000 + k) for k in range(1, 11)]
    for min_size, draw_seed in attempts:
        part = cls(num_partitions=num_clients, partition_by="product_type", alpha=alpha,
                   min_partition_size=min_size, self_balancing=True, shuffle=True, seed=draw_seed)
        part.dataset = ds
        try:
            with _quiet():
                parts = [list(part.load_partition(k)["idx"]) for k in range(num_clients)]
        except (ValueError, ZeroDivisionError):
            continue
        if all(parts) and sorted(i for idx in parts for i in idx) == list(range(n)):
            return parts
    raise PartitionError(f"Dirichlet partitioning (alpha={alpha}) could not give each of {num_clients} clients "
                         f"a product from {n} training products; use fewer clients or a larger alpha")


def partition_summary(parts: Sequence[Sequence[Product]]) -> list[dict[str, Any]]:
    """Per client: product and image counts, product-type and country histograms."""
    out = []
    for k, part in enumerate(parts):
        types = Counter(p.product_type for p in part)
        countries = Counter(p.country or UNKNOWN_TYPE for p in part)
        out.append({
            "client": k,
            "products": len(part),
            "images": sum(len(p.images) for p in part),
            "product_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
            "countries": dict(sorted(countries.items(), key=lambda kv: (-kv[1], kv[0]))),
        })
    return out
