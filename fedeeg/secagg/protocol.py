"""The secure-aggregation protocol as two state machines exchanging plain dicts.

One round of the SecAgg+ family (Bonawitz et al., CCS 2017; Bell et al.,
CCS 2020) between sites (:class:`SecAggClient`) and the coordinator
(:class:`SecAggServer`). Messages are dicts of ints, bytes and lists of them
(they travel as Flower ConfigRecords; see :mod:`fedeeg.federation.secure`).

1. **Advertise** — each site makes two X25519 key pairs for the round, ``c``
   (encryption) and ``s`` (pairwise masks), and signs ``(session, round, site,
   c_pk, s_pk)`` with its long-term Ed25519 identity key. The server checks
   the signatures against its roster of identity keys, drops sites whose
   advertisement does not verify (:class:`~fedeeg.secagg.keys.SignatureError`),
   and places the survivors ``U1`` on a neighbour graph (every site, or ``k``
   random neighbours as in SecAgg+).
2. **Share keys** — each site checks its neighbours' signatures itself (so the
   server cannot substitute keys), draws a self-mask seed ``b`` and splits
   ``b`` and its ``s`` private key into Shamir shares (threshold ``t``) for
   its neighbours and itself; each neighbour's pair of shares is encrypted
   with ChaCha20-Poly1305 under a key derived (HKDF) from the ``c`` X25519
   agreement. The server only relays ciphertexts. Sites that answer: ``U2``.
3. **Masked input** — each site decrypts the shares sent to it (a tampered
   ciphertext fails authentication: :class:`~fedeeg.secagg.keys.DecryptionError`),
   then uploads ``y = x + PRG(b) + sum_j ±PRG(s_ij)`` in Z_{2^32}, with
   ``s_ij`` from the ``s`` agreement with each neighbour ``j`` in ``U2`` (``+``
   if its id is smaller than ``j``, ``-`` otherwise). The masks are ChaCha20
   keystreams (:mod:`fedeeg.secagg.masking`). Sites that upload: ``U3``; from
   here the survivor set is fixed and later uploads are refused.
4. **Unmask** — each site in ``U3`` reveals, for each neighbour (and itself),
   the share of ``b`` if that neighbour is in ``U3`` and the share of its
   ``s`` key if it dropped (in ``U2`` but not ``U3``) — never both for one
   site, and only once per round. With ``t`` shares the server removes every
   surviving self mask and the pairwise masks the dropped sites left behind:
   what remains is ``sum_{i in U3} x_i`` exactly.

A round fails cleanly (:class:`RoundFailed`) when fewer than ``t`` sites
remain at any stage or fewer than ``t`` shares arrive to remove a mask.
Threshold ``t`` must be a strict majority of each site's share holders, so
that a server splitting the survivors cannot collect ``t`` shares of both
secrets of one site. The model is an honest-but-curious coordinator that may
also tamper with relayed messages; signed advertisements and authenticated
shares make tampering detectable. Not covered: a malicious coordinator sending
different survivor sets to different sites (Bell et al.'s consistency round)
and range proofs on the sites' inputs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import keys as K
from .encoding import ring_sum
from .masking import SEED_BYTES, expand_mask, fresh_seed
from .shamir import ShareError, combine_shares, share_from_bytes, share_to_bytes, split_secret

logger = logging.getLogger(__name__)

SESSION_BYTES = 16


class ProtocolError(ValueError):
    """A message breaks the protocol: wrong stage, inconsistent request, or a late or repeated message."""


class RoundFailed(RuntimeError):
    """The round cannot complete: fewer than the threshold of sites or shares remain."""


# ------------------------------------------------------------------ helpers
def auto_neighbours(n_sites: int) -> int:
    """Neighbours per site when none is configured.

    Every other site up to 10 sites; beyond, the smallest even number
    >= 3 log2(n) (SecAgg+'s logarithmic neighbourhoods), at most ``n - 1``.
    """
    if n_sites <= 10:
        return max(n_sites - 1, 0)
    k = math.ceil(3 * math.log2(n_sites))
    return min(n_sites - 1, k + (k % 2))


def resolve_threshold(threshold: float, n_holders: int) -> int:
    """The Shamir threshold ``t`` for ``n_holders`` share holders (a site and its neighbours).

    Parameters
    ----------
    threshold : float
        A fraction in (0.5, 1) of the holders (``t = ceil(threshold * n_holders)``),
        or a whole count >= 1.
    n_holders : int
        Holders of each site's shares.

    Raises
    ------
    ValueError
        When ``t`` is not a strict majority of the holders or exceeds them.
    """
    t = math.ceil(threshold * n_holders - 1e-9) if threshold < 1 else int(threshold)
    t = max(t, 2 if n_holders >= 2 else 1)
    if t > n_holders:
        raise ValueError(f"'secagg_threshold' {threshold!r} asks for {t} shares but each site has only {n_holders} "
                         f"share holders (itself and its neighbours); lower it or add sites.")
    if 2 * t <= n_holders:
        raise ValueError(f"'secagg_threshold' {threshold!r} gives t={t} of {n_holders} share holders, not a strict "
                         f"majority: a coordinator splitting the survivors could then recover both masks of a site. "
                         f"Use a fraction above 0.5 or a count above {n_holders // 2}.")
    return t


def _shuffled(ids: Sequence[int]) -> list[int]:
    out = list(ids)
    for i in range(len(out) - 1, 0, -1):  # Fisher-Yates with the OS's CSPRNG
        j = int.from_bytes(os.urandom(8), "big") % (i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def neighbour_graph(site_ids: Sequence[int], neighbours: int = 0) -> dict[int, tuple[int, ...]]:
    """A random ``k``-regular graph (Harary-style ring) over the sites.

    Parameters
    ----------
    site_ids : sequence of int
        The sites.
    neighbours : int
        ``k``; 0 = :func:`auto_neighbours`; an odd ``k`` is raised to the next
        even number; ``k >= n - 1`` gives the complete graph.

    Returns
    -------
    graph : dict of int to tuple of int
        Each site's neighbours (symmetric, without itself), sorted.
    """
    ids = sorted(int(i) for i in site_ids)
    n = len(ids)
    k = auto_neighbours(n) if neighbours <= 0 else int(neighbours)
    if k >= n - 1:
        return {i: tuple(j for j in ids if j != i) for i in ids}
    k += k % 2
    ring = _shuffled(ids)
    graph: dict[int, set[int]] = {i: set() for i in ids}
    for pos, i in enumerate(ring):
        for off in range(1, k // 2 + 1):
            j = ring[(pos + off) % n]
            graph[i].add(j)
            graph[j].add(i)
    return {i: tuple(sorted(v)) for i, v in graph.items()}


def _u32(x: int) -> bytes:
    return int(x).to_bytes(4, "big")


def _u64(x: int) -> bytes:
    return int(x).to_bytes(8, "big")


def advertisement_payload(session: bytes, round_id: int, site: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """The bytes a site signs in its key advertisement."""
    return K.DOMAIN + b"/advertise/" + bytes(session) + _u64(round_id) + _u32(site) + bytes(c_pk) + bytes(s_pk)


def _pair_info(kind: bytes, session: bytes, a: int, b: int) -> bytes:
    lo, hi = sorted((int(a), int(b)))
    return kind + b"/" + bytes(session) + _u32(lo) + _u32(hi)


def _share_aad(session: bytes, round_id: int, sender: int, receiver: int) -> bytes:
    return K.DOMAIN + b"/share/" + bytes(session) + _u64(round_id) + _u32(sender) + _u32(receiver)


def pair_seed(s_private: bytes, peer_s_public: bytes, session: bytes, a: int, b: int) -> bytes:
    """Seed of the pairwise mask of sites ``a`` and ``b`` (symmetric in them)."""
    return K.hkdf(K.agree(s_private, peer_s_public), _pair_info(b"pair-mask", session, a, b))


def _share_key(c_private: bytes, peer_c_public: bytes, session: bytes, a: int, b: int) -> bytes:
    return K.hkdf(K.agree(c_private, peer_c_public), _pair_info(b"share-key", session, a, b))


def _as_public(key: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    return K.identity_from_public_bytes(key) if isinstance(key, (bytes, bytearray)) else key


def _ids(values, what: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ProtocolError(f"{what} must be a list of site ids, got {values!r}.") from None
    if len(set(out)) != len(out):
        raise ProtocolError(f"{what} names a site twice: {out}.")
    return out


def _bytes_list(values, n: int, what: str) -> list[bytes]:
    out = list(values) if values is not None else []
    if len(out) != n or not all(isinstance(v, (bytes, bytearray)) for v in out):
        raise ProtocolError(f"{what} must be {n} byte strings, got {len(out)}.")
    return [bytes(v) for v in out]


# ------------------------------------------------------------------- client
class SecAggClient:
    """One site's side of one round.

    Parameters
    ----------
    site : int
        The site's protocol id (>= 1; its Shamir x-coordinate).
    identity : Ed25519PrivateKey
        The site's long-term identity key.
    roster : mapping of int to Ed25519PublicKey or bytes
        Every site's public identity key, by protocol id.
    """

    STAGES = ("new", "advertised", "shared", "ready", "masked", "unmasked")

    def __init__(self, site: int, identity: Ed25519PrivateKey, roster: Mapping[int, Ed25519PublicKey | bytes]) -> None:
        if int(site) < 1:
            raise ValueError(f"'site' must be a protocol id >= 1, got {site!r}.")
        self.site = int(site)
        self.identity = identity
        self.roster = {int(k): _as_public(v) for k, v in roster.items()}
        if self.site not in self.roster:
            raise ValueError(f"Site {self.site} is not in the roster (ids {sorted(self.roster)}).")
        self.stage = "new"
        self.round_id = -1
        self.session = b""
        self.c_sk = self.s_sk = self.b = b""
        self.threshold = 0
        self.n_sites = 0
        self.nbrs: list[int] = []
        self.nbr_c: dict[int, bytes] = {}
        self.nbr_s: dict[int, bytes] = {}
        self.u2: list[int] = []
        self.shares: dict[int, tuple[bytes, bytes]] = {}  # holder's share of (b, s_sk) of each site, itself included

    # ---- state kept between messages (Flower's Context.state)
    def to_state(self) -> dict:
        """The client's state as a dict of ints, bytes and lists (secret keys included: keep it at the site)."""
        owners = sorted(self.shares)
        return {
            "site": self.site, "stage": self.stage, "round": self.round_id, "session": self.session,
            "c-sk": self.c_sk, "s-sk": self.s_sk, "b": self.b, "threshold": self.threshold, "n-sites": self.n_sites,
            "nbrs": list(self.nbrs), "nbr-c": [self.nbr_c[j] for j in self.nbrs], "nbr-s": [self.nbr_s[j] for j in self.nbrs],
            "u2": list(self.u2), "share-of": owners, "share-b": [self.shares[o][0] for o in owners],
            "share-sk": [self.shares[o][1] for o in owners],
        }

    @classmethod
    def from_state(cls, state: Mapping, identity: Ed25519PrivateKey, roster: Mapping) -> "SecAggClient":
        """Inverse of :meth:`to_state`."""
        self = cls(int(state["site"]), identity, roster)
        self.stage = str(state["stage"])
        self.round_id = int(state["round"])
        self.session = bytes(state["session"])
        self.c_sk, self.s_sk, self.b = bytes(state["c-sk"]), bytes(state["s-sk"]), bytes(state["b"])
        self.threshold, self.n_sites = int(state["threshold"]), int(state["n-sites"])
        self.nbrs = [int(j) for j in state["nbrs"]]
        self.nbr_c = {j: bytes(v) for j, v in zip(self.nbrs, state["nbr-c"], strict=True)}
        self.nbr_s = {j: bytes(v) for j, v in zip(self.nbrs, state["nbr-s"], strict=True)}
        self.u2 = [int(j) for j in state["u2"]]
        self.shares = {int(o): (bytes(b), bytes(s)) for o, b, s in
                       zip(state["share-of"], state["share-b"], state["share-sk"], strict=True)}
        return self

    def _expect(self, stage: str, action: str) -> None:
        if self.stage != stage:
            raise ProtocolError(f"Site {self.site}: cannot {action} at stage {self.stage!r} of round {self.round_id} "
                                f"(expected stage {stage!r}).")

    # ---- 1. advertise
    def advertise(self, request: Mapping) -> dict:
        """Make the round's key pairs and sign them.

        Parameters
        ----------
        request : dict
            ``{"round": int, "session": bytes}`` from the server.

        Returns
        -------
        advertisement : dict
            ``{"site", "c-pk", "s-pk", "sig"}``.
        """
        session = bytes(request.get("session", b""))
        if len(session) != SESSION_BYTES:
            raise ProtocolError(f"Site {self.site}: the advertise request's session is {len(session)} bytes, expected {SESSION_BYTES}.")
        self.__init__(self.site, self.identity, self.roster)  # a new round forgets everything of the last
        self.round_id, self.session = int(request["round"]), session
        self.c_sk, c_pk = K.x25519_keypair()
        self.s_sk, s_pk = K.x25519_keypair()
        sig = K.sign(self.identity, advertisement_payload(self.session, self.round_id, self.site, c_pk, s_pk))
        self.stage = "advertised"
        return {"site": self.site, "c-pk": c_pk, "s-pk": s_pk, "sig": sig}

    # ---- 2. share keys
    def share_keys(self, request: Mapping) -> dict:
        """Check the neighbours' advertisements, split ``b`` and the ``s`` key, encrypt the shares.

        Parameters
        ----------
        request : dict
            ``{"round", "session", "threshold", "n-sites", "nbrs", "nbr-c", "nbr-s", "nbr-sig"}``.

        Returns
        -------
        reply : dict
            ``{"to": [neighbour ids], "ct": [ciphertexts]}``.

        Raises
        ------
        SignatureError
            A neighbour's advertisement does not verify (names the site).
        """
        self._expect("advertised", "share keys")
        if int(request["round"]) != self.round_id or bytes(request["session"]) != self.session:
            raise ProtocolError(f"Site {self.site}: the share-keys request is for another round or session.")
        nbrs = _ids(request["nbrs"], "'nbrs'")
        if self.site in nbrs or not nbrs:
            raise ProtocolError(f"Site {self.site}: the neighbour list must be non-empty and exclude the site itself, got {nbrs}.")
        unknown = [j for j in nbrs if j not in self.roster]
        if unknown:
            raise ProtocolError(f"Site {self.site}: neighbours {unknown} are not in the roster.")
        c_pks = _bytes_list(request["nbr-c"], len(nbrs), "'nbr-c'")
        s_pks = _bytes_list(request["nbr-s"], len(nbrs), "'nbr-s'")
        sigs = _bytes_list(request["nbr-sig"], len(nbrs), "'nbr-sig'")
        threshold = int(request["threshold"])
        n_holders = len(nbrs) + 1
        if not (2 * threshold > n_holders and threshold <= n_holders):
            raise ProtocolError(f"Site {self.site}: threshold {threshold} is not a strict majority of the "
                                f"{n_holders} share holders; refusing (a split could reveal both masks of a site).")
        for j, c_pk, s_pk, sig in zip(nbrs, c_pks, s_pks, sigs, strict=True):
            K.verify(self.roster[j], sig, advertisement_payload(self.session, self.round_id, j, c_pk, s_pk),
                     what=f"Key advertisement of site {j} (round {self.round_id})")
        self.nbrs, self.threshold, self.n_sites = nbrs, threshold, int(request["n-sites"])
        self.nbr_c, self.nbr_s = dict(zip(nbrs, c_pks)), dict(zip(nbrs, s_pks))
        self.b = fresh_seed()
        holders = sorted(nbrs + [self.site])
        b_shares = split_secret(self.b, holders, threshold)
        sk_shares = split_secret(self.s_sk, holders, threshold)
        to, ct = [], []
        for j in nbrs:
            plain = _u32(self.site) + _u32(j) + share_to_bytes(j, b_shares[j]) + share_to_bytes(j, sk_shares[j])
            key = _share_key(self.c_sk, self.nbr_c[j], self.session, self.site, j)
            to.append(j)
            ct.append(K.seal(key, plain, _share_aad(self.session, self.round_id, self.site, j)))
        self.shares = {self.site: (share_to_bytes(self.site, b_shares[self.site]),
                                   share_to_bytes(self.site, sk_shares[self.site]))}
        self.stage = "shared"
        return {"to": to, "ct": ct}

    # ---- 3. masked input
    def receive_shares(self, request: Mapping) -> None:
        """Decrypt and keep the shares the neighbours in ``U2`` sent.

        Parameters
        ----------
        request : dict
            ``{"u2": [ids], "from": [ids], "ct": [ciphertexts]}``.

        Raises
        ------
        DecryptionError
            A ciphertext fails authentication (names the sender).
        """
        self._expect("shared", "receive shares")
        u2 = _ids(request["u2"], "'u2'")
        if self.site not in u2:
            raise ProtocolError(f"Site {self.site}: the server's U2 {u2} does not hold this site.")
        senders = _ids(request["from"], "'from'")
        cts = _bytes_list(request["ct"], len(senders), "'ct'")
        expected = sorted(set(self.nbrs) & set(u2))
        if sorted(senders) != expected:
            raise ProtocolError(f"Site {self.site}: shares relayed from sites {sorted(senders)}, expected exactly the "
                                f"neighbours that shared keys {expected}.")
        if len(u2) < self.threshold:
            raise ProtocolError(f"Site {self.site}: only {len(u2)} sites shared keys, below the threshold {self.threshold}.")
        received = {}
        for j, ct in zip(senders, cts, strict=True):
            key = _share_key(self.c_sk, self.nbr_c[j], self.session, j, self.site)
            plain = K.open_sealed(key, ct, _share_aad(self.session, self.round_id, j, self.site),
                                  what=f"Encrypted shares from site {j} to site {self.site} (round {self.round_id})")
            if plain[:8] != _u32(j) + _u32(self.site) or len(plain) != 8 + 2 * 70:
                raise ProtocolError(f"Site {self.site}: the shares from site {j} are addressed to another pair of sites.")
            received[j] = (plain[8:78], plain[78:])
        self.shares.update(received)
        self.u2 = sorted(u2)
        self.stage = "ready"

    def mask(self, encoded: np.ndarray) -> np.ndarray:
        """Add the self mask and the pairwise masks to an encoded update.

        Parameters
        ----------
        encoded : ndarray of uint32, shape (L,)
            The output of :func:`fedeeg.secagg.encoding.encode_update`.

        Returns
        -------
        masked : ndarray of uint32, shape (L,)
        """
        self._expect("ready", "mask its input")
        encoded = np.asarray(encoded)
        if encoded.dtype != np.uint32 or encoded.ndim != 1:
            raise ValueError(f"The encoded update must be a 1-D uint32 array, got {encoded.dtype} of shape {encoded.shape}.")
        y = encoded + expand_mask(self.b, encoded.size, context=b"self-mask")
        for j in self.nbrs:
            if j not in self.u2:
                continue
            m = expand_mask(pair_seed(self.s_sk, self.nbr_s[j], self.session, self.site, j), encoded.size,
                            context=b"pair-mask")
            if self.site < j:
                y += m
            else:
                y -= m
        self.stage = "masked"
        return y

    # ---- 4. unmask
    def unmask(self, request: Mapping) -> dict:
        """Reveal the shares that remove the survivors' self masks and the dropped sites' pairwise masks.

        Parameters
        ----------
        request : dict
            ``{"u3": [ids]}``: the sites whose masked input the server holds.

        Returns
        -------
        reply : dict
            ``{"b-of": [ids], "b-share": [bytes], "sk-of": [ids], "sk-share": [bytes]}``.

        Raises
        ------
        ProtocolError
            A second unmask request in the round, a survivor set that is not
            part of ``U2``, does not hold this site or is below the threshold.
        """
        if self.stage == "unmasked":
            raise ProtocolError(f"Site {self.site}: already answered an unmask request in round {self.round_id}; "
                                f"refusing a second one (it could reveal both masks of a site).")
        self._expect("masked", "unmask")
        u3 = _ids(request["u3"], "'u3'")
        if not set(u3) <= set(self.u2):
            raise ProtocolError(f"Site {self.site}: survivors {sorted(set(u3) - set(self.u2))} never shared keys.")
        if self.site not in u3:
            raise ProtocolError(f"Site {self.site}: the survivor set {sorted(u3)} does not hold this site.")
        if len(u3) < self.threshold:
            raise ProtocolError(f"Site {self.site}: {len(u3)} survivors, below the threshold {self.threshold}: "
                                f"refusing to unmask so small a sum.")
        holders_of = set(self.nbrs) | {self.site}
        b_of = sorted(holders_of & set(u3))
        sk_of = sorted((set(self.nbrs) & set(self.u2)) - set(u3))
        self.stage = "unmasked"
        return {"b-of": b_of, "b-share": [self.shares[i][0] for i in b_of],
                "sk-of": sk_of, "sk-share": [self.shares[j][1] for j in sk_of]}


# ------------------------------------------------------------------- server
class SecAggServer:
    """The coordinator's side of one round: relays ciphertext, sums masked inputs, removes the masks.

    Parameters
    ----------
    round_id : int
        The federated round (bound into signatures and keys).
    roster : mapping of int to Ed25519PublicKey or bytes
        Every site's public identity key, by protocol id.
    vector_length : int
        Length of every masked input (uint32 values).
    threshold : float
        See :func:`resolve_threshold`.
    neighbours : int
        See :func:`neighbour_graph`.
    names : mapping of int to str | None
        Site names for messages.
    """

    def __init__(self, *, round_id: int, roster: Mapping[int, Ed25519PublicKey | bytes], vector_length: int,
                 threshold: float = 0.6, neighbours: int = 0, names: Mapping[int, str] | None = None) -> None:
        self.round_id = int(round_id)
        self.roster = {int(k): _as_public(v) for k, v in roster.items()}
        self.vector_length = int(vector_length)
        self.threshold_setting = threshold
        self.neighbours_setting = int(neighbours)
        self.names = names if names is not None else {}  # shared: the caller may fill it in later
        self.session = os.urandom(SESSION_BYTES)
        self.stage = "advertise"
        self.rejected: list[dict] = []
        self.ads: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.graph: dict[int, tuple[int, ...]] = {}
        self.threshold = 0
        self.u1: list[int] = []
        self.u2: list[int] = []
        self.u3: list[int] = []
        self.u4: list[int] = []
        self._cts: dict[int, dict[int, bytes]] = {}
        self._inputs: dict[int, np.ndarray] = {}

    def name(self, site: int) -> str:
        return self.names.get(site, f"site id {site}")

    def _reject(self, site: int, stage: str, reason: str) -> None:
        self.rejected.append({"site": self.name(site), "stage": stage, "reason": reason})
        logger.warning("Round %d, secure aggregation (%s): %s", self.round_id, stage, reason)

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise ProtocolError(f"Round {self.round_id}: the server is at stage {self.stage!r}, not {stage!r}.")

    def _need(self, sites: Sequence[int], stage: str) -> None:
        if len(sites) < self.threshold:
            self.stage = "failed"
            raise RoundFailed(f"Round {self.round_id}: {len(sites)} site(s) left after {stage}, below the "
                              f"secure-aggregation threshold t={self.threshold}.")

    @property
    def dropped(self) -> list[int]:
        """Sites that shared keys but whose masked input never arrived."""
        return sorted(set(self.u2) - set(self.u3))

    def advertise_request(self) -> dict:
        """The request every site gets first: ``{"round", "session"}``."""
        self._expect("advertise")
        return {"round": self.round_id, "session": self.session}

    def receive_advertisements(self, ads: Mapping[int, Mapping]) -> dict[int, dict]:
        """Check the signed key advertisements and build the neighbour graph.

        Parameters
        ----------
        ads : mapping of int to dict
            The claimed site id -> its advertisement.

        Returns
        -------
        requests : dict of int to dict
            The share-keys request for every accepted site.
        """
        self._expect("advertise")
        for sid, ad in sorted(ads.items()):
            try:
                if sid not in self.roster:
                    raise ProtocolError(f"Site id {sid} is not in the roster of identity keys.")
                if int(ad["site"]) != sid:
                    raise ProtocolError(f"The advertisement for site id {sid} names site {ad['site']}.")
                c_pk, s_pk, sig = bytes(ad["c-pk"]), bytes(ad["s-pk"]), bytes(ad["sig"])
                K.verify(self.roster[sid], sig, advertisement_payload(self.session, self.round_id, sid, c_pk, s_pk),
                         what=f"Key advertisement of {self.name(sid)} (round {self.round_id})")
            except (K.SignatureError, ProtocolError, KeyError, TypeError, ValueError) as err:
                self._reject(sid, "advertise", f"{type(err).__name__}: {err}")
                continue
            self.ads[sid] = (c_pk, s_pk, sig)
        self.u1 = sorted(self.ads)
        if len(self.u1) < 2:
            self.stage = "failed"
            raise RoundFailed(f"Round {self.round_id}: {len(self.u1)} valid key advertisement(s); secure "
                              f"aggregation needs at least 2 sites.")
        self.graph = neighbour_graph(self.u1, self.neighbours_setting)
        degree = min(len(v) for v in self.graph.values())
        try:
            self.threshold = resolve_threshold(self.threshold_setting, degree + 1)
        except ValueError as err:
            self.stage = "failed"
            raise RoundFailed(f"Round {self.round_id}: {err}") from None
        self._need(self.u1, "key advertisement")
        self.stage = "share"
        return {
            sid: {"round": self.round_id, "session": self.session, "threshold": self.threshold,
                  "n-sites": len(self.u1), "nbrs": list(self.graph[sid]),
                  "nbr-c": [self.ads[j][0] for j in self.graph[sid]],
                  "nbr-s": [self.ads[j][1] for j in self.graph[sid]],
                  "nbr-sig": [self.ads[j][2] for j in self.graph[sid]]}
            for sid in self.u1
        }

    def receive_shares(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """Collect the encrypted shares and route them.

        Returns
        -------
        requests : dict of int to dict
            For every site in ``U2``: ``{"u2", "from", "ct"}``, the ciphertexts addressed to it.
        """
        self._expect("share")
        for sid, reply in sorted(replies.items()):
            try:
                if sid not in self.u1:
                    raise ProtocolError(f"{self.name(sid)} sent shares without a valid key advertisement.")
                to = _ids(reply["to"], "'to'")
                cts = _bytes_list(reply["ct"], len(to), "'ct'")
                if sorted(to) != list(self.graph[sid]):
                    raise ProtocolError(f"{self.name(sid)} addressed shares to {sorted(to)}, not to its neighbours "
                                        f"{list(self.graph[sid])}.")
            except (ProtocolError, KeyError, TypeError) as err:
                self._reject(sid, "share-keys", f"{type(err).__name__}: {err}")
                continue
            self._cts[sid] = dict(zip(to, cts))
        self.u2 = sorted(self._cts)
        self._need(self.u2, "key sharing")
        self.stage = "input"
        return {
            r: {"u2": list(self.u2), "from": [s for s in self.graph[r] if s in self._cts],
                "ct": [self._cts[s][r] for s in self.graph[r] if s in self._cts]}
            for r in self.u2
        }

    def receive_masked_inputs(self, inputs: Mapping[int, np.ndarray]) -> dict[int, dict]:
        """Keep the masked inputs and fix the survivor set ``U3``.

        Raises
        ------
        ProtocolError
            When called again: the survivor set is fixed once; a late upload
            is refused (accepting it after the unmask requests could reveal
            both masks of that site).

        Returns
        -------
        requests : dict of int to dict
            ``{"u3": [ids]}`` for every survivor.
        """
        if self.stage in ("unmask", "done"):
            late = sorted(inputs)
            raise ProtocolError(f"Round {self.round_id}: masked input from {', '.join(self.name(s) for s in late)} "
                                f"arrived after the survivor set was fixed; refused (the site is treated as dropped, "
                                f"and the server never unmasks a site twice).")
        self._expect("input")
        for sid, y in sorted(inputs.items()):
            y = np.asarray(y)
            if sid not in self.u2:
                self._reject(sid, "masked-input", f"{self.name(sid)} sent a masked input without sharing keys.")
            elif y.dtype != np.uint32 or y.shape != (self.vector_length,):
                self._reject(sid, "masked-input", f"{self.name(sid)}: masked input of dtype {y.dtype} and shape "
                                                  f"{y.shape}, expected uint32 of shape ({self.vector_length},).")
            else:
                self._inputs[sid] = y
        self.u3 = sorted(self._inputs)
        self._need(self.u3, "masked input")
        self.stage = "unmask"
        return {sid: {"u3": list(self.u3)} for sid in self.u3}

    def receive_unmask(self, replies: Mapping[int, Mapping]) -> np.ndarray:
        """Remove the masks with the revealed shares.

        Returns
        -------
        total : ndarray of uint32, shape (vector_length,)
            ``sum_{i in U3} x_i`` modulo 2^32.

        Raises
        ------
        RoundFailed
            Fewer than ``t`` shares for a mask, or shares that do not give the
            advertised key back.
        """
        self._expect("unmask")
        b_shares: dict[int, dict[int, int]] = {i: {} for i in self.u3}
        sk_shares: dict[int, dict[int, int]] = {j: {} for j in self.dropped}
        for holder, reply in sorted(replies.items()):
            try:
                if holder not in self.u3:
                    raise ProtocolError(f"{self.name(holder)} is not a survivor; its unmask reply is ignored.")
                b_of = _ids(reply["b-of"], "'b-of'")
                sk_of = _ids(reply["sk-of"], "'sk-of'")
                if set(b_of) & set(sk_of):
                    raise ProtocolError(f"{self.name(holder)} revealed both shares of sites {sorted(set(b_of) & set(sk_of))}.")
                parsed_b = [share_from_bytes(s) for s in _bytes_list(reply["b-share"], len(b_of), "'b-share'")]
                parsed_sk = [share_from_bytes(s) for s in _bytes_list(reply["sk-share"], len(sk_of), "'sk-share'")]
                if any(x != holder for x, _ in parsed_b + parsed_sk):
                    raise ProtocolError(f"{self.name(holder)} sent shares of another holder.")
            except (ProtocolError, ShareError, KeyError, TypeError) as err:
                self._reject(holder, "unmask", f"{type(err).__name__}: {err}")
                continue
            self.u4.append(holder)
            for i, (_, y) in zip(b_of, parsed_b):
                if i in b_shares and (i == holder or i in self.graph[holder]):
                    b_shares[i][holder] = y
            for j, (_, y) in zip(sk_of, parsed_sk):
                if j in sk_shares and j in self.graph[holder]:
                    sk_shares[j][holder] = y
        try:
            total = ring_sum(self._inputs[i] for i in self.u3)
            for i in self.u3:
                b = combine_shares(b_shares[i], self.threshold, SEED_BYTES, what=f"self-mask seed of {self.name(i)}")
                total -= expand_mask(b, self.vector_length, context=b"self-mask")
            for j in self.dropped:
                alive = [i for i in self.graph[j] if i in self._inputs]
                if not alive:
                    continue
                s_sk = combine_shares(sk_shares[j], self.threshold, 32, what=f"mask key of dropped {self.name(j)}")
                if K.x25519_public(s_sk) != self.ads[j][1]:
                    raise ShareError(f"the shares of dropped {self.name(j)}'s mask key do not give its advertised key.")
                for i in alive:
                    m = expand_mask(pair_seed(s_sk, self.ads[i][1], self.session, i, j), self.vector_length,
                                    context=b"pair-mask")
                    if i < j:  # site i added +m
                        total -= m
                    else:
                        total += m
        except ShareError as err:
            self.stage = "failed"
            raise RoundFailed(f"Round {self.round_id}: cannot remove the masks: {err}") from None
        finally:
            self._inputs.clear()
        self.stage = "done"
        return total


__all__ = ["ProtocolError", "RoundFailed", "SecAggClient", "SecAggServer", "auto_neighbours", "resolve_threshold",
           "neighbour_graph", "advertisement_payload", "pair_seed"]
