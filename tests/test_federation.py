"""Federated training (server + clients) with an in-process Grid: no SuperLink, Ray or network.

Clients train with PyTorch in this process (run config ``client-isolation = "inline"``)
on a tiny catalog (24 products x 4 views) and a small, 32 px model, except the
memory test, which runs real child processes (``edge_client.worker``).
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
torch = pytest.importorskip("torch")

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402

from edge_client.app import app as client_app  # noqa: E402
from server.federation import Federation  # noqa: E402
from server.inprocess import InProcessGrid  # noqa: E402
from server.runconfig import DEFAULTS, RunConfig  # noqa: E402
from server.strategies import make_strategy  # noqa: E402
from server.validation import to_numpy, to_record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]



def _rc(catalog, **kw):
    rc = {"catalog": str(catalog), "arch": "mobilenetv3-small", "lr": 0.002, "bn-policy": "local", "products-per-batch": 8,
          "width": 0.35, "input-size": 32, "embedding-dim": 32, "frameworks": "torch",
          "profiles": "rpi4,rpi5,jetson-nano-cpu", "partition": "iid", "num-server-rounds": 2,
          "client-isolation": "inline", "fraction-evaluate": 0.0, "eval-framework": "torch"}
    rc.update({k.replace("_", "-"): v for k, v in kw.items()})
    return RunConfig.from_flower(rc).to_flower()


def _run(rc, out, nodes=3, **grid_kw):
    grid = InProcessGrid(client_app, nodes, rc, **grid_kw)
    summary = Federation(grid, RunConfig.from_flower(rc), out, log=lambda s: None).run()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return grid, summary, rows


def _final_weights(out):
    from models.checkpoint import load_checkpoint
    from server.federation import latest_checkpoint

    return load_checkpoint(latest_checkpoint(Path(out)))[0]


# ----------------------------------------------------------------------------- config


def test_run_config_keys_are_declared_in_pyproject():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert cfg["components"] == {"serverapp": "server.app:app", "clientapp": "edge_client.app:app"}
    assert cfg["config"] == DEFAULTS


def test_generated_app_pyproject_declares_every_key():
    from common.flower import app_pyproject

    doc = tomllib.loads(app_pyproject(DEFAULTS))
    assert doc["tool"]["flwr"]["app"]["config"] == DEFAULTS
    assert "federations" not in doc["tool"]["flwr"]


def test_unknown_run_config_key_is_refused():
    from common.errors import FedcbirError

    with pytest.raises(FedcbirError, match="unknown run-config"):
        RunConfig.from_flower({"no-such-key": 1})


def test_client_holdout_is_deterministic_and_disjoint(tiny_catalog):
    from catalog.dataset import CatalogSplit, client_holdout, holdout_photo

    split = CatalogSplit.load(tiny_catalog)
    train, ev = client_holdout(split.train, seed=0)
    assert [p.item_id for p in train] == [p.item_id for p in split.train] == [p.item_id for p in ev]
    for full, t, e in zip(split.train, train, ev):
        held = holdout_photo(full, 0)
        assert held == holdout_photo(full, 0)
        if held is None:
            assert t.images == full.images and e.other_images == []
        else:
            assert held not in t.images and e.images == [full.main_image, held]
            assert sorted(t.images + [held]) == sorted(full.images)


# ----------------------------------------------------------------------------- strategy-level validation


def _fake_round(strategy_name, replies_spec, catalog):
    """configure_train on a 1-node grid, then hand-made replies to aggregate_train."""
    from models.initial import init_weights

    cfg = RunConfig.from_flower(_rc(catalog, strategy=strategy_name))
    spec = cfg.arch_spec(3)
    glob = init_weights(spec, 0)
    strategy = make_strategy(cfg)
    grid = InProcessGrid(client_app, 1, {})
    [msg] = list(strategy.configure_train(1, to_record(glob), ConfigRecord(), grid))
    msg.metadata.__dict__["_message_id"] = "m0"
    replies = []
    for i, (kind, payload, n) in enumerate(replies_spec):
        if kind == "error":
            reply = Message(Error(code=0, reason=payload), reply_to=msg)
        else:
            arrays = payload(glob, i)
            rec = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
            reply = Message(RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": n, "loss": 1.0})}),
                            reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = 100 + i
        replies.append(reply)
    agg, _ = strategy.aggregate_train(1, replies)
    return glob, (to_numpy(agg) if agg is not None else None), strategy.last_report


def _shift(delta):
    def make(glob, i):
        return {k: (v + np.float32(delta * (i + 1))).astype(np.float32) for k, v in glob.items()}
    return make


def test_fedavg_weighted_average_and_float32(tiny_catalog):
    glob, agg, report = _fake_round("fedavg", [("ok", _shift(0.01), 10), ("ok", _shift(0.01), 30)], tiny_catalog)
    assert [r["status"] for r in report] == ["ok", "ok"]
    for k in glob:
        assert agg[k].dtype == np.float32
        np.testing.assert_allclose(agg[k], glob[k] + (0.01 * 10 + 0.02 * 30) / 40, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,why", [
    (lambda g, i: {**g, next(iter(g)): np.full_like(next(iter(g.values())), np.nan)}, "non-finite"),
    (lambda g, i: {**g, next(iter(g)): np.zeros((3, 3), np.float32)}, "wrong shape"),
    (lambda g, i: {**{k: v for k, v in list(g.items())[1:]}, "evil.weight": np.zeros(1, np.float32)}, "wrong tensor names"),
    (lambda g, i: {k: v.astype(np.float64) for k, v in g.items()}, "wrong dtype"),
    (lambda g, i: {k: v + np.float32(50.0) for k, v in g.items()}, "update norm"),
])
def test_bad_updates_are_rejected_and_do_not_touch_the_model(tiny_catalog, bad, why):
    good = _shift(0.001)
    glob, agg, report = _fake_round("fedavg", [("ok", good, 10), ("bad", bad, 10), ("ok", good, 10)], tiny_catalog)
    assert [r["status"] for r in report] == ["ok", "rejected", "ok"]
    assert why in report[1]["reason"]
    for k in glob:  # average of the two good replies only (+0.001, +0.003)
        np.testing.assert_allclose(agg[k], glob[k] + 0.002, rtol=1e-5, atol=1e-6)


def test_fp16_updates_are_upcast(tiny_catalog):
    half = lambda g, i: {k: (v + np.float32(0.01)).astype(np.float16) for k, v in g.items()}  # noqa: E731
    glob, agg, report = _fake_round("fedavg", [("ok", half, 5), ("ok", half, 5)], tiny_catalog)
    assert [r["status"] for r in report] == ["ok", "ok"]
    assert all(v.dtype == np.float32 for v in agg.values())


def test_error_replies_and_all_rejected(tiny_catalog):
    nan = lambda g, i: {k: np.full_like(v, np.nan) for k, v in g.items()}  # noqa: E731
    glob, agg, report = _fake_round("fedavg", [("error", "offline: rpi4 not available [partition=0 framework=torch "
                                                          "profile=rpi4]", 1),
                                               ("error", "out of memory: peak 1200 MB", 1), ("ok", nan, 3)],
                                    tiny_catalog)
    assert agg is None
    assert [r["status"] for r in report] == ["offline", "dropped", "rejected"]


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedtrimmedavg", "krum"])
def test_every_strategy_returns_float32(tiny_catalog, name):
    specs = [("ok", _shift(0.001), 10 + i) for i in range(5)]
    glob, agg, report = _fake_round(name, specs, tiny_catalog)
    assert all(r["status"] == "ok" for r in report)
    assert set(agg) == set(glob) and all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in agg.values())


# ----------------------------------------------------------------------------- whole federations


def test_federation_writes_metrics_checkpoints_summary(tiny_catalog, tmp_path):
    rc = _rc(tiny_catalog, fraction_evaluate=1.0, bn_policy="local")
    grid, summary, rows = _run(rc, tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["clients"] == []
    for r in rows[1:]:
        assert len(r["clients"]) == 3 and r["accepted"] == 3
        for c in r["clients"]:
            for key in ("node", "partition", "framework", "profile", "simulated_seconds", "host_seconds",
                        "bytes_up", "bytes_down", "peak_rss_mb", "status", "reason", "local_recall@1"):
                assert key in c, key
            assert c["status"] == "ok" and c["framework"] == "torch" and c["bytes_up"] > 0
            assert c["simulated_seconds"] >= c["host_seconds"] * 0.0
        assert r["client_eval"] and 0.0 <= r["client_eval"]["recall@1"] <= 1.0
    assert sorted(c["partition"] for c in rows[1]["clients"]) == [0, 1, 2]
    assert [c["profile"] for c in sorted(rows[1]["clients"], key=lambda c: c["partition"])] == \
        ["rpi4", "rpi5", "jetson-nano-cpu"]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("round-*.json"))
    assert ckpts == ["round-0000.json", "round-0001.json", "round-0002.json"]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["final"]["round"] == 2 and s["client_status_counts"] == {"ok": 6}
    from models.checkpoint import load_checkpoint

    w0, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-0000")
    w2 = _final_weights(tmp_path / "run")
    assert all(v.dtype == np.float32 for v in w2.values())
    assert any(not np.array_equal(w0[k], w2[k]) for k in w0)
    # FedBN: every node keeps its own BN tensors in context.state
    for ctx in grid.contexts.values():
        assert "fedbn" in ctx.state.array_records


def test_rejected_client_leaves_global_model_as_if_absent(tiny_catalog, tmp_path, monkeypatch):
    """Node 1 uploads a huge update: it is rejected, and the global model equals a run
    in which node 1 never answered."""
    import edge_client.node as node_mod

    real_train = node_mod.Node.train

    def evil_train(self, server_round, weights, anchor, prox_mu):
        new, m = real_train(self, server_round, weights, anchor, prox_mu)
        if self.partition == 1:
            new = {k: v * np.float32(1e3) for k, v in new.items()}
        return new, m

    rc = _rc(tiny_catalog, num_server_rounds=1, round_timeout=1.0)
    monkeypatch.setattr(node_mod.Node, "train", evil_train)
    _, _, rows = _run(rc, tmp_path / "evil")
    monkeypatch.setattr(node_mod.Node, "train", real_train)
    _, _, rows_silent = _run(rc, tmp_path / "silent", silent={101})
    by_part = {c["partition"]: c for c in rows[1]["clients"]}
    assert by_part[1]["status"] == "rejected" and "update norm" in by_part[1]["reason"]
    assert by_part[0]["status"] == by_part[2]["status"] == "ok"
    silent = [c for c in rows_silent[1]["clients"] if c["node"] == 101][0]
    assert silent["status"] == "dropped" and "timeout" in silent["reason"]
    a, b = _final_weights(tmp_path / "evil"), _final_weights(tmp_path / "silent")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_offline_device_and_client_exception(tiny_catalog, tmp_path, monkeypatch):
    src = (REPO / "device_profiles" / "rpi4.toml").read_text()
    offline = tmp_path / "never-online.toml"
    offline.write_text(src.replace('name = "rpi4"', 'name = "never-online"')
                       .replace("\navailability = 0.95", "\navailability = 0.0"))
    rc = _rc(tiny_catalog, num_server_rounds=1, profiles=f"rpi4,rpi5,{offline}", fraction_evaluate=1.0)
    import edge_client.node as node_mod

    real_train = node_mod.Node.train

    def flaky(self, *a, **k):
        if self.partition == 1:
            raise RuntimeError("disk full")
        return real_train(self, *a, **k)

    monkeypatch.setattr(node_mod.Node, "train", flaky)
    _, summary, rows = _run(rc, tmp_path / "run")
    by_part = {c["partition"]: c for c in rows[1]["clients"]}
    assert by_part[2]["status"] == "offline" and by_part[2]["reason"].startswith("offline:")
    assert by_part[2]["profile"] == "never-online"
    assert by_part[1]["status"] == "dropped" and "disk full" in by_part[1]["reason"]
    assert by_part[0]["status"] == "ok" and rows[1]["accepted"] == 1


def test_fp16_upload_halves_bytes(tiny_catalog, tmp_path):
    _, _, rows = _run(_rc(tiny_catalog, num_server_rounds=1, fp16_upload=True), tmp_path / "run")
    for c in rows[1]["clients"]:
        assert c["status"] == "ok"
        assert 0.45 < c["bytes_up"] / c["bytes_down"] < 0.55
    assert all(v.dtype == np.float32 for v in _final_weights(tmp_path / "run").values())


@pytest.mark.parametrize("strategy,bn", [("fedavg", "local"), ("fedadam", "shared")])
def test_resume_gives_identical_weights(tiny_catalog, tmp_path, strategy, bn):
    full = tmp_path / "full"
    _run(_rc(tiny_catalog, strategy=strategy, bn_policy=bn, client_state_dir=str(full / "cs")), full)
    part = tmp_path / "part"
    kw = dict(strategy=strategy, bn_policy=bn, client_state_dir=str(part / "cs"))
    _run(_rc(tiny_catalog, num_server_rounds=1, **kw), part)
    _, summary, rows = _run(_rc(tiny_catalog, num_server_rounds=2, resume=True, **kw), part)
    assert [r["round"] for r in rows] == [0, 1, 2] and summary["resumed_from"] == 1
    a, b = _final_weights(full), _final_weights(part)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_and_fresh_run_refuses_old_folder(tiny_catalog, tmp_path):
    from common.errors import FedcbirError

    _run(_rc(tiny_catalog, num_server_rounds=1), tmp_path / "r")
    with pytest.raises(FedcbirError, match="already holds"):
        _run(_rc(tiny_catalog, num_server_rounds=1), tmp_path / "r")
    with pytest.raises(FedcbirError, match="other settings"):
        _run(_rc(tiny_catalog, num_server_rounds=2, resume=True, partition="dirichlet:0.5"), tmp_path / "r")


def test_fedbn_client_trains_from_its_own_bn(tiny_catalog, tmp_path, monkeypatch):
    import edge_client.node as node_mod
    from models import canonical

    seen = {}
    real_train = node_mod.Node.train

    def spy(self, server_round, weights, anchor, prox_mu):
        new, m = real_train(self, server_round, weights, anchor, prox_mu)
        seen[(self.partition, server_round)] = ({k: v.copy() for k, v in weights.items()},
                                                {k: v.copy() for k, v in new.items()})
        return new, m

    monkeypatch.setattr(node_mod.Node, "train", spy)
    out = tmp_path / "run"
    _run(_rc(tiny_catalog, bn_policy="local"), out)
    from models.checkpoint import load_checkpoint

    g1, _ = load_checkpoint(out / "checkpoints" / "round-0001")
    bn = [k for k in g1 if canonical.is_bn(k)]
    other = [k for k in g1 if not canonical.is_bn(k)]
    for p in range(3):
        received, _ = seen[(p, 2)]
        _, trained_r1 = seen[(p, 1)]
        assert all(np.array_equal(received[k], trained_r1[k]) for k in bn)  # own BN from round 1
        assert all(np.array_equal(received[k], g1[k]) for k in other)  # global everything else
        assert any(not np.array_equal(received[k], g1[k]) for k in bn)

    seen.clear()
    out2 = tmp_path / "shared"
    grid, _, _ = _run(_rc(tiny_catalog, bn_policy="shared"), out2)
    g1s, _ = load_checkpoint(out2 / "checkpoints" / "round-0001")
    for p in range(3):
        received, _ = seen[(p, 2)]
        assert all(np.array_equal(received[k], g1s[k]) for k in g1s)
    assert all("fedbn" not in ctx.state.array_records for ctx in grid.contexts.values())


def test_child_process_memory_check(tiny_catalog, tmp_path):
    """Real child processes: a TensorFlow client on a 1 GB Pi 3B+ exceeds its usable RAM,
    a PyTorch client on the same device does not."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("needs tensorflow")
    rc = _rc(tiny_catalog, num_server_rounds=1, frameworks="torch,tf", profiles="rpi3b", client_isolation="process")
    _, _, rows = _run(rc, tmp_path / "run", nodes=2)
    by_fw = {c["framework"]: c for c in rows[1]["clients"]}
    assert by_fw["torch"]["status"] == "ok" and by_fw["torch"]["peak_rss_mb"] < 700
    assert by_fw["tf"]["status"] == "dropped" and by_fw["tf"]["reason"].startswith("out of memory:")
    assert by_fw["tf"]["profile"] == "rpi3b"


# ----------------------------------------------------------------------------- the simulate command (no runtime)


def test_simulate_cli_builds_the_run_config(tiny_catalog, tmp_path):
    import argparse

    from fedcbir.simulate import _run_config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["simulate", "--catalog", str(tiny_catalog), "--out", str(tmp_path / "r"),
                              "--rounds", "2", "--fp16-upload", "--set", "bn-policy=shared",
                              "--set", "fraction-evaluate=0", "--set", "type-head=false"])
    rc = _run_config_from_args(args)
    cfg = RunConfig.from_flower(rc)
    assert cfg.num_server_rounds == 2 and cfg.fp16_upload and cfg.bn_policy == "shared"
    assert cfg.fraction_evaluate == 0.0 and cfg.type_head is False
    assert Path(cfg.out).is_absolute() and Path(cfg.client_state_dir).is_absolute()
    from common.errors import FedcbirError

    for bad in (["--set", "strategy=krum"], ["--set", "nope=1"], ["--set", "lr=fast"]):
        a = parser.parse_args(["simulate", "--catalog", str(tiny_catalog), "--out", str(tmp_path / "r"), *bad])
        with pytest.raises(FedcbirError):
            _run_config_from_args(a)


def test_simulate_fails_fast_on_impossible_partition(tiny_catalog, tmp_path, capsys):
    from fedcbir.simulate import main

    rc = main(["simulate", "--catalog", str(tiny_catalog), "--clients", "500", "--out", str(tmp_path / "r")])
    assert rc != 0 and "500" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pretrained default


def test_partial_fine_tuning_sends_only_the_trained_part(tiny_catalog, tmp_path):
    """The default encoder (EfficientNet-Lite0, ImageNet) at 64 px: only blocks >= 11, the head
    and the projection travel; the frozen part in the final checkpoint is the ImageNet one."""
    from models import canonical
    from models.pretrained import convert

    rc = RunConfig.from_flower({"catalog": str(tiny_catalog), "input-size": 64, "embedding-dim": 16,
                                "frameworks": "torch", "partition": "iid", "num-server-rounds": 1,
                                "max-steps": 2, "client-isolation": "inline", "fraction-evaluate": 0.0,
                                "products-per-batch": 4}).to_flower()
    grid, summary, rows = _run(rc, tmp_path / "run", nodes=2)
    cfg = RunConfig.from_flower(rc)
    spec = cfg.arch_spec(3)
    shared = cfg.shared_names(spec)
    assert cfg.trained_from() == 11 and not any(n.startswith(("stem.", "blocks.3.")) for n in shared)
    sent = sum(int(np.prod(canonical.param_shapes(spec)[n])) * 4 for n in shared)
    total = sum(int(np.prod(s)) * 4 for s in canonical.param_shapes(spec).values())
    clients = rows[1]["clients"]
    assert [c["status"] for c in clients] == ["ok", "ok"]
    assert all(sent <= c["bytes_down"] < sent + 256 * len(shared) for c in clients), ([c["bytes_down"] for c in clients], sent)
    assert sent < 0.85 * total
    final = _final_weights(tmp_path / "run")
    frozen = convert(spec)
    for n in canonical.frozen_names(spec, 11):
        assert np.array_equal(final[n], frozen[n]), n
    assert not np.array_equal(final["blocks.15.project.conv.weight"], frozen["blocks.15.project.conv.weight"])


def test_device_with_another_frozen_part_is_refused(tiny_catalog):
    from edge_client.app import _full_weights
    from edge_client.node import ClientFailure, Node

    rc = RunConfig.from_flower({"catalog": str(tiny_catalog), "input-size": 64, "embedding-dim": 16,
                                "client-isolation": "inline"}).to_flower()
    node = Node.from_context(rc, {"partition-id": 0, "num-partitions": 2})

    class _Ctx:
        class state:  # noqa: N801 - stands in for context.state
            array_records: dict = {}

    with pytest.raises(ClientFailure, match="frozen encoder part differs"):
        _full_weights(node, _Ctx, {"frozen-sha256": "0" * 64}, {}, 1)
    w = _full_weights(node, _Ctx, {"frozen-sha256": node.frozen_digest()}, {}, 1)
    assert set(w) == set(node.base_weights())
