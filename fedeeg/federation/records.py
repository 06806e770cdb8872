"""Conversions between FedEEG objects and Flower records, and what a site may send.

A site's reply carries exactly three records:

- ``arrays`` (ArrayRecord): the trainable tensors (LoRA adapter and head, or the
  full weights under ``full``);
- ``metrics`` (MetricRecord): aggregate scalars (counts, loss, metrics, a
  confusion matrix) — never per-window values;
- ``site`` (ConfigRecord): the site's name, channel names and sfreq.

A training reply may carry a fourth, ``evaluation`` (MetricRecord): the same
aggregate numbers as an evaluate reply's ``metrics``, for the global model the
message brought, and the evaluation's ``seconds``, when the server asked for
them (:data:`EVALUATE_FIRST`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

ARRAYS = "arrays"
METRICS = "metrics"
SITE = "site"
CONFIG = "config"
#: A training reply's evaluation of the global model it received (the previous round's).
EVALUATION = "evaluation"
#: Round-config key: evaluate the received global model before training, answer under :data:`EVALUATION`.
EVALUATE_FIRST = "evaluate-first"

METRIC_KEYS = ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")


#: Key of the packed layout (JSON, as uint8) in an ArrayRecord made by :func:`state_to_record`.
LAYOUT = "layout"
#: Prefix of the packed buffers, one per dtype (``packed.float32`` ...).
PACKED = "packed."


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Trainable tensors → ArrayRecord, packed into one flat buffer per dtype plus a layout.

    Flower moves every array of a record as its own signed object (one
    request each way per array), so an adapter of ~35 tensors costs ~35 round
    trips per message; packed, it costs two or three. The layout (``layout``:
    JSON ``[[name, dtype, shape], ...]`` as uint8) keeps the names and shapes;
    :func:`record_to_numpy` restores them and checks the sizes.
    """
    import json

    layout, buffers = [], {}
    for name, tensor in state.items():
        a = tensor.detach().cpu().contiguous().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        layout.append([str(name), a.dtype.str, list(a.shape)])
        buffers.setdefault(a.dtype.str, []).append(a.reshape(-1))
    arrays = {LAYOUT: np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy()}
    for dt, parts in buffers.items():
        arrays[PACKED + np.dtype(dt).name] = np.concatenate(parts) if parts else np.zeros(0, dtype=dt)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord → dict of numpy arrays (names kept); unpacks a record of :func:`state_to_record`.

    Raises
    ------
    ValueError
        If a packed record is malformed (bad layout, sizes that do not add up).
    """
    import json

    if LAYOUT not in record:  # a plain record, one array per tensor
        return {k: v.numpy() for k, v in record.items()}
    try:
        layout = json.loads(record[LAYOUT].numpy().astype(np.uint8).tobytes().decode())
        specs = [(str(n), np.dtype(d), tuple(int(x) for x in shape)) for n, d, shape in layout]
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"Malformed packed update: its '{LAYOUT}' is not a list of [name, dtype, shape] "
                         f"({err}).") from None
    buffers = {k[len(PACKED):]: record[k].numpy().reshape(-1) for k in record if k.startswith(PACKED)}
    unexpected = set(record) - {LAYOUT} - {PACKED + k for k in buffers}
    if unexpected:
        raise ValueError(f"Malformed packed update: unexpected arrays {sorted(unexpected)}; expected '{LAYOUT}' and "
                         f"'{PACKED}<dtype>' buffers only.")
    out, offsets = {}, dict.fromkeys(buffers, 0)
    for name, dt, shape in specs:
        buf = buffers.get(dt.name)
        if buf is None or buf.dtype != dt:
            raise ValueError(f"Malformed packed update: tensor {name!r} is {dt.name} but there is no "
                             f"'{PACKED}{dt.name}' buffer of that dtype.")
        n = int(np.prod(shape, dtype=np.int64))
        start = offsets[dt.name]
        if start + n > buf.size:
            raise ValueError(f"Malformed packed update: the '{PACKED}{dt.name}' buffer ({buf.size} values) is too "
                             f"short for the layout (tensor {name!r} ends at {start + n}).")
        out[name] = buf[start:start + n].reshape(shape)
        offsets[dt.name] = start + n
    for dt, used in offsets.items():
        if used != buffers[dt].size:
            raise ValueError(f"Malformed packed update: the '{PACKED}{dt}' buffer holds {buffers[dt].size} values "
                             f"but the layout uses {used}.")
    if len(out) != len(specs):
        raise ValueError("Malformed packed update: a tensor name appears twice in its layout.")
    return out


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord (packed or plain) → dict of CPU tensors."""
    return numpy_to_state(record_to_numpy(record))


def numpy_to_state(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def eval_to_metric_record(metrics: dict) -> MetricRecord:
    """Aggregate evaluation numbers of one site → MetricRecord."""
    rec = {k.replace("_", "-"): float(metrics[k]) for k in METRIC_KEYS}
    rec["num-examples"] = int(metrics["n_windows"])
    rec["confusion"] = [int(v) for v in np.asarray(metrics["confusion"]).ravel()]
    return MetricRecord(rec)


def metric_record_to_eval(rec: MetricRecord) -> dict:
    """Inverse of :func:`eval_to_metric_record`."""
    flat = np.asarray(rec["confusion"], dtype=np.int64)
    n = int(round(np.sqrt(flat.size)))
    if n * n != flat.size:
        raise ValueError(f"A site's confusion matrix has {flat.size} entries, which is not a square.")
    out = {k: float(rec[k.replace("_", "-")]) for k in METRIC_KEYS}
    out["n_windows"] = int(rec["num-examples"])
    out["confusion"] = flat.reshape(n, n).tolist()
    return out


#: Key of the round config that carries the sha256 of the coordinator's backbone checkpoint.
CHECKPOINT_SHA = "checkpoint-sha256"


def round_config(rnd: int, checkpoint: str = "", *, evaluate_first: bool = False) -> ConfigRecord:
    """The ``config`` record of a round's messages: ``server-round``, and the sha256 of the backbone checkpoint.

    ``evaluate_first`` (training messages): the sites evaluate the global
    model they receive (the previous round's) before they train, and send the
    numbers with their update (:data:`EVALUATION`), which saves the round an
    evaluate exchange of its own.

    With a checkpoint, every site checks that its own copy has the same
    sha256 before it trains or evaluates (:func:`check_backbone`), so no site
    silently adapts another model.
    """
    rec = ConfigRecord({"server-round": int(rnd)})
    if evaluate_first:
        rec[EVALUATE_FIRST] = True
    if checkpoint:
        from .._hashing import sha256_file_cached

        rec[CHECKPOINT_SHA] = sha256_file_cached(checkpoint)
    return rec


def check_backbone(config: ConfigRecord | None, checkpoint: str) -> None:
    """Raise ValueError when the coordinator's backbone sha256 (in ``config``) differs from this site's checkpoint's."""
    want = str((config or {}).get(CHECKPOINT_SHA, "") or "")
    if not want:
        return
    if not checkpoint:
        raise ValueError(f"The coordinator's run starts from a backbone checkpoint (sha256 {want[:12]}…) but this site "
                         "has none: set [deployment] checkpoint = \"PATH\" to the site's copy of that file.")
    from .._hashing import sha256_file_cached

    got = sha256_file_cached(checkpoint)
    if got != want:
        raise ValueError(f"This site's backbone checkpoint {checkpoint} has sha256 {got[:12]}…, but the coordinator's "
                         f"has {want[:12]}…: the site would adapt another model. Copy the coordinator's checkpoint file "
                         "to the path in [deployment] checkpoint (compare `sha256sum` on both sides).")


def site_record(name: str, ch_names, sfreq: float) -> ConfigRecord:
    return ConfigRecord({"name": str(name), "ch-names": [str(c) for c in ch_names], "sfreq": float(sfreq)})
