"""Starting and supervising Flower's SuperLink and SuperNode processes.

The processes are Flower's own executables (``flower-superlink``; the
SuperNode through :mod:`fedeeg.deploy._supernode`), started in their own
process group and always stopped by their id. :class:`Supervised` restarts a
process that exits, waiting longer each time (exponential backoff up to a
cap), which is how a site daemon rides out network cuts and coordinator
restarts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import __version__

logger = logging.getLogger(__name__)

#: The Flower App id every FedEEG run carries; a site refuses runs of any other app or version.
APP_PUBLISHER = "fedeeg"
APP_NAME = "fedeeg"
APP_ID = f"{APP_PUBLISHER}/{APP_NAME}"
#: Connection name of the coordinator's SuperLink in its private FLWR_HOME.
CONNECTION = "fedeeg"


def flower_env(flwr_home: str | os.PathLike, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry, no update check, no runtime installs."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        "PYTHONUNBUFFERED": "1",
        "FEDEEG_PARENT_PID": str(os.getpid()),
        # Flower starts its helpers (flower-superexec, flwr-clientapp) by name: this Python's bin first.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    env.update(extra)
    return env


def executable(name: str) -> str:
    """A Flower executable next to this Python (the venv's ``bin``), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: "ManagedProcess | None" = None) -> None:
    """Wait until ``host:port`` accepts TCP connections (RuntimeError if ``proc`` dies, TimeoutError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.returncode()} before listening on {host}:{port}; "
                               f"see {proc.log_path}.")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"Nothing listens on {host}:{port} after {timeout:.0f} s.")


class ManagedProcess:
    """One child process in its own process group, logging to a file.

    Parameters
    ----------
    name : str
        For messages.
    argv : list of str
    env : dict
    log_path : path-like
        stdout and stderr go here (appended).
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: str | os.PathLike) -> None:
        self.name, self.argv, self.env = name, list(argv), env
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        logger.debug("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL after ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class Supervised:
    """Keep a process running: restart it when it exits, with exponential backoff.

    Parameters
    ----------
    make : callable
        Returns a new, unstarted :class:`ManagedProcess`.
    max_backoff : float
        Longest wait between restarts (seconds); the wait starts at 1 s,
        doubles after each exit and resets once the process ran for a minute.
    on_exit : callable | None
        Called with the exit code each time the process exits.
    """

    def __init__(self, make, *, max_backoff: float = 60.0, on_exit=None) -> None:
        self._make, self.max_backoff, self._on_exit = make, float(max_backoff), on_exit
        self.current: ManagedProcess | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Supervised":
        self.current = self._make().start()
        self._thread = threading.Thread(target=self._watch, name="fedeeg-supervisor", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        backoff, started = 1.0, time.monotonic()
        while not self._stop.is_set():
            if self.current is not None and self.current.alive():
                self._stop.wait(0.5)
                continue
            code = self.current.returncode() if self.current else None
            if self._stop.is_set():
                return
            if self._on_exit:
                self._on_exit(code)
            if time.monotonic() - started > 60:
                backoff = 1.0
            logger.warning("%s exited (code %s); restarting in %.0f s.", self.current.name if self.current else "process",
                           code, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff)
            self.current = self._make().start()
            self.restarts += 1
            started = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.current is not None:
            self.current.stop()


# ------------------------------------------------------------------ coordinator side
def superlink_argv(*, host: str, port: int, certs=None, insecure: bool = False) -> list[str]:
    """``flower-superlink`` with TLS and node authentication (or ``--insecure``), ServerApp in our own process,
    runtime dependency installation off."""
    argv = [sys.executable, "-m", "fedeeg.deploy._flower", "superlink", "--host", host, "--port", str(port),
            "--isolation", "process",
            "--disable-runtime-dependency-installation"]
    if insecure:
        return argv + ["--insecure"]
    return argv + ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
                   "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth"]


def write_flower_home(flwr_home: str | os.PathLike, *, port: int, ca_cert=None, insecure: bool = False) -> Path:
    """A private FLWR_HOME whose ``config.toml`` points the ``flwr`` CLI at our SuperLink on loopback."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "127.0.0.1:{port}"']
    lines.append("insecure = true" if insecure else f"root-certificates = {json.dumps(str(Path(ca_cert).resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def write_app_dir(folder: str | os.PathLike, run_config: dict) -> Path:
    """The Flower App submitted for a run: FedEEG's app id and version and the run's config, no code.

    Sites never execute code from it: they run the ClientApp of the FedEEG
    installed there and refuse a run whose app id or version differs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_lines = [f"{json.dumps(k)} = {_toml_scalar(v)}" for k, v in run_config.items()]
    (folder / "pyproject.toml").write_text("\n".join([
        "[build-system]", 'requires = ["setuptools>=68"]', 'build-backend = "setuptools.build_meta"', "",
        "[project]", f'name = "{APP_NAME}"', f'version = "{__version__}"', "dependencies = []", "",
        "[tool.flwr.app]", f'publisher = "{APP_PUBLISHER}"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedeeg.federation.server_app:app"',
        'clientapp = "fedeeg.federation.client_app:app"', "",
        "[tool.flwr.app.config]", *cfg_lines, ""]))
    return folder


def _toml_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def flwr_cli(args: list[str], env: dict[str, str], *, timeout: float = 120.0) -> dict:
    """Run ``flwr ARGS --format json`` and return its JSON answer (RuntimeError with Flower's message on failure)."""
    proc = subprocess.run([executable("flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    out = proc.stdout.strip()
    try:
        answer = json.loads(out[out.index("{"):]) if "{" in out else {}
    except ValueError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        raise RuntimeError(f"`flwr {' '.join(args)}` failed ({proc.returncode}): "
                           f"{answer.get('error-message') or out[-500:] or proc.stderr[-500:]}")
    return answer


# ------------------------------------------------------------------ site side
def supernode_argv(*, server: str, runtime_port: int, ca=None, key=None, insecure: bool = False,
                   partition: int = 0, isolation: str = "process", max_wait: float = 120.0) -> list[str]:
    """The site's SuperNode: our long-lived ClientApp process (``--isolation process``), node authentication.

    ``max_wait``: after that many seconds of failed connection attempts the SuperNode exits and the supervisor
    starts a fresh one (a clean state after a coordinator restart)."""
    argv = [sys.executable, "-m", "fedeeg.deploy._flower", "supernode", "--superlink", server, "--isolation", isolation,
            "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", f"partition-id={partition}",
            "--max-wait-time", str(float(max_wait))]
    if insecure:
        return argv + ["--insecure"]
    return argv + ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


__all__ = ["APP_ID", "APP_NAME", "APP_PUBLISHER", "CONNECTION", "ManagedProcess", "Supervised", "flower_env",
           "executable", "free_port", "wait_for_port", "superlink_argv", "supernode_argv", "write_flower_home",
           "write_app_dir", "flwr_cli"]
