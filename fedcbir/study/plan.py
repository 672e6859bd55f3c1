"""What a study runs: its constants, argument checks and the list of federations.

The federation types (one per framework, the mixed one, the IID mixed one, the from-scratch
arm), the run-config keys the study owns and its defaults, the argument checks that need no
catalog, the catalog choice (``--catalog`` | ``--sample``), the run configs (shared base and
per federation), ``plan()`` (seed-major order) and the partition pre-check.

May import: ``common``, ``catalog``, ``device_profiles``, ``models``, ``server`` (the heavy
ones inside functions); nothing of ``fedcbir.study``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from common.errors import FedcbirError

FRAMEWORKS = ("torch", "tf", "jax")
MIXED = "mixed"
#: The "no pretraining" arm: MobileNetV3-Small from random weights, all of it trained, with the
#: settings it was tuned with (its own learning rate, batch, FedBN).
SCRATCH = (("arch", "mobilenetv3-small"), ("lr", 0.002), ("products-per-batch", 8), ("bn-policy", "local"),
           ("input-size", 0), ("embedding-dim", 0), ("train-from", -1))
RUNTIMES = ("simulation", "inprocess")
DEFAULT_TARGET = 0.10

#: Run-config keys the study sets itself (``--set`` may not override them).
OWN_KEYS = {"catalog": "--catalog/--sample", "num-server-rounds": "--rounds", "frameworks": "--frameworks",
            "profiles": "--profile", "partition": "--partition", "strategy": "--strategy",
            "local-epochs": "--local-epochs", "seed": "--seeds/--first-seed", "out": "--out",
            "client-state-dir": "--out", "resume": "(automatic)", "realtime": "(never: timing is emulated)"}
#: Study defaults that differ from the run-config defaults (overridable with --set).
STUDY_DEFAULTS = {"fraction-evaluate": 0.0}


@dataclass(frozen=True)
class Planned:
    """One federation of the study."""
    label: str  # a framework, "mixed", or "scratch-<framework>"
    frameworks: str  # run-config "frameworks" (comma list)
    seed: int
    run_dir: Path
    overrides: tuple[tuple[str, Any], ...] = ()  # run-config keys of this federation type only

    @property
    def name(self) -> str:
        return f"{self.label}-s{self.seed}"


def parse_frameworks(text: str) -> list[str]:
    from models.api import normalize_framework

    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise FedcbirError("--frameworks is empty: give e.g. torch,tf,jax")
    out: list[str] = []
    for t in items:
        fw = normalize_framework(t)
        if fw in out:
            raise FedcbirError(f"--frameworks lists {fw} twice")
        out.append(fw)
    return out


def parse_set(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs -> run-config entries, typed like ``server.runconfig.DEFAULTS``."""
    from server.runconfig import parse_sets

    return parse_sets(items, OWN_KEYS)


def resolve_catalog(args: argparse.Namespace) -> Path:
    """``--catalog ROOT`` | ``--sample`` [``--products N --views V``] (generated once into the cache)."""
    sized = args.products is not None or args.views is not None
    if args.catalog and (args.sample or sized):
        raise FedcbirError("give either --catalog ROOT or --sample [--products N --views V], not both")
    if args.catalog:
        root = Path(args.catalog).expanduser()
        if not root.is_dir():
            raise FedcbirError(f"catalog not found: {root}")
        return root.resolve()
    if not (args.sample or sized):
        raise FedcbirError("give --catalog ROOT (ABO layout) or --sample (the built-in sample catalog)")
    from catalog.sample import ensure_default_sample

    products, views = args.products or 300, args.views or 6
    if products < 8 or views < 3:
        raise FedcbirError("--products must be >= 8 and --views >= 3 (queries need a second photo)")
    return ensure_default_sample(products=products, views=views, progress=sys.stderr.isatty()).resolve()


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without touching the catalog (one-line errors)."""
    if args.seeds < 1:
        raise FedcbirError("--seeds must be >= 1")
    if getattr(args, "extra_arm_seeds", None) is not None and args.extra_arm_seeds < 1:
        raise FedcbirError("--extra-arm-seeds must be >= 1")
    if args.first_seed < 0:
        raise FedcbirError("--first-seed must be >= 0")
    if args.rounds < 1:
        raise FedcbirError("--rounds must be >= 1")
    if args.clients < 1:
        raise FedcbirError("--clients must be >= 1")
    if args.local_epochs < 1:
        raise FedcbirError("--local-epochs must be >= 1")
    if not 0.0 < args.target_recall <= 1.0:
        raise FedcbirError("--target-recall must be in (0, 1]")
    if args.runtime not in RUNTIMES:
        raise FedcbirError(f"--runtime must be one of {', '.join(RUNTIMES)}")
    if args.latency_repeats < 1:
        raise FedcbirError("--latency-repeats must be >= 1")
    from catalog.splits import parse_scheme

    try:
        parse_scheme(args.partition)
    except Exception as exc:  # noqa: BLE001 - PartitionError and friends
        raise FedcbirError(f"--partition {args.partition!r}: {exc}") from None
    profiles = [p.strip() for p in args.profile.split(",") if p.strip()]
    if not profiles:
        raise FedcbirError("--profile is empty")
    from device_profiles import load_profile

    for p in profiles:
        try:
            load_profile(p)
        except FedcbirError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise FedcbirError(f"--profile {p!r}: {exc}") from None


def base_run_config(args: argparse.Namespace, catalog: Path) -> dict[str, Any]:
    """The run config every federation shares (frameworks/seed/out are set per federation)."""
    rc: dict[str, Any] = dict(STUDY_DEFAULTS)
    rc.update(parse_set(args.set))
    rc.update({"catalog": str(catalog), "num-server-rounds": int(args.rounds),
               "profiles": ",".join(p.strip() for p in args.profile.split(",") if p.strip()),
               "partition": args.partition, "strategy": args.strategy, "local-epochs": int(args.local_epochs),
               "realtime": False, "resume": False})
    return rc


def federation_run_config(base: Mapping[str, Any], fed: Planned) -> dict[str, Any]:
    from server.runconfig import RunConfig

    rc = dict(base)
    rc.update(dict(fed.overrides))
    rc.update({"frameworks": fed.frameworks, "seed": fed.seed, "out": str(fed.run_dir.resolve()),
               "client-state-dir": str((fed.run_dir / "client-state").resolve())})
    return RunConfig.from_flower(rc).to_flower()


def plan(frameworks: Sequence[str], seeds: Sequence[int], out: Path, mixed: bool = True,
         scratch: str | None = None, iid_mixed: bool = False, extra_seeds: int | None = None) -> list[Planned]:
    """Seed-major order (every federation type of seed s before seed s+1), so a study cut
    short still holds complete comparisons.  ``scratch``: one framework that also trains the
    from-scratch MobileNetV3-Small (what pretraining is worth).  ``iid_mixed``: the mixed
    federation once more on an IID partition (what the label skew costs).  ``extra_seeds``: the
    two extra arms (IID mixed, from scratch) run only the first that many seeds (all when None)."""
    everyone = list(seeds)
    some = everyone if extra_seeds is None else everyone[:max(0, int(extra_seeds))]
    labels = [(fw, fw, (), everyone) for fw in frameworks]
    if mixed and len(frameworks) > 1:
        labels.append((MIXED, ",".join(frameworks), (), everyone))
        if iid_mixed:
            labels.append((f"{MIXED}-iid", ",".join(frameworks), (("partition", "iid"),), some))
    if scratch:
        labels.append((f"scratch-{scratch}", scratch, SCRATCH, some))
    runs = out / "runs"
    return [Planned(label, fws, int(s), runs / f"{label}-s{int(s)}", ov)
            for s in everyone for label, fws, ov, mine in labels if s in mine]


def precheck_partitions(catalog: Path, base: Mapping[str, Any], seeds: Iterable[int], clients: int) -> dict:
    """Fail fast on a partition that cannot be made; returns per seed the test-set size."""
    from catalog.dataset import CatalogSplit
    from catalog.splits import partition
    from server.runconfig import RunConfig

    cfg = RunConfig.from_flower(dict(base))
    info = {}
    for s in seeds:
        split = CatalogSplit.load(catalog, seed=int(s), test_fraction=cfg.test_fraction)
        try:
            parts = partition(split.train, clients, cfg.partition, int(s))
        except FedcbirError:
            raise
        except Exception as exc:  # noqa: BLE001 - PartitionError is a ValueError
            raise FedcbirError(f"seed {s}: {exc}") from None
        queries = sum(len(p.other_images) for p in split.test if p.main_image)
        info[int(s)] = {"train_products": len(split.train), "test_products": len(split.test),
                        "test_queries": queries, "partition_products": [len(p) for p in parts]}
    return info
