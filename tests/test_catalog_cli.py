"""``fedcbir catalog info | sample | partitions`` through the umbrella command."""
import argparse
import json
import subprocess
import sys

import pytest

import catalog.cli
import fedcbir.cli


def cli(argv):
    """``fedcbir.cli.main``; while a sibling package's CLI module is missing, the same
    dispatcher (``fedcbir.cli.run``) with only the catalog commands registered."""
    try:
        parser = fedcbir.cli.build_parser()
    except ModuleNotFoundError:
        parser = argparse.ArgumentParser(prog="fedcbir")
        sub = parser.add_subparsers(dest="command")
        sub.required = True
        catalog.cli.register(sub)
    return fedcbir.cli.run(parser, argv)


def test_info_json(sample_catalog, capsys):
    assert cli(["catalog", "info", str(sample_catalog), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["products"], info["images"], info["product_types"], info["missing_images"]) == (60, 300, 16, 0)
    assert isinstance(info["countries"], int) and info["countries"] >= 6
    assert sum(info["by_country"].values()) == 60


def test_info_table(sample_catalog, capsys):
    assert cli(["catalog", "info", str(sample_catalog)]) == 0
    out = capsys.readouterr().out
    assert "products" in out and "60" in out


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "country"])
def test_partitions_json(sample_catalog, capsys, scheme):
    assert cli(["catalog", "partitions", str(sample_catalog), "--clients", "3", "--scheme", scheme, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["train_products"] == 48 and res["test_products"] == 12
    assert [row["client"] for row in res["partitions"]] == [0, 1, 2]
    assert sum(row["products"] for row in res["partitions"]) == 48
    assert all(row["products"] > 0 and row["product_types"] for row in res["partitions"])


def test_partitions_table_and_bad_scheme(sample_catalog, capsys):
    assert cli(["catalog", "partitions", str(sample_catalog), "--clients", "2", "--scheme", "iid"]) == 0
    assert "client" in capsys.readouterr().out
    assert cli(["catalog", "partitions", str(sample_catalog), "--scheme", "nonsense"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_sample_command(tmp_path, capsys):
    out = tmp_path / "s"
    assert cli(["catalog", "sample", str(out), "--products", "3", "--views", "2", "--seed", "5", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["products"] == 3 and stats["images"] == 6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert cli(["catalog", "sample", str(tmp_path / "other"), "--products", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty" in err and "\n" not in err


def test_missing_root_is_one_line_error(tmp_path, capsys):
    for cmd in (["catalog", "info"], ["catalog", "partitions"]):
        assert cli(cmd + [str(tmp_path / "nowhere")]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "does not exist" in err and "\n" not in err


def test_help_has_examples(capsys):
    for cmd in (["catalog"], ["catalog", "info"], ["catalog", "sample"], ["catalog", "partitions"]):
        with pytest.raises(SystemExit) as e:
            cli(cmd + ["--help"])
        assert e.value.code == 0
        assert "example" in capsys.readouterr().out


def test_cli_module_imports_stay_light():
    code = ("import sys, catalog.cli; heavy = [m for m in ('numpy', 'PIL', 'torch', 'tensorflow', 'jax', 'datasets')"
            " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
