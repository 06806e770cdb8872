"""A federation in this one process, without Ray: the sites' ClientApp handler answers each message in turn.

Flower's simulation engine (Ray, :mod:`fedeeg.federation.simulation`) stays the
default of ``fedeeg simulate``: it runs sites in parallel actors and bounds
their memory. This engine serves the cases where Ray does not pay or is not
there: one machine with one GPU, where the sites would take turns on it
anyway, and short runs, where starting Ray costs more than the rounds.

The messages are the same Flower ``Message`` objects, built by the same
ServerApp logic (:func:`fedeeg.federation.server_app.run_federation`) and
answered by the same handler as a deployed or Ray-simulated site
(:func:`fedeeg.federation.client_app.handle`); each site keeps its own
``Context`` (its partition id and state) between rounds. Only the transport
differs: a call instead of a Ray actor or a network hop. With the same
configuration the results equal the Ray engine's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from ..config import RunConfig
from ..experiment import RunResult

logger = logging.getLogger(__name__)

#: The run id the in-process sites and server share (there is one run).
_RUN_ID = 1


def _action(message_type: str) -> str:
    """The ClientApp action of a message type: ``train``, ``evaluate``, ``query`` or a secure stage (``train.<stage>``)."""
    head, _, stage = message_type.partition(".")
    return stage or head


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are sites answered in this process.

    Parameters
    ----------
    cfg : RunConfig
        The run every site answers for.
    n_sites : int
        Sites (node ids 1..n_sites, partition ids 0..n_sites-1).
    answer : callable | None
        ``answer(message, context, cfg, action) -> reply``; default FedEEG's
        ClientApp handler (:func:`fedeeg.federation.client_app.handle`).
    """

    def __init__(self, cfg: RunConfig, n_sites: int, answer: Callable | None = None) -> None:
        if n_sites < 1:
            raise ValueError(f"'n_sites' must be >= 1, got {n_sites}.")
        if answer is None:
            from .client_app import handle as answer
        self.cfg, self._answer = cfg, answer
        self._contexts = {
            pid + 1: Context(run_id=_RUN_ID, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": n_sites},
                             state=RecordDict(), run_config={})
            for pid in range(n_sites)
        }
        self._replies: dict[str, Message] = {}
        self._run = None
        self._pushed = 0

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def _reply(self, message: Message) -> Message:
        dst = message.metadata.dst_node_id
        if dst not in self._contexts:
            raise ValueError(f"No site has node id {dst} in this in-process run (node ids 1..{len(self._contexts)}).")
        return self._answer(message, self._contexts[dst], self.cfg, _action(message.metadata.message_type))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self._pushed += 1
            mid = f"inprocess-{self._pushed}"
            self._replies[mid] = self._reply(message)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._reply(message) for message in messages]


def run_federated_inprocess(cfg: RunConfig, *, n_sites: int, on_round: Callable[[dict], None] | None = None) -> RunResult:
    """Run ``cfg`` (mode federated) with ``n_sites`` sites answered in this process, one message at a time.

    Parameters
    ----------
    cfg : RunConfig
        The run.
    n_sites : int
        Sites (partition ids 0..n_sites-1).
    on_round : callable | None
        Progress callback, called with each round's record.

    Returns
    -------
    result : RunResult
    """
    from flwr.supercore.task_identity import TaskIdentity

    from .server_app import run_federation

    # Flower stamps every Message with the running task's identity; a SuperNode or the simulation engine sets it.
    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, _RUN_ID, 0
    try:
        return run_federation(InProcessGrid(cfg, n_sites), cfg, n_sites=n_sites, on_round=on_round, node_timeout=1.0)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


__all__ = ["InProcessGrid", "run_federated_inprocess"]
