"""A hospital's deployment file: the data layer's site tables plus ``[deployment]``.

One TOML file describes the site's data (``[site]``, ``[data]``, ``[labels]``,
``[channels]``, read by :func:`fedeeg.data.site.load_site_config`, the same as
``fedeeg check --site``) and how the daemon connects::

    [deployment]
    server = "coordinator.example.org:9092"   # the coordinator's address
    ca = "keys/ca.pem"                        # the consortium CA (from the coordinator)
    key = "keys/hospital-a.key"               # node-authentication key (fedeeg site new), 0600
    identity_key = "keys/hospital-a.identity.pem"  # secure aggregation (default: beside key)
    roster = "keys/roster.json"               # the identity keys of all sites (from the coordinator)
    device = "auto"                           # auto | cpu | cuda
    threads = 4                               # torch threads for training
    cache_dir = ""                            # preprocessed windows ("" = default, "off" = none)
    checkpoint = ""                           # local copy of the federation's backbone checkpoint
    state_dir = "fedeeg-client"               # logs and runtime files
    runtime_port = 9094                       # local port between SuperNode and ClientApp (loopback)
    poll_interval = 0.25                      # seconds between polls of the coordinator while idle
    active_poll_interval = 0.05               # ... for a minute after a message (a run is under way)
    max_backoff = 60.0                        # longest wait between reconnection attempts

A test site instead sets ``dataset = "synthetic"``, ``partition = N`` and
``name`` under ``[deployment]`` and has no data tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._validation import check_option, check_range, read_toml
from . import check_site_name

CLIENT_DATASETS = ("folder", "synthetic")
DATA_TABLES = ("site", "data", "labels", "channels")
_KEYS = {"server", "ca", "key", "identity_key", "roster", "device", "threads", "cache_dir", "checkpoint", "state_dir",
         "runtime_port", "poll_interval", "active_poll_interval", "max_backoff", "insecure", "dataset", "partition", "name"}


class ClientConfigError(ValueError):
    """An invalid deployment section of a site file."""


@dataclass(frozen=True)
class ClientConfig:
    """A site daemon's settings (``[deployment]``) and its data tables.

    Parameters
    ----------
    name : str
        The site's name (``[site] name``, or ``[deployment] name`` for a
        synthetic test site); must match its enrolled key.
    server : str
        The coordinator's ``host:port``.
    ca : Path | None
        The consortium CA certificate (required unless ``insecure``).
    key : Path | None
        The node-authentication private key (required unless ``insecure``).
    identity_key : Path | None
        The secure-aggregation identity key (Ed25519, 0600); None: the
        ``NAME.identity.pem`` beside ``key`` (:attr:`identity_path`).
    roster : Path | None
        The consortium's roster of identity public keys (``roster.json``
        from the coordinator, :mod:`fedeeg.deploy.roster`); required when
        the run uses secure aggregation.
    device : {"auto", "cpu", "cuda"}
    threads : int
        Torch threads for training.
    cache_dir, checkpoint : str
        Local overrides of the run's cache folder and backbone checkpoint.
    state_dir : Path
        Logs and runtime files of the daemon.
    runtime_port : int
        Loopback port between the SuperNode and the ClientApp process.
    poll_interval : float
        Seconds between polls of the coordinator for work while idle.
    active_poll_interval : float
        Seconds between polls (of the coordinator, and of the SuperNode by
        the ClientApp) for a minute after the site handled a message: a run
        is under way and the next round's message is due. At most
        ``poll_interval``.
    max_backoff : float
        Longest wait between reconnection attempts.
    insecure : bool
        Plain transport (local tests only).
    dataset : {"folder", "synthetic"}
        ``folder``: the data tables of this file; ``synthetic``: generated
        site number ``partition`` (tests).
    partition : int
        Synthetic site index.
    data_tables : dict
        The data layer's tables (``[site]``, ``[data]``, ``[labels]``,
        ``[channels]``) as read.
    """

    name: str
    server: str
    state_dir: Path
    ca: Path | None = None
    key: Path | None = None
    identity_key: Path | None = None
    roster: Path | None = None
    device: str = "auto"
    threads: int = 1
    cache_dir: str = ""
    checkpoint: str = ""
    runtime_port: int = 9094
    poll_interval: float = 0.25
    active_poll_interval: float = 0.05
    max_backoff: float = 60.0
    insecure: bool = False
    dataset: str = "folder"
    partition: int = 0
    data_tables: dict = field(default_factory=dict, compare=False, hash=False)
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_site_name(self.name)
        check_option("device", self.device, ("auto", "cpu", "cuda"))
        check_option("dataset", self.dataset, CLIENT_DATASETS)
        check_range("threads", self.threads, low=1, kind=int)
        check_range("runtime_port", self.runtime_port, low=1, high=65535, kind=int)
        check_range("poll_interval", float(self.poll_interval), low=0.01, high=10.0)
        check_range("active_poll_interval", float(self.active_poll_interval), low=0.01, high=float(self.poll_interval))
        check_range("max_backoff", float(self.max_backoff), low=1.0)
        check_range("partition", self.partition, low=0, kind=int)
        if not isinstance(self.server, str) or ":" not in self.server:
            raise ClientConfigError(f"[deployment] server must be 'HOST:PORT', got {self.server!r} instead.")
        if not self.insecure:
            missing = [k for k in ("ca", "key") if getattr(self, k) is None]
            if missing:
                raise ClientConfigError(f"[deployment] needs {missing}: the consortium CA (ca.pem from the coordinator) "
                                        "and this site's private key (`fedeeg site new NAME`).")
        if self.dataset == "folder" and not self.data_tables:
            raise ClientConfigError("The site file has no [site]/[data]/[labels] tables: describe the site's recordings "
                                    "(see `fedeeg check --site`), or set dataset = \"synthetic\" for a test site.")
        if self.dataset == "synthetic" and self.data_tables:
            raise ClientConfigError("[deployment] dataset = \"synthetic\" takes no data tables; remove "
                                    f"{sorted(self.data_tables)} or use dataset = \"folder\".")

    @property
    def identity_path(self) -> Path | None:
        """The secure-aggregation identity key: ``identity_key``, else ``NAME.identity.pem`` beside ``key``."""
        if self.identity_key is not None:
            return Path(self.identity_key)
        return None if self.key is None else Path(self.key).with_name(f"{self.name}.identity.pem")

    @property
    def supernode_wake_file(self) -> Path:
        """``state_dir/supernode-active``: the SuperNode touches it when it starts handling a message, so the
        site's long-lived ClientApp asks for that message at once rather than after its idle poll interval."""
        return Path(self.state_dir) / "supernode-active"

    def secagg_node_config(self) -> dict[str, str]:
        """What the site's worker puts in ``Context.node_config`` for secure aggregation.

        The site's name, identity key and roster paths ("" when unset), read by
        :func:`fedeeg.federation.secure.client_stage` through
        :func:`fedeeg.deploy.roster.load_site_keys`.
        """
        from .roster import NODE_IDENTITY, NODE_NAME, NODE_ROSTER

        identity = self.identity_path
        return {NODE_NAME: self.name, NODE_IDENTITY: "" if identity is None else str(identity),
                NODE_ROSTER: "" if self.roster is None else str(self.roster)}

    def data_site_file(self) -> Path:
        """Write the data tables alone to ``state_dir/site-data.toml`` (the data layer's site file) and return it.

        The file is read back with :func:`fedeeg.data.site.load_site_config`, so an error in the data tables
        surfaces here, at start, naming the problem.
        """
        from ..data.site import load_site_config

        self.state_dir.mkdir(parents=True, exist_ok=True)
        out = self.state_dir / "site-data.toml"
        out.write_text(_to_toml(self.data_tables))
        load_site_config(out)
        return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ClientConfigError(f"Cannot write {value!r} ({type(value).__name__}) to TOML.")


def _to_toml(tables: dict) -> str:
    lines = []
    for table, section in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in section.items())
        lines.append("")
    return "\n".join(lines)


def load_client_config(path: str | Path) -> ClientConfig:
    """Read a site's deployment file (``[deployment]`` plus the data tables)."""
    d, path = read_toml(path, kind="Site file", error=ClientConfigError, hint=" (see client/site.example.toml)")
    base = path.parent.resolve()
    dep = d.get("deployment")
    if not isinstance(dep, dict):
        raise ClientConfigError(f"{path.name}: no [deployment] table; it says where the coordinator is and which keys "
                                "to use (see client/site.example.toml).")
    unknown = sorted(set(d) - {"deployment", *DATA_TABLES})
    if unknown:
        raise ClientConfigError(f"{path.name}: unknown table(s) {unknown}; allowed: [deployment], "
                                f"{', '.join('[' + t + ']' for t in DATA_TABLES)}.")
    bad = sorted(set(dep) - _KEYS)
    if bad:
        raise ClientConfigError(f"{path.name}: unknown key(s) {bad} in [deployment]; allowed: {sorted(_KEYS)}.")
    data_tables = {t: dict(d[t]) for t in DATA_TABLES if t in d}
    if isinstance(data_tables.get("data", {}).get("root"), str):
        root = Path(data_tables["data"]["root"]).expanduser()
        data_tables["data"]["root"] = str(root if root.is_absolute() else (base / root).resolve())
    if isinstance(data_tables.get("labels", {}).get("table"), str):
        table = Path(data_tables["labels"]["table"]).expanduser()
        data_tables["labels"]["table"] = str(table if table.is_absolute() else (base / table).resolve())
    kwargs = dict(dep)
    name = data_tables.get("site", {}).get("name") or kwargs.pop("name", None)
    kwargs.pop("name", None)
    if not name:
        raise ClientConfigError(f"{path.name}: the site needs a name ([site] name = \"hospital-a\").")
    if "server" not in kwargs:
        raise ClientConfigError(f"{path.name}: [deployment] needs server = \"HOST:PORT\" (the coordinator).")
    for key in ("ca", "key", "identity_key", "roster", "state_dir"):
        if key in kwargs:
            if not isinstance(kwargs[key], str) or not kwargs[key]:
                raise ClientConfigError(f"{path.name}: [deployment] {key} must be a path string, got {kwargs[key]!r}.")
            p = Path(kwargs[key]).expanduser()
            kwargs[key] = p if p.is_absolute() else (base / p).resolve()
    kwargs.setdefault("state_dir", (base / "fedeeg-client").resolve())
    for key in ("poll_interval", "active_poll_interval", "max_backoff"):
        if isinstance(kwargs.get(key), int) and not isinstance(kwargs.get(key), bool):
            kwargs[key] = float(kwargs[key])
    try:
        return ClientConfig(name=str(name), data_tables=data_tables, path=path, **kwargs)
    except (TypeError, ValueError) as err:
        raise ClientConfigError(f"{path.name}: {err}") from None


__all__ = ["ClientConfig", "ClientConfigError", "load_client_config"]
