"""Centralized baseline: checkpoints, metrics, resume that loses and repeats nothing."""
import json

import numpy as np
import pytest

from fedcbir.cli import main
from common.errors import FedcbirError
from models.centralized import TrainSettings, train
from models.checkpoint import load_checkpoint


def _settings(catalog, out, **kw):
    base = dict(framework="torch", catalog=catalog, out=out, epochs=2, arch="mobilenetv3-small", width=0.35, p=4, k=2,
                progress=False)
    base.update(kw)
    return TrainSettings(**base)


def test_train_writes_metrics_checkpoints_and_resume_is_exact(sample_catalog, tmp_path):
    full = train(_settings(sample_catalog, tmp_path / "full"))
    assert [h["epoch"] for h in full["history"]] == [0, 1, 2]
    for key in ("recall@1", "recall@5", "recall@10", "map@r", "type_precision@1"):
        assert 0.0 <= full["final"][key] <= 1.0
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]

    # interrupted after epoch 1, resumed to 2: same weights as the uninterrupted run
    train(_settings(sample_catalog, tmp_path / "part", epochs=1))
    resumed = train(_settings(sample_catalog, tmp_path / "part", epochs=2, resume=True))
    a, meta_a = load_checkpoint(full["checkpoint"])
    b, meta_b = load_checkpoint(resumed["checkpoint"])
    assert meta_a["epoch"] == meta_b["epoch"] == 2
    assert set(a) == set(b)
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) == 0.0
    epochs = [json.loads(l)["epoch"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # no epoch lost or repeated


def test_refuses_to_mix_runs(sample_catalog, tmp_path):
    train(_settings(sample_catalog, tmp_path / "run", epochs=1))
    with pytest.raises(FedcbirError, match="already holds a run"):
        train(_settings(sample_catalog, tmp_path / "run", epochs=1))
    with pytest.raises(FedcbirError, match="other settings"):
        train(_settings(sample_catalog, tmp_path / "run", epochs=2, framework="jax", resume=True))
    with pytest.raises(FedcbirError, match="no checkpoint"):
        train(_settings(sample_catalog, tmp_path / "empty", resume=True))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--framework", "torch", "--catalog", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert main(["train", "--framework", "cuda", "--catalog", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
