"""Checks on every client update before it may reach aggregation.

A reply is *rejected* (dropped from the round, logged, the round goes on) when its arrays
do not have exactly the global model's names and shapes, are not float32/float16 (fp16
uploads are upcast to float32 here), contain NaN/inf or a negative BN variance, or when
its update norm ``||w_client - w_global||`` (over every tensor except BN running
statistics, whose scale is data-dependent and which stay local under FedBN) is an
outlier: more than ``outlier_factor`` x the round's median update norm (the lower
median, so that with two replies the smaller is the reference), or more than
``max_update_ratio`` x the global model's norm (an absolute cap that also works with a
single reply).

:class:`ValidatingMixin` applies these checks in front of a Flower strategy class (its
``aggregate_train``; ``server.strategies`` puts it in front of every base strategy and
``server.privacy`` builds its DP subclass on it), together with the seeded sampling of
``clients-per-round`` nodes (:class:`SampledGrid`) and the record conversions.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam

from models import canonical

ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class Rejected(Exception):
    """An update that must not be aggregated; ``str(exc)`` is the reason."""


def checked_arrays(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` as float32, in the reference's order, or raise :class:`Rejected`."""
    names, got = set(reference), set(arrays)
    if names != got:
        missing, extra = sorted(names - got), sorted(got - names)
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if extra:
            parts.append(f"unexpected {len(extra)} ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})")
        raise Rejected("wrong tensor names: " + "; ".join(parts))
    out: dict[str, np.ndarray] = {}
    for name, ref in reference.items():
        a = np.asarray(arrays[name])
        if a.shape != np.shape(ref):
            raise Rejected(f"wrong shape for {name}: {a.shape}, expected {np.shape(ref)}")
        if a.dtype not in ACCEPTED_DTYPES:
            raise Rejected(f"wrong dtype for {name}: {a.dtype} (float32 or float16 expected)")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise Rejected(f"non-finite values (NaN/inf) in {name}")
        if canonical.is_bn_stat(name) and name.endswith("running_var") and np.any(a < 0):
            raise Rejected(f"negative variance in {name}")
        out[name] = a
    return out


def norm_names(reference: Mapping[str, np.ndarray]) -> list[str]:
    return [n for n in reference if not canonical.is_bn_stat(n)]


def model_norm(weights: Mapping[str, np.ndarray]) -> float:
    names = norm_names(weights)
    return float(np.sqrt(sum(float(np.sum(np.square(weights[n], dtype=np.float64))) for n in names)))


def update_norm(reference: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for n in norm_names(reference):
        d = np.asarray(weights[n], np.float64) - np.asarray(reference[n], np.float64)
        total += float(np.sum(d * d))
    return float(np.sqrt(total))


def outliers(norms: Mapping[object, float], global_norm: float, factor: float, ratio: float) -> dict[object, str]:
    """Keys whose update norm is an outlier, with the reason."""
    out: dict[object, str] = {}
    cap = ratio * max(global_norm, 1e-12)
    values = sorted(norms.values())
    median = values[(len(values) - 1) // 2] if len(values) >= 2 else None
    for key, v in norms.items():
        if v > cap:
            out[key] = f"update norm {v:.4g} exceeds {ratio:g} x the global model's norm ({global_norm:.4g})"
        elif median is not None and median > 0 and v > factor * median:
            out[key] = f"update norm {v:.4g} exceeds {factor:g} x the round's median update norm ({median:.4g})"
    return out


# ----------------------------------------------------------------------------- in front of a strategy


class SampledGrid:
    """The Grid as a strategy sees it in one round: only the sampled nodes."""

    def __init__(self, grid, node_ids: Iterable[int]):
        self._grid = grid
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


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
        return outliers(norms, model_norm(self.reference), self.outlier_factor,
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
                    raise Rejected("a train reply needs exactly one ArrayRecord and one MetricRecord")
                metrics = next(iter(content.metric_records.values()))
                n = metrics.get("num-examples")
                if isinstance(n, list) or n is None or not np.isfinite(float(n)) or float(n) <= 0:
                    raise Rejected(f"num-examples must be a positive number, got {n!r}")
                arrays = checked_arrays(
                    self.reference, to_numpy(next(iter(content.array_records.values()))))
            except Rejected as exc:
                entry.update(status="rejected", reason=str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - undecodable arrays etc.
                entry.update(status="rejected", reason=f"unreadable reply: {type(exc).__name__}: {exc}")
                continue
            norm = update_norm(self.reference, arrays)
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
            except Rejected as exc:
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
