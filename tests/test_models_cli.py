"""``fedcbir models info|parity``: JSON keys, exit codes, user errors."""
import argparse
import json

from fedcbir.cli import run
from models.cli import register


def _main(argv):
    parser = argparse.ArgumentParser(prog="fedcbir")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    register(sub)
    return run(parser, argv)


def test_info_json(capsys):
    assert _main(["models", "info", "--json"]) == 0  # the default: EfficientNet-Lite0, 160 px
    info = json.loads(capsys.readouterr().out)
    assert info["spec"]["name"] == "efficientnet-lite0" and info["spec"]["input_size"] == 160
    assert info["params_trainable"] == 3698944 and info["canonical_names"] == 247
    assert _main(["models", "info", "--arch", "mobilenetv3-small", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_trainable"] == 1000864
    assert info["canonical_names"] == 208
    assert 20e6 < info["forward_flops"] < 22e6
    assert info["spec"]["input_size"] == 96
    assert _main(["models", "info", "--arch", "mobilenetv3-small", "--width", "0.5", "--num-types", "4"]) == 0
    assert "parameters" in capsys.readouterr().out


def test_user_errors_exit_2(capsys):
    assert _main(["models", "info", "--size", "8"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid architecture spec")
    assert _main(["models", "parity", "--products", "1"]) == 2
    assert _main(["models", "parity", "--blocks", "99"]) == 2


def test_parity_json_keys(capsys):
    # same spec/config as tests/test_models_frameworks.py (compiled trainers are reused)
    rc = _main(["models", "parity", "--json", "--arch", "mobilenetv3-small", "--width", "0.5", "--size", "32", "--blocks", "4"])
    out = json.loads(capsys.readouterr().out)
    pairs = {"torch-tf", "torch-jax", "tf-jax"}
    assert set(out["eval_max_abs_diff"]) == pairs
    assert set(out["train_step_max_abs_diff"]) == pairs
    assert set(out["train_step_max_abs_diff_sgd"]) == pairs
    assert all(isinstance(v, float) for v in out["train_step_max_abs_diff"].values())
    assert rc == 0 and out["ok"] is True
    assert out["kernels"]["jax"]["depthwise_impl"] == "shift"
