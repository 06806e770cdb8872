"""Secure aggregation on Flower's Message API: the stages of one round.

The protocol itself is Flower-free (:mod:`fedeeg.secagg`); this module carries
its messages. One secure round is four exchanges, each a ``train.<action>``
message to every site (``group_id`` = the round):

=====================  ==========================================  ===========================================
action                 server sends                                site answers
=====================  ==========================================  ===========================================
``secagg_advertise``   round, session nonce                        signed X25519 keys (+ site name, channels)
``secagg_share``       its neighbours' signed keys, threshold      Shamir shares encrypted to each neighbour
``secagg_input``       global tensors, the shares addressed to it  masked fixed-point update (uint32)
``secagg_unmask``      the survivor set                            the shares that remove the masks
=====================  ==========================================  ===========================================

What is aggregated: the change of each site's travelling tensors from the
global ones (a *delta*), clipped to ``cfg.norm_bound``, weighted by the site's
capped window count and, with ``dp_sigma``, noised — see
:mod:`fedeeg.secagg.encoding`. The server decodes the weighted mean delta and
adds it to the global tensors. Integer tensors (BatchNorm's
``num_batches_tracked``) are not aggregated under secure mode: they keep the
global value.

A site's state between messages (round keys, shares it holds) lives in its
``Context.state`` (``"fedeeg-secagg"``), never leaves the site, and is
replaced at the next round's advertisement.

Identity keys: each site signs its round keys with a long-term Ed25519
identity key, checked against a roster of public keys by protocol id.

- Simulation: every identity is derived from the run's seed
  (:func:`fedeeg.secagg.simulation_identity`), the roster from the same, and a
  site's protocol id is its partition id + 1. Anyone who knows the seed knows
  every key: this protects nothing and is for simulation only.
- Deployment: each site has its own key (``fedeeg site new NAME`` writes
  ``NAME.identity.pem``, which never leaves the site) and trusts the roster
  the consortium distributes (``fedeeg site roster``, :mod:`fedeeg.deploy.roster`;
  ``[deployment] roster`` in site.toml). The site's worker passes both paths
  and the site's name in ``Context.node_config`` (``secagg-identity``,
  ``secagg-roster``, ``secagg-name``); the protocol id is the site's position
  in the roster (sorted by name), and the site refuses to take part when its
  own key does not match its entry. The server verifies advertisements against
  the same roster built from its registry (``secure_round(roster=...)``), and
  every site verifies its neighbours' signatures against its own copy, so a
  coordinator cannot stand in for a site with a key of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from ..aggregation import apply_delta, check_update, flatten_delta, float_names, travelling_names
from ..config import RunConfig
from ..deploy.roster import NODE_IDENTITY, NODE_NAME, NODE_ROSTER, load_site_keys, roster_digest
from ..secagg import (
    EncodingSpec,
    RdpAccountant,
    RoundFailed,
    SecAggClient,
    SecAggServer,
    decode_sum,
    effective_noise_multiplier,
    encode_update,
    simulation_identity,
    simulation_roster,
)
from ..secagg.encoding import vector_length
from ..secagg.protocol import ProtocolError
from . import records as R

logger = logging.getLogger(__name__)

#: Message actions (``train.<action>``) of the four stages, in order.
ADVERTISE, SHARE, INPUT, UNMASK = "secagg_advertise", "secagg_share", "secagg_input", "secagg_unmask"
ACTIONS = (ADVERTISE, SHARE, INPUT, UNMASK)
#: ConfigRecord carrying the protocol payload; ArrayRecord carrying the masked input.
SECAGG = "secagg"
MASKED = "masked"
#: Key of the site's protocol state in ``Context.state``.
STATE_KEY = "fedeeg-secagg"
#: Key of the site record that carries the digest of the roster the site trusts (a diagnostic for stale rosters).
ROSTER_DIGEST = "roster-digest"


class SimulatedFailure(RuntimeError):
    """A failure injected by ``fail_sites``/``fail_at`` (simulation only)."""


def encoding_spec(cfg: RunConfig, n_sites: int) -> EncodingSpec:
    """The round's fixed-point encoding for ``n_sites`` sites (server and sites compute the same)."""
    bound = cfg.norm_bound
    return EncodingSpec(clip=bound, n_sites=int(n_sites), weight_cap=cfg.secagg_weight_cap,
                        noise_std=cfg.dp_sigma * bound, scale=cfg.quant_scale)


def site_identity(cfg: RunConfig, site_id: int):
    """The site's long-term identity key (simulation: derived from the run's seed)."""
    return simulation_identity(cfg.seed, site_id)


def run_roster(cfg: RunConfig, n_sites: int) -> dict[int, bytes]:
    """Public identity keys of the run's sites, by protocol id (partition id + 1)."""
    return simulation_roster(cfg.seed, n_sites)


def site_keys(context: Context, cfg: RunConfig, pid: int):
    """The site's identity key, the roster it trusts and its protocol id.

    Deployment (``context.node_config`` carries ``secagg-name``): the site's
    own key and roster files (:func:`fedeeg.deploy.roster.load_site_keys`),
    protocol id = its position in the roster. Simulation: derived from the
    run's seed, protocol id = ``pid + 1``.

    Returns
    -------
    identity : Ed25519PrivateKey
    roster : dict of int to bytes
    site_id : int
    """
    node = context.node_config
    if NODE_NAME in node:
        return load_site_keys(str(node[NODE_NAME]), str(node.get(NODE_IDENTITY, "")) or None,
                              str(node.get(NODE_ROSTER, "")) or None)
    sid = pid + 1
    return site_identity(cfg, sid), run_roster(cfg, max(cfg.federated_sites, sid)), sid


def check_failure(cfg: RunConfig, pid: int, stage: str, name: str) -> None:
    """Raise :class:`SimulatedFailure` when this site is set to fail at ``stage``."""
    if cfg.fail_sites and pid < cfg.fail_sites and cfg.fail_at == stage:
        raise SimulatedFailure(f"{name} fails at {stage!r} (injected: fail_sites={cfg.fail_sites}, fail_at={cfg.fail_at!r}).")


def _value_bytes(v) -> int:
    if isinstance(v, (bytes, str)):
        return len(v)
    if isinstance(v, list):
        return sum(_value_bytes(x) for x in v)
    return 1 if isinstance(v, bool) else 8


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records: arrays (as Flower counts them), config and metric keys and values.

    Counted like ``ConfigRecord.count_bytes`` (which fails on empty lists):
    bytes and strings by length, numbers as 8 bytes.
    """
    n = sum(r.count_bytes() for r in content.array_records.values())
    for rec in list(content.config_records.values()) + list(content.metric_records.values()):
        n += sum(len(k) + _value_bytes(v) for k, v in rec.items())
    return int(n)


# ------------------------------------------------------------------ site side
def client_stage(message: Message, context: Context, cfg: RunConfig, action: str, pid: int, site) -> Message:
    """Answer one secure-aggregation message at a site.

    Parameters
    ----------
    message : Message
        ``train.<action>`` from the server.
    context : Context
        The site's context; the protocol state is kept in ``context.state``.
    cfg : RunConfig
        The run.
    action : str
        One of :data:`ACTIONS`.
    pid : int
        The site's partition id (simulation: protocol id ``pid + 1``; in a
        deployment the protocol id comes from the roster, see :func:`site_keys`).
    site : fedeeg.experiment.SiteSplit
        The site's data.
    """
    from .client_app import train_local

    identity, roster, sid = site_keys(context, cfg, pid)
    payload = dict(message.content.config_records.get(SECAGG, ConfigRecord()))
    records: dict = {}
    if action == ADVERTISE:  # the site's name and channels travel once per round, with its keys
        client = SecAggClient(sid, identity, roster)
        records[SECAGG] = ConfigRecord(client.advertise(payload))
        site_rec = R.site_record(site.name, site.train.ch_names, site.train.sfreq)
        site_rec[ROSTER_DIGEST] = roster_digest(roster)
        records[R.SITE] = site_rec
    else:
        if STATE_KEY not in context.state.config_records:
            raise ProtocolError(f"{site.name} has no secure-aggregation state for this round: it missed the key "
                                f"advertisement.")
        client = SecAggClient.from_state(dict(context.state.config_records[STATE_KEY]), identity, roster)
        if action == SHARE:
            records[SECAGG] = ConfigRecord(client.share_keys(payload))
        elif action == INPUT:
            client.receive_shares(payload)  # a tampered share fails here, before any training
            check_failure(cfg, pid, "train", site.name)
            global_arrays, trained, result = train_local(cfg, message, pid, site)
            server_round = int(message.content.config_records[R.CONFIG]["server-round"])
            travel = travelling_names(global_arrays, cfg.strategy, server_round)
            reference = {k: global_arrays[k] for k in travel}
            check_update(trained, reference, site=site.name)  # the site checks its own update
            layout = float_names(reference)
            spec = encoding_spec(cfg, client.n_sites)
            encoded, info = encode_update(flatten_delta(trained, reference, layout), result.n_examples, result.loss, spec)
            if info["clipped"]:
                logger.info("%s: update norm %.4g clipped to %g", site.name, info["norm"], spec.clip)
            masked = client.mask(encoded)
            check_failure(cfg, pid, "upload", site.name)
            records[MASKED] = ArrayRecord({MASKED: Array(masked)})
        elif action == UNMASK:
            check_failure(cfg, pid, "unmask", site.name)
            records[SECAGG] = ConfigRecord(client.unmask(payload))
        else:
            raise ValueError(f"Unknown secure-aggregation action {action!r}; expected one of {ACTIONS}.")
    context.state.config_records[STATE_KEY] = ConfigRecord(client.to_state())
    return Message(RecordDict(records), reply_to=message)


# ---------------------------------------------------------------- server side
def _explain_roster_mismatch(rejected: list[dict], site_digests: dict[str, str], digest: str) -> None:
    """Add to a refused advertisement's reason when the site trusts another roster than the server's."""
    for rej in rejected:
        theirs = site_digests.get(rej["site"])
        if rej["stage"] in ("advertise", ADVERTISE) and theirs is not None and theirs != digest:
            rej["reason"] += (f" (the site's roster differs from the coordinator's: digest {theirs} vs {digest}; "
                              "make it again with `fedeeg site roster` and send it to every site)")


@dataclass
class SecureRoundOutcome:
    """What one secure round produced at the server."""

    arrays: dict | None  #: the new global tensors (None: the round failed, keep the old ones)
    losses: list = field(default_factory=list)  #: [(weighted mean loss, total windows)]
    rejected: list = field(default_factory=list)  #: [{"site", "stage", "reason"}]
    bytes_up: dict = field(default_factory=dict)  #: site -> bytes it sent over all stages of the round
    bytes_down: int = 0  #: bytes sent to each site over all stages (mean)
    info: dict = field(default_factory=dict)  #: for the round's record
    failed: str | None = None
    site_info: dict = field(default_factory=dict)  #: site -> {"ch_names", "sfreq"}
    node_names: dict = field(default_factory=dict)  #: node id -> site name


def _send(grid, requests: dict[int, RecordDict], action: str, rnd: int, timeout: float) -> dict[int, Message]:
    messages = [Message(content, dst_node_id=nid, message_type=f"train.{action}", group_id=str(rnd))
                for nid, content in requests.items()]
    replies = grid.send_and_receive(messages, timeout=timeout or None)
    return {r.metadata.src_node_id: r for r in replies}


def _content(config: ConfigRecord, payload: dict | None = None, **records) -> RecordDict:
    out = {R.CONFIG: config}
    if payload is not None:
        out[SECAGG] = ConfigRecord(payload)
    out.update(records)
    return RecordDict(out)


class _Exchange:
    """Sends one stage, records bytes, turns error replies into dropouts."""

    def __init__(self, grid, rnd: int, timeout: float, outcome: SecureRoundOutcome, node_site: dict, names: dict):
        self.grid, self.rnd, self.timeout, self.outcome = grid, rnd, timeout, outcome
        self.node_site, self.names = node_site, names
        self.down = 0
        self.up: dict[int, int] = {}  # node -> bytes

    def name(self, nid: int) -> str:
        sid = self.node_site.get(nid)
        return self.names.get(sid, f"node {nid}")

    def __call__(self, requests: dict[int, RecordDict], action: str) -> dict[int, Message]:
        self.down += sum(content_bytes(c) for c in requests.values())
        replies = _send(self.grid, requests, action, self.rnd, self.timeout)
        ok = {}
        for nid in requests:
            reply = replies.get(nid)
            if reply is None:
                reason = "no reply within the timeout"
            elif reply.has_error():
                reason = reply.error.reason
            else:
                self.up[nid] = self.up.get(nid, 0) + content_bytes(reply.content)
                ok[nid] = reply
                continue
            self.outcome.rejected.append({"site": self.name(nid), "stage": action, "reason": reason})
            logger.warning("Round %d (%s): %s dropped out: %s", self.rnd, action, self.name(nid), reason)
        return ok


def secure_round(grid, nodes: list[int], cfg: RunConfig, global_arrays: dict[str, np.ndarray], rnd: int, *,
                 accountant: RdpAccountant | None = None, roster: dict[int, bytes] | None = None) -> SecureRoundOutcome:
    """Run one round of training with secure aggregation over ``nodes``.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid.
    nodes : list of int
        The sites' node ids.
    cfg : RunConfig
        The run (``secure=True``).
    global_arrays : dict of str to ndarray
        The global trainable tensors.
    rnd : int
        The round.
    accountant : RdpAccountant | None
        Accumulates the DP guarantee when ``cfg.dp_sigma > 0``.
    roster : dict of int to bytes | None
        The sites' raw Ed25519 identity public keys by protocol id
        (deployment: from the registry, :func:`fedeeg.deploy.roster.registry_public_keys`);
        None: derived from the run's seed (simulation).

    Returns
    -------
    outcome : SecureRoundOutcome
        ``arrays`` is None when the round failed (below threshold); the reason
        is in ``failed`` and logged.
    """
    travel = travelling_names(global_arrays, cfg.strategy, rnd)
    reference = {k: global_arrays[k] for k in travel}
    layout = float_names(reference)
    n_values = int(sum(np.asarray(reference[k]).size for k in layout))
    roster = run_roster(cfg, max(cfg.federated_sites, len(nodes))) if roster is None else dict(roster)
    round_cfg = R.round_config(rnd, cfg.checkpoint)
    digest = roster_digest(roster)
    site_digests: dict[str, str] = {}
    outcome = SecureRoundOutcome(arrays=None)
    node_site: dict[int, int] = {}
    names: dict[int, str] = {}
    server = SecAggServer(round_id=rnd, roster=roster, vector_length=vector_length(n_values),
                          threshold=cfg.secagg_threshold, neighbours=cfg.secagg_neighbours, names=names)
    send = _Exchange(grid, rnd, cfg.reply_timeout, outcome, node_site, names)

    def fail(err: Exception) -> SecureRoundOutcome:
        outcome.bytes_up = {send.name(nid): b for nid, b in send.up.items()}
        outcome.failed = str(err)
        outcome.rejected.extend(r for r in server.rejected if r not in outcome.rejected)
        outcome.bytes_down = send.down // max(len(nodes), 1)
        outcome.info = {"failed": True, "threshold": server.threshold, "survivors": len(server.u3),
                        "advertised": len(server.u1)}
        logger.error("Round %d: secure aggregation failed: %s The global model is unchanged; the next round proceeds.",
                     rnd, err)
        return outcome

    try:
        # 1. key advertisement
        replies = send({nid: _content(round_cfg, server.advertise_request()) for nid in nodes}, ADVERTISE)
        ads = {}
        for nid, reply in replies.items():
            try:
                ad = dict(reply.content.config_records[SECAGG])
                sid = int(ad["site"])
                site_rec = reply.content.config_records[R.SITE]
            except (KeyError, TypeError, ValueError) as err:
                outcome.rejected.append({"site": f"node {nid}", "stage": ADVERTISE, "reason": f"malformed reply: {err}"})
                continue
            if sid in ads:
                outcome.rejected.append({"site": str(site_rec["name"]), "stage": ADVERTISE,
                                         "reason": f"site id {sid} claimed by two nodes; the second is refused"})
                continue
            ads[sid] = ad
            node_site[nid] = sid
            names[sid] = outcome.node_names[nid] = str(site_rec["name"])
            outcome.site_info[names[sid]] = {"ch_names": list(site_rec["ch-names"]), "sfreq": float(site_rec["sfreq"])}
            if ROSTER_DIGEST in site_rec:
                site_digests[names[sid]] = str(site_rec[ROSTER_DIGEST])
        site_node = {sid: nid for nid, sid in node_site.items()}

        def by_site(msgs: dict[int, Message]) -> dict[int, Message]:
            return {node_site[nid]: m for nid, m in msgs.items() if nid in node_site}

        try:
            requests = server.receive_advertisements(ads)
        finally:
            _explain_roster_mismatch(server.rejected, site_digests, digest)
        spec = encoding_spec(cfg, len(server.u1))
        # 2. share keys
        replies = by_site(send({site_node[s]: _content(round_cfg, req) for s, req in requests.items()}, SHARE))
        shares = {}
        for sid, reply in replies.items():
            if SECAGG in reply.content.config_records:
                shares[sid] = dict(reply.content.config_records[SECAGG])
        requests = server.receive_shares(shares)
        # 3. masked input (the sites train here)
        down = R.state_to_record(R.numpy_to_state(global_arrays))
        replies = by_site(send({site_node[s]: _content(round_cfg, req, **{R.ARRAYS: down}) for s, req in requests.items()},
                               INPUT))
        inputs = {}
        for sid, reply in replies.items():
            try:
                inputs[sid] = reply.content.array_records[MASKED][MASKED].numpy()
            except (KeyError, ValueError, TypeError) as err:
                server.rejected.append({"site": names.get(sid, str(sid)), "stage": INPUT, "reason": f"malformed masked input: {err}"})
        requests = server.receive_masked_inputs(inputs)
        # 4. unmask
        replies = by_site(send({site_node[s]: _content(round_cfg, req) for s, req in requests.items()}, UNMASK))
        total = server.receive_unmask({sid: dict(r.content.config_records[SECAGG]) for sid, r in replies.items()
                                       if SECAGG in r.content.config_records})
        decoded = decode_sum(total, spec, n_inputs=len(server.u3))
    except (RoundFailed, ValueError) as err:
        return fail(err)
    outcome.rejected.extend(server.rejected)
    # The server's own check of what it can see: the mean of clipped updates is within the bound.
    mean_norm = float(np.linalg.norm(decoded.mean))
    slack = decoded.error_bound * np.sqrt(max(n_values, 1))
    if cfg.dp_sigma == 0 and mean_norm > spec.clip + slack:
        return fail(RoundFailed(f"Round {rnd}: the decoded mean update has L2 norm {mean_norm:.4g}, above the bound "
                                f"clip={spec.clip:g}: some site's masked input was out of range."))
    outcome.bytes_up = {send.name(nid): b for nid, b in send.up.items()}
    outcome.arrays = apply_delta(global_arrays, decoded.mean, layout)
    outcome.losses = [(decoded.mean_loss, decoded.n_examples)]
    outcome.bytes_down = send.down // max(len(nodes), 1)
    info = {
        "sites_advertised": len(server.u1), "sites_shared": len(server.u2), "survivors": len(server.u3),
        "dropped_after_sharing": [names.get(s, str(s)) for s in server.dropped],
        "threshold": server.threshold, "neighbours": min(len(v) for v in server.graph.values()),
        "scale": spec.scale, "clip": spec.clip, "decode_error_bound": decoded.error_bound,
        "mean_update_norm": mean_norm, "train_windows": decoded.n_examples,
    }
    if cfg.dp_sigma > 0 and accountant is not None:
        z = effective_noise_multiplier(cfg.dp_sigma, len(server.u3), len(server.u1))
        info["dp"] = {"noise_multiplier": z, "epsilon_round": accountant.step(z), "epsilon": accountant.epsilon,
                      "delta": accountant.delta}
    outcome.info = info
    return outcome


__all__ = ["ACTIONS", "ADVERTISE", "SHARE", "INPUT", "UNMASK", "SECAGG", "MASKED", "STATE_KEY", "SimulatedFailure",
           "encoding_spec", "site_identity", "run_roster", "site_keys", "check_failure", "content_bytes", "client_stage",
           "SecureRoundOutcome", "secure_round"]
