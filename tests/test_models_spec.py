"""Architecture spec, canonical names/layout/init, shared-name policy (no TF/JAX needed)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from common.errors import FedcbirError
from models import canonical
from models import initial
from models.api import TrainConfig, shared_names
from models.optim import OptimConfig
from models.spec import MOBILENET_V3_SMALL, ArchSpec, BlockSpec, flops, make_divisible, resolve


def test_spec_dict_round_trip_is_json():
    spec = ArchSpec(width=0.75, input_size=128, embedding_dim=64, num_types=7,
                    type_head_input="features", bn_eps=1e-5, bn_momentum=0.01)
    d = json.loads(json.dumps(spec.to_dict()))
    assert ArchSpec.from_dict(d) == spec
    assert hash(ArchSpec.from_dict(d)) == hash(spec)


@pytest.mark.parametrize("bad", [
    {"width": 0.0}, {"input_size": 16}, {"num_types": -1}, {"type_head_input": "x"},
    {"bn_momentum": 0.0}, {"blocks": []}, {"blocks": [[4, 16, 16, False, "relu", 1]]},
])
def test_spec_rejects_bad_values(bad):
    with pytest.raises(FedcbirError):
        ArchSpec(**bad)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(FedcbirError, match="unknown"):
        ArchSpec.from_dict({"widht": 1.0})


def test_resolve_default_shapes():
    r = resolve(ArchSpec())
    assert r.stem.out_hw == 48 and r.stem.cout == 16
    assert [b.dw.out_hw for b in r.blocks] == [24, 12, 12, 6, 6, 6, 6, 6, 3, 3, 3]
    assert r.blocks[0].expand is None  # 16 -> 16: no expansion conv (as MobileNetV3)
    assert [b.residual for b in r.blocks] == [False, False, True, False, True, True, False,
                                              True, False, True, True]
    assert r.feature_dim == 576 and r.feature_hw == 3


def test_width_rounding_multiple_of_8():
    r = resolve(ArchSpec(width=0.75))
    for b in r.blocks:
        for c in (b.dw.cout, b.project.cout):
            assert c % 8 == 0
    assert make_divisible(72 * 0.75) == 56 and make_divisible(3) == 8


def test_flops_counted_from_the_spec():
    # one block, hand count: stem 3x3x3->8 at 16x16; block: dw3x3 s1 at 16x16 on 8 ch (no
    # expansion), SE 8->8->8, project 8->8; head 8->16; proj 16->4
    spec = ArchSpec(width=0.5, input_size=32, embedding_dim=4, stem_channels=16,
                    head_channels=32, blocks=(BlockSpec(3, 16, 16, True, "relu", 1),))
    macs = (16 * 16 * 8 * 27) + (16 * 16 * 8 * 9) + (2 * 8 * 8) + (16 * 16 * 8 * 8) \
        + (16 * 16 * 16 * 8) + 16 * 4
    assert flops(spec) == 2 * macs
    assert flops(spec, batch=32) == 64 * macs
    assert 20e6 < flops(ArchSpec()) < 22e6  # MobileNetV3-Small at 96 px


def test_canonical_names_match_torch_state_dict():
    torch_model = pytest.importorskip("models.torch_model")
    for spec in (ArchSpec(), ArchSpec(width=0.5, input_size=64, num_types=3,
                                      type_head_input="features")):
        sd = torch_model.build(spec).state_dict()
        sd = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        assert list(sd) == canonical.param_names(spec)
        assert sd == canonical.param_shapes(spec)


def test_init_is_deterministic_and_per_name():
    spec = ArchSpec(width=0.5, input_size=32)
    a, b, c = (initial.init_weights(spec, 0), initial.init_weights(spec, 0),
               initial.init_weights(spec, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["stem.conv.weight"], c["stem.conv.weight"])
    # adding a type head does not change the backbone's initialisation
    d = initial.init_weights(spec.replace(num_types=5), 0)
    assert all(np.array_equal(a[k], d[k]) for k in a)
    assert all(v.dtype == np.float32 for v in a.values())
    assert np.all(a["stem.bn.weight"] == 1) and np.all(a["stem.bn.running_var"] == 1)
    assert np.all(a["stem.bn.bias"] == 0) and np.all(a["stem.bn.running_mean"] == 0)
    std = a["blocks.1.expand.conv.weight"].std()  # fan_out = 40 * 1 * 1
    assert abs(std - np.sqrt(2 / 40)) < 0.02
    assert abs(a["blocks.1.dw.conv.weight"].std() - np.sqrt(2 / 9)) < 0.05


def test_validate_weights_names_first_offender():
    spec = ArchSpec(width=0.5, input_size=32)
    w = initial.init_weights(spec)
    canonical.validate_weights(spec, w)
    cases = [
        ({k: v for k, v in w.items() if k != "head.bn.bias"}, "missing tensor 'head.bn.bias'"),
        ({**w, "extra.weight": np.zeros(1, np.float32)}, "unexpected tensor 'extra.weight'"),
        ({**w, "proj.bias": np.zeros(3, np.float32)}, "'proj.bias' has shape"),
        ({**w, "proj.bias": w["proj.bias"].astype(np.float64)}, "'proj.bias' has dtype"),
    ]
    bad = dict(w)
    bad["blocks.0.dw.conv.weight"] = w["blocks.0.dw.conv.weight"].copy()
    bad["blocks.0.dw.conv.weight"][0, 0, 0, 0] = np.nan
    cases.append((bad, "'blocks.0.dw.conv.weight' contains NaN"))
    for weights, msg in cases:
        with pytest.raises(FedcbirError, match=msg.replace("(", r"\(")):
            canonical.validate_weights(spec, weights)


def test_bn_helpers_decay_rule_and_shared_names():
    spec = ArchSpec(num_types=4)
    names = canonical.param_names(spec)
    assert canonical.is_bn_stat("blocks.3.dw.bn.running_var")
    assert canonical.is_bn_param("stem.bn.weight") and not canonical.is_bn_param("proj.weight")
    assert not canonical.is_bn_stat("stem.bn.weight")
    decay = set(canonical.decay_names(spec))
    assert "proj.weight" in decay and "blocks.3.se.fc1.weight" in decay
    assert not any(canonical.is_bn(n) or n.endswith(".bias") for n in decay)
    local = shared_names(spec, "local")
    assert set(local) == {n for n in names if ".bn." not in n}
    assert "type_head.weight" in local
    assert shared_names(spec, "shared") == names
    with pytest.raises(FedcbirError):
        shared_names(spec, "fedbn")


def test_configs_validate_and_serialise():
    cfg = TrainConfig(optim=OptimConfig(name="sgd", lr=0.01), prox_mu=0.01)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(FedcbirError):
        OptimConfig(name="adam")
    with pytest.raises(FedcbirError):
        TrainConfig(bn_policy="global")


def test_light_modules_do_not_import_frameworks():
    code = ("import sys, models.cli, models.spec, models.canonical, models.api, "
            "models.checkpoint, models.losses, models.optim, models.parity, models.threads; "
            "bad = [m for m in ('torch', 'tensorflow', 'jax', 'keras') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_block_spec_list_round_trip():
    assert BlockSpec.from_list(MOBILENET_V3_SMALL[3].to_list()) == MOBILENET_V3_SMALL[3]
