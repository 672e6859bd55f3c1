"""Retrieval metrics against cases computed by hand."""
import numpy as np
import pytest

from models.metrics import retrieval_metrics, retrieval_metrics_from_ranking


def test_hand_computed_ranking():
    # gallery labels: a a b c ; two queries
    gallery = ["a", "a", "b", "c"]
    # query 0 (label a): ranks b, a, c, a -> relevant at ranks 2 and 4; R = 2
    # query 1 (label c): ranks c first -> R = 1
    ranking = np.array([[2, 0, 3, 1], [3, 0, 1, 2]])
    m = retrieval_metrics_from_ranking(ranking, ["a", "c"], gallery, ks=(1, 2, 4))
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx(1.0)
    assert m["recall@4"] == pytest.approx(1.0)
    # query 0: top R=2 -> [b, a]: precision@2 = 1/2 at the one relevant rank -> AP = 0.5/2 = 0.25
    # query 1: top R=1 -> [c]: AP = 1
    assert m["map@r"] == pytest.approx((0.25 + 1.0) / 2)


def test_embeddings_path_and_type_precision():
    gallery = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    queries = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9]], dtype=np.float32)
    m = retrieval_metrics(
        queries, [0, 1, 2], gallery, [0, 1, 2], ks=(1, 2),
        query_types=["mug", "shoe", "shoe"], gallery_types=["mug", "shoe", "lamp"],
    )
    # query 2 (label 2) ranks gallery 1 then 0 then 2 -> miss at 1 and at 2
    assert m["recall@1"] == pytest.approx(2 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["map@r"] == pytest.approx(2 / 3)
    assert m["type_precision@1"] == pytest.approx(1.0)  # query 2's top-1 is a shoe
    assert m["queries"] == 3 and m["gallery"] == 3


def test_scale_invariance_and_empty():
    g = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    m1 = retrieval_metrics(g * 3, range(5), g, range(5))
    assert m1["recall@1"] == 1.0 and m1["map@r"] == 1.0
    with pytest.raises(ValueError):
        retrieval_metrics_from_ranking(np.zeros((0, 1), int), [], ["a"])
