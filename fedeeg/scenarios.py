"""Named research scenarios: TOML files that set a run's configuration.

A scenario (``simulations/scenarios/NAME.toml``, or any path) fixes the
dataset, the sites and how they differ, the federation's participation and the
personalisation, so that ``fedeeg simulate --scenario NAME`` and
``fedeeg sweep --scenario NAME`` run the same experiment by name. Its values
are defaults: explicit options override them.

.. code-block:: toml

    [scenario]
    name = "synthetic-100"
    description = "100 synthetic sites, 10 per round"
    [run]                     # any RunConfig field (snake- or kebab-case)
    dataset = "synthetic"
    sites = 100
    [synthetic]               # generated sites: size and heterogeneity
    subjects_per_site = 3
    windows_per_class = 8
    label_alpha = 0.5         # Dirichlet alpha of each site's class proportions (0 = balanced)
    montage_drop = 0.2        # fraction of channels a site lacks
    site_sfreqs = [128, 200, 256]
    amplitude_shift = 0.3
    noise_shift = 0.02
    size_skew = 0.5
    [federation]
    sites_per_round = 10      # sites sampled per round (0 = all)
    dropout = 0.1             # probability that a sampled site drops out of a round
    parallel_clients = 2      # simulated clients that run at once (bounds Ray actors and memory)
    [personalisation]
    mode = "none"             # none | head | norm | norm+head (kept local, FedBN-style)
    finetune_epochs = 0       # local fine-tune of the final model, reported beside it

Every table's keys become flat run settings (:data:`SECTION_KEYS`). Settings
that :class:`fedeeg.config.RunConfig` does not know yet are listed in
:data:`PROPOSED_FIELDS`; :func:`resolve` returns them apart ("pending") so that
the caller can refuse to run a scenario whose settings would be ignored.

The per-round site sampling and dropouts are plain functions here
(:func:`sample_sites`, :func:`dropped_sites`) for the server to call.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ._validation import check_option, check_range
from .config import LORA_BACKBONES, RunConfig

logger = logging.getLogger(__name__)

#: Personalisation modes (see :mod:`fedeeg.personalisation`).
PERSONALISE_MODES = ("none", "head", "norm", "norm+head")

#: Run settings that scenarios use beyond today's RunConfig: name -> (default, type, description). Each is
#: meant to become a RunConfig field (issue 7's integration); until then :func:`resolve` reports it as pending.
PROPOSED_FIELDS: dict[str, tuple[Any, type, str]] = {
    "sites_per_round": (0, int, "sites sampled per round (0 = all)"),
    "dropout": (0.0, float, "probability that a sampled site drops out of a round (simulation)"),
    "parallel_clients": (0, int, "simulated clients running at once (0 = one per CPU)"),
    "personalise": ("none", str, "tensors kept local: none | head | norm | norm+head"),
    "finetune_epochs": (0, int, "local fine-tune epochs of the final model, evaluated beside it (0 = none)"),
    "site_holdout": ("subjects", str, "test data inside a site: subjects (held out) | time (last windows)"),
    "synth_subjects": (6, int, "synthetic: subjects per site"),
    "synth_windows_per_class": (20, int, "synthetic: windows per subject and class"),
    "label_alpha": (0.0, float, "synthetic: Dirichlet alpha of the sites' class proportions (0 = balanced)"),
    "montage_drop": (0.0, float, "synthetic: fraction of channels each site lacks"),
    "site_sfreqs": ("", str, "synthetic: native rates of the sites, comma-separated (resampled to 200 Hz)"),
    "amplitude_shift": (0.0, float, "synthetic: sd of an extra log gain per site"),
    "noise_shift": (0.0, float, "synthetic: largest extra white-noise level per site"),
    "size_skew": (0.0, float, "synthetic: log sd of the sites' subject counts"),
}

#: Scenario tables and how their keys map onto flat run settings.
SECTION_KEYS: dict[str, dict[str, str]] = {
    "synthetic": {
        "subjects_per_site": "synth_subjects", "windows_per_class": "synth_windows_per_class",
        "label_alpha": "label_alpha", "montage_drop": "montage_drop", "site_sfreqs": "site_sfreqs",
        "amplitude_shift": "amplitude_shift", "noise_shift": "noise_shift", "size_skew": "size_skew",
    },
    "federation": {"sites_per_round": "sites_per_round", "dropout": "dropout", "parallel_clients": "parallel_clients"},
    "personalisation": {"mode": "personalise", "finetune_epochs": "finetune_epochs"},
}
_TABLES = ("scenario", "run", *SECTION_KEYS)
_SYNTHETIC_ONLY = tuple(SECTION_KEYS["synthetic"].values())


def run_fields() -> dict[str, Any]:
    """RunConfig's fields: name -> dataclasses.Field."""
    return {f.name: f for f in fields(RunConfig)}


def known_settings() -> tuple[str, ...]:
    """Every setting a scenario, a sweep grid or an override may name."""
    return tuple(sorted(set(run_fields()) | set(PROPOSED_FIELDS)))


def scenario_dirs() -> list[Path]:
    """Where scenario names are looked up: ``$FEDEEG_SCENARIO_DIR``, then the repository's ``simulations/scenarios``."""
    dirs = []
    if os.environ.get("FEDEEG_SCENARIO_DIR"):
        dirs.append(Path(os.environ["FEDEEG_SCENARIO_DIR"]).expanduser())
    dirs.append(Path(__file__).resolve().parents[1] / "simulations" / "scenarios")
    return dirs


def list_scenarios() -> list[str]:
    """Names of the scenarios found in :func:`scenario_dirs`."""
    names = set()
    for d in scenario_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def find_scenario(name: str | os.PathLike) -> Path:
    """The TOML file of a scenario name or path.

    Raises
    ------
    FileNotFoundError
        Naming the places searched and the scenarios there.
    """
    text = str(name)
    path = Path(text).expanduser()
    if text.endswith(".toml") or os.sep in text or "/" in text:
        if path.is_file():
            return path
        raise FileNotFoundError(f"Scenario file {text!r} does not exist.")
    for d in scenario_dirs():
        candidate = d / f"{text}.toml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Unknown scenario {text!r}: no {text}.toml in {', '.join(str(d) for d in scenario_dirs())}. "
        f"Known scenarios: {', '.join(list_scenarios()) or 'none'}; or give the path of a scenario TOML file."
    )


def _norm_key(key: str) -> str:
    return str(key).replace("-", "_")


def _coerce_setting(name: str, value: Any) -> Any:
    """Check one flat setting's type (ints given as floats etc.) and return it normalised."""
    if name in PROPOSED_FIELDS:
        default, kind, _ = PROPOSED_FIELDS[name]
        if name == "site_sfreqs" and isinstance(value, (list, tuple)):
            value = ",".join(str(float(v)).removesuffix(".0") for v in value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"Scenario setting {name!r} must be {kind.__name__} ({PROPOSED_FIELDS[name][2]}), "
                            f"got {type(value).__name__} ({value!r}) instead.")
        return value
    return value


def check_settings(settings: Mapping[str, Any]) -> None:
    """Validate the proposed (non-RunConfig) settings and their combinations, in mne's manner.

    RunConfig's own fields are validated by RunConfig itself.
    """
    from .data.synthetic import SiteHeterogeneity

    get = lambda k: settings.get(k, PROPOSED_FIELDS[k][0])  # noqa: E731
    check_range("sites_per_round", get("sites_per_round"), low=0, kind=int)
    check_range("dropout", get("dropout"), low=0.0, high=0.95, kind=float)
    check_range("parallel_clients", get("parallel_clients"), low=0, kind=int)
    check_option("personalise", get("personalise"), PERSONALISE_MODES)
    check_range("finetune_epochs", get("finetune_epochs"), low=0, kind=int)
    check_option("site_holdout", get("site_holdout"), ("subjects", "time"))
    check_range("synth_subjects", get("synth_subjects"), low=1, kind=int)
    check_range("synth_windows_per_class", get("synth_windows_per_class"), low=1, kind=int)
    try:
        rates = tuple(float(r) for r in str(get("site_sfreqs")).split(",") if r.strip())
    except ValueError as err:
        raise ValueError(f"'site_sfreqs' must be rates in Hz, comma-separated (e.g. '128,256'), got "
                         f"{get('site_sfreqs')!r}.") from err
    SiteHeterogeneity(label_alpha=get("label_alpha"), montage_drop=get("montage_drop"), site_sfreqs=rates,
                      amplitude_shift=get("amplitude_shift"), noise_shift=get("noise_shift"), size_skew=get("size_skew"))
    dataset = settings.get("dataset", "synthetic")
    off = {k: v for k, v in settings.items() if k in _SYNTHETIC_ONLY and v != PROPOSED_FIELDS[k][0]}
    if off and dataset != "synthetic":
        raise ValueError(f"The settings {sorted(off)} shape generated sites; they need dataset='synthetic', got "
                         f"dataset={dataset!r}.")
    sites = settings.get("sites", 3)
    if get("sites_per_round") > sites:
        raise ValueError(f"'sites_per_round' ({get('sites_per_round')}) cannot exceed 'sites' ({sites}): sample at most "
                         f"every site, or set sites_per_round = 0 for all.")
    if get("montage_drop") > 0:
        backbone = settings.get("backbone", "labram-small")
        if backbone not in LORA_BACKBONES:
            raise ValueError(f"montage_drop > 0 gives sites different channels; the backbone {backbone!r} is built for one "
                             f"channel list. Use a LaBraM backbone ({', '.join(LORA_BACKBONES)}) or montage_drop = 0.")
        if settings.get("mode", "federated") == "centralized":
            raise ValueError("montage_drop > 0 gives sites different channels, which cannot be pooled for "
                             "mode='centralized'; use mode federated/local or montage_drop = 0.")
    if get("personalise") != "none" and settings.get("mode", "federated") != "federated":
        raise ValueError(f"personalise={get('personalise')!r} keeps tensors local in a federation; it needs "
                         f"mode='federated', got mode={settings.get('mode')!r}.")


@dataclass(frozen=True)
class Scenario:
    """A named scenario: flat run settings (RunConfig fields and :data:`PROPOSED_FIELDS`).

    Parameters
    ----------
    name : str
        The scenario's name.
    description : str
        One line saying what it models.
    settings : dict
        Flat settings, snake-case keys.
    path : str
        The TOML file it came from ("" when built in code).
    """

    name: str
    description: str = ""
    settings: dict = field(default_factory=dict)
    path: str = ""

    def __post_init__(self) -> None:
        known = set(known_settings())
        unknown = sorted(k for k in self.settings if k not in known)
        if unknown:
            raise ValueError(f"Scenario {self.name!r}: unknown setting(s) {unknown}. Known: {', '.join(sorted(known))}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "", path: str = "") -> "Scenario":
        """Build from a parsed scenario TOML (tables ``scenario``, ``run``, ``synthetic``, ``federation``, ``personalisation``)."""
        where = path or name or "scenario"
        extra = sorted(set(data) - set(_TABLES))
        if extra:
            raise ValueError(f"{where}: unknown table(s) {extra}; a scenario has the tables {', '.join(_TABLES)}.")
        head = dict(data.get("scenario", {}))
        settings: dict[str, Any] = {}
        for key, value in dict(data.get("run", {})).items():
            settings[_norm_key(key)] = value
        for table, mapping in SECTION_KEYS.items():
            for key, value in dict(data.get(table, {})).items():
                k = _norm_key(key)
                if k not in mapping:
                    raise ValueError(f"{where}: unknown key {key!r} in [{table}]; allowed: {', '.join(mapping)}.")
                settings[mapping[k]] = value
        settings = {k: _coerce_setting(k, v) for k, v in settings.items()}
        return cls(name=str(head.get("name", name)), description=str(head.get("description", "")),
                   settings=settings, path=path)

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> tuple[RunConfig, dict]:
        """The scenario's run config, with ``overrides`` (explicit options) taking precedence; see :func:`resolve`."""
        return resolve(self, overrides)


def load_scenario(name: str | os.PathLike) -> Scenario:
    """Read a scenario by name (see :func:`find_scenario`) or path, and validate it."""
    path = find_scenario(name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"Scenario file {path} is not valid TOML: {err}.") from err
    scenario = Scenario.from_dict(data, name=path.stem, path=str(path))
    # Validate now, not at the first round (the eegmat folder is given at run time).
    needs_dir = scenario.settings.get("dataset") == "eegmat" and not scenario.settings.get("data_dir")
    resolve(scenario, {"data_dir": "<given at run time>"} if needs_dir else None)
    return scenario


def resolve(scenario: Scenario | None, overrides: Mapping[str, Any] | None = None) -> tuple[RunConfig, dict]:
    """Merge a scenario's settings with overrides; build the RunConfig.

    Parameters
    ----------
    scenario : Scenario | None
        The scenario (None: overrides only).
    overrides : mapping | None
        Settings that win over the scenario's (explicit CLI options, a sweep
        cell), snake- or kebab-case.

    Returns
    -------
    cfg : RunConfig
        Built from every setting RunConfig knows.
    pending : dict
        Settings RunConfig does not know yet (:data:`PROPOSED_FIELDS`) whose
        value differs from the default: they would be ignored by this FedEEG;
        callers should refuse to run when it is not empty
        (:func:`require_applied`).
    """
    merged = dict(scenario.settings) if scenario is not None else {}
    for key, value in dict(overrides or {}).items():
        k = _norm_key(key)
        if k not in known_settings():
            raise ValueError(f"Unknown setting {key!r}. Known: {', '.join(known_settings())}.")
        merged[k] = _coerce_setting(k, value)
    if merged.get("dataset") == "eegmat" and not merged.get("data_dir") and os.environ.get("FEDEEG_EEGMAT_DIR"):
        merged["data_dir"] = os.environ["FEDEEG_EEGMAT_DIR"]
    check_settings(merged)
    known = run_fields()
    cfg = RunConfig.from_mapping({k: v for k, v in merged.items() if k in known})
    pending = {k: v for k, v in merged.items()
               if k not in known and k in PROPOSED_FIELDS and v != PROPOSED_FIELDS[k][0]}
    return cfg, pending


def require_applied(pending: Mapping[str, Any], what: str = "This scenario") -> None:
    """Raise when settings would be ignored because RunConfig lacks them (before issue 7's integration)."""
    if pending:
        raise ValueError(
            f"{what} sets {', '.join(f'{k}={v!r}' for k, v in sorted(pending.items()))}, which this FedEEG's RunConfig "
            f"does not know yet (issue 7: needs the lead's integration into config.py and the federation); running "
            f"without them would silently give another experiment. Remove them (or use a scenario without them)."
        )


# ------------------------------------------------------------------ participation
def sample_sites(server_round: int, n_sites: int, k: int, seed: int) -> list[int]:
    """The sites (indices) that take part in a round: ``k`` of ``n_sites`` drawn without replacement.

    Deterministic in ``(seed, server_round)`` and independent of earlier
    rounds, so a resumed run samples the same sites.

    Parameters
    ----------
    server_round : int
        The round, >= 1.
    n_sites : int
        Sites in the federation, >= 1.
    k : int
        Sites per round; 0 or ``k >= n_sites`` = every site.
    seed : int
        The run's seed.

    Returns
    -------
    sites : list of int
        Sorted indices in ``[0, n_sites)``.
    """
    check_range("server_round", server_round, low=0, kind=(int, np.integer))
    check_range("n_sites", n_sites, low=1, kind=(int, np.integer))
    check_range("k", k, low=0, kind=(int, np.integer))
    check_range("seed", seed, low=0, kind=(int, np.integer))
    if k == 0 or k >= n_sites:
        return list(range(int(n_sites)))
    rng = np.random.default_rng([int(seed), int(server_round), 4243])
    return sorted(int(i) for i in rng.choice(int(n_sites), size=int(k), replace=False))


def dropped_sites(server_round: int, sampled: Sequence[int], rate: float, seed: int) -> list[int]:
    """Which of a round's sampled sites drop out (simulated dropouts).

    Each sampled site drops independently with probability ``rate``;
    deterministic in ``(seed, server_round)``. The caller treats a dropped
    site like one whose reply never came.

    Returns
    -------
    dropped : list of int
        A sorted subset of ``sampled``.
    """
    check_range("rate", rate, low=0.0, high=1.0, kind=(int, float))
    sampled = [int(s) for s in sampled]
    if rate <= 0 or not sampled:
        return []
    rng = np.random.default_rng([int(seed), int(server_round), 4244])
    draws = rng.random(len(sampled))
    return sorted(s for s, d in zip(sampled, draws) if d < rate)


def round_participants(server_round: int, cfg: RunConfig, settings: Mapping[str, Any] | None = None) -> tuple[list[int], list[int]]:
    """A round's sampled sites and those of them that drop out, from the config's (or ``settings``') fields."""
    settings = dict(settings or {})
    k = int(getattr(cfg, "sites_per_round", settings.get("sites_per_round", 0)))
    rate = float(getattr(cfg, "dropout", settings.get("dropout", 0.0)))
    sampled = sample_sites(server_round, cfg.federated_sites, k, cfg.seed)
    return sampled, dropped_sites(server_round, sampled, rate, cfg.seed)


__all__ = ["PERSONALISE_MODES", "PROPOSED_FIELDS", "SECTION_KEYS", "Scenario", "check_settings",
           "dropped_sites", "find_scenario", "known_settings", "list_scenarios", "load_scenario", "require_applied",
           "resolve", "round_participants", "run_fields", "sample_sites", "scenario_dirs"]
