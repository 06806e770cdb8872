"""FedEEG ServerApp: drives federated rounds on Flower's Message API.

Each round: send the global trainable tensors to every site, check each reply
(names, shapes, dtypes, finite values, the norm bound ``clip``) before merging,
merge by the example-weighted mean or a robust rule (see
:mod:`fedeeg.aggregation`), then ask every site to evaluate the new global
model on its held-out subjects. With ``secure``, training goes through the four
secure-aggregation stages instead (:mod:`fedeeg.federation.secure`): the server
only learns the sum; a round with too few survivors fails cleanly (logged, the
global model kept) and the next round proceeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..aggregation import UpdateRejected, aggregate, check_norm, check_update, travelling_names
from ..config import RunConfig
from ..experiment import RunResult, build_model, complete_evaluation, round_record, run_labels
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


def _partition_ids(send: Callable[..., list[Message]], grid: Grid, nodes: list[int]) -> dict[int, int]:
    """Ask every node for its partition id (a QUERY message; the sites load no data to answer)."""
    out = {}
    for reply in send(grid, nodes, RecordDict({}), MessageType.QUERY, 0):
        if reply.has_error():
            raise RuntimeError(f"Site {reply.metadata.src_node_id} did not give its partition id: {reply.error.reason}")
        out[reply.metadata.src_node_id] = int(reply.content.config_records[R.SITE]["partition-id"])
    return out


def _broadcast(grid: Grid, nodes: list[int], content: RecordDict, message_type: str, rnd: int,
               timeout: float = 0.0) -> list[Message]:
    messages = [Message(content, dst_node_id=nid, message_type=message_type, group_id=str(rnd)) for nid in nodes]
    return list(grid.send_and_receive(messages, timeout=timeout or None))


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    *,
    n_sites: int,
    on_round: Callable[[dict], None] | None = None,
    node_timeout: float = 120.0,
    broadcast: Callable[..., list[Message]] | None = None,
    resume: tuple[int, dict, list[dict]] | None = None,
    on_checkpoint: Callable[[int, dict, dict], None] | None = None,
    roster: dict[int, bytes] | None = None,
    site_names: dict[int, str] | None = None,
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
        Called with each round's record (progress display) once it is
        complete: with ``evaluate_in='next-train'`` an evaluated round's record
        is complete when the next round's training replies bring its metrics.
    node_timeout : float
        Seconds to wait for the sites to connect.
    broadcast : callable | None
        Sends a round's messages and returns the replies, called as
        ``broadcast(grid, nodes, content, message_type, rnd)``; None: ask
        ``nodes`` and wait for all (deployment: quorum and deadline, see
        :mod:`fedeeg.federation.deployment`).
    resume : (int, dict, list) | None
        Continue after a checkpoint: the last round done, the global arrays
        then and the rounds' records so far (the last one may still be marked
        ``evaluation_pending``: its sites then evaluate it with the next round).
    on_checkpoint : callable | None
        Called after each round as ``on_checkpoint(rnd, global_arrays, history)``
        with the rounds' records so far; the last one is marked
        ``evaluation_pending`` while its held-out metrics are still to come.
    roster : dict of int to bytes | None
        Secure aggregation: the sites' raw Ed25519 identity public keys by
        protocol id (deployment: :func:`fedeeg.deploy.roster.registry_public_keys`);
        None: the keys derived from the run's seed (simulation).
    site_names : dict of int to str | None
        Node id -> site name known before the first reply (deployment: the
        registered names), so that a site whose very first reply is an error
        is still named in the logs and the round records.

    Returns
    -------
    result : RunResult
        With the global model under ``models["global"]``.
    """
    label_names = run_labels(cfg)
    model = build_model(cfg, n_outputs=len(label_names))
    from ..models import load_trainable_state_dict, trainable_state_dict

    from ..personalisation import enable_local_training, local_parameter_names

    enable_local_training(model, cfg.personalise)
    local_names = set(local_parameter_names(model, cfg.personalise))
    global_arrays = {k: v.numpy() for k, v in trainable_state_dict(model).items()}
    initial_local = {k: v for k, v in global_arrays.items() if k in local_names}  # stay at the sites
    global_arrays = {k: v for k, v in global_arrays.items() if k not in local_names}
    nodes = _wait_for_nodes(grid, n_sites, node_timeout)
    logger.info("%d sites connected; %d rounds of %s", len(nodes), cfg.rounds, cfg.strategy)
    site_names = dict(site_names or {})
    site_info: dict[str, dict] = {}
    history: list[dict] = []
    bytes_up: list[float] = []
    bytes_down: list[float] = []
    per_site: dict[str, dict] = {}
    start = 1
    if resume is not None:  # deployment: continue after the last checkpointed round
        start, global_arrays, history = resume[0] + 1, dict(resume[1]), list(resume[2])
    if broadcast is None:
        def send(grid_, nodes_, content_, message_type_, rnd_):
            return _broadcast(grid_, nodes_, content_, message_type_, rnd_, timeout=cfg.reply_timeout)
    else:
        send = broadcast
    by_pid = None
    if cfg.sites_per_round or cfg.dropout > 0:  # partial participation: sample partition ids, map them to nodes
        by_pid = {pid: nid for nid, pid in _partition_ids(send, grid, nodes).items()}
    accountant = None
    if cfg.secure:
        from ..secagg import RdpAccountant

        accountant = RdpAccountant(cfg.dp_delta) if cfg.dp_sigma > 0 else None
        for rec in history:  # resumed: the rounds already released count
            if accountant is not None and rec.get("secure", {}).get("dp"):
                accountant.step(rec["secure"]["dp"]["noise_multiplier"])
        logger.info("Secure aggregation: clip %g, DP noise multiplier %g, threshold %s, neighbours %s",
                    cfg.norm_bound, cfg.dp_sigma, cfg.secagg_threshold, cfg.secagg_neighbours or "auto")
    fold = cfg.evaluates_with_next_train and by_pid is None
    # the records whose global model the sites evaluate with this round's training message (evaluate_in='next-train');
    # more than one only after rounds that changed nothing (skipped), so they all share that model
    pending = [h for h in history if h.get("evaluation_pending")]
    for rnd in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        extra: dict = {}
        round_nodes = eval_nodes = nodes
        if by_pid is not None:
            from ..scenarios import round_participants

            sampled, dropped = round_participants(rnd, cfg)
            round_nodes = [by_pid[i] for i in sampled if i not in set(dropped)]
            eval_nodes = nodes if rnd == cfg.rounds else (round_nodes or [by_pid[i] for i in sampled])
            extra.update(sampled=len(sampled), dropped=len(dropped), evaluated=len(eval_nodes))
        if cfg.secure:
            from .secure import secure_round

            outcome = secure_round(grid, round_nodes, cfg, global_arrays, rnd, accountant=accountant, roster=roster)
            for name, info in outcome.site_info.items():
                site_info.setdefault(name, {}).update(info)
            site_names.update(outcome.node_names)
            if outcome.arrays is not None:
                global_arrays = outcome.arrays
            losses, rejected = outcome.losses, outcome.rejected
            up_sizes = list(outcome.bytes_up.values())
            down_size = outcome.bytes_down
            n_answered = outcome.info.get("survivors", 0) if outcome.arrays is not None else 0
            extra["secure"] = outcome.info
            if outcome.failed:
                extra["failed"] = outcome.failed
        else:
            global_arrays, losses, rejected, up_sizes, down_size, n_answered, replies = _plain_round(
                send, grid, round_nodes, cfg, global_arrays, rnd, site_names, site_info,
                evaluate_first=bool(pending))
            if pending:  # the previous round's held-out metrics came with this round's updates
                pending = _settle_pending(pending, replies, n_answered, rnd, site_names, site_info, on_round)
        bytes_down.append(float(down_size))
        bytes_up.extend(float(s) for s in up_sizes)

        evaluate_now = cfg.evaluates_after(rnd)
        defer = evaluate_now and fold and rnd < cfg.rounds
        per_site = {}
        if evaluate_now and not defer:  # the global model is packed only for a round whose sites evaluate it now
            content = RecordDict({R.ARRAYS: R.state_to_record(R.numpy_to_state(global_arrays)),
                                  R.CONFIG: R.round_config(rnd, cfg.checkpoint)})
            eval_replies = send(grid, eval_nodes, content, MessageType.EVALUATE, rnd)
            per_site = _evaluations(eval_replies, rnd, R.METRICS, site_names, site_info)
            for rec in pending:  # still waiting after rounds that changed nothing: the same global model
                complete_evaluation(rec, per_site)
                if on_round:
                    on_round(rec)
            pending = []
        rec = round_record(rnd, per_site, losses, time.perf_counter() - t0,
                            sites_answered=n_answered, rejected=rejected,
                            bytes_up_per_site=int(np.mean(up_sizes)) if up_sizes else 0,
                            bytes_down_per_site=int(down_size), **extra)
        if defer:
            rec["evaluation_pending"] = True
            pending.append(rec)
            logger.info("Round %d trained (loss %.4g); the sites evaluate its global model with round %d's training.",
                        rnd, rec["train_loss"], rnd + 1)
        history.append(rec)
        if on_round and not defer:
            on_round(rec)
        if on_checkpoint:
            on_checkpoint(rnd, global_arrays, history)
    load_trainable_state_dict(model, R.numpy_to_state({**global_arrays, **initial_local}))
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
        extra=_secure_summary(cfg, history, accountant) if cfg.secure else {},
    )


def _secure_summary(cfg: RunConfig, history: list[dict], accountant) -> dict:
    """The secure run's facts for summary.json."""
    done = [h for h in history if not h.get("failed")]
    out = {
        "rounds_completed": len(done),
        "rounds_failed": [h["round"] for h in history if h.get("failed")],
        "clip": cfg.norm_bound,
        "max_decode_error_bound": max((h["secure"]["decode_error_bound"] for h in done if "secure" in h), default=None),
        "dp_sigma": cfg.dp_sigma,
    }
    if accountant is not None:
        out.update(epsilon=accountant.epsilon, delta=accountant.delta)
    return {"secure_aggregation": out}


def _settle_pending(pending: list[dict], replies: list[Message], n_answered: int, rnd: int, site_names: dict,
                    site_info: dict, on_round: Callable[[dict], None] | None) -> list[dict]:
    """Complete the records waiting for their evaluation from round ``rnd``'s training replies; return those still waiting.

    Without any evaluation in the replies, the records keep waiting if no
    update was merged (the round was skipped: the next round's message brings
    the same global model), and are closed without held-out metrics otherwise.
    """
    evaluated = _evaluations(replies, pending[-1]["round"], R.EVALUATION, site_names, site_info, required=False)
    if not evaluated and n_answered == 0:
        logger.warning("Round %d: no site answered, so round %s's evaluation is asked for again with the next round.",
                       rnd, pending[-1]["round"])
        return pending
    if not evaluated:
        logger.warning("Round %d: no site sent its evaluation of round %s's global model; that round has no held-out "
                       "metrics.", rnd, pending[-1]["round"])
    for rec in pending:
        complete_evaluation(rec, evaluated)
        if on_round:
            on_round(rec)
    return []


def _evaluations(replies: list[Message], rnd: int, key: str, site_names: dict, site_info: dict, *,
                 required: bool = True) -> dict[str, dict]:
    """The sites' held-out metrics of round ``rnd``'s global model, by site name, from their replies' ``key`` record.

    Raises
    ------
    RuntimeError
        If ``required`` and no site could evaluate it.
    """
    per_site = {}
    for reply in replies:
        nid = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("Round %d: evaluation at site %s failed: %s", rnd, site_names.get(nid, nid), reply.error.reason)
            continue
        try:
            name = str(reply.content.config_records[R.SITE]["name"])
            per_site[name] = R.metric_record_to_eval(reply.content.metric_records[key])
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("Round %d: malformed evaluation reply from site %s ignored (missing or bad %s).",
                           rnd, site_names.get(nid, nid), exc)
            continue
        if name in site_info:
            site_info[name]["test_windows"] = per_site[name]["n_windows"]
    if not per_site and required:
        raise RuntimeError(f"Round {rnd}: no site could evaluate the global model; see the sites' errors above.")
    return dict(sorted(per_site.items()))


def _plain_round(send: Callable[..., list[Message]], grid: Grid, nodes: list[int], cfg: RunConfig,
                 global_arrays: dict, rnd: int, site_names: dict, site_info: dict, *, evaluate_first: bool = False):
    """One training round with updates in the clear: check each, merge with ``cfg.aggregation``.

    Under ``rolora`` only this round's half of the adapter (and the head) is
    expected back and merged; the other half keeps its global value. With
    ``evaluate_first`` the sites also evaluate the global model they receive
    (the previous round's) before training; the replies are returned for it.
    """
    travel = travelling_names(global_arrays, cfg.strategy, rnd)
    reference = {k: global_arrays[k] for k in travel}
    down = R.state_to_record(R.numpy_to_state(global_arrays))
    content = RecordDict({R.ARRAYS: down, R.CONFIG: R.round_config(rnd, cfg.checkpoint, evaluate_first=evaluate_first)})
    replies = send(grid, nodes, content, MessageType.TRAIN, rnd)
    updates, losses, rejected, up_sizes = [], [], [], []
    for reply in replies:
        nid = reply.metadata.src_node_id
        if reply.has_error():
            rejected.append({"site": site_names.get(nid, str(nid)), "reason": reply.error.reason})
            logger.warning("Round %d: site %s failed: %s", rnd, site_names.get(nid, nid), reply.error.reason)
            continue
        try:
            site_rec = reply.content.config_records[R.SITE]
            name = str(site_rec["name"])
            info = {"ch_names": list(site_rec["ch-names"]), "sfreq": float(site_rec["sfreq"])}
        except (KeyError, TypeError, ValueError) as exc:
            who = site_names.get(nid, str(nid))
            rejected.append({"site": who, "reason": f"malformed reply: missing or bad {exc}"})
            logger.warning("Round %d: site %s sent a malformed reply (missing or bad %s); ignored.", rnd, who, exc)
            continue
        site_names[nid] = name
        site_info[name] = info
        arrays = reply.content.array_records[R.ARRAYS]
        try:
            update = R.record_to_numpy(arrays)
            check_update(update, reference, site=name)
            check_norm(update, reference, cfg.norm_bound, site=name)
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
        global_arrays = {**global_arrays, **aggregate(updates, cfg.aggregation)}
    else:
        logger.error("Round %d: no valid update from any site; the global model is unchanged.", rnd)
    return global_arrays, losses, rejected, up_sizes, down.count_bytes(), len(updates), replies


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
    def write(cfg: RunConfig, result: RunResult, wall_seconds: float) -> None:
        from ..outputs import write_outputs

        write_outputs(cfg, result, wall_seconds=wall_seconds)

    return server_app_for(lambda context: override if override is not None else RunConfig.from_mapping(dict(context.run_config)),
                          run_federation, write, n_sites=n_sites, results=results, on_round=on_round)


def server_app_for(load_config: Callable, run: Callable, write: Callable, *, n_sites: int | None = None,
                   results: list | None = None, on_round: Callable[[dict], None] | None = None) -> ServerApp:
    """A ServerApp that loads its config, runs the federation and hands the result on (or writes it).

    Parameters
    ----------
    load_config : callable
        ``load_config(context) -> cfg`` (a RunConfig or PretrainConfig).
    run : callable
        ``run(grid, cfg, n_sites=..., on_round=...) -> result``.
    write : callable
        ``write(cfg, result, wall_seconds)``: used under ``flwr run`` (no
        ``results`` list), where nobody else writes the outputs to ``cfg.out``.
    n_sites : int | None
        Sites to wait for; None = ``cfg.sites`` (3 for the eegmat year split).
    results : list | None
        The result is appended here (in-process callers).
    on_round : callable | None
        Progress callback.
    """
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = load_config(context)
        sites = n_sites or (3 if cfg.dataset == "eegmat" and cfg.split == "year" else cfg.sites)
        start = time.perf_counter()
        result = run(grid, cfg, n_sites=sites, on_round=on_round)
        if results is not None:
            results.append(result)
        elif cfg.out:
            write(cfg, result, time.perf_counter() - start)

    return server


#: The ServerApp that ``flwr run .`` loads (pyproject ``[tool.flwr.app.components]``).
app = make_server_app()
