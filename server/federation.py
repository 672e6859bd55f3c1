"""The federation's round loop (run inside the ServerApp, or in-process in tests).

Our own loop over a Flower strategy's ``configure_train`` / ``aggregate_train`` /
``configure_evaluate`` / ``aggregate_evaluate`` (instead of ``strategy.start``) so that a
run can resume at round k+1 from its last checkpoint. Per round:

1. train: every connected node gets the global model (float32); replies are collected
   until all arrived or ``round-timeout`` passed (missing ones are logged as ``dropped``);
   the validating strategy (``server.strategies``) screens them and aggregates;
2. client evaluation (``fraction-evaluate`` of the nodes): local retrieval metrics on
   each node's held-out photos, aggregated weighted by the number of queries;
3. server evaluation on the test products (``server.evaluation``);
4. checkpoint ``RUN/checkpoints/round-XXXX`` (``models.checkpoint``; FedAdam's server
   moments go to ``round-XXXX.server-opt.npz``) and one line appended to
   ``RUN/metrics.jsonl``.

Under differential privacy (run config ``dp``, ``server.privacy``) the strategy is Flower's DP
wrapper with validation in front; before a round is sent the budget check may stop the run
(``target-epsilon``), and after it the round's epsilon is added to the privacy ledger and
to the row (``dp``: sampling rate, devices, clip, noise std, epsilon at delta).

Round 0 (before training) is evaluated and checkpointed too. ``RUN/summary.json`` is written
at the end. Resume (run config ``resume = true``): continue after the newest checkpoint,
refusing if the run's fingerprint (catalog, partition, strategy, architecture, ...)
differs; ``num-server-rounds`` may grow. FedAdam's moments are restored from the
checkpoint, so a resumed FedAdam run continues exactly too.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message

from common.errors import FedcbirError
from common.io import append_jsonl, write_json_atomic
from server.runconfig import RunConfig
from server.strategies import make_strategy, optimizer_state, restore_optimizer_state
from server.validation import to_numpy, to_record

CHECKPOINT_DIR = "checkpoints"
CLIENT_KEYS = {  # metrics.jsonl client field <- reply metric
    "simulated_seconds": "simulated-seconds", "host_seconds": "host-seconds", "cpu_seconds": "cpu-seconds",
    "process_seconds": "process-seconds",
    "compute_seconds": "compute-seconds", "transfer_seconds": "transfer-seconds", "bytes_up": "bytes-up",
    "bytes_down": "bytes-down", "peak_rss_mb": "peak-rss-mb", "num_examples": "num-examples", "loss": "loss",
    "cache_hits": "cache-hits", "cache_misses": "cache-misses", "build_seconds": "build-seconds",
    "first_step_seconds": "first-step-seconds", "steady_step_seconds": "steady-step-seconds",
}


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def exchange(grid, messages: Iterable[Message], timeout: float, poll: float = 0.25
             ) -> tuple[list[Message], dict[str, int], set[str]]:
    """Push, then pull until every reply arrived or ``timeout`` passed.

    Returns (replies, {message id: destination node}, ids still unanswered). Unlike
    ``grid.send_and_receive`` (which sleeps 3 s between pulls) this polls every ``poll`` s.
    """
    messages = list(messages)
    if not messages:
        return [], {}, set()
    ids = list(grid.push_messages(messages))
    sent = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
    pending = set(sent)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        for r in grid.pull_messages(list(pending)):
            if r.metadata.reply_to_message_id in pending:
                pending.discard(r.metadata.reply_to_message_id)
                replies.append(r)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    for mid, m in zip(ids, messages):  # push failed: count as unanswered
        if not mid:
            key = f"unsent-{m.metadata.dst_node_id}"
            sent[key] = m.metadata.dst_node_id
            pending.add(key)
    return replies, sent, pending


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / CHECKPOINT_DIR).glob("round-*.json"))
    return ckpts[-1] if ckpts else None


def run_folder_state(run_dir: Path, run_config: Mapping[str, Any], *,
                     hint: str = "use another output folder") -> tuple[str, str]:
    """What to do with a run folder before running ``run_config`` into it:
    ``("done" | "resume" | "fresh", why)``. Done: its summary has the same settings and
    round count; resume: its newest checkpoint has the same settings (any round count up to
    the requested one); fresh: no checkpoint. Other settings, more rounds already run or a
    damaged checkpoint raise a one-line error ending with ``hint``."""

    def comparable(rc: Mapping[str, Any], *drop: str) -> dict[str, Any]:
        return {k: v for k, v in rc.items() if k not in ("resume", *drop)}

    want = RunConfig.from_flower(run_config).to_flower()
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary = {}
        if comparable(summary.get("run_config") or {}) == comparable(want) and \
                int(summary.get("rounds", -1)) == int(want["num-server-rounds"]):
            return "done", "finished with the same settings"
    ck = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ck is None:
        return "fresh", "no checkpoint"
    try:
        meta = json.loads(ck.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise FedcbirError(f"{ck} is damaged: {hint}") from None
    old = meta.get("run_config") or {}
    if comparable(old, "num-server-rounds") != comparable(want, "num-server-rounds"):
        diff = sorted(k for k in set(old) | set(want) if k not in ("resume", "num-server-rounds")
                      and old.get(k) != want.get(k))
        raise FedcbirError(f"{run_dir} holds a federation with other settings ({', '.join(diff)}): {hint}")
    done = int(meta.get("round", 0))
    if done > int(want["num-server-rounds"]):
        raise FedcbirError(f"{run_dir} already ran {done} rounds, more than the {want['num-server-rounds']} "
                           f"asked for: {hint}")
    return "resume", f"continuing after round {done}"


def _info_from_reason(reason: str) -> tuple[dict[str, Any], str]:
    from server.runconfig import TAG_RE

    m = TAG_RE.search(reason or "")
    if not m:
        return {}, reason
    info = {"partition-id": int(m.group(1)), "framework": m.group(2), "profile": m.group(3)}
    return info, (reason[:m.start()] + reason[m.end():]).strip()


class Federation:
    def __init__(self, grid, cfg: RunConfig, out: str | Path, run_id: int | str | None = None,
                 log: Callable[[str], None] | None = None):
        self.grid = grid
        self.cfg = cfg
        self.out = Path(out).resolve()
        self.run_id = run_id
        self.log = log or _flower_log
        self.nodes: dict[int, dict[str, Any]] = {}  # node id -> partition/framework/profile

    # ------------------------------------------------------------------ setup
    def _setup(self):
        from catalog.dataset import CatalogSplit
        from models.initial import init_weights
        from server.evaluation import ServerEvaluator

        cfg = self.cfg
        self.root = cfg.catalog_root()
        self.split = CatalogSplit.load(self.root, seed=cfg.seed, test_fraction=cfg.test_fraction)
        self.spec = cfg.arch_spec(len(self.split.type_names))
        self.pre = cfg.preprocess()
        self.evaluator = ServerEvaluator(self.split, self.spec, self.pre, cfg.eval_framework, cfg.bn_policy,
                                         train_from=cfg.trained_from())
        # only the trained part travels (and, under FedBN, not its BN tensors); devices hold the
        # frozen part themselves and check it against this digest
        from models import canonical
        from models.canonical import frozen_digest

        self.shared = cfg.shared_names(self.spec)
        self.frozen = canonical.frozen_names(self.spec, cfg.trained_from())
        self.strategy = make_strategy(cfg)
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        ck = latest_checkpoint(self.out)
        if cfg.resume:
            if ck is None:
                raise FedcbirError(f"resume: no checkpoint in {self.out / CHECKPOINT_DIR}")
            self._resume(ck)
        else:
            if ck is not None:
                raise FedcbirError(f"{self.out} already holds a federated run: resume it or use another output folder")
            self.weights = init_weights(self.spec, cfg.seed)
            if self.spec.pretrained:  # projection from the catalog's own main photos
                from models.projection import catalog_projection, main_photos

                self.weights = catalog_projection(self.spec, self.weights, main_photos(self.split, self.pre,
                                                  seed=cfg.seed), cfg.seed, cfg.eval_framework)
            self.start_round = 0
        self.frozen_sha256 = frozen_digest(self.weights, self.frozen) if self.frozen else ""
        self._setup_privacy()

    def _setup_privacy(self) -> None:
        """Under DP: the privacy ledger (rebuilt from the rows of a resumed run), the adaptive
        clipping norm where the run left it, and the BN running statistics of the trained part,
        which never travel under DP (``RunConfig.shared_names``): a pretrained encoder keeps
        its initial ones; a model trained from scratch under ``bn-policy = shared`` gets them
        re-estimated by the server on the catalog's main photos after every round."""
        from models import canonical

        cfg = self.cfg
        self.ledger = None
        self.budget_stop: str | None = None
        self.dp_bn_stats: list[str] = []
        if cfg.dp == "off":
            return
        from server.privacy import PrivacyLedger

        self.ledger = PrivacyLedger.from_rows(cfg, self.history)
        last = next((r["dp"] for r in reversed(self.history) if r.get("dp")), None)
        if cfg.dp.endswith("-adaptive") and last and last.get("next_clip"):  # the norm where the run left it
            self.strategy.clipping_norm = float(last["next_clip"])
        if cfg.bn_policy == "shared" and not self.spec.pretrained:
            # a pretrained encoder keeps its initial (ImageNet) statistics: re-estimating them on
            # the catalog's main photos alone cost the default encoder half its Recall@1 (0.577 ->
            # 0.267 at 96 px); a model trained from scratch has none worth keeping
            self.dp_bn_stats = [n for n in canonical.trained_part_names(self.spec, cfg.trained_from())
                                if canonical.is_bn_stat(n)]

    def _resume(self, ck: Path) -> None:
        from models.checkpoint import load_checkpoint

        weights, meta = load_checkpoint(ck)
        if meta.get("fingerprint") != _clean(self.cfg.fingerprint()):
            raise FedcbirError(f"resume: {ck} belongs to a run with other settings "
                               f"({meta.get('fingerprint')}); use another output folder")
        k = int(meta["round"])
        self.weights = weights
        self.start_round = k + 1
        self.resumed_from = k
        opt = ck.with_name(ck.stem + ".server-opt.npz")
        if opt.is_file():
            with np.load(opt, allow_pickle=False) as z:
                restore_optimizer_state(self.strategy, {n: np.array(z[n]) for n in z.files})
        rows: list[dict[str, Any]] = []
        mfile = self.out / "metrics.jsonl"
        if mfile.is_file():
            for line in mfile.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if isinstance(row, dict) and int(row.get("round", -1)) <= k:
                    rows.append(row)
        by_round = {int(r["round"]): r for r in rows}
        if k not in by_round and meta.get("row"):
            by_round[k] = meta["row"]
        self.history = [by_round[r] for r in sorted(by_round)]
        with open(mfile.with_suffix(".jsonl.tmp"), "w", encoding="utf-8") as f:
            for row in self.history:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        mfile.with_suffix(".jsonl.tmp").replace(mfile)
        for row in self.history:
            for c in row.get("clients", []):
                if c.get("partition") is not None:
                    self.nodes[int(c["node"])] = {"partition-id": c["partition"], "framework": c["framework"],
                                                  "profile": c["profile"]}
        self.log(f"resuming after round {k} from {ck}")

    def _wait_for_nodes(self, want: int | None = None) -> list[int]:
        want = max(1, self.cfg.min_nodes if want is None else want)
        deadline = time.monotonic() + self.cfg.wait_nodes_timeout
        while True:
            ids = list(self.grid.get_node_ids())
            if len(ids) >= want:
                return ids
            if time.monotonic() >= deadline:
                raise FedcbirError(f"only {len(ids)} node(s) connected after {self.cfg.wait_nodes_timeout:.0f} s; "
                                   f"min-nodes is {want}")
            time.sleep(1.0)

    # ------------------------------------------------------------------ rounds
    def run(self) -> dict[str, Any]:
        t_run = time.perf_counter()
        self._setup()
        self.out.mkdir(parents=True, exist_ok=True)
        nodes = self._wait_for_nodes()
        self.log(f"{len(nodes)} node(s) connected; strategy {self.cfg.strategy}; rounds "
                 f"{self.start_round}..{self.cfg.num_server_rounds}; output {self.out}")
        if self.ledger is not None:
            self.ledger.check_plan(self.cfg.num_server_rounds - max(self.start_round, 1) + 1, len(nodes),
                                   " now connected")
            self.log(f"differential privacy {self.cfg.dp}: clip {self.cfg.dp_clip:g}, noise multiplier "
                     f"{self.cfg.dp_noise:g}, {self.cfg.clients_per_round} device(s) per round expected, "
                     f"delta {self.cfg.dp_delta:g}, {self.cfg.dp_accountant.upper()} accountant")
        if self.start_round == 0:
            self._finish_round(0, self._server_row(0, time.perf_counter()))
            self.start_round = 1
        for r in range(self.start_round, self.cfg.num_server_rounds + 1):
            if not self._round(r):
                break
        summary = self._summary(time.perf_counter() - t_run)
        write_json_atomic(self.out / "summary.json", summary)
        return summary

    def _config(self) -> ConfigRecord:
        return ConfigRecord({"frozen-sha256": self.frozen_sha256} if self.frozen_sha256 else {})

    def _server_row(self, r: int, t0: float) -> dict[str, Any]:
        m = self.evaluator.evaluate(self.weights)
        row = {"round": r, **{k: m[k] for k in ("recall@1", "recall@5", "recall@10", "map@r")},
               "type_precision@1": m.get("type_precision@1"), "server_eval_seconds": m["eval_seconds"],
               "clients": [], "time": time.time()}
        return row

    def _budget_allows(self, r: int) -> bool:
        """Under ``target-epsilon``: whether round ``r`` (its sampling rate is known once the
        strategy has sampled) keeps epsilon within the budget; if not, the run stops here,
        after round ``r - 1``'s checkpoint."""
        cfg = self.cfg
        if self.ledger is None or cfg.target_epsilon <= 0:
            return True
        q = self.strategy.round_info["sampling_rate"]
        nxt = self.ledger.epsilon([(q, cfg.dp_noise)])
        if nxt <= cfg.target_epsilon:
            return True
        self.budget_stop = (f"stopped after round {r - 1}: round {r} would raise epsilon from "
                            f"{self.ledger.epsilon():.3g} to {nxt:.3g} > target-epsilon {cfg.target_epsilon:g} "
                            f"(delta {cfg.dp_delta:g}, q = {q:.3g})")
        self.log(f"privacy budget: {self.budget_stop}")
        return False

    def _round(self, r: int) -> bool:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._wait_for_nodes(1)  # Flower's sampling would wait forever with no node at all
        global_record = to_record({n: self.weights[n] for n in self.shared})
        msgs = list(self.strategy.configure_train(r, global_record, self._config(), self.grid))
        if not self._budget_allows(r):
            return False
        replies, sent, missing = exchange(self.grid, msgs, cfg.round_timeout)
        t_train = time.perf_counter()
        aggregation_error = None
        try:
            agg, _ = self.strategy.aggregate_train(r, replies)
        except Exception as exc:  # noqa: BLE001 - e.g. too few replies for a trimmed mean
            agg, aggregation_error = None, f"{type(exc).__name__}: {exc}"
            self.log(f"round {r}: aggregation failed, global model unchanged: {aggregation_error}")
        if agg is not None:
            self.weights = {**self.weights, **{k: np.asarray(v, np.float32) for k, v in to_numpy(agg).items()}}
            if self.dp_bn_stats:
                self.weights.update(self.evaluator.recalibrated_bn_stats(self.weights, self.dp_bn_stats))
        dp_row = None
        if self.ledger is not None:  # every round that sampled counts, released or not
            info = dict(self.strategy.round_info)
            eps = self.ledger.add(info["sampling_rate"], cfg.dp_noise)
            dp_row = {**info, "noise_multiplier": cfg.dp_noise, "epsilon": eps, "delta": cfg.dp_delta,
                      "accountant": cfg.dp_accountant, "mode": cfg.dp}
        clients = self._client_rows(self.strategy.last_report, sent, missing)
        t_agg = time.perf_counter()

        client_eval: dict[str, Any] | None = None
        if cfg.fraction_evaluate > 0:
            emsgs = self.strategy.configure_evaluate(r, to_record({n: self.weights[n] for n in self.shared}),
                                                     self._config(), self.grid)
            ereplies, esent, _ = exchange(self.grid, emsgs, cfg.round_timeout)
            try:
                agg_eval = self.strategy.aggregate_evaluate(r, ereplies)
            except Exception as exc:  # noqa: BLE001
                agg_eval = None
                self.log(f"round {r}: client evaluation could not be aggregated: {exc}")
            client_eval = dict(agg_eval) if agg_eval else None
            by_node = {c["node"]: c for c in clients}
            for rep in ereplies:
                node = esent.get(rep.metadata.reply_to_message_id)
                if node in by_node and not rep.has_error():
                    m = rep.content.metric_records.get("metrics", {})
                    by_node[node]["local_recall@1"] = m.get("recall@1")
        t_ceval = time.perf_counter()

        row = self._server_row(r, t0)
        ok = [c for c in clients if c["status"] == "ok"]
        row.update(
            clients=clients, accepted=len(ok), failed=len(clients) - len(ok),
            client_eval={k: client_eval[k] for k in ("recall@1", "recall@5", "map@r") if k in client_eval}
            if client_eval else None,
            seconds=time.perf_counter() - t0, train_seconds=t_train - t0, aggregate_seconds=t_agg - t_train,
            client_eval_seconds=t_ceval - t_agg,
            simulated_round_seconds=max((c["simulated_seconds"] or 0.0 for c in ok), default=0.0),
            bytes_up=sum(c["bytes_up"] or 0 for c in clients), bytes_down=sum(c["bytes_down"] or 0 for c in clients),
        )
        if aggregation_error:
            row["aggregation_error"] = aggregation_error
        if dp_row is not None:
            row["dp"] = dp_row
        self._finish_round(r, row)
        return True

    def _client_rows(self, report: list[dict[str, Any]], sent: dict[str, int], missing: set[str]):
        rows = []
        for e in report:
            node = sent.get(e["reply_to"], e["src_node"])
            info = dict(e.get("client") or {})
            reason = e.get("reason", "")
            if not info:
                info, reason = _info_from_reason(reason)
            else:
                reason = _info_from_reason(reason)[1]
            if info:
                self.nodes[node] = {k: info.get(k) for k in ("partition-id", "framework", "profile")}
            known = self.nodes.get(node, {})
            m = e.get("metrics") or {}
            row = {"node": node, "partition": known.get("partition-id"), "framework": known.get("framework"),
                   "profile": known.get("profile"), "status": e["status"], "reason": reason}
            row.update({field: m.get(key) for field, key in CLIENT_KEYS.items()})
            row["update_norm"] = e.get("update_norm")
            rows.append(row)
        for mid in sorted(missing):
            node = sent[mid]
            known = self.nodes.get(node, {})
            row = {"node": node, "partition": known.get("partition-id"), "framework": known.get("framework"),
                   "profile": known.get("profile"), "status": "dropped",
                   "reason": f"no reply within the round timeout ({self.cfg.round_timeout:g} s)"}
            row.update({field: None for field in CLIENT_KEYS})
            row["update_norm"] = None
            rows.append(row)
        rows.sort(key=lambda c: (c["partition"] if c["partition"] is not None else 1 << 30, c["node"]))
        return rows

    def _finish_round(self, r: int, row: dict[str, Any]) -> None:
        from models.checkpoint import save_checkpoint

        row = _clean(row)
        prefix = self.out / CHECKPOINT_DIR / f"round-{r:04d}"
        opt = optimizer_state(self.strategy)
        if opt:
            prefix.parent.mkdir(parents=True, exist_ok=True)
            from common.io import atomic_path

            with atomic_path(prefix.with_name(prefix.name + ".server-opt.npz"), suffix=".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **opt)
        save_checkpoint(prefix, self.weights, {
            "arch": self.spec, "preprocessing": self.pre.to_dict(), "framework": self.cfg.eval_framework,
            "round": r, "metrics": {k: row.get(k) for k in ("recall@1", "recall@5", "recall@10", "map@r")},
            "fingerprint": _clean(self.cfg.fingerprint()), "run_config": self.cfg.to_flower(),
            "strategy": self.cfg.strategy, "bn_policy": self.cfg.bn_policy, "catalog": str(self.root),
            "row": row,
        })
        append_jsonl(self.out / "metrics.jsonl", row)
        self.history.append(row)
        if r == 0:
            self.log(f"round 0 (before training): recall@1 {row['recall@1']:.3f}, map@r {row['map@r']:.3f}")
        else:
            dp = row.get("dp")
            eps = "" if not dp else (f", epsilon {dp['epsilon']:.3g} (delta {dp['delta']:g})"
                                     if dp.get("epsilon") is not None else ", epsilon inf (no noise)")
            self.log(f"round {r}: {row['accepted']} ok / {row['failed']} failed, recall@1 {row['recall@1']:.3f}, "
                     f"map@r {row['map@r']:.3f}, {row['seconds']:.1f} s{eps}")

    def _summary(self, seconds: float) -> dict[str, Any]:
        rows = self.history
        final = rows[-1]
        best = max(rows, key=lambda r: r["recall@1"])
        counts: dict[str, int] = {}
        for row in rows:
            for c in row.get("clients", []):
                counts[c["status"]] = counts.get(c["status"], 0) + 1
        pick = ("recall@1", "recall@5", "recall@10", "map@r", "type_precision@1")
        return _clean({
            "run_id": self.run_id, "out": str(self.out), "rounds": final["round"], "strategy": self.cfg.strategy,
            "frameworks": list(self.cfg.frameworks), "profiles": list(self.cfg.profiles),
            "partition": self.cfg.partition, "bn_policy": self.cfg.bn_policy, "catalog": str(self.root),
            "nodes": {str(k): v for k, v in sorted(self.nodes.items())},
            "train_products": len(self.split.train), "test_products": len(self.split.test),
            "initial": {k: rows[0].get(k) for k in pick}, "final": {"round": final["round"], **{k: final.get(k) for k in pick}},
            "best": {"round": best["round"], "recall@1": best["recall@1"]},
            "client_status_counts": counts,
            "bytes_up_total": sum(r.get("bytes_up", 0) or 0 for r in rows),
            "bytes_down_total": sum(r.get("bytes_down", 0) or 0 for r in rows),
            "simulated_seconds_total": sum(r.get("simulated_round_seconds", 0) or 0 for r in rows),
            "checkpoint": str(latest_checkpoint(self.out)), "resumed_from": self.resumed_from,
            "seconds": seconds, "run_config": self.cfg.to_flower(),
            "privacy": self._privacy_summary(), "stopped": self.budget_stop,
        })

    def _privacy_summary(self) -> dict[str, Any] | None:
        if self.ledger is None:
            return None
        from server.privacy import describe

        eps = self.ledger.epsilon()
        return {**describe(self.cfg), "epsilon": eps if math.isfinite(eps) else None,
                "rounds_accounted": len(self.ledger.rounds),
                "statement": (f"({eps:.3g}, {self.cfg.dp_delta:g})-DP for each device's whole contribution "
                              f"over {len(self.ledger.rounds)} round(s)" if math.isfinite(eps)
                              else "no formal guarantee: dp-noise is 0 (clipping only)")}


def _flower_log(text: str) -> None:
    from logging import INFO

    from flwr.supercore import log

    log(INFO, "[fedcbir] %s", text)
