"""FedEEG ClientApp: trains the shared model's trainable tensors on one site's EEG.

Only the trainable tensors (LoRA adapter + head, or the full weights under the
``full`` strategy) and aggregate metrics leave the site.
"""

from __future__ import annotations

import logging
import os
import traceback

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import RunConfig
from . import records as R

logger = logging.getLogger(__name__)

#: Error code for a failure inside our ClientApp (Flower reserves small codes).
CLIENT_ERROR_CODE = 1001

_MODEL_CACHE: dict = {}


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

        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = build_model(cfg, n_outputs=n_outputs)
    return _MODEL_CACHE[key]


def _set_threads() -> None:
    import torch

    n = int(os.environ.get("FEDEEG_CLIENT_THREADS", "1"))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def handle(message: Message, context: Context, override: RunConfig | None, action: str) -> Message:
    """Train or evaluate on this site; any failure becomes a clear error reply."""
    try:
        return _handle(message, context, override, action)
    except Exception as exc:  # a daemon survives a bad round: the server gets the reason
        logger.error("%s failed: %s", action, exc)
        logger.debug("%s", traceback.format_exc())
        return Message(Error(code=CLIENT_ERROR_CODE, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)


def _handle(message: Message, context: Context, override: RunConfig | None, action: str) -> Message:
    from ..experiment import prepare_sites
    from ..models import load_trainable_state_dict, trainable_state_dict
    from ..training import evaluate, train_epochs

    _set_threads()
    cfg = _config(context, override)
    sites = prepare_sites(cfg)
    pid = _site_index(context, len(sites))
    site = sites[pid]
    model = _model(cfg, len(site.train.label_names))
    if R.ARRAYS not in message.content.array_records:
        raise ValueError(f"The server's {action} message carries no '{R.ARRAYS}' ArrayRecord.")
    load_trainable_state_dict(model, message.content.array_records[R.ARRAYS].to_torch_state_dict())
    server_round = int(message.content.config_records.get(R.CONFIG, ConfigRecord()).get("server-round", 0))
    site_rec = R.site_record(site.name, site.train.ch_names, site.train.sfreq)
    if action == "train":
        result = train_epochs(
            model, site.train, epochs=cfg.local_epochs, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed * 100_003 + server_round * 101 + pid,
        )
        content = RecordDict({
            R.ARRAYS: R.state_to_record(trainable_state_dict(model)),
            R.METRICS: MetricRecord({
                "num-examples": result.n_examples,
                "train-loss": result.loss,
                "windows-per-second": result.windows_per_second,
            }),
            R.SITE: site_rec,
        })
    else:
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

    return client


#: The ClientApp that ``flwr run .`` loads (pyproject ``[tool.flwr.app.components]``).
app = make_client_app()
