"""The coordinator's server and a hospital's client daemon: what ``fedeeg server start`` and ``fedeeg client start`` do."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from .certs import CertPaths
from .federation_config import FederationConfig
from .launcher import (CONNECTION, ManagedProcess, Supervised, flower_env, flwr_cli, superlink_argv, supernode_argv,
                       wait_for_port, write_app_dir, write_flower_home)
from .registry import SiteRegistry
from .site_config import ClientConfig

logger = logging.getLogger(__name__)

INSECURE_WARNING = ("INSECURE: plain transport without TLS and without node authentication. Anyone on the network can "
                    "read the updates and connect as a site. For local tests only; never with patient data.")

#: SuperNode exit code when the coordinator refuses its key (Flower's 305).
REFUSED_EXIT = 305


def _install_stop_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):  # noqa: ARG001
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def start_server(fed: FederationConfig, *, insecure: bool = False, on_round: Callable[[dict], None] | None = None):
    """Start the SuperLink (TLS, node authentication), register the active sites, submit the run and serve it.

    Runs the whole federation in this process and returns its RunResult (None
    if the output folder holds a complete run). Restarted with the same
    ``federation.toml`` after a crash, it resumes after the last checkpoint.
    """
    from ..federation.deployment import serve_server_task
    from .metrics import ServerMetrics

    out = Path(fed.out)
    home = out / ".flwr"
    certs = None
    if insecure:
        logger.warning(INSECURE_WARNING)
    else:
        certs = CertPaths.in_dir(fed.certificates).check()
    registry = SiteRegistry(fed.registry)
    active = registry.active()
    if not insecure and not active:
        raise ValueError(f"No active site in {fed.registry}: register the sites' public keys first "
                         "(`fedeeg site register NAME.pub --registry ...`).")
    env = flower_env(home)
    write_flower_home(home, port=fed.port, ca_cert=certs.ca_cert if certs else None, insecure=insecure)
    _install_stop_signals(threading.Event())
    superlink = ManagedProcess("SuperLink", superlink_argv(host=fed.host, port=fed.port, certs=certs, insecure=insecure),
                               env, out / "logs" / "superlink.log").start()
    metrics = None
    try:
        wait_for_port("127.0.0.1", fed.port, 60.0, superlink)
        node_names: dict[int, str] = {}
        if not insecure:
            keys = home / "keys"
            keys.mkdir(parents=True, exist_ok=True)
            for entry in active:
                pub = keys / f"{entry.name}.pub"
                pub.write_text(f"{entry.public_key} fedeeg-site:{entry.name}\n")
                answer = flwr_cli(["supernode", "register", str(pub), CONNECTION], env)
                node_names[int(answer["node-id"])] = entry.name
            logger.info("registered %d sites with the SuperLink: %s", len(active), ", ".join(e.name for e in active))
            revoked = [e.name for e in registry.all() if e.status != "active"]
            if revoked:
                logger.info("revoked sites (refused): %s", ", ".join(revoked))
        app_dir = write_app_dir(home / "app", fed.run.to_flower())
        run_id = int(flwr_cli(["run", str(app_dir), CONNECTION], env)["run-id"])
        logger.info("run %d submitted: %d rounds of %s on %s; listening on %s (%s)", run_id, fed.run.rounds,
                    fed.run.strategy, fed.run.backbone, fed.address, "INSECURE" if insecure else "TLS, node authentication")
        metrics = ServerMetrics(fed.metrics_port)
        return serve_server_task(fed, address=f"127.0.0.1:{fed.port}", insecure=insecure,
                                 ca_cert=certs.ca_cert.read_bytes() if certs else None, run_id=run_id,
                                 node_names=node_names, on_round=on_round, metrics=metrics)
    finally:
        if metrics is not None:
            metrics.close()
        superlink.stop()


def start_client(site: ClientConfig, *, insecure: bool = False, stop: threading.Event | None = None,
                 capture=None, isolation: str = "process") -> None:
    """Run the site's SuperNode (supervised, reconnecting with backoff) and its long-lived ClientApp until stopped."""
    from . import check_private
    from ..federation.deployment import ClientWorker

    if insecure or site.insecure:
        insecure = True
        logger.warning(INSECURE_WARNING)
    else:
        check_private(site.key)
        if not Path(site.ca).is_file():
            raise FileNotFoundError(f"[deployment] ca = {str(site.ca)!r} not found: copy the coordinator's ca.pem there.")
    stop = stop or threading.Event()
    _install_stop_signals(stop)
    state = Path(site.state_dir)
    if isolation not in ("process", "subprocess"):
        raise ValueError(f"'isolation' must be 'process' or 'subprocess', got {isolation!r} instead.")
    # subprocess: Flower's default (a new flwr-clientapp process per message, Flower's own waits), for comparison.
    poll = site.poll_interval if isolation == "process" else 0
    env = flower_env(state / ".flwr", FEDEEG_SUPERNODE_POLL=str(poll), FEDEEG_SUPERNODE_ACTIVE_POLL=str(site.active_poll_interval),
                     FEDEEG_SUPERNODE_WAKE_FILE=str(site.supernode_wake_file), FEDEEG_CLIENT_THREADS=str(site.threads))
    capture = capture or _capture_from_env(site.name)
    worker = None if isolation == "subprocess" else ClientWorker(site, runtime_address=f"127.0.0.1:{site.runtime_port}", capture=capture)

    log_path = state / "logs" / "supernode.log"

    def on_exit(code):
        if code == REFUSED_EXIT or refused(log_path):
            logger.error("The coordinator at %s refused site %s (exit %d): its key is not registered or was revoked. "
                         "Send %s to the coordinator (`fedeeg site register`). Retrying with backoff.",
                         site.server, site.name, code, Path(str(site.key)).with_suffix(".pub"))
        else:
            logger.warning("SuperNode exited (code %s): connection to %s lost; reconnecting.", code, site.server)

    supervisor = Supervised(lambda: ManagedProcess(
        "SuperNode", supernode_argv(server=site.server, runtime_port=site.runtime_port, ca=site.ca, key=site.key,
                                    insecure=insecure, partition=site.partition, isolation=isolation,
                                    max_wait=max(30.0, 2 * site.max_backoff)),
        env, log_path), max_backoff=site.max_backoff, on_exit=on_exit)
    supervisor.start()
    logger.info("site %s: SuperNode started for %s (%s); loading the model code…", site.name, site.server,
                "INSECURE" if insecure else "TLS, node authentication")
    try:
        if isolation == "subprocess":
            logger.info("site %s: Flower's subprocess isolation (a new ClientApp process per message)", site.name)
            while not stop.wait(1.0):
                pass
            return
        worker.warm_up()
        logger.info("site %s ready: waiting for rounds", site.name)
        worker.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()


def refused(log_path: Path) -> bool:
    """True when the SuperNode's last exit (its log's tail) was the coordinator refusing its key (Flower's 305)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    last = tail.rsplit("Starting Flower SuperNode", 1)[-1]
    return f"Exit Code: {REFUSED_EXIT}" in last


def _capture_from_env(name: str):
    """``$FEDEEG_CAPTURE_DIR``: append a description of every reply this site sends (array names, shapes, dtypes and
    the scalar values; never array contents) to ``DIR/NAME.jsonl``, so the site can see what leaves it."""
    import json
    import os

    folder = os.environ.get("FEDEEG_CAPTURE_DIR")
    if not folder:
        return None
    from ..federation.deployment import describe_reply

    path = Path(folder) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def capture(message) -> None:
        with path.open("a") as f:
            f.write(json.dumps(describe_reply(message), default=str) + "\n")

    return capture


__all__ = ["start_server", "start_client", "refused", "INSECURE_WARNING", "REFUSED_EXIT"]
