"""One federated client (a node), without Flower types: data, device emulation, FedBN state,
and running the framework work in a child process (``edge_client.worker``).

``edge_client.app`` adapts this to Flower messages. Everything that differs between
nodes comes from the run config (``server.runconfig``) and the node config
(``partition-id``, ``num-partitions``; in deployment also ``framework``, ``profile``,
``catalog``, which override the run config's round-robin assignment).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common.errors import FedcbirError
from server.runconfig import RunConfig, client_tag, derive_seed

_SPLITS: dict[tuple, Any] = {}
_PARTS: dict[tuple, list] = {}
_TABLES_READY: set[tuple] = set()
_NODES: dict[str, "Node"] = {}
_BASE: dict[tuple, dict[str, np.ndarray]] = {}

class ClientFailure(FedcbirError):
    """A round this node cannot complete; ``kind`` is the reason prefix (offline, out of memory, ...)."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _split(root: Path, seed: int, test_fraction: float):
    from catalog.dataset import CatalogSplit

    key = (str(root), seed, test_fraction)
    if key not in _SPLITS:
        _SPLITS[key] = CatalogSplit.load(root, seed=seed, test_fraction=test_fraction)
    return _SPLITS[key]


def _partitions(split, scheme: str, n: int) -> list:
    from catalog.splits import partition

    key = (str(split.root), split.seed, split.test_fraction, scheme, n)
    if key not in _PARTS:
        _PARTS[key] = partition(split.train, n, scheme, split.seed)
    return _PARTS[key]


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


@dataclass
class Node:
    cfg: RunConfig
    partition: int
    num_partitions: int
    framework: str
    profile_name: str
    root: Path
    emulator: Any
    spec: Any
    split: Any
    train_products: list
    eval_products: list

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_context(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> "Node":
        key = json.dumps([dict(run_config), dict(node_config)], sort_keys=True, default=str)
        node = _NODES.get(key)
        if node is None:
            node = _NODES[key] = cls._build(run_config, node_config)
        return node

    @classmethod
    def _build(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> "Node":
        from catalog.dataset import client_holdout
        from device_profiles import Emulator, load_profile
        from models.api import normalize_framework

        overrides = {k: node_config[k] for k in ("catalog",) if node_config.get(k)}
        cfg = RunConfig.from_flower(run_config, **overrides)
        if "partition-id" not in node_config or "num-partitions" not in node_config:
            raise FedcbirError("node config needs partition-id and num-partitions "
                               "(e.g. --node-config 'partition-id=0 num-partitions=4')")
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
        framework, profile = cfg.assignment(pid)
        if node_config.get("framework"):
            framework = normalize_framework(node_config["framework"])
        if node_config.get("profile"):
            profile = str(node_config["profile"])
        prof = load_profile(profile)
        root = cfg.catalog_root()
        split = _split(root, cfg.seed, cfg.test_fraction)
        products = _partitions(split, cfg.partition, n)[pid]
        train, evaluation = client_holdout(products, cfg.seed)
        spec = cfg.arch_spec(len(split.type_names))
        return cls(cfg=cfg, partition=pid, num_partitions=n, framework=framework, profile_name=prof.name,
                   root=root, emulator=Emulator(prof, seed=cfg.seed, realtime=cfg.realtime), spec=spec,
                   split=split, train_products=train, eval_products=evaluation)

    @property
    def tag(self) -> str:
        """Appended to error reasons so the server knows who failed (errors carry no records)."""
        return client_tag(self.partition, self.framework, self.profile_name)

    def describe(self) -> dict[str, Any]:
        return {"partition-id": self.partition, "framework": self.framework, "profile": self.profile_name}

    def _ensure_tables(self) -> None:
        """Decode this node's images once per process (ImageTable caches them on disk)."""
        pre = self.cfg.preprocess()
        key = (str(self.root), self.cfg.seed, self.cfg.test_fraction, self.cfg.partition, self.num_partitions,
               self.partition, pre.size)
        if key not in _TABLES_READY:
            self.split.table(self.train_products, pre)
            self.split.table(self.eval_products, pre)
            _TABLES_READY.add(key)

    # ------------------------------------------------------------------ availability
    def check_available(self, server_round: int) -> None:
        if not self.emulator.is_available(server_round, self.partition):
            raise ClientFailure("offline", f"{self.profile_name} device not available in round {server_round} "
                                           f"(availability {self.emulator.profile.availability})")

    # ------------------------------------------------------------------ FedBN state
    def bn_names(self) -> list[str]:
        """The BN tensors a FedBN node keeps (those of the trained part; frozen ones never change)."""
        from models import canonical

        k = self.cfg.trained_from()
        return [n for n in canonical.param_names(self.spec)
                if canonical.is_bn(n) and canonical.in_trained_part(n, k)]

    def base_weights(self) -> dict[str, np.ndarray]:
        """The full canonical weights this device starts from: the frozen part (ImageNet
        weights from the installed package, never sent over the network) and a seeded init
        of the rest, which the server's arrays then replace."""
        hit = _BASE.get((self.spec, self.cfg.seed))
        if hit is None:
            from models.initial import init_weights

            hit = _BASE[(self.spec, self.cfg.seed)] = init_weights(self.spec, self.cfg.seed)
        return dict(hit)

    def frozen_digest(self) -> str:
        from models import canonical
        from models.canonical import frozen_digest

        names = canonical.frozen_names(self.spec, self.cfg.trained_from())
        return frozen_digest(self.base_weights(), names) if names else ""

    def _state_dir(self) -> Path | None:
        return Path(self.cfg.client_state_dir) if self.cfg.client_state_dir else None

    def load_disk_state(self, server_round: int) -> dict[str, np.ndarray] | None:
        """FedBN tensors persisted by an earlier run (``client-state-dir``): the newest from a
        round before ``server_round`` (a later one would come from rounds being redone)."""
        d = self._state_dir()
        if d is None or not d.is_dir():
            return None
        best = None
        for f in d.glob(f"partition-{self.partition:05d}-round-*.npz"):
            try:
                r = int(f.stem.rsplit("-", 1)[1])
            except ValueError:
                continue
            if r < server_round and (best is None or r > best[0]):
                best = (r, f)
        if best is None:
            return None
        from edge_client.worker import read_npz

        arrays = read_npz(best[1])
        names = self.bn_names()
        if set(arrays) != set(names):
            return None
        return arrays

    def save_disk_state(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        d = self._state_dir()
        if d is None:
            return
        from common.io import atomic_path

        d.mkdir(parents=True, exist_ok=True)
        dest = d / f"partition-{self.partition:05d}-round-{server_round:05d}.npz"
        with atomic_path(dest, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        files = sorted(d.glob(f"partition-{self.partition:05d}-round-*.npz"))
        for old in files[:-2]:  # keep the last two rounds
            old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ work
    def _base_job(self, mode: str, prox_mu: float = 0.0) -> dict[str, Any]:
        return {
            "mode": mode, "framework": self.framework, "arch": self.spec.to_dict(),
            "train_config": self.cfg.train_config(prox_mu).to_dict(), "catalog": str(self.root),
            "pre": self.cfg.preprocess().to_dict(), "type_names": list(self.split.type_names), "threads": 1,
            "views": self.cfg.views,
        }

    def train(self, server_round: int, weights: dict[str, np.ndarray], anchor: dict[str, np.ndarray] | None,
              prox_mu: float) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from edge_client.worker import ANCHOR_PREFIX, products_to_json

        self._ensure_tables()
        cfg = self.cfg
        job = self._base_job("train", prox_mu)
        e0 = (server_round - 1) * cfg.local_epochs
        job.update(products=products_to_json(self.train_products), p=cfg.products_per_batch,
                   k=cfg.photos_per_product, batch_seed=derive_seed(cfg.seed, self.partition, 11),
                   epochs=list(range(e0, e0 + cfg.local_epochs)))
        arrays = dict(weights)
        if anchor is not None and prox_mu > 0:
            arrays.update({ANCHOR_PREFIX + k: v for k, v in anchor.items()})
        return self._run(job, arrays)

    def evaluate(self, weights: dict[str, np.ndarray], recalibrate: bool) -> dict[str, Any]:
        from edge_client.worker import products_to_json

        self._ensure_tables()
        job = self._base_job("evaluate")
        job["products"] = products_to_json(self.eval_products)
        if recalibrate:
            job["recalibrate_products"] = products_to_json(self.train_products)
        _, metrics = self._run(job, weights)
        return metrics

    def _run(self, job: dict[str, Any], arrays: Mapping[str, np.ndarray]):
        t0 = time.perf_counter()
        if self.cfg.client_isolation == "inline":
            from edge_client.worker import run_job

            out, metrics = run_job(job, arrays, cache_trainers=True)
            metrics["process_seconds"] = time.perf_counter() - t0
            metrics["memory_checked"] = False  # the whole (shared) process: no honest peak
            return out, metrics
        out, metrics = run_in_child(job, arrays, timeout=self.cfg.round_timeout)
        metrics["process_seconds"] = time.perf_counter() - t0
        metrics["memory_checked"] = True
        self.emulator.check_memory(metrics["peak_rss_mb"])  # raises DeviceOutOfMemory
        return out, metrics


def child_env() -> dict[str, str]:
    from device_profiles import thread_env

    env = dict(os.environ)
    env.update(thread_env(1, env))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    # XLA's persistent compilation cache: a JAX client compiles its train step once per
    # host, not once per round (a device keeps such a cache on its disk as well)
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        from common.io import cache_dir

        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir() / "xla-cache")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def run_in_child(job: Mapping[str, Any], arrays: Mapping[str, np.ndarray], timeout: float | None = None):
    """Run one job in ``python -m edge_client.worker`` and return ``(weights | None, metrics)``."""
    from edge_client.worker import read_npz, write_job

    with tempfile.TemporaryDirectory(prefix="fedcbir-job-") as tmp:
        d = Path(tmp)
        write_job(d, job, arrays)
        try:
            proc = subprocess.run([sys.executable, "-m", "edge_client.worker", str(d)], env=child_env(),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClientFailure("failed", f"local {job['mode']} did not finish within {timeout:.0f} s") from None
        result_file = d / "result.json"
        if not result_file.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-5:]
            raise ClientFailure("failed", f"worker exited with code {proc.returncode}: {' | '.join(tail)}")
        result = json.loads(result_file.read_text(encoding="utf-8"))
        if "error" in result:
            raise ClientFailure("failed", result["error"])
        out = read_npz(d / "out.npz") if (d / "out.npz").is_file() else None
        return out, result["metrics"]
