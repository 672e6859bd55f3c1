"""The usearch layer and the metadata store on their own (no model needed)."""
from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest

from common.errors import FedcbirError


def unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
def test_explicit_keys_save_view_and_search(tmp_path, dtype):
    from retrieval.vectors import VectorSearch, add_vectors, new_index, open_index, sha256_file

    rng = np.random.default_rng(0)
    x = unit(rng, 500)
    keys = np.arange(500, dtype=np.uint64) * 7 + 3  # sparse keys
    idx = new_index(32, dtype)
    add_vectors(idx, keys, x, threads=1)  # one thread: the same graph on every run
    path = tmp_path / "a.usearch"
    idx.save(os.fspath(path))
    viewed = open_index(path, sha256=sha256_file(path), size=path.stat().st_size, ndim=32, dtype=dtype)
    assert len(viewed) == 500
    k, s = VectorSearch(viewed).search(x[:20], 5)
    assert (k[:, 0] == keys[:20].astype(np.int64)).mean() >= 0.95
    assert s[:, 0] == pytest.approx(1.0, abs=0.02)
    assert (np.diff(s, axis=1) <= 1e-6).all()
    # exhaustive scan = exact ranking
    k2, s2 = VectorSearch(viewed).search(x[:5], 10, exhaustive=True)
    exact = np.argsort(-(x[:5] @ x.T), axis=1)[:, :10]
    if dtype == "f32":
        assert (k2 == keys[exact].astype(np.int64)).all()


def test_short_results_are_padded(tmp_path):
    from retrieval.vectors import VectorSearch, add_vectors, new_index

    rng = np.random.default_rng(1)
    idx = new_index(32, "f16")
    add_vectors(idx, [5, 9, 11], unit(rng, 3))
    k, s = VectorSearch(idx).search(unit(rng, 2), 6)
    assert k.shape == (2, 6) and (k[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()
    empty = new_index(32, "f16")
    k, s = VectorSearch(empty).search(unit(rng, 1), 3)
    assert (k == -1).all()


def test_i8_reranking_with_exact_vectors_restores_recall(tmp_path):
    from retrieval.vectors import ExactVectors, VectorSearch, add_vectors, new_index, save_npy

    rng = np.random.default_rng(2)
    centres = unit(rng, 50, 64)
    x = centres[rng.integers(0, 50, 4000)] + 0.15 * rng.standard_normal((4000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, 4000, 100)] + 0.05 * rng.standard_normal((100, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    keys = np.arange(1, 4001, dtype=np.uint64)
    truth = keys[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    idx = new_index(64, "i8")
    add_vectors(idx, keys, x)
    save_npy(tmp_path / "k.npy", keys)
    save_npy(tmp_path / "v.npy", x.astype(np.float16))
    ev = ExactVectors.load(tmp_path / "k.npy", tmp_path / "v.npy")
    assert isinstance(ev.vectors, np.memmap)

    def recall(found):
        return np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)])

    plain, _ = VectorSearch(idx).search(q, 10)
    reranked, scores = VectorSearch(idx, ev).search(q, 10)
    assert recall(reranked) >= max(0.98, recall(plain))
    assert scores[:, 0] == pytest.approx(np.sort(q @ x.T, axis=1)[:, -1], abs=2e-3)
    assert (ev.rows(np.array([1, 4000, 4001, 0], dtype=np.uint64)) == [0, 3999, -1, -1]).all()


def test_open_index_refuses_damage_and_mismatch(tmp_path):
    from retrieval.vectors import IndexFileError, add_vectors, new_index, open_index, sha256_file

    rng = np.random.default_rng(3)
    idx = new_index(32, "f16")
    add_vectors(idx, np.arange(100), unit(rng, 100))
    path = tmp_path / "a.usearch"
    idx.save(os.fspath(path))
    digest = sha256_file(path)
    with pytest.raises(IndexFileError, match="expected 64-d"):
        open_index(path, sha256=digest, ndim=64)
    with pytest.raises(IndexFileError, match="stores f16 vectors, the manifest says i8"):
        open_index(path, sha256=digest, dtype="i8")
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="sha256"):
        open_index(path, sha256=digest)
    with pytest.raises(IndexFileError, match="bytes"):
        open_index(path, sha256=digest, size=len(data) + 1)
    (tmp_path / "junk.usearch").write_bytes(b"\0" * 64)
    with pytest.raises(IndexFileError, match="not a usearch index"):
        open_index(tmp_path / "junk.usearch", sha256=None)
    with pytest.raises(IndexFileError, match="missing"):
        open_index(tmp_path / "none.usearch", sha256=None)


def test_bad_vectors_and_keys_are_rejected():
    from retrieval.vectors import add_vectors, as_keys, check_dtype, new_index

    idx = new_index(8, "f16")
    with pytest.raises(FedcbirError, match="NaN"):
        add_vectors(idx, [1], np.full((1, 8), np.nan, np.float32))
    with pytest.raises(ValueError):
        add_vectors(idx, [1, 2], np.ones((1, 8), np.float32))
    with pytest.raises(ValueError):
        as_keys([-1])
    with pytest.raises(FedcbirError):
        check_dtype("b1")


def test_deleted_slots_trigger_compaction(tmp_path):
    from retrieval.vectors import add_vectors, deleted_fraction, needs_compaction, new_index

    rng = np.random.default_rng(4)
    idx = new_index(16, "f16")
    add_vectors(idx, np.arange(100), unit(rng, 100, 16))
    idx.remove(np.arange(20, dtype=np.uint64))
    p = tmp_path / "a.usearch"
    idx.save(os.fspath(p))
    assert deleted_fraction(p) == pytest.approx(0.2) and not needs_compaction(p)
    idx.remove(np.arange(20, 40, dtype=np.uint64))
    idx.save(os.fspath(p))
    assert needs_compaction(p)


# ----------------------------------------------------------------------------- store


def _product(i, **kw):
    from catalog.abo import Product

    d = dict(item_id=f"B{i:09d}", product_type="MUG" if i % 2 else "CHAIR", name=f"Thing {i}", brand="Acme",
             color="Red", country="US", main_image=f"00/{i:08x}.jpg", other_images=[f"01/{i:08x}.jpg"])
    d.update(kw)
    return Product(**d)


def test_store_round_trip_and_read_only_open(tmp_path):
    from retrieval.store import Store, StoreError, listing_hash

    path = tmp_path / "s.sqlite"
    s = Store.create(path, tmp_path)
    keys = s.allocate_keys(4)
    assert keys == [1, 2, 3, 4] and s.allocate_keys(1) == [5]
    for i in range(2):
        p = _product(i)
        s.put_product(p)
        s.add_image(keys[2 * i], p.item_id, p.main_image, True, 10, 20, "aa")
        s.add_image(keys[2 * i + 1], p.item_id, p.other_images[0], False, 10, 20, "bb")
    s.record_skipped("B000000001", "02/x.jpg", "cannot read image x: empty", 0, 1)
    s.commit_and_close()
    ro = Store.open_readonly(path)
    try:
        assert ro.counts() == {"products": 2, "images": 4, "skipped": 1, "product_types": 2}
        rows = ro.rows_for_keys([1, 2, 3, 99])
        assert set(rows) == {1, 2, 3} and rows[1].is_main and not rows[2].is_main
        assert rows[3].name == "Thing 1" and rows[3].product_type == "MUG"
        assert ro.main_images() == {"B000000000": 1, "B000000001": 3}
        assert ro.product_types() == {"CHAIR": 1, "MUG": 1}
        assert ro.listing_hashes()["B000000000"] == listing_hash(_product(0))
        assert ro.skipped_files() == {("B000000001", "02/x.jpg"): (0, 1)}
        with pytest.raises(sqlite3.OperationalError):
            ro.conn.execute("DELETE FROM images")
    finally:
        ro.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sqlite"]  # no journal left behind
    # an update works on a copy; the original is untouched
    before = path.read_bytes()
    up = Store.copy_for_update(path, tmp_path / "t.sqlite")
    assert up.delete_product("B000000000") == [1, 2]
    up.commit_and_close()
    assert path.read_bytes() == before
    assert Store.open_readonly(tmp_path / "t.sqlite").counts()["images"] == 2
    (tmp_path / "bad.sqlite").write_bytes(b"SQLite format 3\0" + b"\xff" * 200)
    with pytest.raises(StoreError):
        Store.open_readonly(tmp_path / "bad.sqlite")
    with pytest.raises(StoreError, match="missing"):
        Store.open_readonly(tmp_path / "nope.sqlite")


def test_listing_hash_sees_metadata_and_photo_changes():
    from retrieval.store import listing_hash

    base = listing_hash(_product(1))
    assert listing_hash(_product(1)) == base
    assert listing_hash(_product(1, name="Other")) != base
    assert listing_hash(_product(1, other_images=["01/x.jpg", "02/y.jpg"])) != base


def test_verified_files_are_not_hashed_again_until_they_change(tmp_path, monkeypatch):
    import retrieval.vectors as ri

    monkeypatch.setenv("FEDCBIR_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    digest = ri.sha256_file(f)
    calls = []
    real = ri.sha256_file
    monkeypatch.setattr(ri, "sha256_file", lambda p: calls.append(p) or real(p))
    ri.verify_file(f, digest, 3000, "file", use_cache=True)
    ri.verify_file(f, digest, 3000, "file", use_cache=True)
    assert len(calls) == 1
    ri.verify_file(f, digest, 3000, "file")  # without the cache: always hashed
    assert len(calls) == 2
    with open(f, "r+b") as fh:  # same size, same inode, new content
        fh.write(b"X")
    with pytest.raises(ri.IndexFileError, match="sha256"):
        ri.verify_file(f, digest, 3000, "file", use_cache=True)
    assert len(calls) == 3
