"""FedEEG ClientApp: trains the shared model's trainable tensors on one site's EEG.

Only the trainable tensors (LoRA adapter + head, or the full weights under the
``full`` strategy) and aggregate metrics leave the site; under ``secure`` only
a masked, fixed-point update whose sum alone the server can read
(:mod:`fedeeg.federation.secure`).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from contextlib import contextmanager

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import RunConfig
from . import records as R

logger = logging.getLogger(__name__)

#: Error code for a failure inside our ClientApp (Flower reserves small codes).
CLIENT_ERROR_CODE = 1001

_MODEL_CACHE: dict = {}
#: The local (personalised) tensors' initial values, per cached model: a site's first round starts from them.
_INITIAL_LOCAL: dict = {}


def _config(context: Context, override: RunConfig | None) -> RunConfig:
    return override if override is not None else RunConfig.from_mapping(dict(context.run_config))


def _site_index(context: Context, n_sites: int) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError(
            "This SuperNode's node config has no 'partition-id': in simulation Flower sets it; "
            "in deployment start the client with `fedeeg client start --config site.toml`."
        )
    pid = int(context.node_config["partition-id"])
    if not 0 <= pid < n_sites:
        raise ValueError(f"partition-id {pid} is out of range: the run has {n_sites} sites (0..{n_sites - 1}).")
    return pid


def _model(cfg: RunConfig, n_outputs: int):
    """One model per actor process, reused across rounds (rebuilding costs seconds).

    Keyed on the whole (frozen) run config: every message of a run carries the same one.
    """
    key = (cfg, n_outputs)
    if key not in _MODEL_CACHE:
        from ..experiment import build_model

        from ..models import trainable_state_dict
        from ..personalisation import enable_local_training, local_parameter_names

        _MODEL_CACHE.clear()
        model = build_model(cfg, n_outputs=n_outputs)
        enable_local_training(model, cfg.personalise)
        local = set(local_parameter_names(model, cfg.personalise))
        _INITIAL_LOCAL.clear()
        _INITIAL_LOCAL[key] = {k: v.numpy() for k, v in trainable_state_dict(model).items() if k in local}
        _MODEL_CACHE[key] = model
    return _MODEL_CACHE[key]


def _local_store(cfg: RunConfig):
    """Where a site's local tensors wait between rounds (personalise != 'none')."""
    import tempfile
    from pathlib import Path

    from ..personalisation import LocalStateStore

    return LocalStateStore(Path(cfg.out or tempfile.gettempdir()) / ".local_state")


def _load_for_site(model, cfg: RunConfig, record, site_name: str) -> None:
    """Load the server's shared tensors plus this site's own local ones (if any) into the model."""
    from ..models import load_trainable_state_dict
    from ..personalisation import merge_state

    shared = R.record_to_state(record)
    if cfg.personalise != "none":
        import torch

        initial = next(iter(_INITIAL_LOCAL.values()))  # one cached model (and its initial local tensors) per process
        local = _local_store(cfg).load(site_name, default=initial)

        shared = merge_state(shared, {k: torch.as_tensor(v) for k, v in local.items()})
    load_trainable_state_dict(model, shared)


def _set_threads() -> None:
    import torch

    n = int(os.environ.get("FEDEEG_CLIENT_THREADS", "1"))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def handle(message: Message, context: Context, override: RunConfig | None, action: str) -> Message:
    """Answer one message at this site; any failure becomes a clear error reply.

    ``action`` is ``"train"``, ``"evaluate"`` or a secure-aggregation stage
    (:data:`fedeeg.federation.secure.ACTIONS`).
    """
    try:
        return _handle(message, context, override, action)
    except Exception as exc:  # a daemon survives a bad round: the server gets the reason
        logger.error("%s failed: %s", action, exc)
        logger.debug("%s", traceback.format_exc())
        return Message(Error(code=CLIENT_ERROR_CODE, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)


@contextmanager
def _rolora_phase(model, cfg: RunConfig, server_round: int):
    """Under ``rolora``, train only this round's LoRA matrix (and the head); restore the flags after."""
    if cfg.strategy != "rolora":
        yield
        return
    from ..aggregation import rolora_phase

    phase = rolora_phase(server_round)
    frozen = ".lora_A." if phase == "B" else ".lora_B."
    flipped = [p for n, p in model.named_parameters() if frozen in n and p.requires_grad]
    for p in flipped:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in flipped:
            p.requires_grad_(True)


def train_local(cfg: RunConfig, message: Message, pid: int, site, *,
                evaluation: dict | None = None) -> tuple[dict, dict, object]:
    """Load the server's tensors, train this round's tensors on the site's windows.

    Parameters
    ----------
    evaluation : dict | None
        If given, the received global model is first evaluated on the site's
        held-out windows and :func:`fedeeg.training.evaluate`'s numbers are
        put in this dict, with the evaluation's ``seconds`` (the server asked
        with ``evaluate-first``).

    Returns
    -------
    global_arrays : dict of str to ndarray
        The tensors the server sent (all trainable ones).
    trained : dict of str to ndarray
        The tensors that trained this round (all, or this round's half under ``rolora``).
    result : fedeeg.training.TrainResult
    """
    from ..models import trainable_state_dict
    from ..training import evaluate, resolve_device, train_epochs

    model = _model(cfg, len(site.train.label_names))
    if R.ARRAYS not in message.content.array_records:
        raise ValueError(f"The server's training message carries no '{R.ARRAYS}' ArrayRecord.")
    record = message.content.array_records[R.ARRAYS]
    _load_for_site(model, cfg, record, site.name)
    global_arrays = R.record_to_numpy(record)
    if evaluation is not None:  # the global model as received, as an evaluate message would see it
        t0 = time.perf_counter()
        evaluation.update(evaluate(model, site.test, device=cfg.device))
        evaluation["seconds"] = time.perf_counter() - t0
    server_round = int(message.content.config_records.get(R.CONFIG, ConfigRecord()).get("server-round", 0))
    with _rolora_phase(model, cfg, server_round):
        result = train_epochs(
            model, site.train, epochs=cfg.local_epochs, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed * 100_003 + server_round * 101 + pid,
            compile=cfg.compile_for(resolve_device(cfg.device)),
        )
        trained = {k: v.numpy() for k, v in trainable_state_dict(model).items()}
    if cfg.personalise != "none":
        from ..personalisation import local_parameter_names, split_state

        trained, local = split_state(trained, local_parameter_names(model, cfg.personalise))
        _local_store(cfg).save(site.name, local)
    return global_arrays, trained, result


def _handle(message: Message, context: Context, override: RunConfig | None, action: str) -> Message:
    from ..experiment import prepare_site
    from ..training import evaluate
    from . import secure

    _set_threads()
    cfg = _config(context, override)
    pid = _site_index(context, cfg.federated_sites)
    if action == "query":  # the server maps nodes to partition ids (partial participation); no data is loaded
        return Message(RecordDict({R.SITE: ConfigRecord({"partition-id": pid})}), reply_to=message)
    R.check_backbone(message.content.config_records.get(R.CONFIG), cfg.checkpoint)  # before any data is loaded
    site = prepare_site(cfg, pid)  # this site only, loaded lazily
    if action in secure.ACTIONS:
        if not cfg.secure:
            raise ValueError(f"The server sent a secure-aggregation message ({action}) but this run's config has "
                             f"secure=False; both sides must run the same config.")
        return secure.client_stage(message, context, cfg, action, pid, site)
    site_rec = R.site_record(site.name, site.train.ch_names, site.train.sfreq)
    if action == "train":
        if cfg.secure:
            raise ValueError("This run has secure=True: the site answers only secure-aggregation messages for "
                             "training, never plain updates.")
        secure.check_failure(cfg, pid, "train", site.name)
        round_cfg = message.content.config_records.get(R.CONFIG, ConfigRecord())
        evaluation = {} if bool(round_cfg.get(R.EVALUATE_FIRST, False)) else None
        global_arrays, trained, result = train_local(cfg, message, pid, site, evaluation=evaluation)
        if cfg.clip > 0:
            from ..aggregation import clip_update

            trained, norm = clip_update(trained, global_arrays, cfg.clip)
            if norm > cfg.clip:
                logger.info("%s: update norm %.4g clipped to %g", site.name, norm, cfg.clip)
        secure.check_failure(cfg, pid, "upload", site.name)
        content = RecordDict({
            R.ARRAYS: R.state_to_record(R.numpy_to_state(trained)),
            R.METRICS: MetricRecord({
                "num-examples": result.n_examples,
                "train-loss": result.loss,
                "windows-per-second": result.windows_per_second,
            }),
            R.SITE: site_rec,
        })
        if evaluation is not None:
            content[R.EVALUATION] = R.eval_to_metric_record(evaluation)
            content[R.EVALUATION]["seconds"] = float(evaluation["seconds"])
    else:
        model = _model(cfg, len(site.train.label_names))
        if R.ARRAYS not in message.content.array_records:
            raise ValueError(f"The server's {action} message carries no '{R.ARRAYS}' ArrayRecord.")
        _load_for_site(model, cfg, message.content.array_records[R.ARRAYS], site.name)
        metrics = evaluate(model, site.test, device=cfg.device)
        content = RecordDict({R.METRICS: R.eval_to_metric_record(metrics), R.SITE: site_rec})
    return Message(content, reply_to=message)


def make_client_app(override: RunConfig | None = None) -> ClientApp:
    """The ClientApp; ``override`` replaces Flower's run config (used by ``fedeeg simulate``)."""
    client = ClientApp()

    @client.train()
    def _train(message: Message, context: Context) -> Message:
        return handle(message, context, override, "train")

    @client.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return handle(message, context, override, "evaluate")

    @client.query()
    def _query(message: Message, context: Context) -> Message:
        return handle(message, context, override, "query")

    # Secure aggregation: one train.<action> message per stage (see fedeeg.federation.secure).
    def _stage(action: str):
        def fn(message: Message, context: Context) -> Message:
            return handle(message, context, override, action)

        fn.__name__ = f"_{action}"
        return fn

    from .secure import ACTIONS

    for action in ACTIONS:
        client.train(action)(_stage(action))

    return client


#: The ClientApp that ``flwr run .`` loads (pyproject ``[tool.flwr.app.components]``).
app = make_client_app()
