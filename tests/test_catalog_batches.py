"""Decode-once image table and deterministic P x K batches."""
import time

import numpy as np
import pytest

import catalog.batches as batches
from catalog.abo import load_products
from catalog.batches import ImageTable, PKBatches, augment_uint8, eval_batches
from catalog.images import DEFAULT_PREPROCESS, Preprocess, normalize
from catalog.sample import generate_sample


@pytest.fixture(scope="module")
def table(sample_catalog):
    products = load_products(sample_catalog)[:12]
    return ImageTable.load(sample_catalog, products, progress=False)


def test_table_shapes_and_labels(table):
    assert table.images.shape == (60, 96, 96, 3) and table.images.dtype == np.uint8
    assert table.labels.dtype == np.int64 and table.types.dtype == np.int64
    assert np.array_equal(np.bincount(table.labels), [5] * 12)
    assert len(table.item_ids) == 12 and table.num_products == 12 and len(table) == 60
    assert table.type_names == sorted(set(table.type_names))
    assert table.skipped == []
    assert table.pre == DEFAULT_PREPROCESS


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "s"
    generate_sample(root, products=3, views=2, progress=False)
    products = load_products(root)
    bad = root / "images" / "small" / products[1].other_images[0]
    bad.write_bytes(bad.read_bytes()[:100])
    (root / "images" / "small" / products[2].main_image).unlink()
    t = ImageTable.load(root, products, Preprocess(size=32), progress=False)
    assert len(t) == 4 and len(t.skipped) == 2
    assert t.images.shape == (4, 32, 32, 3)
    assert list(t.labels) == [0, 0, 1, 2]
    types = ImageTable.load(root, products, Preprocess(size=32), progress=False,
                            type_names=["ZZZ"] + sorted({p.product_type for p in products}))
    assert types.type_names[0] == "ZZZ" and 0 not in types.types


def test_cache_round_trip(sample_catalog, tmp_path, monkeypatch):
    products = load_products(sample_catalog)[:4]
    first = ImageTable.load(sample_catalog, products, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("images-*.u8"))) == 1 and len(list(tmp_path.glob("images-*.json"))) == 1
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    assert isinstance(first.images, batches.DiskImages) and first.images.path.parent == tmp_path

    def boom(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(batches, "load_image", boom)
    second = ImageTable.load(sample_catalog, products, progress=False, cache_dir=tmp_path)
    assert np.array_equal(first.images, second.images) and second.paths == first.paths
    assert second.item_ids == first.item_ids and np.array_equal(second.types, first.types)
    monkeypatch.undo()
    other = ImageTable.load(sample_catalog, products, Preprocess(size=48), progress=False, cache_dir=tmp_path)
    assert other.images.shape[1] == 48 and len(list(tmp_path.glob("images-*.u8"))) == 2
    # a damaged cache (pixels cut short) is rebuilt, never fatal
    pixels = first.images.path
    ref = np.asarray(first.images)
    pixels.write_bytes(pixels.read_bytes()[:1000])
    rebuilt = ImageTable.load(sample_catalog, products, progress=False, cache_dir=tmp_path)
    assert np.array_equal(rebuilt.images, ref)


def test_cache_is_committed_only_when_complete(sample_catalog, tmp_path, monkeypatch):
    """A decode that fails part-way leaves no cache (nor temporary files) behind."""
    products = load_products(sample_catalog)[:4]
    calls = {"n": 0}
    real = batches.load_image

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(batches, "load_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        ImageTable.load(sample_catalog, products, progress=False, cache_dir=tmp_path, workers=1)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    t = ImageTable.load(sample_catalog, products, progress=False, cache_dir=tmp_path)
    assert len(t) == 20 and len(list(tmp_path.iterdir())) == 2


def test_disk_images_index_like_numpy(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(37, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "t.u8"
    path.write_bytes(ref.tobytes())
    d = batches.DiskImages.open(path, ref.shape)
    assert len(d) == 37 and d.shape == ref.shape and d.dtype == np.uint8 and d.ndim == 4
    for key in (0, -1, 5, slice(None), slice(3, 9), slice(30, 99), slice(None, None, 3), slice(9, 2, -2),
                np.array([4, 5, 6, 1, 1, 36]), [2, 0], np.arange(37) % 2 == 0, np.array([], np.int64),
                np.array([[1, 2], [3, 4]]), (slice(2, 4), 0), np.int64(7)):
        assert np.array_equal(d[key], ref[key]), key
    assert np.array_equal(np.asarray(d), ref) and np.array_equal(d.memmap(), ref)
    for bad in (37, -38, np.array([0, 40]), np.ones(5, bool)):
        with pytest.raises(IndexError):
            d[bad]
    import pickle

    assert np.array_equal(pickle.loads(pickle.dumps(d))[3:5], ref[3:5])
    with pytest.raises(ValueError):
        batches.DiskImages.open(path, (38, 4, 4, 3))


def test_reading_batches_does_not_grow_memory_with_the_table(tmp_path):
    """Peak RSS of a process that reads every row of a 300 MB table in random P x K batches
    stays near its start (pread; a numpy memmap would make the whole file resident)."""
    import subprocess
    import sys

    n, s = 4000, 160  # 4000 x 160 x 160 x 3 = 307 MB
    path = tmp_path / "big.u8"
    with open(path, "wb") as f:
        row = np.zeros((s, s, 3), np.uint8)
        for _ in range(n):
            f.write(row.data)
    code = f"""
import numpy as np
from catalog.batches import DiskImages, ImageTable, PKBatches
from catalog.images import Preprocess
from common.memory import vm_hwm_mb
d = DiskImages.open({str(path)!r}, ({n}, {s}, {s}, 3))
t = ImageTable(images=d, labels=np.arange({n}) // 4, types=np.zeros({n}, np.int64), paths=[""] * {n},
               item_ids=[str(i) for i in range({n} // 4)], type_names=["X"], pre=Preprocess(size={s}))
pk = PKBatches(t, p=16, k=4, seed=0, augment=False)
pk.batch(0, 0)
base = vm_hwm_mb()
for step in range(pk.steps_per_epoch):
    pk.batch(0, step)
print(base, vm_hwm_mb())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    base, peak = map(float, out.split())
    assert peak - base < 60, (base, peak)  # one batch is 20 MB of float32


def test_pk_batches_shape_and_determinism(table):
    pk = PKBatches(table, p=4, k=3, seed=7)
    assert pk.steps_per_epoch == 3 and len(pk) == 3 and pk.batch_size == 12
    e0 = list(pk.epoch(0))
    assert len(e0) == 3
    for b in e0:
        assert b.x.shape == (12, 96, 96, 3) and b.x.dtype == np.float32
        assert b.labels.dtype == np.int64 and b.types.dtype == np.int64
        assert list(np.unique(b.labels, return_counts=True)[1]) == [3] * 4
        for lab, t in zip(b.labels, b.types):
            assert table.types[table.labels == lab][0] == t
    seen = np.concatenate([b.labels for b in e0])
    assert len(set(seen.tolist())) == 12  # every product once per epoch (12 = 3 x 4)
    again = PKBatches(table, p=4, k=3, seed=7)
    for a, b in zip(e0, again.epoch(0)):
        assert a.x.tobytes() == b.x.tobytes() and np.array_equal(a.labels, b.labels)
    assert pk.batch(0, 2).x.tobytes() == e0[2].x.tobytes()  # random access = the same batch
    e1 = list(pk.epoch(1))
    assert e1[0].x.tobytes() != e0[0].x.tobytes()
    other_seed = PKBatches(table, p=4, k=3, seed=8).batch(0, 0)
    assert other_seed.x.tobytes() != e0[0].x.tobytes()
    # iterating runs epoch 0, then epoch 1
    it = PKBatches(table, p=4, k=3, seed=7)
    assert [b.x.tobytes() for b in it] == [b.x.tobytes() for b in e0]
    assert next(iter(it)).x.tobytes() == e1[0].x.tobytes()


def test_products_with_few_photos_and_no_augmentation():
    imgs = np.arange(3 * 8 * 8 * 3, dtype=np.uint8).reshape(3, 8, 8, 3)
    t = ImageTable(images=imgs, labels=np.array([0, 1, 1], np.int64), types=np.array([0, 0, 0], np.int64),
                   paths=["a", "b", "c"], item_ids=["A", "B", "C"], type_names=["X"], pre=Preprocess(size=8))
    pk = PKBatches(t, p=8, k=4, seed=0, augment=False)
    assert pk.p == 2 and pk.steps_per_epoch == 1  # only two products have photos
    b = pk.batch(0, 0)
    assert b.x.shape == (8, 8, 8, 3)
    assert sorted(b.labels.tolist()) == [0] * 4 + [1] * 4
    assert np.array_equal(b.x[b.labels == 0][0], normalize(imgs[0], t.pre))  # one photo, repeated
    assert {float(x.sum()) for x in b.x[b.labels == 1]} == {float(normalize(imgs[1], t.pre).sum()),
                                                           float(normalize(imgs[2], t.pre).sum())}
    with pytest.raises(Exception):
        PKBatches(t, p=0)


def test_augmentation_is_seeded_and_in_range(table):
    raw = table.images[:8]
    a = augment_uint8(raw, np.random.default_rng(1))
    b = augment_uint8(raw, np.random.default_rng(1))
    assert a.dtype == np.float32 and a.shape == raw.shape and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 255
    assert not np.array_equal(a, raw.astype(np.float32))


def test_eval_batches_cover_the_table_in_order(table):
    got = list(eval_batches(table, 25))
    assert [len(b.labels) for b in got] == [25, 25, 10]
    assert np.array_equal(np.concatenate([b.labels for b in got]), table.labels)
    assert np.array_equal(got[0].x, normalize(table.images[:25], table.pre))


def test_batch_speed(table):
    pk = PKBatches(table, p=8, k=4, seed=0)
    pk.batch(0, 0)
    t0 = time.perf_counter()
    for _ in range(5):
        pk.batch(0, 0)
    assert (time.perf_counter() - t0) / 5 < 0.25  # a few ms normally; generous for busy machines
