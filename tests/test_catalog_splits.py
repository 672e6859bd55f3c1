"""Train/test split, retrieval sets and client partitions (iid, Dirichlet, natural by country)."""
from collections import Counter

import pytest

from catalog.abo import Product, load_products
from catalog.splits import (
    PartitionError,
    country_assignment,
    parse_scheme,
    partition,
    partition_summary,
    retrieval_sets,
    split_products,
)

TYPES = ["CHAIR", "SOFA", "LAMP", "MUG", "RUG"]
COUNTRIES = ["US"] * 9 + ["IN"] * 4 + ["GB"] * 3 + ["DE"] * 2 + ["JP", None]


def _products(n=100):
    out = []
    for i in range(n):
        out.append(Product(item_id=f"B{i:04d}", product_type=TYPES[i % 5] if i % 7 else "CHAIR", name=f"p{i}",
                           country=COUNTRIES[(i * 7) % len(COUNTRIES)], main_image=f"{i:02d}/m{i}.jpg",
                           other_images=[f"{i:02d}/o{i}_{v}.jpg" for v in range(i % 4)]))
    return out


def test_split_is_disjoint_stratified_and_seeded():
    ps = _products()
    s = split_products(ps, 0.2, seed=1)
    train, test = {p.item_id for p in s.train}, {p.item_id for p in s.test}
    assert not train & test and len(train | test) == 100 and len(test) == 20
    by_type = Counter(p.product_type for p in ps)
    test_types = Counter(p.product_type for p in s.test)
    for t, n in by_type.items():
        assert abs(test_types[t] - 0.2 * n) <= 1, (t, n, test_types[t])
    again = split_products(list(reversed(ps)), 0.2, seed=1)  # input order does not matter
    assert [p.item_id for p in again.test] == [p.item_id for p in s.test]
    assert {p.item_id for p in split_products(ps, 0.2, seed=2).test} != test
    assert len(split_products(ps[:2], 0.2).test) == 1
    assert len(split_products(ps, 0.2, stratify=False).test) == 20
    with pytest.raises(PartitionError):
        split_products(ps[:1])
    with pytest.raises(PartitionError):
        split_products(ps, 1.0)
    with pytest.raises(PartitionError):
        split_products(ps + ps[:1])  # duplicate item id


def test_retrieval_sets_follow_the_abo_protocol():
    ps = _products(8)
    ps[3].main_image = None  # main image missing: the first other image takes its place
    rs = retrieval_sets(ps)
    assert rs.gallery_labels == [p.item_id for p in ps]
    assert rs.gallery_paths[0] == ps[0].main_image and rs.gallery_paths[3] == ps[3].other_images[0]
    assert len(rs.query_paths) == sum(len(p.images) - 1 for p in ps)
    assert set(rs.query_paths).isdisjoint(rs.gallery_paths)
    for path, label, kind in zip(rs.query_paths, rs.query_labels, rs.query_types):
        owner = next(p for p in ps if p.item_id == label)
        assert path in owner.other_images and kind == owner.product_type


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "dirichlet:5", "country"])
@pytest.mark.parametrize("clients", [1, 2, 3, 7, 12])
def test_partitions_cover_training_products_exactly_once(scheme, clients):
    s = split_products(_products(), 0.2, seed=0)
    parts = partition(s.train, clients, scheme, seed=0)
    assert len(parts) == clients and all(parts)
    ids = [p.item_id for part in parts for p in part]
    assert sorted(ids) == sorted(p.item_id for p in s.train)
    assert not set(ids) & {p.item_id for p in s.test}
    again = partition(list(reversed(s.train)), clients, scheme, seed=0)
    assert [[p.item_id for p in part] for part in again] == [[p.item_id for p in part] for part in parts]


def test_partitions_depend_on_seed_and_scheme():
    ps = _products()
    a = [[p.item_id for p in part] for part in partition(ps, 4, "iid", seed=0)]
    b = [[p.item_id for p in part] for part in partition(ps, 4, "iid", seed=1)]
    assert a != b
    skewed = partition(ps, 4, "dirichlet:0.05", seed=0)
    flat = partition(ps, 4, "dirichlet:1000", seed=0)

    def spread(parts):  # mean share of the most common type per client
        return sum(max(Counter(p.product_type for p in part).values()) / len(part) for part in parts) / len(parts)

    assert spread(skewed) > spread(flat)


def test_country_scheme_rule():
    ps = _products()
    countries = Counter(p.country or "UNKNOWN" for p in ps)
    parts = partition(ps, len(countries), "country")  # one country per client, largest first
    assert [Counter(p.country or "UNKNOWN" for p in part).most_common(1)[0][1] == len(part) for part in parts] == [True] * len(parts)
    assert [len(part) for part in parts] == sorted(countries.values(), reverse=True)
    two = partition(ps, 2, "country")  # greedy: each country to the currently smallest client
    for part in two:
        cs = {p.country for p in part}
        assert all(not (cs & {q.country for q in other}) for other in two if other is not part)
    assert country_assignment(["US"] * 5 + ["IN"] * 3 + ["GB"] * 2, 2) == [0] * 5 + [1] * 3 + [1] * 2
    many = country_assignment(["US"] * 6 + ["IN"] * 2, 4)  # extra clients go to the biggest country
    assert Counter(many) == Counter({0: 2, 1: 2, 2: 2, 3: 2})
    assert set(many[:6]) == {0, 1, 2} and set(many[6:]) == {3}


def test_partition_errors():
    ps = _products(5)
    with pytest.raises(PartitionError, match="non-empty"):
        partition(ps, 6, "iid")
    with pytest.raises(PartitionError, match="unknown partition scheme"):
        partition(ps, 2, "random")
    with pytest.raises(PartitionError):
        parse_scheme("dirichlet:-1")
    with pytest.raises(PartitionError):
        parse_scheme("dirichlet:abc")
    with pytest.raises(PartitionError):
        partition(ps, 0, "iid")
    assert parse_scheme("Dirichlet:0.5") == ("dirichlet", 0.5)


def test_partitions_of_the_sample_catalog(sample_catalog):
    ps = load_products(sample_catalog)
    s = split_products(ps, 0.2, seed=0)
    parts = partition(s.train, 3, "country", seed=0)
    summary = partition_summary(parts)
    assert sum(row["products"] for row in summary) == len(s.train) == 48
    assert sum(row["images"] for row in summary) == 48 * 5
    assert "US" in summary[0]["countries"]
