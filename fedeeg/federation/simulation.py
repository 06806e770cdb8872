"""Run a federated configuration in Flower's simulation engine (Ray) on one machine."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .._validation import check_option
from ..config import RunConfig
from ..experiment import RunResult

logger = logging.getLogger(__name__)

#: Simulation engines of :func:`run_federated_simulation` (``$FEDEEG_ENGINE``, ``fedeeg simulate --engine``).
ENGINES = ("ray", "inprocess")


class _DropRunSimulationDeprecation(logging.Filter):
    """``fedeeg simulate`` deliberately drives Flower's engine through ``run_simulation``
    (``flwr run`` cannot take a config built by our CLI); its deprecation notice is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return "run_simulation" not in msg and "deprecated feature" not in msg.lower()


def _quiet_flower(verbose: bool) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    level = logging.INFO if verbose else logging.WARNING
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(level)
    if not any(isinstance(f, _DropRunSimulationDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropRunSimulationDeprecation())


def run_apps_in_simulation(server_app, client_app, *, n_sites: int, device: str, cpus_per_site: float = 1.0,
                           parallel_clients: int = 0, verbose: bool = False) -> None:
    """Run a ServerApp/ClientApp pair in Flower's simulation engine (Ray) with ``n_sites`` virtual SuperNodes.

    The one place that sets up the engine for FedEEG (environment, quiet
    logs, Ray resources); used by ``fedeeg simulate`` and ``fedeeg pretrain``.

    Parameters
    ----------
    server_app, client_app : flwr ServerApp, ClientApp
    n_sites : int
        Virtual SuperNodes (partition-id = site index).
    device : str
        ``auto``/``cuda`` share the visible GPUs among the sites' actors.
    cpus_per_site : float
        Ray CPUs each ClientApp actor holds (and its torch threads).
    parallel_clients : int
        If > 0, at most this many ClientApp actors at once (overrides ``cpus_per_site``).
    verbose : bool
        Show Flower's and Ray's INFO logs.
    """
    import torch
    from flwr.simulation import run_simulation

    _quiet_flower(verbose)
    # Ray's local workers inherit this process's environment.
    os.environ["FEDEEG_CLIENT_THREADS"] = str(max(1, int(cpus_per_site)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n_cpus = os.cpu_count() or 1
    if parallel_clients:  # each actor holds one model and <= 2 sites
        cpus_per_site = n_cpus / parallel_clients
    use_gpu = device in ("auto", "cuda") and torch.cuda.is_available()
    backend_config = {
        "client_resources": {
            "num_cpus": min(cpus_per_site, n_cpus),
            "num_gpus": (1.0 / n_sites) if use_gpu else 0.0,
        },
        "init_args": {
            "num_cpus": n_cpus,
            "num_gpus": torch.cuda.device_count() if use_gpu else 0,
            "include_dashboard": False,
            "object_store_memory": 512 * 2**20,  # messages are small; Ray's default reserves 30 % of RAM
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
        },
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_sites,
                   backend_config=backend_config, verbose_logging=verbose)


def run_federated_simulation(
    cfg: RunConfig,
    *,
    n_sites: int,
    on_round: Callable[[dict], None] | None = None,
    cpus_per_site: float = 1.0,
    verbose: bool = False,
    engine: str | None = None,
) -> RunResult:
    """Run ``cfg`` (mode federated) with ``n_sites`` virtual SuperNodes.

    Parameters
    ----------
    cfg : RunConfig
        The run; every simulated site builds the same model from it.
    n_sites : int
        Number of virtual SuperNodes (one per site, partition-id = site index).
    on_round : callable | None
        Progress callback, called with each round's record.
    cpus_per_site : float
        Ray CPUs each ClientApp actor holds (and its torch threads).
    verbose : bool
        Show Flower's and Ray's INFO logs.
    engine : {"ray", "inprocess"} | None
        ``"ray"``: Flower's simulation engine (sites in parallel Ray actors).
        ``"inprocess"``: the sites answer in this process, one after the
        other (:mod:`fedeeg.federation.inprocess`; one GPU, short runs, no
        Ray). None: ``$FEDEEG_ENGINE``, else ``"ray"``.

    Returns
    -------
    result : RunResult
    """
    engine = check_option("engine", engine or os.environ.get("FEDEEG_ENGINE", "ray"), ENGINES)
    if engine == "inprocess":
        _quiet_flower(verbose)
        from .inprocess import run_federated_inprocess

        result = run_federated_inprocess(cfg, n_sites=n_sites, on_round=on_round)
    else:
        from .client_app import make_client_app
        from .server_app import make_server_app

        results: list[RunResult] = []
        server_app = make_server_app(cfg, n_sites=n_sites, results=results, on_round=on_round)
        client_app = make_client_app(cfg)
        run_apps_in_simulation(server_app, client_app, n_sites=n_sites, device=cfg.device, cpus_per_site=cpus_per_site,
                               parallel_clients=cfg.parallel_clients, verbose=verbose)
        if not results:
            raise RuntimeError("The federated simulation ended without a result; run with --verbose to see Flower's log.")
        result = results[0]
    if cfg.finetune_epochs:  # personalisation: each site fine-tunes the final model; reported beside it
        from ..personalisation import finetune_sites

        result.extra["personalised"] = finetune_sites(cfg, result.models["global"], epochs=cfg.finetune_epochs)
    return result
