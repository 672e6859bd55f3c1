"""The three frameworks compute the same function: names, converters, eval and training
parity (SGD and AdamW, type head on, FedProx on), BN statistics, optimizer formulas, loss.

Small spec for the training checks (first 4 blocks: no-expansion + SE + ReLU, expansion,
residual, 5x5 + SE + hard-swish; width 0.5, 32 px) to keep compile times low; the default
spec is checked in eval mode.
"""
import numpy as np
import pytest

from models.threads import set_threads

set_threads(1)  # before any framework import

from models import canonical, initial, parity  # noqa: E402
from models.api import FRAMEWORKS, TrainConfig, local_train, make_trainer  # noqa: E402
from models.losses import jax_loss, numpy_loss, tf_loss, torch_loss  # noqa: E402
from models.optim import OptimConfig  # noqa: E402
from models.spec import MOBILENET_V3_SMALL, ArchSpec  # noqa: E402

SMALL = ArchSpec(width=0.5, input_size=32, num_types=5, blocks=MOBILENET_V3_SMALL[:4])


@pytest.fixture(scope="module")
def batch():
    return parity.synthetic_batch(SMALL.input_size, 8, 4, seed=0, num_types=SMALL.num_types)


@pytest.fixture(scope="module")
def report(batch):
    # the same spec/config the CLI test uses (trainers are cached in models.parity)
    return parity.run_parity(SMALL, seed=0)


def test_builders_produce_the_canonical_names_and_shapes():
    import jax

    from models import flax_model, keras_model, torch_model

    spec = SMALL.replace(type_head_input="features")
    shapes = canonical.param_shapes(spec)
    sd = torch_model.build(spec).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()
            if not k.endswith("num_batches_tracked")} == shapes
    enc = keras_model.build(spec)
    kinds = canonical.param_kinds(spec)
    keras_shapes = {n: keras_model.from_keras_layout(kinds[n], np.zeros(v.shape)).shape
                    for n, v in enc.var_of.items()}
    assert keras_shapes == shapes
    assert len({id(v) for v in enc.var_of.values()}) == len(shapes)
    assert len(enc.embed_model.weights) == len(shapes) - 2  # no type head in the export graph
    model, _ = flax_model.build(spec)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)
    tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros(x.shape, x.dtype)))
    paths = {}
    for coll in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree[coll])[0]:
            paths[(coll, tuple(p.key for p in path))] = leaf.shape
    expected = {}
    for e in canonical.entries(spec):
        key = flax_model.flax_path(e.name, e.kind)
        expected[key] = flax_model.to_flax_layout(e.kind, np.zeros(e.shape)).shape
    assert paths == expected


def test_converters_are_lossless():
    from models import flax_model, keras_model, torch_model

    w = initial.init_weights(SMALL, 3)
    rng = np.random.default_rng(0)
    w = {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in w.items()}
    w = {k: np.abs(v) if canonical.is_bn_stat(k) else v for k, v in w.items()}
    back = {
        "torch": torch_model.to_canonical(torch_model.build(SMALL, w)),
        "keras": keras_model.to_canonical(keras_model.build(SMALL, w)),
        "flax": flax_model.to_canonical(SMALL, flax_model.from_canonical(SMALL, w)),
    }
    for fw, w2 in back.items():
        assert list(w2) == list(w), fw
        for k in w:
            assert w2[k].dtype == np.float32 and np.array_equal(w2[k], w[k]), (fw, k)


def test_eval_parity_default_spec():
    spec = ArchSpec()
    x, _, _ = parity.synthetic_batch(spec.input_size, 4, 2, seed=1)
    w = parity.parity_weights(spec, x, seed=1)
    emb = {}
    for fw in FRAMEWORKS:
        t = make_trainer(fw, spec, TrainConfig())
        t.set_weights(w)
        emb[fw] = t.embed(x, batch_size=5)  # uneven chunks on purpose
    assert emb["torch"].shape == (8, 128) and np.abs(emb["torch"]).max() > 0.1
    for a, b in parity.PAIRS:
        assert np.abs(emb[a] - emb[b]).max() <= 1e-5, (a, b)


def test_parity_report_meets_goals(report):
    for key in ("eval_max_abs_diff", "train_step_max_abs_diff", "train_step_max_abs_diff_sgd"):
        assert set(report[key]) == {"torch-tf", "torch-jax", "tf-jax"}
    assert max(report["eval_max_abs_diff"].values()) <= 1e-5
    assert max(report["train_step_max_abs_diff"].values()) <= 1e-4  # AdamW
    assert max(report["train_step_max_abs_diff_sgd"].values()) <= 1e-4
    assert report["ok"]
    # the loss includes the type head and a non-zero FedProx term, and agrees
    for opt in ("adamw", "sgd"):
        losses = report["loss"][opt]
        assert max(losses.values()) - min(losses.values()) < 1e-5
    assert report["prox_mu"] > 0 and report["spec"]["num_types"] > 0


def test_steps_keep_bn_statistics_and_weights_in_step(batch):
    """Several SGD steps on different batches: every canonical array stays within 1e-4,
    BN running statistics included (unbiased running variance everywhere)."""
    w = parity.parity_weights(SMALL, batch[0])
    cfg = TrainConfig(optim=parity.PARITY_OPTIMIZERS["sgd"], prox_mu=0.1, type_weight=0.5)
    batches = [parity.synthetic_batch(32, 8, 4, seed=s, num_types=5) for s in (1, 2, 3)]
    out = {}
    for fw in FRAMEWORKS:
        t = parity._trainer(fw, SMALL, cfg)
        t.set_weights(w)
        m = t.train(batches)
        assert m["steps"] == 3 and m["examples"] == 96 and m["threads"]["requested"] == 1
        out[fw] = t.get_weights()
    stats = [n for n in out["torch"] if canonical.is_bn_stat(n)]
    for a, b in parity.PAIRS:
        assert canonical.max_abs_diff(out[a], out[b]) <= 1e-4, (a, b)
        for n in stats:
            assert np.abs(out[a][n] - out[b][n]).max() <= 1e-4 * max(1, np.abs(out[a][n]).max())
    # the stats did move (momentum 0.1, three steps)
    assert np.abs(out["torch"]["stem.bn.running_mean"] - w["stem.bn.running_mean"]).max() > 1e-3


def test_recalibrate_bn_matches_manual_and_across_frameworks(batch):
    import torch

    x = batch[0]
    x2 = parity.synthetic_batch(32, 4, 4, seed=9)[0]
    w = initial.init_weights(SMALL, 0)
    out = {}
    for fw in FRAMEWORKS:
        t = make_trainer(fw, SMALL, TrainConfig())
        t.set_weights(w)
        info = t.recalibrate_bn([x, (x2, None)])
        assert info["batches"] == 2
        out[fw] = t.get_weights()
    # stem BN: mean over the two batches of the batch mean / unbiased variance of the conv
    conv = torch.nn.functional.conv2d
    ms, vs = [], []
    for xb in (x, x2):
        y = conv(torch.from_numpy(xb).permute(0, 3, 1, 2),
                 torch.from_numpy(w["stem.conv.weight"]), stride=2, padding=1)
        ms.append(y.mean((0, 2, 3)).numpy())
        vs.append(y.var((0, 2, 3), unbiased=True).numpy())
    np.testing.assert_allclose(out["torch"]["stem.bn.running_mean"], np.mean(ms, 0), atol=1e-5)
    np.testing.assert_allclose(out["torch"]["stem.bn.running_var"], np.mean(vs, 0), rtol=1e-4)
    for a, b in parity.PAIRS:
        for n in out[a]:
            if canonical.is_bn_stat(n):
                np.testing.assert_allclose(out[a][n], out[b][n], rtol=1e-4, atol=1e-5)
            else:
                assert np.array_equal(out[a][n], out[b][n])  # no weight update


def test_jax_depthwise_paths_agree(batch):
    x = batch[0][:8]
    w = parity.parity_weights(SMALL, batch[0])
    e = {}
    for impl in ("shift", "lax"):
        t = make_trainer("jax", SMALL, TrainConfig(), depthwise_impl=impl)
        t.set_weights(w)
        e[impl] = t.embed(x)
    assert np.abs(e["shift"] - e["lax"]).max() <= 1e-5
    t = make_trainer("torch", SMALL, TrainConfig(), memory_format="contiguous")
    t.set_weights(w)
    assert np.abs(t.embed(x) - e["lax"]).max() <= 1e-5


def test_local_train_and_type_only_labels(batch):
    x, labels, types = batch
    w = initial.init_weights(SMALL, 0)
    cfg = TrainConfig(optim=parity.PARITY_OPTIMIZERS["sgd"], prox_mu=0.1, type_weight=0.5)
    new, m = local_train("torch", SMALL, w, [(x, labels, types)] * 2, cfg)
    assert m["steps"] == 2 and m["loss"] > 0 and m["loss_type"] > 0
    assert set(new) == set(w) and not np.array_equal(new["proj.weight"], w["proj.weight"])


def _np_optimizer(cfg, params, grads_seq, decay):
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_seq, 1):
        for k in p:
            g = grads[k].astype(np.float64)
            if cfg.name == "sgd":
                if decay[k]:
                    g = g + cfg.weight_decay * p[k]
                m[k] = cfg.momentum * m[k] + g
                p[k] = p[k] - cfg.lr * m[k]
            else:
                b1, b2 = cfg.betas
                if decay[k]:
                    p[k] = p[k] * (1 - cfg.lr * cfg.weight_decay)
                m[k] = b1 * m[k] + (1 - b1) * g
                v2[k] = b2 * v2[k] + (1 - b2) * g * g
                mh, vh = m[k] / (1 - b1 ** t), v2[k] / (1 - b2 ** t)
                p[k] = p[k] - cfg.lr * mh / (np.sqrt(vh) + cfg.eps)
    return p


@pytest.mark.parametrize("cfg", [
    OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
    OptimConfig(name="adamw", lr=0.01, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
])
def test_optimizer_formulas_match_reference(cfg):
    import jax.numpy as jnp
    import optax
    import tensorflow as tf
    import torch

    from models.optim import TFOptimizer, optax_transform, torch_optimizer

    rng = np.random.default_rng(0)
    params = {"a.weight": rng.standard_normal((4, 3)).astype(np.float32),
              "a.bias": rng.standard_normal(4).astype(np.float32)}
    decay = {"a.weight": True, "a.bias": False}
    # tiny gradients included, where eps placement matters
    grads_seq = [{k: (rng.standard_normal(v.shape) * s).astype(np.float32)
                  for k, v in params.items()} for s in (1.0, 1e-6, 0.3, 1e-7, 2.0)]
    ref = _np_optimizer(cfg, params, grads_seq, decay)
    names = list(params)
    # torch
    tp = [torch.nn.Parameter(torch.from_numpy(params[n].copy())) for n in names]
    opt = torch_optimizer(cfg, list(zip(names, tp)), [n for n in names if decay[n]])
    for grads in grads_seq:
        for n, p in zip(names, tp):
            p.grad = torch.from_numpy(grads[n].copy())
        opt.step()
    got = {"torch": {n: p.detach().numpy() for n, p in zip(names, tp)}}
    # optax
    tx = optax_transform(cfg, {n: decay[n] for n in names})
    jp = {n: jnp.asarray(params[n]) for n in names}
    state = tx.init(jp)
    for grads in grads_seq:
        upd, state = tx.update({n: jnp.asarray(grads[n]) for n in names}, state, jp)
        jp = optax.apply_updates(jp, upd)
    got["optax"] = {n: np.asarray(jp[n]) for n in names}
    # TF
    tv = [tf.Variable(params[n]) for n in names]
    topt = TFOptimizer(cfg, tv, [decay[n] for n in names])
    step = tf.function(lambda gs: topt.apply(gs))
    for grads in grads_seq:
        step([tf.constant(grads[n]) for n in names])
    got["tf"] = {n: v.numpy() for n, v in zip(names, tv)}
    for fw, p in got.items():
        for n in names:
            np.testing.assert_allclose(p[n], ref[n], rtol=2e-6, atol=2e-7, err_msg=f"{fw} {n}")


def test_loss_matches_reference_in_all_frameworks():
    import jax.numpy as jnp
    import tensorflow as tf
    import torch

    rng = np.random.default_rng(0)
    e = rng.standard_normal((12, 16)).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 5], np.int32)  # 3 and 5: no positive
    types = np.array([0, 0, 0, 1, 1, 1, -1, -1, 2, 0, 0, 1], np.int32)
    logits = rng.standard_normal((12, 3)).astype(np.float32)
    ref = numpy_loss(e, labels, types, logits, 0.1, 0.3)
    got = {
        "torch": torch_loss(torch.from_numpy(e), torch.from_numpy(labels).long(),
                            torch.from_numpy(types).long(), torch.from_numpy(logits), 0.1, 0.3),
        "tf": tf_loss(tf.constant(e), tf.constant(labels), tf.constant(types),
                      tf.constant(logits), 0.1, 0.3),
        "jax": jax_loss(jnp.asarray(e), jnp.asarray(labels), jnp.asarray(types),
                        jnp.asarray(logits), 0.1, 0.3),
    }
    for fw, vals in got.items():
        np.testing.assert_allclose([float(v) for v in vals], ref, rtol=1e-5, err_msg=fw)
    # two products, two identical photos each, orthogonal products: the positive is the
    # best possible, loss = log(1 + 2 exp(-1/T)) ... exactly, by hand
    z = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    total, sup, _ = numpy_loss(z, [0, 0, 1, 1], temperature=0.5)
    lse = np.log(np.exp(2.0) + 2 * np.exp(0.0))
    assert sup == pytest.approx(-(2.0 - lse))


@pytest.mark.parametrize("kernel,stride,hw", [(3, 1, 7), (3, 2, 8), (5, 2, 9), (5, 1, 3)])
def test_jax_depthwise_backward_matches_autodiff(kernel, stride, hw):
    import jax
    import jax.numpy as jnp

    from models.flax_model import depthwise_lax, depthwise_shift_vjp

    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, hw, hw, 6)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
    pad = kernel // 2
    r = jnp.asarray(rng.standard_normal(depthwise_lax(x, k, stride, pad).shape), jnp.float32)

    def loss(fn):
        return lambda x, k: jnp.sum(fn(jnp.tanh(x), k, stride, pad) * r)

    got = jax.jit(jax.grad(loss(depthwise_shift_vjp), argnums=(0, 1)))(x, k)
    ref = jax.jit(jax.grad(loss(depthwise_lax), argnums=(0, 1)))(x, k)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
