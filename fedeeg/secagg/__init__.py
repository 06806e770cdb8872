"""Secure aggregation of site updates (Flower-free).

The coordinator merges the sites' low-rank updates but only ever sees their
sum: each site uploads its update encoded in Z_{2^32} (:mod:`.encoding`)
plus masks (:mod:`.masking`) that cancel in the sum or are removed with Shamir
shares (:mod:`.shamir`) held by the other sites; keys are signed and shares
encrypted site-to-site (:mod:`.keys`). :mod:`.protocol` holds the client and
server state machines, :mod:`.dp` the distributed Gaussian noise accounting.
The Flower messages that drive them live in :mod:`fedeeg.federation.secure`.
"""

from .dp import RdpAccountant, effective_noise_multiplier, gaussian_rdp, rdp_to_epsilon
from .encoding import DecodedSum, EncodingSpec, decode_sum, encode_update, ring_capacity_problem, ring_sum
from .keys import (
    DecryptionError,
    SignatureError,
    generate_identity,
    load_identity,
    load_public_identity,
    public_bytes,
    save_identity,
    simulation_identity,
)
from .protocol import ProtocolError, RoundFailed, SecAggClient, SecAggServer, neighbour_graph, resolve_threshold
from .shamir import ShareError, combine_shares, split_secret


def simulation_roster(seed: int, n_sites: int) -> dict[int, bytes]:
    """Public identity keys of ``n_sites`` simulated sites (protocol ids 1..n), see :func:`simulation_identity`."""
    return {i: public_bytes(simulation_identity(seed, i)) for i in range(1, n_sites + 1)}


__all__ = [
    "RdpAccountant", "effective_noise_multiplier", "gaussian_rdp", "rdp_to_epsilon",
    "DecodedSum", "EncodingSpec", "decode_sum", "encode_update", "ring_capacity_problem", "ring_sum",
    "DecryptionError", "SignatureError", "generate_identity", "load_identity", "load_public_identity", "public_bytes",
    "save_identity", "simulation_identity", "simulation_roster",
    "ProtocolError", "RoundFailed", "SecAggClient", "SecAggServer", "neighbour_graph", "resolve_threshold",
    "ShareError", "combine_shares", "split_secret",
]
