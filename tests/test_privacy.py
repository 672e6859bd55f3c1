"""Device-level differential privacy (``server.privacy``): the accountant against published
values, clipping, noise, the fixed-denominator average, Flower's adaptive wrappers as
corrected here, validation before clipping, the privacy budget, one-line errors.

Strategy-level tests hand-made replies to the DP strategy (no training); the federations
use the in-process Grid and the tiny 32 px model of ``tests/test_federation.py``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("dp_accounting")
pytest.importorskip("torch")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402

from edge_client.app import app as client_app  # noqa: E402
from common.errors import FedcbirError  # noqa: E402
from server import privacy  # noqa: E402
from server.federation import Federation  # noqa: E402
from server.inprocess import InProcessGrid  # noqa: E402
from server.runconfig import RunConfig  # noqa: E402
from server.strategies import make_strategy  # noqa: E402
from server.validation import to_numpy, to_record  # noqa: E402

DP = {"dp": "server-fixed", "clients-per-round": 4, "dp-clip": 0.5, "dp-noise": 1.0}


def _rc(catalog, **kw):
    rc = {"catalog": str(catalog), "arch": "mobilenetv3-small", "lr": 0.002, "bn-policy": "local",
          "products-per-batch": 8, "width": 0.35, "input-size": 32, "embedding-dim": 32, "frameworks": "torch",
          "profiles": "rpi4", "partition": "iid", "num-server-rounds": 2, "client-isolation": "inline",
          "fraction-evaluate": 0.0, "eval-framework": "torch", **DP}
    rc.update({k.replace("_", "-"): v for k, v in kw.items()})
    return RunConfig.from_flower(rc).to_flower()


# ----------------------------------------------------------------------------- the accountant


def _classic_rdp_epsilon(q, z, steps, delta):
    """RDP -> (epsilon, delta) with the classic conversion eps = min_a rdp(a) + log(1/delta) / (a - 1)
    over TF Privacy's orders: what its published tables used."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = privacy.accountant([(q, z)] * steps, "rdp", orders=orders)
    rdp = np.asarray(acc._rdp)  # dp-accounting 0.6.0 (pinned): the composed RDP curve
    return float(np.nanmin(rdp + math.log(1 / delta) / (np.asarray(orders) - 1)))


@pytest.mark.parametrize("z,epochs,published", [(1.3, 15, 1.19), (1.1, 60, 3.01), (0.7, 45, 7.10)])
def test_accountant_reproduces_tf_privacy_published_epsilons(z, epochs, published):
    """tensorflow/privacy tutorials/README.md: DP-SGD on MNIST, batch 256 of 60,000 (Poisson
    rate 256/60000), delta 1e-5: epsilon 1.19 / 3.01 / 7.10. Our events (Poisson-subsampled
    Gaussian, add/remove one) reproduce them with that table's RDP conversion; the epsilon we
    report uses dp-accounting's tighter conversion, so it is a little lower."""
    q, steps = 256 / 60000, math.ceil(epochs * 60000 / 256)
    assert _classic_rdp_epsilon(q, z, steps, 1e-5) == pytest.approx(published, abs=0.01)
    ours = privacy.epsilon([(q, z)] * steps, 1e-5, "rdp")
    assert 0.7 * published < ours <= published


def _analytic_gaussian_epsilon(z, delta):
    """Exact epsilon of the Gaussian mechanism (Balle & Wang 2018, Thm 8):
    delta(eps) = Phi(-eps z + 1/(2z)) - e^eps Phi(-eps z - 1/(2z))."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gap(eps):
        return norm.cdf(-eps * z + 0.5 / z) - math.exp(eps) * norm.cdf(-eps * z - 0.5 / z) - delta

    return brentq(gap, 1e-9, 100.0)


def test_accountant_gaussian_mechanism_exact_values():
    # dp-accounting's own test: z = 4.530877117 is (1, 1e-6)-DP by RDP
    assert privacy.epsilon([(1.0, 4.530877117)], 1e-6, "rdp") == pytest.approx(1.0, abs=1e-4)
    exact = _analytic_gaussian_epsilon(4.530877117, 1e-6)
    assert privacy.epsilon([(1.0, 4.530877117)], 1e-6, "pld") == pytest.approx(exact, rel=2e-3)
    # T rounds of z without sampling = one Gaussian with z / sqrt(T)
    assert privacy.epsilon([(1.0, 6.0)] * 9, 1e-5, "pld") == pytest.approx(_analytic_gaussian_epsilon(2.0, 1e-5),
                                                                          rel=2e-3)


def test_accountant_basics():
    rounds = [(0.2, 1.0)] * 20
    rdp, pld = privacy.epsilon(rounds, 1e-5, "rdp"), privacy.epsilon(rounds, 1e-5, "pld")
    assert 0 < pld <= rdp  # RDP is an upper bound, PLD (nearly) tight
    assert privacy.epsilon([], 1e-5) == 0.0
    assert privacy.epsilon([(0.2, 0.0)], 1e-5) == math.inf
    assert privacy.epsilon(rounds[:10], 1e-5) < rdp  # composition only grows
    assert privacy.epsilon([(0.1, 1.0)] * 20, 1e-5) < rdp  # amplification by sampling
    n = privacy.rounds_within(rdp, 0.2, 1.0, 1e-5)
    assert n == 20 or (privacy.epsilon([(0.2, 1.0)] * n, 1e-5) <= rdp < privacy.epsilon([(0.2, 1.0)] * (n + 1), 1e-5))
    with pytest.raises(FedcbirError, match="accountant"):
        privacy.epsilon(rounds, 1e-5, "moments")


# ----------------------------------------------------------------------------- strategy level


class _Grid(InProcessGrid):
    def __init__(self, n):
        super().__init__(client_app, n, {})


def _weights(catalog, **kw):
    from models.initial import init_weights

    cfg = RunConfig.from_flower(_rc(catalog, **kw))
    spec = cfg.arch_spec(3)
    w = init_weights(spec, 0)
    return cfg, {n: w[n] for n in cfg.shared_names(spec)}


def _direction(glob, seed, norm):
    rng = np.random.default_rng(seed)
    d = {k: rng.standard_normal(v.shape).astype(np.float64) for k, v in glob.items()}
    scale = norm / math.sqrt(sum(float(np.sum(v * v)) for v in d.values()))
    return {k: (v * scale) for k, v in d.items()}


def _reply(msg, arrays, src, metrics=None):
    rec = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    reply = Message(RecordDict({"arrays": rec, "metrics": MetricRecord(metrics or {"num-examples": 10, "loss": 1.0})}),
                    reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = src
    return reply


def _dp_round(catalog, updates, nodes=None, spy=None, **kw):
    """One DP round: configure_train on a grid of ``nodes`` (default: as many as updates), then
    the replies ``glob + update`` (an update may be a callable ``glob -> arrays``)."""
    cfg, glob = _weights(catalog, **kw)
    strategy = make_strategy(cfg)
    if spy is not None:
        real = strategy.strategy.aggregate_train

        def capture(server_round, replies):
            replies = list(replies)
            spy.extend({k: v.numpy().copy() for k, v in r.content["arrays"].items()} for r in replies)
            return real(server_round, replies)

        strategy.strategy.aggregate_train = capture
    grid = _Grid(nodes or len(updates))
    msgs = list(strategy.configure_train(1, to_record(glob), ConfigRecord(), grid))
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"m{i}"
    replies = []
    for i, up in enumerate(updates):
        arrays = up(glob) if callable(up) else {k: (glob[k] + up[k]).astype(np.float32) for k in glob}
        replies.append(_reply(msgs[i % len(msgs)], arrays, 100 + i))
    agg, _ = strategy.aggregate_train(1, replies)
    return cfg, glob, strategy, (to_numpy(agg) if agg is not None else None), msgs


def _norm(a, b):
    return math.sqrt(sum(float(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2)) for k in b))


def test_dp_strategy_is_flowers_wrapper_validated_first(tiny_catalog):
    from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                         DifferentialPrivacyServerSideFixedClipping, FedAvg)

    cfg, _ = _weights(tiny_catalog)
    s = make_strategy(cfg)
    assert isinstance(s, DifferentialPrivacyServerSideFixedClipping) and isinstance(s.strategy, FedAvg)
    assert (s.noise_multiplier, s.clipping_norm, s.num_sampled_clients) == (1.0, 0.5, 4)
    cfg, _ = _weights(tiny_catalog, dp="client-adaptive", dp_noise=0.5, dp_count_stddev=1.0)
    assert isinstance(make_strategy(cfg), DifferentialPrivacyClientSideAdaptiveClipping)
    # under DP the BN running statistics never travel
    from models import canonical

    assert not any(canonical.is_bn_stat(n) for n in cfg.shared_names(cfg.arch_spec(3)))
    cfg_off = RunConfig.from_flower(_rc(tiny_catalog, dp="off", bn_policy="shared"))
    assert any(canonical.is_bn_stat(n) for n in cfg_off.shared_names(cfg_off.arch_spec(3)))


def test_server_side_clipping_bounds_every_update(tiny_catalog):
    _, glob = _weights(tiny_catalog)
    seen: list[dict] = []
    ups = [_direction(glob, i, norm) for i, norm in enumerate([0.1, 0.5, 3.0, 20.0])]
    cfg, glob, s, agg, msgs = _dp_round(tiny_catalog, ups, spy=seen, dp_noise=0.0)
    assert len(msgs) == 4 and [r["status"] for r in s.last_report] == ["ok"] * 4
    norms = [_norm(r, glob) for r in seen]
    assert all(n <= 0.5 * (1 + 1e-5) for n in norms), norms
    assert norms[0] == pytest.approx(0.1, rel=1e-4) and norms[2] == pytest.approx(0.5, rel=1e-4)
    # no noise (z = 0): the fixed-denominator average of the clipped updates, exactly
    want = {k: glob[k] + sum(u[k] * min(1.0, 0.5 / n) for u, n in zip(ups, [0.1, 0.5, 3.0, 20.0])) / 4 for k in glob}
    for k in glob:
        np.testing.assert_allclose(agg[k], want[k], rtol=1e-4, atol=1e-6)


def test_fixed_denominator_counts_missing_devices_as_zero(tiny_catalog):
    """4 devices expected, 2 answered: the average is (u1 + u2) / 4, not / 2."""
    _, glob = _weights(tiny_catalog)
    ups = [_direction(glob, i, 0.2) for i in range(2)]
    _, glob, s, agg, _ = _dp_round(tiny_catalog, ups, nodes=4, dp_noise=0.0)
    for k in glob:
        np.testing.assert_allclose(agg[k], glob[k] + (ups[0][k] + ups[1][k]) / 4, rtol=1e-4, atol=1e-6)
    assert s.round_info["sampled"] == 4 and s.round_info["accepted"] == 2


def test_noise_has_the_configured_standard_deviation(tiny_catalog):
    """z = 2, clip 0.5, m = 4 expected: std z * clip / m = 0.25 on every coordinate of the
    average; zero-mean; drawn from OS randomness (two identical rounds differ, and the global
    numpy generator, seeded by the run, is left where it was)."""
    _, glob = _weights(tiny_catalog)
    same = [lambda g: dict(g)] * 4  # zero updates: the release is glob + noise
    np.random.seed(123)
    _, glob, s, agg1, _ = _dp_round(tiny_catalog, same, dp_noise=2.0)
    after = np.random.rand()
    np.random.seed(123)
    _, _, _, agg2, _ = _dp_round(tiny_catalog, same, dp_noise=2.0)
    assert np.random.rand() == after  # the global generator's state was restored
    noise = np.concatenate([(agg1[k].astype(np.float64) - glob[k]).ravel() for k in glob])
    n = noise.size
    assert n > 20_000
    std = 2.0 * 0.5 / 4
    assert s.round_info["noise_std"] == pytest.approx(std)
    assert noise.std() == pytest.approx(std, rel=6 / math.sqrt(2 * n))  # 6 sigma of the sample std
    assert abs(noise.mean()) < 6 * std / math.sqrt(n)
    # Gaussian: kurtosis 3
    assert np.mean((noise / noise.std()) ** 4) == pytest.approx(3.0, abs=0.15)
    assert not np.array_equal(agg1[next(iter(glob))], agg2[next(iter(glob))])


def test_validation_runs_before_clipping(tiny_catalog):
    """A NaN update and a huge (poisoned) one are rejected, not clipped into the average; the
    round-median outlier rule is off under DP (clipping bounds every device)."""
    _, glob = _weights(tiny_catalog)
    good = _direction(glob, 0, 0.3)
    nan = lambda g: {k: np.full_like(v, np.nan) for k, v in g.items()}  # noqa: E731
    huge = lambda g: {k: v * np.float32(1e3) for k, v in g.items()}  # noqa: E731
    big = _direction(glob, 1, 0.3 * 50)  # 50 x the median: an outlier without DP, clipped under DP
    seen: list[dict] = []
    _, glob, s, agg, _ = _dp_round(tiny_catalog, [good, nan, huge, big], spy=seen, dp_noise=0.0)
    rep = s.last_report
    assert [r["status"] for r in rep] == ["ok", "rejected", "rejected", "ok"]
    assert "non-finite" in rep[1]["reason"] and "global model's norm" in rep[2]["reason"]
    assert len(seen) == 2 and all(np.all(np.isfinite(v)) for r in seen for v in r.values())
    assert all(np.all(np.isfinite(v)) for v in agg.values())


def test_client_side_clipping_mod_and_server_check(tiny_catalog):
    from server.privacy import dp_clipping_mod

    _, glob = _weights(tiny_catalog, dp="client-fixed")
    _Grid(1)  # sets Flower's task identity, which Message() reads
    up = _direction(glob, 3, 4.0)
    sent = Message(RecordDict({"arrays": to_record(glob), "config": ConfigRecord({"clipping_norm": 0.5})}),
                   dst_node_id=100, message_type="train")

    def app(msg, ctx):
        arrays = {k: (glob[k] + up[k]).astype(np.float32) for k in glob}
        return Message(RecordDict({"arrays": to_record(arrays),
                                   "metrics": MetricRecord({"num-examples": 3, "loss": 1.0})}), reply_to=msg)

    for mode, bit in (("client-fixed", None), ("client-adaptive", 1), ("server-fixed", "none")):
        ctx = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={"dp": mode})
        reply = dp_clipping_mod(sent, ctx, app)
        norm = _norm(to_numpy(reply.content["arrays"]), glob)
        if mode == "server-fixed":  # the device does not clip
            assert norm == pytest.approx(4.0, rel=1e-4)
            continue
        assert norm == pytest.approx(0.5, rel=1e-4)
        if bit is not None:
            assert reply.content["metrics"]["norm_bit"] == bit
    # a device that does not clip under client-side DP is rejected
    _, glob, s, _, _ = _dp_round(tiny_catalog, [_direction(glob, 0, 0.4), up], dp="client-fixed", dp_noise=0.0)
    assert [r["status"] for r in s.last_report] == ["ok", "rejected"]
    assert "did not clip" in s.last_report[1]["reason"]


@pytest.mark.parametrize("norm,factor", [(5.0, math.exp(0.1)), (0.01, math.exp(-0.1))])
def test_adaptive_clipping_moves_the_norm_the_right_way(tiny_catalog, norm, factor):
    """Andrew et al.: every update clipped -> the norm grows; none clipped -> it shrinks
    (target quantile 0.5, lr 0.2; no noise, so exact)."""
    _, glob = _weights(tiny_catalog)
    ups = [_direction(glob, i, norm) for i in range(4)]
    _, _, s, agg, _ = _dp_round(tiny_catalog, ups, dp="server-adaptive", dp_noise=0.0)
    assert s.round_info["clip"] == 0.5
    assert s.clipping_norm == pytest.approx(0.5 * factor, rel=1e-9)
    assert s.round_info["next_clip"] == pytest.approx(0.5 * factor, rel=1e-9)


def test_adaptive_noise_uses_this_rounds_norm(tiny_catalog):
    _, glob = _weights(tiny_catalog)
    ups = [_direction(glob, i, 5.0) for i in range(4)]
    _, glob, s, agg, _ = _dp_round(tiny_catalog, ups, dp="server-adaptive", dp_noise=0.5, dp_count_stddev=1.0)
    want = s.noise_multiplier * 0.5 / 4  # Flower's update multiplier x this round's clip / m
    assert s.round_info["noise_std"] == pytest.approx(want)
    assert s.noise_multiplier > 0.5  # the update query gets more noise than the overall z
    clipped_avg = {k: glob[k] + sum(u[k] * 0.1 for u in ups) / 4 for k in glob}
    noise = np.concatenate([(agg[k].astype(np.float64) - clipped_avg[k]).ravel() for k in glob])
    assert noise.std() == pytest.approx(want, rel=0.05)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kw,msg", [
    ({"dp": "bogus"}, "dp 'bogus': choose one of off, server-fixed"),
    ({"dp_noise": -1.0}, "dp-noise (the noise multiplier) must be >= 0"),
    ({"dp_clip": 0.0}, "dp-clip (the clipping norm) must be > 0"),
    ({"dp_delta": 1.0}, "dp-delta must be in (0, 1)"),
    ({"clients_per_round": 0}, "dp needs clients-per-round >= 1"),
    ({"strategy": "fedadam"}, "dp needs strategy fedavg or fedprox"),
    ({"dp": "off", "target_epsilon": 3.0}, "target-epsilon needs differential privacy"),
    ({"target_epsilon": -1.0}, "target-epsilon must be >= 0"),
    ({"dp_noise": 0.0, "target_epsilon": 3.0}, "target-epsilon needs dp-noise > 0"),
    ({"dp": "server-adaptive", "dp_noise": 1.0}, "needs dp-count-stddev > 0.5"),
    ({"dp": "client-fixed", "fp16_upload": True}, "fp16-upload"),
    ({"dp_accountant": "moments"}, "dp-accountant 'moments'"),
])
def test_bad_settings_are_one_line_errors(tiny_catalog, kw, msg):
    with pytest.raises(FedcbirError) as e:
        _rc(tiny_catalog, **kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_simulate_cli_refuses_in_one_line(tiny_catalog, tmp_path, capsys):
    import fedcbir.cli

    base = ["simulate", "--catalog", str(tiny_catalog), "--clients", "10", "--rounds", "30", "--frameworks", "torch",
            "--profiles", "rpi4", "--partition", "iid", "--out", str(tmp_path / "run")]
    for extra, msg in ((["--set", "dp=bogus"], "dp 'bogus'"), (["--set", "dp=server-fixed", "--set", "dp-noise=-1"],
                                                               "dp-noise (the noise multiplier) must be >= 0"),
                       (["--set", "dp=server-fixed", "--set", "clients-per-round=5", "--set", "target-epsilon=2"],
                        "target-epsilon 2: 30 round(s) would spend epsilon")):
        code = fedcbir.cli.run(fedcbir.cli.build_parser(), base + extra)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and msg in err, err
        assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_server_cli_refuses_in_one_line(tiny_catalog, tmp_path, capsys):
    from fedcbir.cli import main

    base = ["server", "--catalog", str(tiny_catalog), "--min-clients", "4", "--rounds", "30",
            "--out", str(tmp_path / "run")]
    rc = main([*base, "--set", "dp=server-fixed", "--set", "clients-per-round=2", "--set", "target-epsilon=2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "target-epsilon 2: 30 round(s) would spend epsilon" in err and "with --min-clients" in err
    assert "\n" not in err and "Traceback" not in err
    rc = main([*base, "--set", "dp=server-fixed", "--set", "strategy=krum"])
    assert rc == 2 and "use its own option (--strategy)" in capsys.readouterr().err
    rc = main([*base, "--strategy", "krum", "--set", "dp=server-fixed", "--set", "clients-per-round=2"])
    assert rc == 2 and "dp needs strategy fedavg or fedprox" in capsys.readouterr().err


# ----------------------------------------------------------------------------- federations


def _run(rc, out, nodes, grid_cls=InProcessGrid):
    grid = grid_cls(client_app, nodes, rc)
    summary = Federation(grid, RunConfig.from_flower(rc), out, log=lambda s: None).run()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_dp_federation_records_epsilon_per_round_and_resumes(tiny_catalog, tmp_path):
    kw = dict(clients_per_round=2, bn_policy="shared", dp_noise=1.0)
    summary, rows = _run(_rc(tiny_catalog, num_server_rounds=1, **kw), tmp_path / "r", nodes=6)
    summary, rows = _run(_rc(tiny_catalog, num_server_rounds=2, resume=True, **kw), tmp_path / "r", nodes=6)
    assert [r["round"] for r in rows] == [0, 1, 2] and "dp" not in rows[0]
    for r in rows[1:]:
        dp = r["dp"]
        assert dp["sampling_rate"] == pytest.approx(2 / 6) and dp["population"] == 6 and dp["delta"] == 1e-5
        assert dp["sampled"] == len(r["clients"]) and dp["noise_std"] == pytest.approx(1.0 * 0.5 / 2)
    eps = [r["dp"]["epsilon"] for r in rows[1:]]
    assert eps[0] == pytest.approx(privacy.epsilon([(2 / 6, 1.0)], 1e-5))
    assert eps[1] == pytest.approx(privacy.epsilon([(2 / 6, 1.0)] * 2, 1e-5)) and eps[1] > eps[0]
    p = summary["privacy"]
    assert p["epsilon"] == pytest.approx(eps[1]) and p["rounds_accounted"] == 2 and summary["stopped"] is None
    assert p["mode"] == "server-fixed" and p["accountant"].startswith("RDP") and p["sampling"].startswith("poisson")
    # BN running statistics of the trained part: re-estimated by the server, finite
    from models import canonical
    from models.checkpoint import load_checkpoint

    w0, _ = load_checkpoint(tmp_path / "r" / "checkpoints" / "round-0000")
    w2, _ = load_checkpoint(tmp_path / "r" / "checkpoints" / "round-0002")
    stats = [n for n in w0 if canonical.is_bn_stat(n)]
    assert all(np.all(np.isfinite(w2[n])) for n in stats)
    assert any(not np.array_equal(w0[n], w2[n]) for n in stats)
    assert all(np.all(w2[n] >= 0) for n in stats if n.endswith("running_var"))


def test_target_epsilon_refuses_to_start(tiny_catalog, tmp_path):
    rc = _rc(tiny_catalog, clients_per_round=2, num_server_rounds=30, target_epsilon=2.0)
    with pytest.raises(FedcbirError, match=r"target-epsilon 2: 30 round\(s\) would spend epsilon .* round\(s\) fit"):
        _run(rc, tmp_path / "r", nodes=6)
    assert not list((tmp_path / "r").glob("checkpoints/round-*"))
    with pytest.raises(FedcbirError, match="would spend"):
        privacy.precheck(rc, 6, " simulated")
    privacy.precheck(rc, 600, " simulated")  # enough devices: q = 2/600 fits


class _Shrinking(InProcessGrid):
    """All nodes connected until ``shrunk`` is set; then all but two have left."""

    shrunk = False

    def get_node_ids(self):
        ids = list(self.contexts)
        return ids[:2] if self.shrunk else ids


def test_target_epsilon_stops_cleanly_with_last_checkpoint(tiny_catalog, tmp_path):
    """Planned: 3 rounds at q = 2/8 fit the budget; after round 1 six devices leave, so
    round 2 would run at q = 1 and exceed it: the run stops after round 1, its
    checkpoint and summary intact."""
    from models.checkpoint import load_checkpoint

    target = privacy.epsilon([(0.25, 1.0)] * 3, 1e-5) + 0.01
    assert privacy.epsilon([(0.25, 1.0), (1.0, 1.0)], 1e-5) > target
    rc = _rc(tiny_catalog, clients_per_round=2, num_server_rounds=3, target_epsilon=target)
    grid = _Shrinking(client_app, 8, rc)
    lines: list[str] = []

    def log(line):
        lines.append(line)
        if line.startswith("round 1:"):
            grid.shrunk = True  # six devices leave after round 1

    summary = Federation(grid, RunConfig.from_flower(rc), tmp_path / "r", log=log).run()
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(x.startswith("privacy budget: stopped after round 1") for x in lines)
    assert [r["round"] for r in rows] == [0, 1]
    assert summary["rounds"] == 1 and "stopped after round 1: round 2 would raise epsilon" in summary["stopped"]
    assert summary["privacy"]["epsilon"] == pytest.approx(rows[1]["dp"]["epsilon"])
    assert rows[1]["dp"]["epsilon"] <= target
    w, meta = load_checkpoint(tmp_path / "r" / "checkpoints" / "round-0001")
    assert meta["round"] == 1 and all(np.all(np.isfinite(v)) for v in w.values())
    assert summary["checkpoint"].endswith("round-0001.json")
    assert not (tmp_path / "r" / "checkpoints" / "round-0002.json").exists()


def test_epsilon_in_round_line_demo_report_and_summary_line():
    from fedcbir.demo.report import _privacy_md
    from common.flower import round_line
    from server.privacy import describe, summary_line

    cfg = RunConfig.from_flower({"dp": "server-fixed", "clients-per-round": 3, "dp-noise": 1.0})
    dp = {"sampling_rate": 1.0, "epsilon": 2.5, "delta": 1e-5, "noise_multiplier": 1.0}
    row = {"round": 1, "recall@1": 0.1, "map@r": 0.1, "clients": [{"status": "ok"}], "seconds": 1.0, "dp": dp}
    assert round_line(row, 3).endswith("| epsilon 2.5 (delta 1e-05)")
    assert round_line({**row, "dp": {**dp, "epsilon": None}}, 3).endswith("| epsilon inf (no noise)")
    assert "epsilon" not in round_line({k: v for k, v in row.items() if k != "dp"}, 3)
    summary = {"privacy": {**describe(cfg), "epsilon": 2.5, "rounds_accounted": 1}, "stopped": None}
    assert summary_line(summary) == ("; device-level DP (server-fixed): epsilon 2.5 at delta 1e-05 after 1 round(s) "
                                     "(RDP)")
    assert summary_line({"privacy": None}) == ""
    text = _privacy_md(summary, [{"round": 0}, row])[0]
    assert "epsilon **2.5** at delta 1e-05 after 1 round(s)" in text and "Per round: 1: 2.5" in text
    assert _privacy_md({"privacy": None}, []) == []


def test_pretrained_encoder_keeps_its_bn_statistics_under_dp(tiny_catalog, tmp_path):
    """The default encoder (ImageNet EfficientNet-Lite0, here at 32 px) under DP: its trained
    part moves, but its BN running statistics neither travel nor change."""
    from models import canonical
    from models.checkpoint import load_checkpoint

    rc = RunConfig.from_flower({"catalog": str(tiny_catalog), "input-size": 32, "frameworks": "torch",
                                "profiles": "rpi4", "partition": "iid", "num-server-rounds": 1,
                                "client-isolation": "inline", "fraction-evaluate": 0.0, "products-per-batch": 8,
                                "dp": "server-fixed", "clients-per-round": 3}).to_flower()
    _run(rc, tmp_path / "r", nodes=3)
    cfg = RunConfig.from_flower(rc)
    spec = cfg.arch_spec(3)
    assert spec.pretrained and cfg.bn_policy == "shared"
    trained = canonical.trained_part_names(spec, cfg.trained_from())
    stats = [n for n in trained if canonical.is_bn_stat(n)]
    assert stats and not set(stats) & set(cfg.shared_names(spec))
    w0, _ = load_checkpoint(tmp_path / "r" / "checkpoints" / "round-0000")
    w1, _ = load_checkpoint(tmp_path / "r" / "checkpoints" / "round-0001")
    assert all(np.array_equal(w0[n], w1[n]) for n in stats)
    assert any(not np.array_equal(w0[n], w1[n]) for n in trained if not canonical.is_bn_stat(n))


def test_adaptive_clipping_norm_survives_a_resume(tiny_catalog, tmp_path):
    kw = dict(dp="server-adaptive", dp_noise=0.5, dp_count_stddev=1.0, clients_per_round=3)
    _run(_rc(tiny_catalog, num_server_rounds=1, **kw), tmp_path / "r", nodes=3)
    _, rows = _run(_rc(tiny_catalog, num_server_rounds=2, resume=True, **kw), tmp_path / "r", nodes=3)
    assert rows[1]["dp"]["next_clip"] != rows[1]["dp"]["clip"] == 0.5
    assert rows[2]["dp"]["clip"] == pytest.approx(rows[1]["dp"]["next_clip"])


def test_clients_per_round_without_dp_is_a_seeded_fixed_size_sample(tiny_catalog):
    cfg, glob = _weights(tiny_catalog, dp="off", clients_per_round=2)

    def picked(server_round, seed=0):
        s = make_strategy(RunConfig.from_flower({**cfg.to_flower(), "seed": seed}))
        return sorted(m.metadata.dst_node_id for m in s.configure_train(server_round, to_record(glob),
                                                                        ConfigRecord(), _Grid(6)))

    assert len(picked(1)) == 2 and picked(1) == picked(1)
    assert len({tuple(picked(r)) for r in range(1, 9)}) > 1  # another sample each round
    cfg_all, _ = _weights(tiny_catalog, dp="off", clients_per_round=0)
    assert len(list(make_strategy(cfg_all).configure_train(1, to_record(glob), ConfigRecord(), _Grid(6)))) == 6
