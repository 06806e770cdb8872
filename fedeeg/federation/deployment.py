"""Flower glue of a real deployment: long-lived ServerApp/ClientApp processes, rounds that always end, resume, audit.

Both sides run Flower's deployment engine with ``--isolation process``: the
SuperLink and each SuperNode hand their tasks to a process we run ourselves
instead of spawning ``flwr-serverapp``/``flwr-clientapp`` (which re-import
torch and peft, ≈ 15 s, for every message).

- :class:`ClientWorker` (one per site, in ``fedeeg client start``) takes the
  SuperNode's ClientApp tasks one after the other, in one process that keeps
  the model and the site's windows loaded. It runs the ClientApp of the FedEEG
  installed at the site, never code from the run, and refuses a run whose app
  id or version differs from its own (:func:`app_mismatch`).
- :func:`serve_server_task` (in ``fedeeg server start``) takes the SuperLink's
  ServerApp task of the run it submitted and drives
  :func:`fedeeg.federation.server_app.run_federation` with a
  :class:`RoundCloser` (quorum or deadline; too few answers: retry, skip or
  abort), a checkpoint after every round (:mod:`fedeeg.deploy.state`), resume
  from the last good one, and an audit log (:mod:`fedeeg.deploy.audit`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Error, Message, MessageType, RecordDict

from .. import __version__
from ..config import RunConfig
from ..deploy.audit import AuditLog, config_hash
from ..deploy.federation_config import FederationConfig
from ..deploy.launcher import APP_ID
from ..deploy.metrics import ServerMetrics
from ..deploy.site_config import ClientConfig
from ..deploy.state import RoundStateStore
from . import records as R

logger = logging.getLogger(__name__)

#: Error code of a refused run (app or version mismatch).
APP_MISMATCH_CODE = 1002
#: Flower's error code for a message whose destination node went away (flwr.common.constant.ErrorCode).
_NODE_UNAVAILABLE = 5


# ----------------------------------------------------------------- Flower runtime API
def _runtime_client(address: str, *, insecure: bool, certificates: bytes | None, token: str | None = None,
                    component: str = "SuperExec", give_up_after: float | None = None):
    """A client of a SuperLink/SuperNode runtime API.

    With ``give_up_after`` (the site's worker), calls retry transport errors
    for at most that many seconds and raise on an HTTP error such as 401 (a
    task token made stale by a SuperNode restart). Flower's own invoker
    answers a 401 by sending SIGINT to the whole process, which would end a
    site's daemon whenever its SuperNode restarts mid-task.
    """
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    invoker = make_simple_http_retry_invoker() if give_up_after is None else _bounded_retry_invoker(give_up_after)
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                 root_certificates=certificates, interceptors=interceptors,
                                                 retry_invoker=invoker)


def _bounded_retry_invoker(max_time: float):
    """Retry transport errors and 502/503/504 for ``max_time`` seconds; raise on any other HTTP error, never signal."""
    import httpx
    from flwr.supercore.retry.http_retry import _RETRYABLE_STATUS_CODES, _RETRYABLE_TRANSPORT_ERRORS
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    def should_give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in _RETRYABLE_STATUS_CODES

    return RetryInvoker(lambda: exponential(max_delay=min(10.0, max_time)),
                        (*_RETRYABLE_TRANSPORT_ERRORS, httpx.HTTPStatusError), max_tries=None, max_time=max_time,
                        should_giveup=should_give_up)


def _acquire(client, task_type) -> tuple[str, object] | None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
    if res.HasField("task") and res.token:
        return res.token, res.task
    return None


def app_mismatch(fab_id: str, fab_version: str) -> str | None:
    """Why this installation refuses a run of app ``fab_id`` version ``fab_version`` (None: accepted)."""
    if fab_id == APP_ID and fab_version == __version__:
        return None
    return (f"Refused: the coordinator's run is app {fab_id!r} version {fab_version!r}, but this site runs FedEEG "
            f"{__version__} (app {APP_ID!r}) and only ever executes its own installed ClientApp. Install the "
            f"coordinator's FedEEG version (pip install fedeeg=={fab_version}) or ask the coordinator to run "
            f"FedEEG {__version__}.")


# ----------------------------------------------------------------- site side
def site_run_config(run: RunConfig, site: ClientConfig, data_file: Path | None) -> tuple[RunConfig, int]:
    """The run as this site trains it: its own data, device, cache and checkpoint; and its partition index.

    The coordinator's paths (``data_dir``, ``site_files``, ``checkpoint``,
    ``cache_dir``, ``out``) mean nothing at a site and are replaced.
    """
    from ..experiment import run_labels

    changes: dict = {"device": site.device, "out": ""}
    if site.cache_dir:
        changes["cache_dir"] = site.cache_dir
    if run.checkpoint:
        if not site.checkpoint:
            raise ValueError("The run starts from a backbone checkpoint; set [deployment] checkpoint = \"PATH\" to this "
                             "site's copy of it (the coordinator's path means nothing here).")
        changes["checkpoint"] = site.checkpoint
    if site.dataset == "synthetic":
        if site.partition >= run.sites:
            raise ValueError(f"[deployment] partition = {site.partition} but the run has {run.sites} synthetic sites.")
        return run.replace(**changes), site.partition
    changes.update(dataset="folder", data_dir="", site_files=str(data_file), labels=",".join(run_labels(run)))
    return run.replace(**changes), 0


class ClientWorker:
    """The site's long-lived ClientApp process (SuperNode ``--isolation process``).

    Parameters
    ----------
    site : ClientConfig
    runtime_address : str
        The SuperNode's local runtime API (``127.0.0.1:PORT``).
    capture : callable | None
        Called with every reply before it is sent (tests inspect what leaves
        the site).
    """

    def __init__(self, site: ClientConfig, *, runtime_address: str, capture: Callable[[Message], None] | None = None) -> None:
        self.site = site
        self.address = runtime_address
        self.capture = capture
        self.data_file = site.data_site_file() if site.dataset == "folder" else None
        self.tasks_done = 0
        from ..deploy._flower import ActivePoll

        # The SuperNode touches this file when it starts handling a message (see fedeeg.deploy._flower).
        self.polls = ActivePoll(site.poll_interval, site.active_poll_interval, wake_file=site.supernode_wake_file)
        os.environ["FEDEEG_CLIENT_THREADS"] = str(site.threads)

    def warm_up(self) -> None:
        """Import torch, peft and the model code once, before the first round."""
        from .. import experiment, training  # noqa: F401
        from ..models import lora  # noqa: F401

        try:
            import peft  # noqa: F401
        except ImportError:  # pragma: no cover
            pass

    def serve(self, stop: threading.Event) -> None:
        """Take and run ClientApp tasks until ``stop`` is set; survive SuperNode restarts with backoff."""
        from flwr.supercore.constant import TaskType

        from ..deploy._flower import shorter_object_pull_backoff, wait_for_work

        shorter_object_pull_backoff()
        backoff = 0.5
        client = None
        while not stop.is_set():
            try:
                if client is None:
                    client = _runtime_client(self.address, insecure=True, certificates=None,
                                             give_up_after=self.site.max_backoff)
                got = _acquire(client, TaskType.CLIENT_APP)
                backoff = 0.5
            except Exception as err:  # the SuperNode restarts, or is not up yet
                logger.debug("runtime API at %s not reachable (%s); retrying in %.1f s", self.address, err, backoff)
                if client is not None:
                    client.close()
                    client = None
                stop.wait(backoff)
                backoff = min(backoff * 2, self.site.max_backoff)
                continue
            if got is None:
                wait_for_work(self.polls, stop)
                continue
            try:
                self.run_task(got[0])
            except Exception as err:  # one failed task never ends the daemon
                logger.error("ClientApp task failed: %s", err)
            self.polls.busy()  # the next round's message is due: poll its SuperNode often for a while
        if client is not None:
            client.close()

    def run_task(self, token: str) -> None:
        """Pull one message, answer it with FedEEG's ClientApp, push the reply."""
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        from .client_app import CLIENT_ERROR_CODE, handle

        client = _runtime_client(self.address, insecure=True, certificates=None, token=token, component="flwr-clientapp",
                                 give_up_after=max(30.0, self.site.max_backoff))
        heartbeat = HeartbeatSender(_task_heartbeat(client))
        heartbeat.start()
        context, message, replied = None, None, False
        status, details = SubStatus.FAILED, "FedEEG ClientApp failed"
        try:
            t_task = time.time()
            message, context, run, _fab = pull_task_input(client)
            t_in = time.time()
            problem = app_mismatch(run.fab_id, run.fab_version)
            t0 = time.perf_counter()
            if problem:
                logger.error("%s", problem)
                reply = Message(Error(code=APP_MISMATCH_CODE, reason=problem), reply_to=message)
            else:
                try:
                    cfg, partition = site_run_config(RunConfig.from_mapping(dict(context.run_config)), self.site,
                                                     self.data_file)
                except (TypeError, ValueError) as err:
                    reply = Message(Error(code=CLIENT_ERROR_CODE, reason=f"{type(err).__name__}: {err}"), reply_to=message)
                else:
                    context.node_config["partition-id"] = partition
                    # Secure aggregation: this site's own identity key and the roster it trusts (not seed-derived).
                    context.node_config.update(self.site.secagg_node_config())
                    kind = message.metadata.message_type
                    action = _action(kind)
                    if action is None:
                        reply = Message(Error(code=CLIENT_ERROR_CODE, reason=f"FedEEG sites answer train, evaluate and "
                                              f"secure-aggregation (train.<stage>) messages only, got {kind!r}."),
                                        reply_to=message)
                    else:
                        reply = handle(message, context, cfg, action)
            logger.info("run %s round %s: %s answered in %.1f s (the message reached this site %.1f s after the "
                        "coordinator sent it; the SuperNode had it for %.2f s, pulling it took %.2f s)", run.run_id,
                        message.metadata.group_id, message.metadata.message_type, time.perf_counter() - t0,
                        t_in - message.metadata.created_at, t_task - message.metadata.created_at, t_in - t_task)
            if self.capture is not None:
                self.capture(reply)
            push_message(client, reply, context)
            replied = True
            status, details = SubStatus.COMPLETED, ""
            self.tasks_done += 1
        except Exception as err:
            details = f"{type(err).__name__}: {err}"
            if message is not None and context is not None and not replied:
                try:  # never leave the SuperNode waiting for a reply that will not come
                    push_message(client, Message(Error(code=CLIENT_ERROR_CODE, reason=details), reply_to=message), context)
                except Exception:  # noqa: BLE001 - the SuperNode is gone; its restart clears the task
                    pass
            raise
        finally:
            try:
                push_task_output(client, context, status, details)
            except Exception as err:  # noqa: BLE001 - a stale task (SuperNode restarted): nothing to report to
                logger.warning("Could not report the task's end to the SuperNode (%s); it restarted and drops the "
                               "task.", err)
            finally:
                heartbeat.stop()
                client.close()


def _task_heartbeat(client) -> Callable[[], bool]:
    """A task heartbeat that reports failure instead of signalling the process.

    Flower's ``make_task_heartbeat_fn_http`` raises SIGINT when the SuperNode
    no longer knows the task (after a SuperNode restart), which would stop the
    site's daemon; here the stale task simply fails to push its reply.
    """
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except Exception as err:  # noqa: BLE001 - a heartbeat never ends the daemon
            logger.debug("task heartbeat failed: %s", err)
            return False

    return beat


def _action(message_type: str) -> str | None:
    """The ClientApp action of a message type: train, evaluate, or a secure-aggregation stage (``train.<stage>``)."""
    if message_type == MessageType.TRAIN:
        return "train"
    if message_type == MessageType.EVALUATE:
        return "evaluate"
    if message_type.startswith(MessageType.TRAIN + "."):
        return message_type.split(".", 1)[1]
    return None


def describe_reply(message: Message) -> dict:
    """What a reply carries, for inspection (names, shapes, dtypes and scalar values; no array contents)."""
    if message.has_error():
        return {"error": {"code": message.error.code, "reason": message.error.reason}}
    content = message.content

    def arrays(rec) -> dict:
        try:  # a packed adapter: the tensors it carries
            return {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in R.record_to_numpy(rec).items()}
        except ValueError:
            return {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in rec.items()}

    return {
        "arrays": {name: arrays(rec) for name, rec in content.array_records.items()},
        "metrics": {name: dict(rec) for name, rec in content.metric_records.items()},
        "configs": {name: dict(rec) for name, rec in content.config_records.items()},
    }


# ----------------------------------------------------------------- coordinator side
class RoundCloser:
    """Send a round's messages to the connected sites and close the round by quorum or deadline.

    Parameters
    ----------
    fed : FederationConfig
    node_names : dict
        Node id -> registered site name (from the SuperLink registrations).
    audit : AuditLog | None
    metrics : ServerMetrics | None
    sleep : callable
        For tests.
    registry : path-like | None
        The site registry, re-read (when it changed) before every round: a
        site revoked during the run is no longer asked from the next round
        on (plain rounds; a secure run's roster is fixed at its start).
    """

    def __init__(self, fed: FederationConfig, *, node_names: dict[int, str] | None = None, audit: AuditLog | None = None,
                 metrics: ServerMetrics | None = None, sleep: Callable[[float], None] = time.sleep,
                 registry: str | os.PathLike | None = None) -> None:
        self.fed, self.node_names = fed, dict(node_names or {})
        self.audit, self.metrics, self.sleep = audit, metrics, sleep
        self.suspects: set[int] = set()
        self._misnamed: set[int] = set()  # sites already warned about a name other than their registered one
        self.registry = Path(registry) if registry else None
        self._registry_stamp: tuple | None = None
        self.revoked: set[str] = set()

    def name(self, nid: int) -> str:
        return self.node_names.get(nid, f"node-{nid}")

    def _authenticated_name(self, reply: Message) -> None:
        """Record a reply under the name its site is registered with, not the name it gives itself.

        With node authentication the SuperLink knows which registered key sent
        a reply; the site's own ``name`` setting is only a label. A site whose
        label differs is recorded (metrics, reports) under its registered name,
        with a warning once per site, so one site cannot report as another.
        """
        nid = reply.metadata.src_node_id
        registered = self.node_names.get(nid)
        if registered is None or reply.has_error():
            return
        try:
            rec = reply.content.config_records[R.SITE]
            claimed = rec["name"]
        except (KeyError, AttributeError, TypeError):
            return
        if str(claimed) == registered:
            return
        if nid not in self._misnamed:
            self._misnamed.add(nid)
            logger.warning("Site %s (registered key) calls itself %r in its replies; its results are recorded as %s. "
                           "Set name = %r in that site's TOML, or leave it out.", registered, str(claimed), registered,
                           registered)
        rec["name"] = registered

    def _refresh_revocations(self) -> None:
        """Re-read the registry if it changed; log and audit every site newly revoked."""
        from ..deploy.registry import SiteRegistry

        try:
            st = self.registry.stat()
        except OSError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._registry_stamp:
            return
        self._registry_stamp = stamp
        try:
            registry = SiteRegistry(self.registry)
        except ValueError as err:  # a half-edited registry never stops a run; the last good state stays
            logger.warning("Could not re-read the site registry (%s); revocations unchanged.", err)
            return
        now = {e.name for e in registry.all() if e.status != "active"} & set(self.node_names.values())
        for name in sorted(now - self.revoked):
            logger.warning("Site %s was revoked in %s: it is no longer asked.", name, self.registry)
            if self.audit is not None:
                self.audit.append("site-revoked", site=name)
        self.revoked = now

    def _online(self, grid) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if self.node_names:  # with node authentication every node is a registered site
            nodes = [n for n in nodes if n in self.node_names]
        if self.registry is not None:
            self._refresh_revocations()
            nodes = [n for n in nodes if self.name(n) not in self.revoked]
        return nodes

    def __call__(self, grid, nodes, content: RecordDict, message_type: str, rnd: int) -> list[Message]:
        fed = self.fed
        phase = "train" if message_type == MessageType.TRAIN else "evaluate"
        for attempt in range(fed.max_retries + 1):
            ask = self._online(grid)
            waited = time.monotonic()
            while len(ask) < fed.min_sites and time.monotonic() - waited < fed.round_deadline:
                self.sleep(fed.poll_interval * 5)
                ask = self._online(grid)
            if self.metrics:
                self.metrics.set("sites_connected", len(ask))
            replies, stragglers = self._ask(grid, ask, content, message_type, rnd)
            ok = [r for r in replies if _usable(r, message_type)]
            self._log(phase, rnd, attempt, ask, replies, stragglers, message_type)
            if len(ok) >= fed.min_sites or (phase == "evaluate" and ok):
                return replies
            msg = (f"Round {rnd} ({phase}): {len(ok)} of {len(ask)} sites answered in time, fewer than min_sites = "
                   f"{fed.min_sites}")
            if fed.on_too_few == "abort":
                raise RuntimeError(msg + "; on_too_few = 'abort' stops the run (restart resumes after the last round).")
            if fed.on_too_few == "skip" or attempt == fed.max_retries:
                logger.error("%s; the round is skipped%s and the global model unchanged.", msg,
                             f" after {attempt} retries" if attempt else "")
                if self.audit is not None:
                    self.audit.append("round-skipped", round=rnd, phase=phase, answered=len(ok))
                return [] if phase == "train" else replies
            logger.warning("%s; asking again (retry %d of %d).", msg, attempt + 1, fed.max_retries)
        return []  # pragma: no cover

    def _ask(self, grid, ask: list[int], content, message_type, rnd) -> tuple[list[Message], list[int]]:
        if not ask:
            return [], []
        messages = [Message(content, dst_node_id=nid, message_type=message_type, group_id=str(rnd)) for nid in ask]
        ids = list(grid.push_messages(messages))
        if self.metrics is not None and R.ARRAYS in content.array_records:
            self.metrics.inc("bytes_down", content.array_records[R.ARRAYS].count_bytes() * len(ask))
        node_of = dict(zip(ids, ask))
        pending = set(i for i in ids if i)
        replies: list[Message] = []
        need = self.fed.quorum or max(self.fed.min_sites, len([n for n in ask if n not in self.suspects]))
        need = min(need, len(ask))
        deadline = time.monotonic() + self.fed.round_deadline
        resent: dict[int, int] = {}
        while pending:
            for reply in grid.pull_messages(list(pending)):
                nid = reply.metadata.src_node_id
                logger.debug("round %d: answer from %s after %.2f s", rnd, self.name(nid),
                             time.monotonic() - deadline + self.fed.round_deadline)
                pending.discard(reply.metadata.reply_to_message_id)
                if (reply.has_error() and reply.error.code == _NODE_UNAVAILABLE and resent.get(nid, 0) < 3
                        and time.monotonic() < deadline):
                    # The site's connection dropped (e.g. it reconnects after a coordinator restart): ask it again.
                    resent[nid] = resent.get(nid, 0) + 1
                    logger.info("Round %d: %s was unreachable; asking it again.", rnd, self.name(nid))
                    self.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
                    again = list(grid.push_messages([Message(content, dst_node_id=nid, message_type=message_type,
                                                             group_id=str(rnd))]))
                    node_of.update(dict(zip(again, [nid])))
                    pending.update(i for i in again if i)
                    continue
                self._authenticated_name(reply)
                replies.append(reply)
                self.suspects.discard(nid)
            if len([r for r in replies if _usable(r, message_type)]) >= need or time.monotonic() >= deadline:
                break
            self.sleep(self.fed.poll_interval)
        # A fixed order (by site name), so that aggregation does not depend on who answered first.
        replies.sort(key=lambda r: (self.name(r.metadata.src_node_id), r.metadata.src_node_id))
        stragglers = [node_of[i] for i in pending]
        self.suspects.update(stragglers)
        if stragglers:
            logger.warning("Round %d: %s did not answer in time (%s); late answers are discarded.", rnd,
                           ", ".join(self.name(n) for n in stragglers),
                           "quorum reached" if time.monotonic() < deadline else f"deadline {self.fed.round_deadline:.0f} s")
            if self.metrics:
                self.metrics.inc("stragglers", len(stragglers))
        return replies, stragglers

    def _log(self, phase, rnd, attempt, ask, replies, stragglers, message_type=MessageType.TRAIN) -> None:
        answered, failed, updates = [], [], []
        for r in replies:
            nid = r.metadata.src_node_id
            if r.has_error():
                failed.append({"site": self.name(nid), "reason": r.error.reason})
                continue
            if not _usable(r, message_type):
                failed.append({"site": self.name(nid), "reason": "malformed reply: no site record"})
                continue
            answered.append(self.name(nid))
            if phase == "train" and R.ARRAYS in r.content.array_records:
                rec = r.content.array_records[R.ARRAYS]
                try:
                    norm = math.sqrt(sum(float(np.sum(np.square(a.astype(np.float64)))) for a in R.record_to_numpy(rec).values()))
                except Exception:  # a malformed update: run_federation rejects it with the reason
                    norm = None
                size = int(rec.count_bytes())
                m = r.content.metric_records.get(R.METRICS, {})
                updates.append({"site": self.name(nid), "bytes": size, "l2_norm": norm,
                                "num_examples": _finite(m.get("num-examples")),
                                "windows_per_second": _finite(m.get("windows-per-second"))})
                if R.EVALUATION in r.content.metric_records:  # the previous round's model, evaluated first
                    updates[-1]["evaluate_seconds"] = _finite(r.content.metric_records[R.EVALUATION].get("seconds"))
                if self.metrics:
                    self.metrics.inc("bytes_up", size)
        if self.metrics:
            self.metrics.inc("rejected", len(failed))
        if self.audit is not None:
            self.audit.append(f"round-{phase}", round=rnd, attempt=attempt, asked=[self.name(n) for n in ask],
                              answered=answered, failed=failed, stragglers=[self.name(n) for n in stragglers],
                              updates=updates)


def _usable(reply: Message, message_type: str) -> bool:
    """Whether a reply counts towards quorum and ``min_sites``: no error and, for train and evaluate, a site record.

    A malformed reply is still handed on (the federation logs and rejects it
    with its reason) but never closes a round in place of a real answer.
    """
    if reply.has_error():
        return False
    if message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
        return True
    try:
        return "name" in reply.content.config_records[R.SITE]
    except (KeyError, AttributeError, TypeError):
        return False


def wait_for_sites(grid, fed: FederationConfig, node_names: dict[int, str], *, sleep=time.sleep) -> list[int]:
    """Wait up to ``connect_timeout`` for ``sites`` sites; then go on with at least ``min_sites`` or fail."""
    deadline = time.monotonic() + fed.connect_timeout
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if node_names:
            nodes = [n for n in nodes if n in node_names]
        if len(nodes) != last:
            logger.info("%d of %d sites connected", len(nodes), fed.sites)
            last = len(nodes)
        if len(nodes) >= fed.sites:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= fed.min_sites:
                logger.warning("Only %d of %d sites connected within %.0f s; starting with them.", len(nodes), fed.sites,
                               fed.connect_timeout)
                return nodes
            raise TimeoutError(f"Only {len(nodes)} of the {fed.sites} sites connected within {fed.connect_timeout:.0f} s "
                               f"(min_sites = {fed.min_sites}); check the sites' daemons and their registration.")
        sleep(fed.poll_interval * 5)


def run_deployment(grid, fed: FederationConfig, *, node_names: dict[int, str] | None = None,
                   on_round: Callable[[dict], None] | None = None, metrics: ServerMetrics | None = None):
    """Run (or resume) the federation on ``grid`` and write its outputs to ``fed.out``.

    Returns
    -------
    result : RunResult | None
        None when the checkpoint says the run was already complete.
    """
    from ..outputs import write_outputs
    from .server_app import run_federation

    out = Path(fed.out)
    out.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(out)
    store = RoundStateStore(out)
    cfg = fed.run
    roster = None
    if cfg.secure:  # the sites' own identity keys, by protocol id (1-based position by name, as in roster.json)
        from ..deploy.roster import registry_public_keys

        try:
            roster = registry_public_keys(fed.registry)
        except ValueError as err:
            raise ValueError(f"Secure aggregation needs every active site's identity key: {err}") from None
    latest = store.load_latest()
    resume = None
    if latest is not None:
        if latest.state.get("config_hash") != config_hash(cfg.to_dict()):
            raise ValueError(f"The checkpoints in {out} belong to a run with another configuration; use a new output "
                             "folder ([federation] out) or restore the original federation.toml.")
        if latest.round >= cfg.rounds:
            logger.info("The run in %s is complete (round %d of %d); nothing to do.", out, latest.round, cfg.rounds)
            return None
        resume = (latest.round, latest.arrays, latest.state.get("history", []))
        logger.warning("Resuming after round %d of %d from %s.", latest.round, cfg.rounds, latest.path)
    audit.append("run-start", federation=fed.name, fedeeg_version=__version__, config_hash=config_hash(cfg.to_dict()),
                 rounds=cfg.rounds, resumed_after=latest.round if latest else 0,
                 sites=sorted(set((node_names or {}).values())))
    closer = RoundCloser(fed, node_names=node_names, audit=audit, metrics=metrics,
                         registry=fed.registry if node_names else None)
    nodes = wait_for_sites(grid, fed, node_names or {})
    start = time.perf_counter()
    wall_before = float(latest.state.get("wall_seconds", 0.0)) if latest else 0.0

    def on_checkpoint(rnd: int, arrays: dict, history: list[dict]) -> None:
        rec = history[-1]
        manifest = store.save(rnd, arrays, {"history": history, "config_hash": config_hash(cfg.to_dict()),
                                            "wall_seconds": wall_before + time.perf_counter() - start})
        audit.append("round-end", round=rnd, rejected=rec.get("rejected", []), sites_answered=rec.get("sites_answered"),
                     train_loss=_finite(rec.get("train_loss")), seconds=rec.get("seconds"))
        audit.append("checkpoint", round=rnd, files=manifest["files"])
        if metrics:
            metrics.set("round", rnd)
            metrics.set("round_seconds", float(rec.get("seconds", 0.0)))
        # the rounds whose records are complete (a round evaluated with the next round's training waits for it)
        _write_jsonl(out / "metrics.jsonl", [h for h in history if not h.get("evaluation_pending")])

    # Secure rounds exchange their four stages directly (not through the closer): each stage waits at most the
    # round deadline unless the run sets its own reply_timeout, so a dead site never hangs a secure round.
    run_cfg = cfg.replace(reply_timeout=cfg.reply_timeout or fed.round_deadline) if cfg.secure else cfg
    result = run_federation(grid, run_cfg, n_sites=len(nodes), on_round=on_round, node_timeout=fed.connect_timeout,
                            broadcast=closer, resume=resume, on_checkpoint=on_checkpoint, roster=roster,
                            site_names=node_names)
    write_outputs(cfg, result, wall_seconds=wall_before + time.perf_counter() - start, out=out)
    from ..checkpoint import read_manifest

    audit.append("run-end", rounds=cfg.rounds, adapter_files=read_manifest(out / "adapter").get("files", {}))
    return result


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """Write ``records`` as JSON lines, atomically (write-then-rename)."""
    from ..outputs import _atomic_write, _json_default, _nan_to_none

    _atomic_write(path, "".join(json.dumps(_nan_to_none(rec), default=_json_default) + "\n" for rec in records))


def serve_server_task(fed: FederationConfig, *, address: str, insecure: bool, ca_cert: bytes | None, run_id: int,
                      node_names: dict[int, str] | None = None, on_round: Callable[[dict], None] | None = None,
                      metrics: ServerMetrics | None = None, acquire_timeout: float = 120.0):
    """Take the SuperLink's ServerApp task of run ``run_id`` and run the federation in this process."""
    from flwr.common.constant import SubStatus
    from flwr.common.serde import context_from_proto, context_to_proto, run_from_proto
    from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid import HttpGrid

    from ..deploy._flower import shorter_object_pull_backoff

    shorter_object_pull_backoff()  # the sites' replies: ask again after 0.05 s, not 1 s
    client = _runtime_client(address, insecure=insecure, certificates=ca_cert)
    deadline = time.monotonic() + acquire_timeout
    try:
        while True:
            got = _acquire(client, TaskType.SERVER_APP)
            if got is not None:
                if int(got[1].run_id) == int(run_id):
                    break
                logger.warning("Ignoring ServerApp task of run %s: this server only runs its own run %s.",
                               got[1].run_id, run_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"The SuperLink did not hand out the ServerApp task of run {run_id} within "
                                   f"{acquire_timeout:.0f} s.")
            time.sleep(0.2)
    finally:
        client.close()
    token = got[0]
    grid = HttpGrid(runtime_api_address=address, insecure=insecure, root_certificates=ca_cert, token=token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(grid._runtime_client))
    heartbeat.start()
    context, status, details = None, SubStatus.FAILED, "FedEEG ServerApp failed"
    try:
        res = grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        grid.set_run(run_from_proto(res.run))
        result = run_deployment(grid, fed, node_names=node_names, on_round=on_round, metrics=metrics)
        status, details = SubStatus.COMPLETED, ""
        return result
    except Exception as err:
        details = f"{type(err).__name__}: {err}"
        raise
    finally:
        try:
            grid._runtime_client.PushTaskOutput(PushTaskOutputRequest(
                context=context_to_proto(context) if context else None, sub_status=status, details=details))
        except Exception as err:  # the SuperLink may be gone (a crash): the checkpoint is what counts
            logger.debug("could not report the task's end to the SuperLink: %s", err)
        heartbeat.stop()
        grid.close()


__all__ = ["APP_MISMATCH_CODE", "app_mismatch", "site_run_config", "ClientWorker", "describe_reply", "RoundCloser",
           "wait_for_sites", "run_deployment", "serve_server_task"]
