"""The coordinator's ``federation.toml``, validated at the edge.

Example (paths are relative to the file)::

    [federation]
    name = "eeg-consortium"
    out = "runs/federation"     # outputs, checkpoints, audit log
    sites = 3                   # sites to wait for before round 1
    min_sites = 2               # fewer answers than this: on_too_few
    quorum = 0                  # close a round once this many answered (0: all sites asked)
    round_deadline = 900.0      # seconds; a round closes then at the latest
    on_too_few = "retry"        # retry | skip | abort
    max_retries = 2
    connect_timeout = 3600.0    # seconds to wait for the first `sites`

    [server]
    host = "0.0.0.0"
    port = 9092
    certificates = "certs"      # ca.pem, server.pem, server.key (fedeeg certs init)
    registry = "sites.json"     # fedeeg site register / revoke
    metrics_port = 0            # Prometheus endpoint on this port (0: off)

    [run]                       # fedeeg.config.RunConfig (kebab- or snake-case)
    strategy = "fedit"
    rounds = 20
    local-epochs = 2
    backbone = "labram-base"
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .._validation import check_option, check_range, read_toml
from ..config import RunConfig

ON_TOO_FEW = ("retry", "skip", "abort")
#: ``[run] site-files`` of a ``dataset = "folder"`` federation: the coordinator reads no EEG.
FOLDER_PLACEHOLDER = "each-site-reads-its-own-site.toml"


class FederationConfigError(ValueError):
    """An invalid federation.toml."""


@dataclass(frozen=True)
class FederationConfig:
    """The coordinator's settings (``[federation]`` and ``[server]``) and the run (``[run]``).

    Parameters
    ----------
    name : str
        The federation's name (logs, audit).
    out : Path
        Output folder: ``summary.json``, ``metrics.jsonl``, ``adapter/``,
        ``learning_curve.png``, ``audit.jsonl``, ``checkpoints/``.
    sites : int
        Sites to wait for before the first round (up to ``connect_timeout``).
    min_sites : int
        A round needs at least this many answers; fewer: ``on_too_few``.
    quorum : int
        A round closes as soon as this many sites answered (0: every site
        asked); at ``round_deadline`` it closes with whoever answered.
    round_deadline : float
        Seconds after which a round closes; later answers are discarded and
        logged.
    on_too_few : {"retry", "skip", "abort"}
        Fewer than ``min_sites`` answered: ask again (up to ``max_retries``
        times, then skip), keep the global model and go on, or stop the run.
    max_retries : int
        Retries of a round that got too few answers.
    connect_timeout : float
        Seconds to wait for ``sites`` sites before round 1 (then it starts
        with ``min_sites``, or fails).
    host, port : str, int
        Where the SuperLink listens.
    certificates : Path
        Folder of ``ca.pem``, ``server.pem``, ``server.key``.
    registry : Path
        The site registry file.
    metrics_port : int
        Prometheus endpoint port (0: off).
    poll_interval : float
        Seconds between polls of the local SuperLink for the sites' answers during a round.
    run : RunConfig
        The run every site trains (``out`` is set to ``out``).
    """

    out: Path
    run: RunConfig
    name: str = "fedeeg"
    sites: int = 3
    min_sites: int = 1
    quorum: int = 0
    round_deadline: float = 900.0
    on_too_few: str = "retry"
    max_retries: int = 2
    connect_timeout: float = 3600.0
    host: str = "0.0.0.0"
    port: int = 9092
    certificates: Path = Path("certs")
    registry: Path = Path("sites.json")
    metrics_port: int = 0
    poll_interval: float = 0.05
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_range("sites", self.sites, low=1, kind=int)
        check_range("min_sites", self.min_sites, low=1, kind=int)
        if self.min_sites > self.sites:
            raise FederationConfigError(f"'min_sites' ({self.min_sites}) cannot exceed 'sites' ({self.sites}).")
        check_range("quorum", self.quorum, low=0, kind=int)
        if self.quorum and self.quorum < self.min_sites:
            raise FederationConfigError(f"'quorum' ({self.quorum}) must be 0 (all sites) or >= 'min_sites' "
                                        f"({self.min_sites}).")
        check_range("round_deadline", float(self.round_deadline), low=1.0)
        check_option("on_too_few", self.on_too_few, ON_TOO_FEW)
        check_range("max_retries", self.max_retries, low=0, kind=int)
        check_range("connect_timeout", float(self.connect_timeout), low=1.0)
        check_range("port", self.port, low=1, high=65535, kind=int)
        check_range("metrics_port", self.metrics_port, low=0, high=65535, kind=int)
        check_range("poll_interval", float(self.poll_interval), low=0.01, high=10.0)
        if not isinstance(self.run, RunConfig):
            raise TypeError(f"'run' must be a RunConfig, got {type(self.run).__name__}.")
        if self.run.mode != "federated":
            raise FederationConfigError(f"[run] mode must be 'federated' for a deployment, got {self.run.mode!r}.")
        for name in ("out", "certificates", "registry"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.run.out != str(self.out):
            object.__setattr__(self, "run", self.run.replace(out=str(self.out)))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, base_dir: str | Path = ".", path: Path | None = None) -> "FederationConfig":
        """Build from the TOML's tables; relative paths resolve against ``base_dir``."""
        where = path.name if path is not None else "federation config"
        base = Path(base_dir)
        unknown = sorted(set(d) - {"federation", "server", "run"})
        if unknown:
            raise FederationConfigError(f"{where}: unknown table(s) {unknown}; allowed: [federation], [server], [run].")
        allowed = {f.name for f in fields(cls)} - {"run", "path"}
        kwargs: dict[str, Any] = {}
        for table, keys in (("federation", {"name", "out", "sites", "min_sites", "quorum", "round_deadline",
                                           "on_too_few", "max_retries", "connect_timeout"}),
                            ("server", {"host", "port", "certificates", "registry", "metrics_port", "poll_interval"})):
            section = d.get(table, {})
            if not isinstance(section, dict):
                raise FederationConfigError(f"{where}: [{table}] must be a table.")
            bad = sorted(set(k.replace("-", "_") for k in section) - keys)
            if bad:
                raise FederationConfigError(f"{where}: unknown key(s) {bad} in [{table}]; allowed: {sorted(keys)}.")
            kwargs.update({k.replace("-", "_"): v for k, v in section.items()})
        assert set(kwargs) <= allowed
        if "out" not in kwargs:
            raise FederationConfigError(f"{where}: [federation] needs out = \"FOLDER\" (outputs, checkpoints, audit log).")
        for key in ("out", "certificates", "registry"):
            if key in kwargs:
                if not isinstance(kwargs[key], str) or not kwargs[key]:
                    raise FederationConfigError(f"{where}: {key} must be a path string, got {kwargs[key]!r}.")
                p = Path(kwargs[key]).expanduser()
                kwargs[key] = p if p.is_absolute() else (base / p).resolve()
        for key in ("certificates", "registry"):
            kwargs.setdefault(key, (base / ("certs" if key == "certificates" else "sites.json")).resolve())
        for key in ("round_deadline", "connect_timeout", "poll_interval"):
            if isinstance(kwargs.get(key), int) and not isinstance(kwargs.get(key), bool):
                kwargs[key] = float(kwargs[key])
        run = dict(d.get("run", {}))
        if run.get("dataset") == "folder" and "site-files" not in run and "site_files" not in run:
            run["site-files"] = FOLDER_PLACEHOLDER  # the coordinator reads no EEG; each site reads its own site.toml
        try:
            run_cfg = RunConfig.from_mapping({**run, "out": str(kwargs["out"])})
            return cls(run=run_cfg, path=path, **kwargs)
        except (TypeError, ValueError) as err:
            raise FederationConfigError(f"{where}: {err}") from None


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read and validate a ``federation.toml``."""
    d, path = read_toml(path, kind="Federation file", error=FederationConfigError,
                        hint=" (see server/federation.example.toml)")
    return FederationConfig.from_dict(d, base_dir=path.parent.resolve(), path=path)


__all__ = ["FederationConfig", "FederationConfigError", "load_federation_config", "ON_TOO_FEW"]
