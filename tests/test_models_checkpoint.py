"""Checkpoint format: round trip, atomic layout, tamper/truncation/mismatch detection."""
import json

import numpy as np
import pytest

from common.errors import FedcbirError
from models import canonical
from models import initial
from models.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from models.spec import ArchSpec

SPEC = ArchSpec(width=0.5, input_size=32, num_types=3)


def _meta():
    return {"arch": SPEC, "preprocessing": {"size": 32, "mean": [0.5, 0.5, 0.5]},
            "framework": "jax", "round": 3, "metrics": {"loss": 1.25}, "client": "c7"}


def test_round_trip_prefix(tmp_path):
    w = initial.init_weights(SPEC, 4)
    json_path = save_checkpoint(tmp_path / "round-0003", w, _meta())
    assert json_path == tmp_path / "round-0003.json"
    assert (tmp_path / "round-0003.npz").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    for path in (tmp_path / "round-0003", json_path, tmp_path / "round-0003.npz"):
        w2, meta = load_checkpoint(path)
        assert list(w2) == canonical.param_names(SPEC)
        assert all(np.array_equal(w[k], w2[k]) and w2[k].dtype == np.float32 for k in w)
    assert ArchSpec.from_dict(meta["arch"]) == SPEC
    assert meta["framework"] == "jax" and meta["round"] == 3 and meta["client"] == "c7"
    assert meta["preprocessing"]["size"] == 32 and meta["metrics"] == {"loss": 1.25}
    assert len(meta["npz_sha256"]) == 64 and meta["fedcbir_version"] and meta["created"]


def test_round_trip_directory_and_float64_input(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    w = {k: v.astype(np.float64) for k, v in initial.init_weights(SPEC).items()}
    save_checkpoint(d, w, {"arch": SPEC.to_dict()})
    assert checkpoint_paths(d) == (d / "model.npz", d / "model.json")
    w2, _ = load_checkpoint(d)
    assert all(w2[k].dtype == np.float32 for k in w2)


def test_tampered_truncated_missing(tmp_path):
    w = initial.init_weights(SPEC)
    prefix = tmp_path / "c"
    save_checkpoint(prefix, w, _meta())
    npz = tmp_path / "c.npz"
    data = bytearray(npz.read_bytes())
    # tampered: same size, one byte changed
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(FedcbirError, match="sha256"):
        load_checkpoint(prefix)
    # truncated
    npz.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(FedcbirError, match="truncated"):
        load_checkpoint(prefix)
    npz.unlink()
    with pytest.raises(FedcbirError, match="not found"):
        load_checkpoint(prefix)
    with pytest.raises(FedcbirError, match="not found"):
        load_checkpoint(tmp_path / "nothing")


def test_damaged_json_and_wrong_architecture(tmp_path):
    w = initial.init_weights(SPEC)
    prefix = tmp_path / "c"
    json_path = save_checkpoint(prefix, w, _meta())
    original = json_path.read_text()
    for num_types, msg in ((0, "names do not match"), (5, "'type_head.weight' has shape")):
        doc = json.loads(original)
        doc["arch"]["num_types"] = num_types  # claims another architecture
        json_path.write_text(json.dumps(doc))
        with pytest.raises(FedcbirError, match=msg):
            load_checkpoint(prefix)
    json_path.write_text("{not json")
    with pytest.raises(FedcbirError, match="damaged"):
        load_checkpoint(prefix)


def test_save_validates(tmp_path):
    w = initial.init_weights(SPEC)
    with pytest.raises(FedcbirError, match="arch"):
        save_checkpoint(tmp_path / "x", w, {})
    with pytest.raises(FedcbirError, match="missing tensor"):
        save_checkpoint(tmp_path / "x", {k: v for k, v in list(w.items())[1:]}, {"arch": SPEC})
    with pytest.raises(FedcbirError, match="reserved"):
        save_checkpoint(tmp_path / "x", w, {"arch": SPEC, "npz_sha256": "0"})
    assert not list(tmp_path.iterdir())
