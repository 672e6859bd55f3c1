"""A Grid that calls a ClientApp object in this process: no SuperLink, Ray or subprocesses.

For fast tests and benchmarks of the server logic. It calls the app exactly like Flower's
runtimes do (``reply = client_app(message=msg, context=ctx)``), keeps one ``Context`` per
node across rounds (``context.state`` persists, as in the real runtimes), copies every
message (strategies send one shared RecordDict to all nodes; real transports serialise),
and turns an exception into an Error reply while discarding that call's state changes.
``silent`` node ids never reply (a dead device + round timeout); ``node_config`` adds
keys to every node's config (or pass a callable ``partition -> dict``).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Callable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID
CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode


class InProcessGrid(Grid):
    def __init__(self, client_app, num_nodes: int, run_config: dict[str, Any] | None = None, *,
                 run_id: int = 1, silent: Iterable[int] = (),
                 node_config: dict[str, Any] | Callable[[int], dict[str, Any]] | None = None,
                 first_node_id: int = 100) -> None:
        self._run = Run.create_empty(run_id=run_id)
        # Message(...) reads run/node/task ids from this process-global identity
        # (flwr-serverapp sets it the same way)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self.client_app = client_app
        self.silent = set(silent)
        self.contexts: dict[int, Context] = {}
        for i in range(num_nodes):
            extra = node_config(i) if callable(node_config) else dict(node_config or {})
            nid = first_node_id + i
            self.contexts[nid] = Context(run_id=run_id, node_id=nid,
                                         node_config={"partition-id": i, "num-partitions": num_nodes, **extra},
                                         state=RecordDict(), run_config=dict(run_config or {}))
        self._replies: dict[str, Message] = {}
        self.calls = 0

    def set_run(self, run: Run) -> None:  # abstract in Grid
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # deprecated upstream, still abstract
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            node_id = msg.metadata.dst_node_id
            if node_id in self.silent:
                continue
            msg_copy = copy.deepcopy(msg)
            ctx = self.contexts[node_id]
            saved = copy.deepcopy(ctx.state)
            self.calls += 1
            try:
                reply = self.client_app(message=msg_copy, context=ctx)
            except Exception as ex:  # noqa: BLE001 - what the runtimes do
                ctx.state = saved
                reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"),
                                reply_to=msg_copy)
            self._replies[msg.metadata.message_id] = copy.deepcopy(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
