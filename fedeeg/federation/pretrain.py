"""Federated masked-patch pretraining on Flower's Message API.

Each round the server sends the full pretrainer state (backbone without the
fine-tuning-only ``fc_norm``/``head``, the mask token and the decoder) to every
site; each site trains ``local_epochs`` on its own **training** windows
(:func:`fedeeg.pretrain.pretrain_windows`: held-out subjects are never used)
and replies with its weights, its number of windows and its mean loss. The
server checks every reply (names, shapes, dtypes, finite values; a bad one is
logged and left out, the round continues) and averages the rest weighted by
the sites' windows (FedAvg). No EEG, no per-window value and no subject
identifier leaves a site.

The result is written by :func:`fedeeg.pretrain.write_pretrain_outputs`, like
a central run's.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..aggregation import UpdateRejected, check_update, weighted_average
from ..pretrain import PretrainConfig, PretrainResult, build_pretrainer, pretrain_windows, steps_per_epoch, train_pretrainer
from . import records as R
from .client_app import CLIENT_ERROR_CODE, _set_threads, _site_index
from .server_app import _broadcast, _wait_for_nodes, server_app_for

logger = logging.getLogger(__name__)

#: The metrics a site's pretraining reply carries (all scalars).
REPLY_METRICS = ("num-examples", "train-loss", "windows-per-second")

_PRETRAINER_CACHE: dict = {}


# ------------------------------------------------------------------------------------------------ client
def _config(context: Context, override: PretrainConfig | None) -> PretrainConfig:
    return override if override is not None else PretrainConfig.from_mapping(dict(context.run_config))


def _pretrainer(cfg: PretrainConfig):
    """One pretrainer per actor process, reused across rounds (its weights are replaced every round)."""
    if cfg not in _PRETRAINER_CACHE:
        _PRETRAINER_CACHE.clear()
        _PRETRAINER_CACHE[cfg] = build_pretrainer(cfg)
    return _PRETRAINER_CACHE[cfg]


def handle_pretrain(message: Message, context: Context, override: PretrainConfig | None = None) -> Message:
    """Pretrain on this site's training windows; any failure becomes a clear error reply.

    Parameters
    ----------
    message : flwr.app.Message
        The server's train message: ``arrays`` (the global pretrainer state) and
        ``config`` (``server-round``).
    context : flwr.app.Context
        The node's context; ``node_config["partition-id"]`` picks the site.
    override : PretrainConfig | None
        Replaces Flower's run config (``fedeeg pretrain --federated``).

    Returns
    -------
    reply : flwr.app.Message
        ``arrays`` (the trained state), ``metrics`` (:data:`REPLY_METRICS`) and
        ``site`` (name, channel names, sfreq), or an error reply.
    """
    try:
        return _handle(message, context, override)
    except Exception as exc:  # the server gets the reason; the round goes on without this site
        logger.error("pretraining failed: %s", exc)
        logger.debug("%s", traceback.format_exc())
        return Message(Error(code=CLIENT_ERROR_CODE, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)


def _handle(message: Message, context: Context, override: PretrainConfig | None) -> Message:
    _set_threads()
    cfg = _config(context, override)
    sites = pretrain_windows(cfg)
    pid = _site_index(context, len(sites))
    name, windows = list(sites.items())[pid]
    model = _pretrainer(cfg)
    if R.ARRAYS not in message.content.array_records:
        raise ValueError(f"The server's train message carries no '{R.ARRAYS}' ArrayRecord.")
    model.load_exchange_state_dict(R.record_to_state(message.content.array_records[R.ARRAYS]))
    server_round = int(message.content.config_records.get(R.CONFIG, ConfigRecord()).get("server-round", 1))
    if not 1 <= server_round <= cfg.rounds:
        raise ValueError(f"server-round {server_round} is outside the run's rounds 1..{cfg.rounds}.")
    spe = steps_per_epoch([windows], cfg.batch_size)
    result = train_pretrainer(
        model, [windows], epochs=cfg.local_epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size, mask_ratio=cfg.mask_ratio, symmetric=cfg.symmetric, warmup=cfg.warmup,
        max_grad_norm=cfg.max_grad_norm, device=cfg.device, seed=cfg.seed * 100_003 + server_round * 101 + pid,
        # One warm-up + cosine schedule over all rounds, continued from round to round.
        step_offset=(server_round - 1) * cfg.local_epochs * spe, total_steps=cfg.rounds * cfg.local_epochs * spe,
    )
    model.cpu()
    content = RecordDict({
        R.ARRAYS: R.state_to_record(model.exchange_state_dict()),
        R.METRICS: MetricRecord({
            "num-examples": int(windows.n_windows),
            "train-loss": float(result.loss),
            "windows-per-second": float(result.windows_per_second),
        }),
        R.SITE: R.site_record(name, windows.ch_names, windows.sfreq),
    })
    return Message(content, reply_to=message)


def make_pretrain_client_app(override: PretrainConfig | None = None) -> ClientApp:
    """The pretraining ClientApp; ``override`` replaces Flower's run config."""
    client = ClientApp()

    @client.train()
    def _train(message: Message, context: Context) -> Message:
        return handle_pretrain(message, context, override)

    return client


# ------------------------------------------------------------------------------------------------ server
def run_pretrain_federation(
    grid: Grid,
    cfg: PretrainConfig,
    *,
    n_sites: int,
    on_round: Callable[[dict], None] | None = None,
    node_timeout: float = 120.0,
) -> PretrainResult:
    """Run ``cfg.rounds`` rounds of federated pretraining over the sites connected to ``grid``.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid the ServerApp was given.
    cfg : PretrainConfig
        The run's configuration.
    n_sites : int
        Sites to wait for before the first round.
    on_round : callable | None
        Called with each round's record (``round``, ``loss``, ``seconds``,
        ``windows_per_second``, ``sites_answered``, ``rejected``, bytes).
    node_timeout : float
        Seconds to wait for the sites to connect.

    Returns
    -------
    result : PretrainResult
        With the averaged pretrainer.

    Raises
    ------
    RuntimeError
        If no round got a single valid update (nothing was pretrained).
    """
    model = build_pretrainer(cfg)
    global_arrays = {k: v.numpy() for k, v in model.exchange_state_dict().items()}
    nodes = _wait_for_nodes(grid, n_sites, node_timeout)
    logger.info("%d sites connected; %d rounds of federated pretraining (%s)", len(nodes), cfg.rounds, cfg.backbone)
    site_names: dict[int, str] = {}
    site_windows: dict[str, int] = {}
    history: list[dict] = []
    merged_rounds = 0
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        down = R.state_to_record(R.numpy_to_state(global_arrays))
        content = RecordDict({R.ARRAYS: down, R.CONFIG: ConfigRecord({"server-round": rnd})})
        updates, losses, rejected, up_sizes = [], [], [], []
        for reply in _broadcast(grid, nodes, content, MessageType.TRAIN, rnd):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                rejected.append({"site": site_names.get(nid, str(nid)), "reason": reply.error.reason})
                logger.warning("Round %d: site %s failed: %s", rnd, site_names.get(nid, nid), reply.error.reason)
                continue
            name = str(site_names.get(nid, nid))
            try:
                name = str(reply.content.config_records[R.SITE]["name"])
                site_names[nid] = name
                arrays = reply.content.array_records[R.ARRAYS]
                update = R.record_to_numpy(arrays)
                check_update(update, global_arrays, site=name)
                m = reply.content.metric_records[R.METRICS]
                n, loss = int(m["num-examples"]), float(m["train-loss"])
                if n <= 0 or not np.isfinite(loss):
                    raise UpdateRejected(f"Update from site {name!r} rejected: num-examples {n}, train-loss {loss}.")
            except (UpdateRejected, ValueError, KeyError, TypeError) as exc:
                rejected.append({"site": name, "reason": str(exc)})
                logger.warning("Round %d: %s", rnd, exc)
                continue
            site_windows[name] = n
            updates.append((update, float(n)))
            losses.append((loss, n))
            up_sizes.append(arrays.count_bytes())
        if updates:
            global_arrays = weighted_average(updates)
            merged_rounds += 1
        else:
            logger.error("Round %d: no valid update from any site; the global weights are unchanged.", rnd)
        seconds = time.perf_counter() - t0
        n_round = sum(n for _, n in losses)
        rec = {
            "round": rnd,
            "loss": float(sum(l * n for l, n in losses) / n_round) if n_round else float("nan"),
            "seconds": round(seconds, 3),
            "windows_per_second": round(n_round * cfg.local_epochs / seconds, 1) if seconds > 0 else 0.0,
            "sites_answered": len(updates),
            "rejected": rejected,
            "bytes_up_per_site": int(np.mean(up_sizes)) if up_sizes else 0,
            "bytes_down_per_site": int(down.count_bytes()),
        }
        logger.info("Round %d: loss %.4f from %d site(s), %d rejected", rnd, rec["loss"], len(updates), len(rejected))
        history.append(rec)
        if on_round:
            on_round(rec)
    if not merged_rounds:
        raise RuntimeError("Federated pretraining got no valid update from any site in any round; nothing was "
                           "pretrained (see the sites' errors above).")
    model.load_exchange_state_dict(R.numpy_to_state(global_arrays))
    return PretrainResult(model, history, sum(site_windows.values()), dict(sorted(site_windows.items())), "federated",
                          extra={"rounds_merged": merged_rounds})


def make_pretrain_server_app(
    override: PretrainConfig | None = None,
    *,
    n_sites: int | None = None,
    results: list | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> ServerApp:
    """The pretraining ServerApp.

    Parameters
    ----------
    override : PretrainConfig | None
        Replaces Flower's run config; None reads ``context.run_config``
        (``[tool.flwr.app.config]`` holding :class:`PretrainConfig` keys).
    n_sites : int | None
        Sites to wait for; None = ``cfg.sites`` (3 for the eegmat year split).
    results : list | None
        The PretrainResult is appended here (in-process callers); without it
        the ServerApp writes ``cfg.out`` itself.
    on_round : callable | None
        Progress callback.
    """
    def write(cfg: PretrainConfig, result: PretrainResult, wall_seconds: float) -> None:
        from ..pretrain import write_pretrain_outputs

        write_pretrain_outputs(cfg, result, wall_seconds=wall_seconds)

    return server_app_for(lambda context: override if override is not None else PretrainConfig.from_mapping(dict(context.run_config)),
                          run_pretrain_federation, write, n_sites=n_sites, results=results, on_round=on_round)


# ------------------------------------------------------------------------------------------- simulation
def run_pretrain_simulation(
    cfg: PretrainConfig,
    *,
    n_sites: int,
    on_round: Callable[[dict], None] | None = None,
    cpus_per_site: float = 1.0,
    verbose: bool = False,
) -> PretrainResult:
    """Run federated pretraining in Flower's simulation engine with ``n_sites`` virtual SuperNodes.

    Parameters
    ----------
    cfg : PretrainConfig
        The run; every simulated site builds the same pretrainer from it.
    n_sites : int
        Virtual SuperNodes (one per site, partition-id = site index).
    on_round : callable | None
        Progress callback, called with each round's record.
    cpus_per_site : float
        Ray CPUs each ClientApp actor holds (and its torch threads).
    verbose : bool
        Show Flower's and Ray's INFO logs.

    Returns
    -------
    result : PretrainResult
    """
    from .simulation import run_apps_in_simulation

    results: list[PretrainResult] = []
    server_app = make_pretrain_server_app(cfg, n_sites=n_sites, results=results, on_round=on_round)
    client_app = make_pretrain_client_app(cfg)
    run_apps_in_simulation(server_app, client_app, n_sites=n_sites, device=cfg.device, cpus_per_site=cpus_per_site,
                           verbose=verbose)
    if not results:
        raise RuntimeError("The federated pretraining simulation ended without a result; run with --verbose to see Flower's log.")
    return results[0]


#: Apps for ``flwr run`` (point ``[tool.flwr.app.components]`` here, with PretrainConfig keys in
#: ``[tool.flwr.app.config]``).
serverapp = make_pretrain_server_app()
clientapp = make_pretrain_client_app()

__all__ = [
    "REPLY_METRICS",
    "handle_pretrain",
    "make_pretrain_client_app",
    "make_pretrain_server_app",
    "run_pretrain_federation",
    "run_pretrain_simulation",
]
