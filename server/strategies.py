"""Flower strategies by name, each wrapped so that train replies are validated first.

``make_strategy(cfg)`` picks a base class from ``flwr.serverapp.strategy`` (fedavg,
fedprox, fedadam, fedtrimmedavg, krum) and builds a subclass of it with
``server.validation.ValidatingMixin`` in front. The mixin's ``aggregate_train``:

1. sorts the replies by the partition id they report, then by source node (aggregation
   order, hence float rounding, must not depend on arrival order or on the node ids a
   runtime happens to draw: a resumed or repeated run gives bit-identical weights);
2. classifies Error replies (reason ``offline:...`` -> ``offline``, anything else ->
   ``dropped``);
3. validates each content reply (exactly one ArrayRecord and one MetricRecord with a
   positive ``num-examples``; names/shapes/dtypes/finiteness; see ``server.validation``),
   upcasts float16 uploads to float32, then screens update norms for outliers; rejected
   replies are logged (status ``rejected``) and left out;
4. hands the accepted replies (rebuilt as ``{"arrays", "metrics"}`` with
   only ``num-examples`` and ``loss``, so one odd client cannot break Flower's key-consistency
   check) to the base class's ``aggregate_train``;
5. casts the result back to float32 (FedAvg/FedAdam compute in float64) and, for FedAdam,
   replaces BN running statistics by their plain weighted average (an Adam step on
   running means/variances makes no sense).

``last_report`` holds one dict per reply for the round loop (``server.federation``).

``clients-per-round > 0`` trains a seeded sample of that many connected nodes per round
(``_sample``). Under differential privacy (run config ``dp``) ``server.privacy`` builds a
subclass (``PrivateMixin``) that overrides the hooks ``_sample`` (Poisson), ``_rejections``
(per-update rules only), ``_clean_metrics`` (equal weights) and ``_aggregate_accepted``
(Flower's DP wrapper clips, averages and adds noise).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, Krum

from server.privacy import make_dp_strategy
from server.runconfig import RunConfig
from server.validation import ValidatingMixin

BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum}
_CLASSES: dict[type, type] = {}


def strategy_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Validated{base.__name__}", (ValidatingMixin, base), {})
    return _CLASSES[base]


def make_strategy(cfg: RunConfig):
    """The configured strategy (validated). Node minimums are 1: the round loop decides how
    many nodes to wait for, so Flower's ``sample_nodes`` never blocks."""
    base = BASES[cfg.strategy]
    kw: dict[str, Any] = dict(fraction_train=1.0, fraction_evaluate=cfg.fraction_evaluate,
                              min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    if base is FedProx:
        kw["proximal_mu"] = cfg.prox_mu
    elif base is FedAdam:
        kw.update(eta=cfg.server_lr, eta_l=cfg.lr)
    elif base is FedTrimmedAvg:
        kw["beta"] = cfg.trim_beta
    elif base is Krum:
        kw["num_malicious_nodes"] = cfg.krum_malicious
    if cfg.dp == "off":
        strategy = strategy_class(base)(**kw)
    else:  # Flower's DP wrapper around the base, validated first (server.privacy)
        strategy = make_dp_strategy(cfg, base, kw)
    strategy.clients_per_round = cfg.clients_per_round
    strategy.seed = cfg.seed
    strategy.outlier_factor = cfg.outlier_factor
    strategy.max_update_ratio = cfg.max_update_ratio
    strategy.last_report = []
    return strategy


# ----------------------------------------------------------------------------- FedAdam state


def optimizer_state(strategy) -> dict[str, np.ndarray]:
    """Server optimizer moments (FedAdam's m_t / v_t) for the checkpoint; {} for others."""
    out: dict[str, np.ndarray] = {}
    for attr in ("m_t", "v_t"):
        d = getattr(strategy, attr, None)
        if d:
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in d.items()})
    return out


def restore_optimizer_state(strategy, arrays: dict[str, np.ndarray]) -> None:
    for attr in ("m_t", "v_t"):
        part = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(attr + "/")}
        if part and hasattr(strategy, attr):
            setattr(strategy, attr, part)
