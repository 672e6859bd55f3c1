"""The run configuration: the one contract between the ServerApp and every ClientApp.

Flower passes ``context.run_config`` (a flat dict of TOML scalars) to both sides. The keys
and defaults are defined once here, in :data:`DEFAULTS`; ``pyproject.toml``'s
``[tool.flwr.app.config]`` must declare exactly these keys (Flower rejects ``-c`` overrides
of undeclared keys; a test checks that the two agree), and ``fedcbir simulate`` writes them
into the app directory it generates.

Defaults are those of the default encoder (``arch = efficientnet-lite0``, ImageNet weights,
fine-tuned from block 11 on: ``train-from = -1`` takes the architecture's default; 160 px and
256-d when ``input-size`` / ``embedding-dim`` are 0): AdamW lr 3e-4, P=16 x K=4, BatchNorm of
the trained blocks averaged (``bn-policy = shared``), 4 augmented views per photo (so the
frozen trunk's activations can be cached), product-type head on.  They mirror the
centralized baseline (``fedcbir train``), so that one federated round of one client with
all the data equals one centralized epoch.  The from-scratch MobileNetV3-Small arm is
``arch = mobilenetv3-small`` (with its own lr 2e-3, P=8, bn-policy local, 96 px, 128-d).

This module is light (standard library only): clients import it too.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from common.errors import FedcbirError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedtrimmedavg", "krum")
DP_MODES = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
DP_STRATEGIES = ("fedavg", "fedprox")  # plain (weighted) averaging: the sensitivity analysis of DP-FedAvg holds
ACCOUNTANTS = ("rdp", "pld")
FRAMEWORK_CODES = {"torch": 0, "tf": 1, "jax": 2}
ISOLATION = ("process", "inline")
#: How a client names itself at the end of an error reason (the server reads it back into
#: the round's report even when the reply has no metrics): ``[partition=P framework=F profile=X]``.
TAG_RE = re.compile(r"\[partition=(-?\d+) framework=(\S+) profile=([^\]\s]+)\]")


def client_tag(partition: int, framework: str, profile: str) -> str:
    return f"[partition={partition} framework={framework} profile={profile}]"

#: run-config key -> default (types matter: Flower keeps TOML types).
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 3,
    "strategy": "fedavg",
    "frameworks": "torch,tf,jax",
    "profiles": "rpi4,rpi5,jetson-nano-cpu",
    "catalog": "",  # "" = the built-in sample catalog (generated once into the cache)
    "partition": "dirichlet:0.3",
    "seed": 0,
    "test-fraction": 0.2,
    "local-epochs": 1,
    "max-steps": 0,  # per round and client; 0 = no cap (tests use it)
    "optimizer": "adamw",
    "lr": 0.0003,
    "products-per-batch": 16,
    "photos-per-product": 4,
    "arch": "efficientnet-lite0",  # efficientnet-lite0 (ImageNet-pretrained) | mobilenetv3-small
    "train-from": -1,  # first trained block; -1 = the architecture's default (11 | 0 = all)
    "views": 4,  # augmented views per photo (0 = a fresh augmentation every epoch)
    "cache-mb": 256,  # frozen-trunk activation cache per client process
    "width": 1.0,
    "input-size": 0,  # 0 = the architecture's (160 | 96)
    "embedding-dim": 0,  # 0 = the architecture's (256 | 128)
    "type-head": True,
    "bn-policy": "shared",  # local = FedBN (BN tensors stay on the device) | shared
    "prox-mu": 0.01,  # FedProx proximal weight (used only by strategy fedprox)
    "server-lr": 0.01,  # FedAdam eta
    "trim-beta": 0.2,  # FedTrimmedAvg cut fraction
    "krum-malicious": 0,  # Krum: assumed number of malicious nodes
    "fp16-upload": False,
    "realtime": False,
    "fraction-evaluate": 1.0,  # share of nodes running local (client-side) evaluation
    "eval-framework": "torch",  # server-side evaluation framework
    "round-timeout": 3600.0,  # seconds a round waits for replies
    "min-nodes": 0,  # wait for this many nodes before round 1; 0 = the nodes already connected
    "wait-nodes-timeout": 300.0,
    "outlier-factor": 10.0,  # reject an update whose norm > factor x median norm of the round
    "max-update-ratio": 10.0,  # ... or > ratio x the global model's norm
    "out": "",  # run folder (absolute); "" = ./runs/flwr-<run id> in the ServerApp's cwd
    "resume": False,
    "client-isolation": "process",  # process = a fresh child process per message | inline
    "client-state-dir": "",  # where clients also persist FedBN tensors (survives --resume)
    "clients-per-round": 0,  # devices sampled per round; 0 = every connected device (under DP: expected number)
    "dp": "off",  # off | server-fixed | client-fixed | server-adaptive | client-adaptive (server.privacy)
    "dp-clip": 0.05,  # clipping norm of a device's update (adaptive: the initial norm); README "Privacy"
    "dp-noise": 1.0,  # noise multiplier z: Gaussian noise std = z x clip on the sum of updates
    "dp-delta": 1e-5,  # the delta at which epsilon is reported
    "dp-accountant": "rdp",  # rdp | pld (dp-accounting)
    "dp-quantile": 0.5,  # adaptive clipping: target share of unclipped updates
    "dp-count-stddev": 0.0,  # adaptive clipping: noise std of the clipped-count query; 0 = devices per round / 20
    "target-epsilon": 0.0,  # privacy budget: refuse to start / stop before exceeding it; 0 = none
}


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int
    strategy: str
    frameworks: tuple[str, ...]
    profiles: tuple[str, ...]
    catalog: str
    partition: str
    seed: int
    test_fraction: float
    local_epochs: int
    max_steps: int
    optimizer: str
    lr: float
    products_per_batch: int
    photos_per_product: int
    arch: str
    train_from: int
    views: int
    cache_mb: int
    width: float
    input_size: int
    embedding_dim: int
    type_head: bool
    bn_policy: str
    prox_mu: float
    server_lr: float
    trim_beta: float
    krum_malicious: int
    fp16_upload: bool
    realtime: bool
    fraction_evaluate: float
    eval_framework: str
    round_timeout: float
    min_nodes: int
    wait_nodes_timeout: float
    outlier_factor: float
    max_update_ratio: float
    out: str
    resume: bool
    client_isolation: str
    client_state_dir: str
    clients_per_round: int
    dp: str
    dp_clip: float
    dp_noise: float
    dp_delta: float
    dp_accountant: str
    dp_quantile: float
    dp_count_stddev: float
    target_epsilon: float

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any] | None = None, **overrides: Any) -> "RunConfig":
        """Typed view of a Flower run config; missing keys take :data:`DEFAULTS`."""
        raw = dict(DEFAULTS)
        unknown = sorted(set(run_config or {}) - set(DEFAULTS))
        if unknown:
            raise FedcbirError(f"unknown run-config key(s): {', '.join(unknown)}")
        raw.update(run_config or {})
        raw.update({k.replace("_", "-"): v for k, v in overrides.items()})
        from models.api import normalize_framework

        def as_bool(key):
            v = raw[key]
            if isinstance(v, str):
                return v.strip().lower() in ("1", "true", "yes", "on")
            return bool(v)

        def as_list(key):
            return tuple(s.strip() for s in str(raw[key]).split(",") if s.strip())

        try:
            cfg = cls(
                num_server_rounds=int(raw["num-server-rounds"]),
                strategy=str(raw["strategy"]).strip().lower(),
                frameworks=tuple(normalize_framework(f) for f in as_list("frameworks")),
                profiles=as_list("profiles"),
                catalog=str(raw["catalog"]),
                partition=str(raw["partition"]),
                seed=int(raw["seed"]),
                test_fraction=float(raw["test-fraction"]),
                local_epochs=int(raw["local-epochs"]),
                max_steps=int(raw["max-steps"]),
                optimizer=str(raw["optimizer"]),
                lr=float(raw["lr"]),
                products_per_batch=int(raw["products-per-batch"]),
                photos_per_product=int(raw["photos-per-product"]),
                arch=str(raw["arch"]).strip().lower(),
                train_from=int(raw["train-from"]),
                views=int(raw["views"]),
                cache_mb=int(raw["cache-mb"]),
                width=float(raw["width"]),
                input_size=int(raw["input-size"]),
                embedding_dim=int(raw["embedding-dim"]),
                type_head=as_bool("type-head"),
                bn_policy=str(raw["bn-policy"]),
                prox_mu=float(raw["prox-mu"]),
                server_lr=float(raw["server-lr"]),
                trim_beta=float(raw["trim-beta"]),
                krum_malicious=int(raw["krum-malicious"]),
                fp16_upload=as_bool("fp16-upload"),
                realtime=as_bool("realtime"),
                fraction_evaluate=float(raw["fraction-evaluate"]),
                eval_framework=normalize_framework(raw["eval-framework"]),
                round_timeout=float(raw["round-timeout"]),
                min_nodes=int(raw["min-nodes"]),
                wait_nodes_timeout=float(raw["wait-nodes-timeout"]),
                outlier_factor=float(raw["outlier-factor"]),
                max_update_ratio=float(raw["max-update-ratio"]),
                out=str(raw["out"]),
                resume=as_bool("resume"),
                client_isolation=str(raw["client-isolation"]),
                client_state_dir=str(raw["client-state-dir"]),
                clients_per_round=int(raw["clients-per-round"]),
                dp=str(raw["dp"]).strip().lower(),
                dp_clip=float(raw["dp-clip"]),
                dp_noise=float(raw["dp-noise"]),
                dp_delta=float(raw["dp-delta"]),
                dp_accountant=str(raw["dp-accountant"]).strip().lower(),
                dp_quantile=float(raw["dp-quantile"]),
                dp_count_stddev=float(raw["dp-count-stddev"]),
                target_epsilon=float(raw["target-epsilon"]),
            )
        except (TypeError, ValueError) as exc:
            raise FedcbirError(f"invalid run config: {exc}") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        def bad(msg: str):
            raise FedcbirError(f"invalid run config: {msg}")

        if self.num_server_rounds < 0:
            bad("num-server-rounds must be >= 0")
        if self.strategy not in STRATEGIES:
            bad(f"strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if not self.frameworks:
            bad("frameworks is empty")
        if not self.profiles:
            bad("profiles is empty")
        from models.spec import PRESETS

        if self.arch not in PRESETS:
            bad(f"arch {self.arch!r}: choose one of {', '.join(PRESETS)}")
        if self.views < 0 or self.cache_mb < 0 or self.train_from < -1:
            bad("views and cache-mb must be >= 0, train-from >= -1")
        if self.local_epochs < 1 or self.max_steps < 0:
            bad("local-epochs must be >= 1 and max-steps >= 0")
        if self.bn_policy not in ("local", "shared"):
            bad("bn-policy must be local or shared")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            bad("fraction-evaluate must be in [0, 1]")
        if self.round_timeout <= 0 or self.wait_nodes_timeout < 0:
            bad("round-timeout must be > 0 and wait-nodes-timeout >= 0")
        if self.outlier_factor <= 1 or self.max_update_ratio <= 0:
            bad("outlier-factor must be > 1 and max-update-ratio > 0")
        if self.client_isolation not in ISOLATION:
            bad(f"client-isolation must be one of {ISOLATION}")
        if not 0.0 <= self.trim_beta < 0.5:
            bad("trim-beta must be in [0, 0.5)")
        if self.prox_mu < 0 or self.server_lr <= 0 or self.krum_malicious < 0:
            bad("prox-mu >= 0, server-lr > 0 and krum-malicious >= 0 are required")
        if self.clients_per_round < 0:
            bad("clients-per-round must be >= 0 (0 = every connected device)")
        self._check_dp(bad)

    def _check_dp(self, bad) -> None:
        import math

        if self.dp not in DP_MODES:
            bad(f"dp {self.dp!r}: choose one of {', '.join(DP_MODES)}")
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon >= 0):
            bad(f"target-epsilon must be >= 0 (0 = no budget), got {self.target_epsilon:g}")
        if self.dp == "off":
            if self.target_epsilon > 0:
                bad("target-epsilon needs differential privacy: set dp (e.g. dp=server-fixed)")
            return
        if not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
            bad(f"dp-noise (the noise multiplier) must be >= 0, got {self.dp_noise:g}")
        if not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
            bad(f"dp-clip (the clipping norm) must be > 0, got {self.dp_clip:g}")
        if not 0.0 < self.dp_delta < 1.0:
            bad(f"dp-delta must be in (0, 1), got {self.dp_delta:g}")
        if self.dp_accountant not in ACCOUNTANTS:
            bad(f"dp-accountant {self.dp_accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")
        if self.strategy not in DP_STRATEGIES:
            bad(f"dp needs strategy fedavg or fedprox (an average whose sensitivity to one device is "
                f"clip / devices per round), not {self.strategy}")
        if self.clients_per_round < 1:
            bad("dp needs clients-per-round >= 1 (the expected number of devices per round: each device "
                "takes part with probability clients-per-round / connected devices)")
        if self.dp.startswith("client-") and self.fp16_upload:
            bad(f"dp={self.dp} clips on the device: fp16-upload would round the clipped update after "
                "clipping; use server-side clipping with fp16-upload")
        if self.target_epsilon > 0 and self.dp_noise == 0:
            bad("target-epsilon needs dp-noise > 0 (without noise epsilon is infinite)")
        if self.dp.endswith("-adaptive"):
            if not 0.0 <= self.dp_quantile <= 1.0:
                bad("dp-quantile must be in [0, 1]")
            if self.dp_count_stddev < 0:
                bad("dp-count-stddev must be >= 0 (0 = devices per round / 20)")
            count_std = self.dp_count_stddev or self.clients_per_round / 20
            if self.dp_noise > 0 and self.dp_noise >= 2 * count_std:
                bad(f"dp={self.dp}: dp-noise {self.dp_noise:g} needs dp-count-stddev > {self.dp_noise / 2:g} "
                    f"(it is {count_std:g}; 0 means clients-per-round / 20)")

    # ------------------------------------------------------------------ derived
    def to_flower(self) -> dict[str, Any]:
        """Back to a Flower run config (kebab-case keys, TOML scalar types)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ",".join(v) if isinstance(v, tuple) else v
        return out

    def catalog_root(self) -> Path:
        if self.catalog:
            return Path(self.catalog).expanduser().resolve()
        from catalog.sample import ensure_default_sample

        return ensure_default_sample(progress=False)

    def arch_spec(self, num_types: int = 0):
        from models.spec import preset

        return preset(self.arch, width=self.width, input_size=self.input_size or None,
                      embedding_dim=self.embedding_dim or None,
                      num_types=num_types if self.type_head else 0)

    def preprocess(self):
        from catalog.images import Preprocess
        from models.spec import preprocess_kwargs

        return Preprocess(**preprocess_kwargs(self.arch_spec()))

    def trained_from(self) -> int:
        """The first trained block (the architecture's default for ``train-from = -1``)."""
        spec = self.arch_spec()
        k = spec.default_train_from if self.train_from < 0 else self.train_from
        if k > len(spec.blocks):
            raise FedcbirError(f"invalid run config: train-from {k} > {len(spec.blocks)} blocks of {spec.name}")
        return k

    def shared_names(self, spec) -> list[str]:
        """What travels between server and devices and is averaged: the trained part
        (without its BN tensors under FedBN; under DP never the BN running statistics,
        which are not parameters but averages of the device's activations: they would
        escape clipping's bound, and noise would make variances negative)."""
        from models import canonical
        from models.api import shared_names

        names = shared_names(spec, self.bn_policy, self.trained_from())
        if self.dp != "off":
            names = [n for n in names if not canonical.is_bn_stat(n)]
        return names

    def train_config(self, prox_mu: float = 0.0):
        from models.api import TrainConfig
        from models.optim import OptimConfig

        return TrainConfig(optim=OptimConfig(name=self.optimizer, lr=self.lr), epochs=1,
                           max_steps=self.max_steps or None, prox_mu=float(prox_mu),
                           bn_policy=self.bn_policy, threads=1, seed=self.seed,
                           train_from=self.trained_from(), cache_mb=self.cache_mb)

    def assignment(self, partition_id: int) -> tuple[str, str]:
        """(framework, profile) of a partition: round-robin over the two lists."""
        p = int(partition_id)
        return self.frameworks[p % len(self.frameworks)], self.profiles[p % len(self.profiles)]

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its ``--resume``."""
        keep = ("strategy", "catalog", "partition", "seed", "test_fraction", "arch", "train_from", "width",
                "input_size", "embedding_dim", "type_head", "bn_policy", "frameworks", "profiles")
        d = asdict(self)
        out = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep}
        # added only when set, so that runs from before these keys still resume
        if self.clients_per_round:
            out["clients_per_round"] = self.clients_per_round
        if self.dp != "off":  # what travels (no BN statistics) and the privacy ledger depend on it
            out.update(dp=self.dp, dp_delta=self.dp_delta, dp_accountant=self.dp_accountant)
        return out

    def fingerprint_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def parse_sets(items: list[str] | None, flagged: Mapping[str, str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options -> run-config overrides, typed like :data:`DEFAULTS`; keys that
    have their own option (``flagged``: key -> option) or are unknown are refused."""
    rc: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise FedcbirError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if k in flagged:
            raise FedcbirError(f"--set {k}: use its own option ({flagged[k]})")
        if k not in DEFAULTS:
            raise FedcbirError(f"--set: unknown run-config key {k!r} (known: {', '.join(DEFAULTS)})")
        d = DEFAULTS[k]
        try:
            rc[k] = (v.strip().lower() in ("1", "true", "yes", "on")) if isinstance(d, bool) else type(d)(v)
        except ValueError:
            raise FedcbirError(f"--set {k}: expected a {type(d).__name__}, got {v!r}") from None
    return rc


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (seed, round, partition, ...), stable across platforms."""
    h = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=4).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF
