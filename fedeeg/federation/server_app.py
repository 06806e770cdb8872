"""FedEEG ServerApp: drives federated rounds on Flower's Message API.

Each round: send the global trainable tensors to every site, check each reply
(names, shapes, dtypes, finite values) before merging, merge by the
example-weighted mean (see :mod:`fedeeg.aggregation`), then ask every site to
evaluate the new global model on its held-out subjects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..aggregation import UpdateRejected, check_update, weighted_average
from ..config import RunConfig
from ..experiment import RunResult, build_model, round_record, run_labels
from ..metrics import pool_metrics
from . import records as R

logger = logging.getLogger(__name__)


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes[:n] if n else nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"Only {len(nodes)} of the {n} sites connected within {timeout:.0f} s.")
        time.sleep(0.5)


def _broadcast(grid: Grid, nodes: list[int], content: RecordDict, message_type: str, rnd: int) -> list[Message]:
    messages = [Message(content, dst_node_id=nid, message_type=message_type, group_id=str(rnd)) for nid in nodes]
    return list(grid.send_and_receive(messages))


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    *,
    n_sites: int,
    on_round: Callable[[dict], None] | None = None,
    node_timeout: float = 120.0,
) -> RunResult:
    """Run ``cfg.rounds`` federated rounds over the sites connected to ``grid``.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid the ServerApp was given.
    cfg : RunConfig
        The run's configuration.
    n_sites : int
        Sites to wait for before the first round.
    on_round : callable | None
        Called with each round's record (progress display).
    node_timeout : float
        Seconds to wait for the sites to connect.

    Returns
    -------
    result : RunResult
        With the global model under ``models["global"]``.
    """
    label_names = run_labels(cfg)
    model = build_model(cfg, n_outputs=len(label_names))
    from ..models import load_trainable_state_dict, trainable_state_dict

    global_arrays = {k: v.numpy() for k, v in trainable_state_dict(model).items()}
    nodes = _wait_for_nodes(grid, n_sites, node_timeout)
    logger.info("%d sites connected; %d rounds of %s", len(nodes), cfg.rounds, cfg.strategy)
    site_names: dict[int, str] = {}
    site_info: dict[str, dict] = {}
    history: list[dict] = []
    bytes_up: list[float] = []
    bytes_down: list[float] = []
    per_site: dict[str, dict] = {}
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        down = R.state_to_record(R.numpy_to_state(global_arrays))
        content = RecordDict({R.ARRAYS: down, R.CONFIG: ConfigRecord({"server-round": rnd})})
        replies = _broadcast(grid, nodes, content, MessageType.TRAIN, rnd)
        updates, losses, rejected, up_sizes = [], [], [], []
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error():
                rejected.append({"site": site_names.get(nid, str(nid)), "reason": reply.error.reason})
                logger.warning("Round %d: site %s failed: %s", rnd, site_names.get(nid, nid), reply.error.reason)
                continue
            name = str(reply.content.config_records[R.SITE]["name"])
            site_names[nid] = name
            site_info[name] = {
                "ch_names": list(reply.content.config_records[R.SITE]["ch-names"]),
                "sfreq": float(reply.content.config_records[R.SITE]["sfreq"]),
            }
            arrays = reply.content.array_records[R.ARRAYS]
            try:
                update = R.record_to_numpy(arrays)
                check_update(update, global_arrays, site=name)
            except (UpdateRejected, ValueError, KeyError) as exc:
                rejected.append({"site": name, "reason": str(exc)})
                logger.warning("Round %d: %s", rnd, exc)
                continue
            m = reply.content.metric_records[R.METRICS]
            site_info[name]["train_windows"] = int(m["num-examples"])
            updates.append((update, float(m["num-examples"])))
            losses.append((float(m["train-loss"]), int(m["num-examples"])))
            up_sizes.append(arrays.count_bytes())
        if updates:
            global_arrays = weighted_average(updates)
        else:
            logger.error("Round %d: no valid update from any site; the global model is unchanged.", rnd)
        bytes_down.append(float(down.count_bytes()))
        bytes_up.extend(float(s) for s in up_sizes)

        content = RecordDict({R.ARRAYS: R.state_to_record(R.numpy_to_state(global_arrays)),
                              R.CONFIG: ConfigRecord({"server-round": rnd})})
        per_site = {}
        for reply in _broadcast(grid, nodes, content, MessageType.EVALUATE, rnd):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("Round %d: evaluation at site %s failed: %s", rnd, site_names.get(nid, nid), reply.error.reason)
                continue
            name = str(reply.content.config_records[R.SITE]["name"])
            per_site[name] = R.metric_record_to_eval(reply.content.metric_records[R.METRICS])
            if name in site_info:
                site_info[name]["test_windows"] = per_site[name]["n_windows"]
        per_site = dict(sorted(per_site.items()))
        if not per_site:
            raise RuntimeError(f"Round {rnd}: no site could evaluate the global model; see the sites' errors above.")
        rec = round_record(rnd, per_site, losses, time.perf_counter() - t0,
                            sites_answered=len(updates), rejected=rejected,
                            bytes_up_per_site=int(np.mean(up_sizes)) if up_sizes else 0,
                            bytes_down_per_site=int(down.count_bytes()))
        history.append(rec)
        if on_round:
            on_round(rec)
    load_trainable_state_dict(model, R.numpy_to_state(global_arrays))
    first = next(iter(site_info.values()), {"ch_names": [], "sfreq": 200.0})
    return RunResult(
        history=history,
        per_site=per_site,
        test=pool_metrics(list(per_site.values())),
        models={"global": model},
        communication={
            "bytes_up_per_site_per_round": int(np.mean(bytes_up)) if bytes_up else 0,
            "bytes_down_per_site_per_round": int(np.mean(bytes_down)) if bytes_down else 0,
        },
        sites={name: {k: v for k, v in info.items() if k.endswith("_windows")} for name, info in sorted(site_info.items())},
        channels=tuple(first["ch_names"]),
        sfreq=first["sfreq"],
        label_names=label_names,
    )


def make_server_app(
    override: RunConfig | None = None,
    *,
    n_sites: int | None = None,
    results: list | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> ServerApp:
    """The ServerApp.

    Parameters
    ----------
    override : RunConfig | None
        Replaces Flower's run config (``fedeeg simulate``); None reads
        ``context.run_config`` (``flwr run .``).
    n_sites : int | None
        Sites to wait for; None = ``cfg.sites`` (3 for the eegmat year split).
    results : list | None
        The RunResult is appended here (in-process callers).
    on_round : callable | None
        Progress callback.
    """
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = override if override is not None else RunConfig.from_mapping(dict(context.run_config))
        sites = n_sites or (3 if cfg.dataset == "eegmat" and cfg.split == "year" else cfg.sites)
        start = time.perf_counter()
        result = run_federation(grid, cfg, n_sites=sites, on_round=on_round)
        if results is not None:
            results.append(result)
        elif cfg.out:  # `flwr run .`: nobody else will write the outputs
            from ..outputs import write_outputs

            write_outputs(cfg, result, wall_seconds=time.perf_counter() - start)

    return server


#: The ServerApp that ``flwr run .`` loads (pyproject ``[tool.flwr.app.components]``).
app = make_server_app()
