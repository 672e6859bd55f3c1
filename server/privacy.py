"""Device-level differential privacy (DP-FedAvg) on Flower 1.42's own wrappers, and its budget.

Run config ``dp`` picks one of Flower's strategy wrappers (``flwr.serverapp.strategy``):

=================  ==============================================  =========================
``dp``             server strategy                                 on the device
=================  ==============================================  =========================
server-fixed       ``DifferentialPrivacyServerSideFixedClipping``   nothing
client-fixed       ``DifferentialPrivacyClientSideFixedClipping``   ``fixedclipping_mod``
server-adaptive    ``DifferentialPrivacyServerSideAdaptiveClipping``  nothing
client-adaptive    ``DifferentialPrivacyClientSideAdaptiveClipping``  ``adaptiveclipping_mod``
=================  ==============================================  =========================

What one round does, in this order (``PrivateMixin`` in front of the wrapper, the project's
``ValidatingMixin`` behind it, the wrapped FedAvg/FedProx inside):

1. **sampling** (``configure_train``): every connected device takes part with probability
   ``q = clients-per-round / connected devices`` (Poisson sampling, drawn from the OS's
   randomness: a sample predictable from the run's seed would void the amplification the
   accountant counts on);
2. **validation before clipping** (``server.validation``): names, shapes, dtypes, finite
   values, the absolute cap ``max-update-ratio`` x the global model's norm, and (client-side
   clipping) ``||update|| <= clip``.  A rejected update is left out, i.e. counts as a zero
   update, never clipped into the average.  The round-median outlier rule is off under DP:
   it makes one device's update decide whether another's is dropped, which breaks the
   per-device sensitivity bound (clipping already bounds every device's influence);
3. **clipping** of each update ``w_device - w_global`` to L2 norm ``clip`` over every tensor
   sent (the trained part only: the frozen trunk never travels; BN running statistics never
   travel under DP, see ``RunConfig.shared_names``), by the wrapper (server-side) or by
   Flower's mod on the device (client-side);
4. **the fixed-denominator average** (``FixedDenominatorMixin``): every accepted device
   weighs the same and the sum is divided by the *expected* number ``m = clients-per-round``,
   not by the number that answered, so that adding or removing one device changes the
   result by at most ``clip / m``;
5. **Gaussian noise** of std ``z * clip / m`` on every coordinate of that average, by the
   wrapper (numpy's global generator, which ``PrivateMixin`` reseeds from ``os.urandom``
   for the release and restores afterwards, so the noise cannot be replayed from the run's
   seed: keras' ``set_random_seed`` seeds that generator in this process).

Corrections to Flower 1.42's adaptive wrappers (``_DPWrapperFixes``), after Andrew et al.
2019 ("Differentially private learning with adaptive clipping"): (a) the noise std uses the
clipping norm of *this* round (Flower adds the noise after already moving the norm to the
next round's value); (b) the norm moves on the share of *unclipped* updates (Flower feeds
its ``exp(-lr * (share - target))`` step the clipped share, so a norm that clips every
update shrinks further instead of growing); (c) that share is the noisy
``sum(b_i - 1/2) + N(0, s^2)``, re-centred with the expected ``m / 2`` and divided by the
expected ``m`` (sensitivity 1/2, which Flower's split of the noise between the two queries
assumes, and no dependence on how many devices answered).

BatchNorm running statistics are averages of a device's activations, not parameters: they
would escape the clipping bound, and noise would make variances negative. Under DP they
never travel (neither way); the global model keeps the pretrained encoder's initial ones (a
model trained from scratch with ``bn-policy = shared`` gets them re-estimated by the server
on the catalog's main photos, public data, after every round; under ``bn-policy = local``
nothing of BatchNorm travels anyway). BN affine parameters of the trained part are trained,
clipped and noised like every other weight.

The budget (``epsilon``): user-level = device-level (neighbouring federations differ by one
device with all of its photos), add-or-remove-one relation, one Poisson-subsampled Gaussian
event per round ``(q, z)`` composed with Google's ``dp-accounting`` (RDP by default, PLD with
``dp-accountant = pld``).  With adaptive clipping ``z`` is the effective multiplier of the
two queries together (Flower splits it).  Only the model weights are covered: the per-device
metrics in ``metrics.jsonl`` (loss, examples, local recall) are not privatised.
"""
from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideAdaptiveClipping,
                                     DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideAdaptiveClipping,
                                     DifferentialPrivacyServerSideFixedClipping)

from common.errors import FedcbirError
from server import validation
from server.validation import ValidatingMixin, to_numpy, to_record

WRAPPERS = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}
NORM_BIT = "norm_bit"  # flwr.supercore.differential_privacy.KEY_NORM_BIT
CLIP_TOLERANCE = 1e-4  # relative slack of the server's check of client-side clipping (float32 rounding)
SAMPLING = "poisson"
RELATION = "add-or-remove one device"
ACCOUNTANT_NAMES = {"rdp": "RDP (dp_accounting.rdp.RdpAccountant)",
                    "pld": "PLD (dp_accounting.pld.PLDAccountant)"}


# ----------------------------------------------------------------------------- accounting


def accountant(rounds: Sequence[tuple[float, float]], kind: str = "rdp", orders: Sequence[float] | None = None):
    """A dp-accounting accountant (``RdpAccountant`` or ``PLDAccountant``, add/remove-one
    relation) that has composed the rounds ``[(q, z), ...]``: each a Gaussian mechanism with
    noise multiplier ``z > 0`` on a Poisson sample of rate ``q``."""
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    if kind == "rdp":
        acc = RdpAccountant(orders=None if orders is None else list(orders),
                            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    elif kind == "pld":
        acc = PLDAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    else:
        raise FedcbirError(f"unknown accountant {kind!r}: rdp or pld")
    counts = Counter((float(q), float(z)) for q, z in rounds if float(q) > 0)
    with _quiet_absl():
        for (q, z), n in sorted(counts.items()):
            acc.compose(dp_event.PoissonSampledDpEvent(min(q, 1.0), dp_event.GaussianDpEvent(z)), n)
    return acc


def epsilon(rounds: Sequence[tuple[float, float]], delta: float, kind: str = "rdp") -> float:
    """epsilon at ``delta`` after the rounds ``[(q, z), ...]`` (see :func:`accountant`);
    ``inf`` when some round had no noise; 0.0 before any round."""
    rounds = [(float(q), float(z)) for q, z in rounds if float(q) > 0]
    if not rounds:
        return 0.0
    if any(z <= 0 for _, z in rounds):
        return math.inf
    acc = accountant(rounds, kind)
    with _quiet_absl():
        return float(acc.get_epsilon(delta))


class _quiet_absl:
    """RDP logs a warning for every order it must skip at small z (absl logging)."""

    def __enter__(self):
        self.logger = logging.getLogger("absl")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False


def rounds_within(target: float, q: float, z: float, delta: float, accountant: str = "rdp",
                  done: Sequence[tuple[float, float]] = (), limit: int = 100_000) -> int:
    """How many more rounds ``(q, z)`` fit after ``done`` without epsilon exceeding ``target``."""
    def fits(k: int) -> bool:
        return epsilon(list(done) + [(q, z)] * k, delta, accountant) <= target

    if not fits(0):
        return 0
    hi = 1
    while hi < limit and fits(hi):
        hi *= 2
    if hi >= limit and fits(limit):
        return limit
    lo = hi // 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class PrivacyLedger:
    """The rounds released so far ``[(q, z)]`` and the epsilon they spent."""

    def __init__(self, cfg, rounds: Iterable[tuple[float, float]] = ()):
        self.cfg = cfg
        self.rounds: list[tuple[float, float]] = [(float(q), float(z)) for q, z in rounds]

    @classmethod
    def from_rows(cls, cfg, rows: Iterable[dict[str, Any]]) -> "PrivacyLedger":
        events = []
        for row in rows:
            dp = row.get("dp") or {}
            if dp.get("sampling_rate") is not None and dp.get("noise_multiplier") is not None:
                events.append((dp["sampling_rate"], dp["noise_multiplier"]))
        return cls(cfg, events)

    def epsilon(self, extra: Sequence[tuple[float, float]] = ()) -> float:
        return epsilon(self.rounds + list(extra), self.cfg.dp_delta, self.cfg.dp_accountant)

    def add(self, q: float, z: float) -> float:
        self.rounds.append((float(q), float(z)))
        return self.epsilon()

    def plan(self, rounds: int, population: int) -> tuple[float, float]:
        """(q, epsilon after ``rounds`` more rounds with ``population`` connected devices)."""
        q = sampling_rate(self.cfg.clients_per_round, population)
        return q, self.epsilon([(q, self.cfg.dp_noise)] * max(0, int(rounds)))

    def check_plan(self, rounds: int, population: int, where: str = "") -> None:
        """Refuse (one line) when ``rounds`` more rounds would exceed ``target-epsilon``."""
        cfg = self.cfg
        if cfg.target_epsilon <= 0 or rounds <= 0:
            return
        q, eps = self.plan(rounds, population)
        if eps > cfg.target_epsilon:
            fit = rounds_within(cfg.target_epsilon, q, cfg.dp_noise, cfg.dp_delta, cfg.dp_accountant, self.rounds)
            done = f" after the {len(self.rounds)} already run" if self.rounds else ""
            raise FedcbirError(
                f"target-epsilon {cfg.target_epsilon:g}: {rounds} round(s){done} would spend epsilon {eps:.3g} at "
                f"delta {cfg.dp_delta:g} ({cfg.clients_per_round} of {population} devices per round{where}, "
                f"q = {q:.3g}, noise multiplier {cfg.dp_noise:g}, {cfg.dp_accountant.upper()}); "
                f"{fit} round(s) fit: lower the rounds, raise dp-noise or add devices")


def sampling_rate(clients_per_round: int, population: int) -> float:
    return 1.0 if population <= 0 else min(1.0, float(clients_per_round) / float(population))


def describe(cfg) -> dict[str, Any]:
    """The settings behind every epsilon this run reports (summary / JSON)."""
    return {"mode": cfg.dp, "noise_multiplier": cfg.dp_noise, "clip": cfg.dp_clip, "delta": cfg.dp_delta,
            "clients_per_round": cfg.clients_per_round, "accountant": ACCOUNTANT_NAMES[cfg.dp_accountant],
            "sampling": f"{SAMPLING} (each device with probability clients_per_round / connected devices)",
            "neighbouring": RELATION, "unit": "device (user-level DP)",
            "target_epsilon": cfg.target_epsilon or None,
            "covers": "the model weights released each round (checkpoints, exports); not the per-device "
                      "metrics in metrics.jsonl"}


def precheck(run_config: dict[str, Any], population: int, what: str) -> None:
    """Before starting anything (``fedcbir simulate`` / ``server``): refuse a run whose
    planned rounds would exceed ``target-epsilon`` with ``population`` devices (``what``
    says where that number comes from); a resumed run counts the rounds already in its
    ``metrics.jsonl``."""
    import json
    from pathlib import Path

    from server.runconfig import RunConfig

    cfg = RunConfig.from_flower(run_config)
    if cfg.dp == "off" or cfg.target_epsilon <= 0:
        return
    rows: list[dict[str, Any]] = []
    mfile = Path(cfg.out) / "metrics.jsonl" if cfg.out else None
    if cfg.resume and mfile is not None and mfile.is_file():
        for line in mfile.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    done = max((int(r.get("round", 0)) for r in rows), default=0)
    PrivacyLedger.from_rows(cfg, rows).check_plan(cfg.num_server_rounds - done, population, what)


def summary_line(summary: dict[str, Any]) -> str:
    """The privacy part of a command's last line ("" without DP)."""
    p = summary.get("privacy")
    if not p:
        return ""
    eps = "inf (no noise)" if p.get("epsilon") is None else f"{p['epsilon']:.3g}"
    text = (f"; device-level DP ({p['mode']}): epsilon {eps} at delta {p['delta']:g} after "
            f"{p['rounds_accounted']} round(s) ({p['accountant'].split(' ')[0]})")
    if summary.get("stopped"):
        text += f"; privacy budget: {summary['stopped']}"
    return text


# ----------------------------------------------------------------------------- strategies


class FixedDenominatorMixin:
    """In front of FedAvg/FedProx inside a DP wrapper: ``w + (sum of accepted updates) / m``
    with ``m = expected_replies`` whatever number answered (missing and rejected devices
    count as zero updates), and ``w`` itself when none did (the wrapper still adds noise:
    whether a round releases must not depend on the data)."""

    expected_replies: int = 1
    _current: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self._current = {k: np.asarray(v, np.float64) for k, v in to_numpy(arrays).items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if self._current is None:
            raise RuntimeError("aggregate_train before configure_train")
        metrics: MetricRecord | None = MetricRecord()
        avg = self._current
        if replies:
            agg, metrics = super().aggregate_train(server_round, replies)
            if agg is None:
                return None, metrics
            avg = to_numpy(agg)
        share = len(replies) / float(self.expected_replies)
        out = {k: (cur + share * (np.asarray(avg[k], np.float64) - cur)).astype(np.float32)
               for k, cur in self._current.items()}
        return to_record(out), metrics


class _DPWrapperFixes:
    """Between ``PrivateMixin`` and a Flower DP wrapper (see the module doc)."""

    round_clip: float = 0.0

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        moved = self.clipping_norm
        self.clipping_norm = self.round_clip
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = moved

    def _noisy_fraction(self, count: int, total: int) -> float:  # adaptive wrappers only
        """Noisy share of *unclipped* updates (``count`` is the clipped ones): Andrew et al.'s
        ``b = (sum(b_i - 1/2) + N(0, s^2) + m/2) / m`` with ``b_i = 1`` for ``||update|| <= clip``.
        Flower's ``exp(-lr * (b - target))`` then shrinks the norm when more than ``target``
        of the updates fit (Flower 1.42 feeds it the clipped share, which shrinks a norm that
        clips everything)."""
        m = float(self.num_sampled_clients)
        centred = total / 2.0 - float(count) + float(np.random.normal(0.0, self.clipped_count_stddev))
        return (centred + m / 2.0) / m


class PrivateMixin(ValidatingMixin):
    """``ValidatingMixin`` with DP's sampling, screening and release (module doc)."""

    dp_mode: str = "server-fixed"
    dp_z: float = 1.0  # the noise multiplier the accountant counts (adaptive: of both queries)
    round_info: dict[str, Any]

    # -- sampling
    def _sample(self, server_round: int, node_ids: list[int]) -> list[int]:
        q = sampling_rate(self.clients_per_round, len(node_ids))
        rng = random.SystemRandom()
        sample = [n for n in node_ids if q >= 1.0 or rng.random() < q]
        self.round_clip = float(self.clipping_norm)
        self.round_info = {"population": len(node_ids), "sampling_rate": q, "sampled": len(sample),
                           "clip": self.round_clip}
        return sample

    # -- screening: per-update rules only (see module doc)
    def _rejections(self, norms: dict[int, float]) -> dict[int, str]:
        bad = validation.outliers(norms, validation.model_norm(self.reference), math.inf, self.max_update_ratio)
        if self.dp_mode.startswith("client-"):
            limit = self.round_clip * (1.0 + CLIP_TOLERANCE) + 1e-7
            for i, v in norms.items():
                if i not in bad and v > limit:
                    bad[i] = (f"update norm {v:.4g} exceeds the clipping norm {self.round_clip:.4g}: "
                              f"the device did not clip (dp={self.dp_mode})")
        return bad

    def _clean_metrics(self, n: float, loss: float, metrics: dict[str, Any]) -> MetricRecord:
        out = {"num-examples": 1.0, "loss": loss}  # every device weighs the same
        if self.dp_mode == "client-adaptive":
            bit = metrics.get(NORM_BIT)
            if bit not in (0, 1, 0.0, 1.0, True, False):
                raise validation.Rejected(f"{NORM_BIT} must be 0 or 1 under dp=client-adaptive, got {bit!r}")
            out[NORM_BIT] = int(bit)
        return MetricRecord(out)

    # -- release
    def _aggregate_accepted(self, server_round: int, accepted: list[Message], errors: list[Message]):
        # a zero update contributes exactly zero to the sum (Flower's clipping divides by its norm)
        nonzero = [m for m in accepted if self._norms.get(id(m), 1.0) > 0]
        state = np.random.get_state()
        np.random.seed(np.frombuffer(os.urandom(32), dtype=np.uint32))
        try:
            agg, metrics = self._base_aggregate(server_round, nonzero)
        finally:
            np.random.set_state(state)
        self.round_info.update(accepted=len(accepted), next_clip=float(self.clipping_norm),
                               noise_std=float(self.noise_multiplier) * self.round_clip
                               / float(self.num_sampled_clients),
                               noise_multiplier=self.dp_z)
        if agg is None:
            return None, metrics
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in to_numpy(agg).items()}
        return to_record({k: weights[k] for k in self.reference}), metrics


_CLASSES: dict[tuple[type, type], type] = {}


def _cached(name: str, bases: tuple[type, ...]) -> type:
    if bases not in _CLASSES:
        _CLASSES[bases] = type(name, bases, {})
    return _CLASSES[bases]


def make_dp_strategy(cfg, base: type, kw: dict[str, Any]):
    """The DP wrapper of ``cfg.dp`` around ``base`` (FedAvg or FedProx), validated first."""
    inner_cls = _cached(f"FixedDenominator{base.__name__}", (FixedDenominatorMixin, base))
    inner = inner_cls(**{**kw, "min_train_nodes": 0, "min_available_nodes": 0})
    inner.expected_replies = cfg.clients_per_round
    wrapper = WRAPPERS[cfg.dp]
    cls = _cached(f"Validated{wrapper.__name__}", (PrivateMixin, _DPWrapperFixes, wrapper))
    try:
        if cfg.dp.endswith("-fixed"):
            strategy = cls(inner, cfg.dp_noise, cfg.dp_clip, cfg.clients_per_round)
        else:
            strategy = cls(inner, cfg.dp_noise, cfg.clients_per_round, initial_clipping_norm=cfg.dp_clip,
                           target_clipped_quantile=cfg.dp_quantile,
                           clipped_count_stddev=cfg.dp_count_stddev or None)
    except ValueError as exc:
        raise FedcbirError(f"invalid run config: dp={cfg.dp}: {exc}") from None
    strategy.dp_mode = cfg.dp
    strategy.dp_z = cfg.dp_noise
    strategy.round_clip = cfg.dp_clip
    strategy.round_info = {}
    return strategy


# ----------------------------------------------------------------------------- the device side


def dp_clipping_mod(msg: Message, context, call_next) -> Message:
    """ClientApp mod: under ``dp = client-fixed | client-adaptive`` hand train messages to
    Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` (they clip exactly the arrays
    the server sent: the trained part); any other message or mode passes through."""
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    mode = str(context.run_config.get("dp", "off")).strip().lower()
    if not msg.metadata.message_type.startswith("train") or mode not in ("client-fixed", "client-adaptive"):
        return call_next(msg, context)
    mod = fixedclipping_mod if mode == "client-fixed" else adaptiveclipping_mod
    seen: dict[str, Message] = {}

    def inner(m: Message, c) -> Message:
        seen["reply"] = call_next(m, c)
        return seen["reply"]

    try:
        return mod(msg, context, inner)
    except ZeroDivisionError:  # an update of norm 0 (nothing trained): nothing to clip
        reply = seen["reply"]
        if mode == "client-adaptive":
            next(iter(reply.content.metric_records.values()))[NORM_BIT] = 0
        return reply


__all__ = ["PrivacyLedger", "accountant", "describe", "dp_clipping_mod", "epsilon", "make_dp_strategy", "precheck",
           "rounds_within", "sampling_rate", "summary_line"]
