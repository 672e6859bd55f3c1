"""Flower strategies by name, each wrapped so that train replies are validated first.

``make_strategy(cfg)`` picks a base class from ``flwr.serverapp.strategy`` (fedavg,
fedprox, fedadam, fedtrimmedavg, krum) and builds a subclass of it with
:class:`ValidatingMixin` in front. The mixin's ``aggregate_train``:

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

from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, Krum

from models import canonical
from server import validation
from server.runconfig import RunConfig

BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum}
_CLASSES: dict[type, type] = {}


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()})


def error_status(reason: str) -> str:
    return "offline" if reason.strip().lower().startswith("offline:") else "dropped"


def _reply_order(msg: Message) -> tuple[int, int, str]:
    """Sort key of a train reply: its ``partition-id`` metric (the data it trained on, stable
    across runs, unlike node ids, which Flower draws at random), then node id and message id;
    error or malformed replies sort after the others."""
    part = 1 << 62
    try:
        if not msg.has_error():
            for rec in msg.content.metric_records.values():
                if "partition-id" in rec:
                    part = int(rec["partition-id"])
                    break
    except Exception:  # noqa: BLE001 - validated later; only the order is decided here
        pass
    return part, int(msg.metadata.src_node_id), str(msg.metadata.reply_to_message_id)


class ValidatingMixin:
    """Put in front of a Flower strategy class (see module doc)."""

    outlier_factor: float = 10.0
    max_update_ratio: float = 10.0
    reference: dict[str, np.ndarray] | None = None
    last_report: list[dict[str, Any]]

    clients_per_round: int = 0
    seed: int = 0
    _norms: dict[int, float]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self.reference = {k: np.asarray(v, np.float32) for k, v in to_numpy(arrays).items()}
        self.last_report = []
        nodes = sorted(int(n) for n in grid.get_node_ids())
        sample = self._sample(server_round, nodes)
        if sample != nodes:
            from server.privacy import SampledGrid

            grid = SampledGrid(grid, sample)
        return super().configure_train(server_round, arrays, config, grid)

    def _sample(self, server_round: int, node_ids: list[int]) -> list[int]:
        """The nodes that train this round: ``clients-per-round`` of them, drawn with a seed of
        (seed, round) so that a repeated run samples the same; all when 0 or too few."""
        m = self.clients_per_round
        if m <= 0 or m >= len(node_ids):
            return node_ids
        import random

        from server.runconfig import derive_seed

        return sorted(random.Random(derive_seed(self.seed, server_round)).sample(node_ids, m))

    def _rejections(self, norms: dict[int, float]) -> dict[int, str]:
        return validation.outliers(norms, validation.model_norm(self.reference), self.outlier_factor,
                                   self.max_update_ratio)

    def _clean_metrics(self, n: float, loss: float, metrics: dict[str, Any]) -> MetricRecord:
        return MetricRecord({"num-examples": n, "loss": loss})

    def _base_aggregate(self, server_round: int, replies: list[Message]):
        return super().aggregate_train(server_round, replies)

    def _aggregate_accepted(self, server_round: int, accepted: list[Message], errors: list[Message]):
        if not accepted:
            self._base_aggregate(server_round, errors)  # lets Flower log the failures
            return None, None
        agg, agg_metrics = self._base_aggregate(server_round, accepted + errors)
        if agg is None:
            return None, agg_metrics
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in to_numpy(agg).items()}
        if isinstance(self, FedAdam):
            weights.update(_weighted_bn_stats(accepted))
        return to_record({k: weights[k] for k in self.reference}), agg_metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = sorted(replies, key=_reply_order)
        report: list[dict[str, Any]] = []
        self.last_report = report
        if self.reference is None:
            raise RuntimeError("aggregate_train before configure_train")
        candidates: list[tuple[Message, dict[str, np.ndarray], float, dict[str, Any]]] = []
        errors: list[Message] = []
        for msg in replies:
            entry: dict[str, Any] = {"src_node": msg.metadata.src_node_id,
                                     "reply_to": msg.metadata.reply_to_message_id}
            report.append(entry)
            if msg.has_error():
                entry.update(status=error_status(msg.error.reason), reason=msg.error.reason,
                             error_code=int(msg.error.code))
                errors.append(msg)
                continue
            content = msg.content
            entry["metrics"] = {k: v for rec in content.metric_records.values() for k, v in rec.items()}
            entry["client"] = {k: v for rec in content.config_records.values() for k, v in rec.items()}
            try:
                if len(content.array_records) != 1 or len(content.metric_records) != 1:
                    raise validation.Rejected("a train reply needs exactly one ArrayRecord and one MetricRecord")
                metrics = next(iter(content.metric_records.values()))
                n = metrics.get("num-examples")
                if isinstance(n, list) or n is None or not np.isfinite(float(n)) or float(n) <= 0:
                    raise validation.Rejected(f"num-examples must be a positive number, got {n!r}")
                arrays = validation.checked_arrays(
                    self.reference, to_numpy(next(iter(content.array_records.values()))))
            except validation.Rejected as exc:
                entry.update(status="rejected", reason=str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - undecodable arrays etc.
                entry.update(status="rejected", reason=f"unreadable reply: {type(exc).__name__}: {exc}")
                continue
            norm = validation.update_norm(self.reference, arrays)
            entry["update_norm"] = norm
            loss = metrics.get("loss", 0.0)
            loss = float(loss) if not isinstance(loss, list) and np.isfinite(float(loss)) else 0.0
            candidates.append((msg, arrays, norm, entry))
            entry["_clean"] = (float(n), loss)
        bad = self._rejections({i: c[2] for i, c in enumerate(candidates)})
        accepted: list[Message] = []
        self._norms = {}
        for i, (msg, arrays, norm, entry) in enumerate(candidates):
            n, loss = entry.pop("_clean")
            if i in bad:
                entry.update(status="rejected", reason=bad[i])
                continue
            try:
                metrics = self._clean_metrics(n, loss, entry["metrics"])
            except validation.Rejected as exc:
                entry.update(status="rejected", reason=str(exc))
                continue
            entry.update(status="ok", reason="")
            msg.content = RecordDict({"arrays": to_record(arrays), "metrics": metrics})
            self._norms[id(msg)] = norm
            accepted.append(msg)
        for entry in report:
            entry.pop("_clean", None)
        return self._aggregate_accepted(server_round, accepted, errors)


def _weighted_bn_stats(accepted: list[Message]) -> dict[str, np.ndarray]:
    total = sum(float(m.content["metrics"]["num-examples"]) for m in accepted)
    out: dict[str, np.ndarray] = {}
    for m in accepted:
        w = float(m.content["metrics"]["num-examples"]) / total
        for k, v in m.content["arrays"].items():
            if canonical.is_bn_stat(k):
                a = v.numpy().astype(np.float64) * w
                out[k] = out[k] + a if k in out else a
    return {k: v.astype(np.float32) for k, v in out.items()}


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
        from server.privacy import make_dp_strategy

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
