"""Secure aggregation protocol (fedeeg.secagg), without Flower: masks, shares, keys, encoding, DP."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest

from fedeeg.secagg import (
    DecryptionError,
    EncodingSpec,
    ProtocolError,
    RdpAccountant,
    RoundFailed,
    SecAggClient,
    SecAggServer,
    ShareError,
    SignatureError,
    combine_shares,
    decode_sum,
    encode_update,
    generate_identity,
    load_identity,
    neighbour_graph,
    ring_sum,
    save_identity,
    simulation_identity,
    simulation_roster,
    split_secret,
)
from fedeeg.secagg.keys import public_bytes
from fedeeg.secagg.protocol import resolve_threshold


class Round:
    """Drives one protocol round between in-memory clients and a server, stage by stage."""

    def __init__(self, n: int, length: int, threshold: float = 0.6, neighbours: int = 0, seed: int = 0):
        self.roster = simulation_roster(seed, n)
        self.clients = {i: SecAggClient(i, simulation_identity(seed, i), self.roster) for i in range(1, n + 1)}
        self.server = SecAggServer(round_id=1, roster=self.roster, vector_length=length, threshold=threshold,
                                   neighbours=neighbours)

    def advertise(self, ads_hook=None):
        req = self.server.advertise_request()
        ads = {i: c.advertise(req) for i, c in self.clients.items()}
        if ads_hook:
            ads_hook(ads)
        self.share_requests = self.server.receive_advertisements(ads)
        return self.share_requests

    def share(self):
        replies = {i: self.clients[i].share_keys(r) for i, r in self.share_requests.items()}
        self.input_requests = self.server.receive_shares(replies)
        return self.input_requests

    def upload(self, inputs: dict, drop=()):
        masked = {}
        for i, req in self.input_requests.items():
            self.clients[i].receive_shares(req)
            if i not in drop:
                masked[i] = self.clients[i].mask(inputs[i])
        self.masked = masked
        self.unmask_requests = self.server.receive_masked_inputs(masked)
        return self.unmask_requests

    def unmask(self, drop=()):
        replies = {i: self.clients[i].unmask(r) for i, r in self.unmask_requests.items() if i not in drop}
        return self.server.receive_unmask(replies)

    def run(self, inputs: dict, drop_upload=(), drop_unmask=()):
        self.advertise()
        self.share()
        self.upload(inputs, drop=drop_upload)
        return self.unmask(drop=drop_unmask)


def _inputs(n: int, length: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)  # test data only; the protocol never uses numpy's generators
    return {i: rng.integers(0, 2**32, length, dtype=np.uint32) for i in range(1, n + 1)}


# ---------------------------------------------------------------- exactness
def test_unmasked_sum_equals_plain_ring_sum_exactly():
    # Prepare
    xs = _inputs(5, 1000)
    rnd = Round(5, 1000)
    # Execute
    total = rnd.run(xs)
    # Assert: bit-exact in Z_2^32, and no single masked upload equals its input
    np.testing.assert_array_equal(total, ring_sum(xs.values()))
    assert all(not np.array_equal(rnd.masked[i], xs[i]) for i in xs)


def test_masked_upload_is_uniform_over_the_ring_whatever_the_update():
    # Prepare: two very different updates of the same site (all zeros; a constant, large value)
    from scipy.stats import chisquare

    n_values = 200_000
    uploads = {}
    for name, value in (("zeros", 0), ("large", 2**31 + 12345)):
        rnd = Round(3, n_values)
        xs = {i: np.full(n_values, value, dtype=np.uint32) for i in range(1, 4)}
        # Execute: what the server receives from site 1
        rnd.run(xs)
        uploads[name] = rnd.masked[1]
    # Assert: both uploads are uniform over the ring (256 bins of the top byte; 16 of the bottom 4 bits)
    for name, y in uploads.items():
        assert chisquare(np.bincount(y >> 24, minlength=256)).pvalue > 1e-4, name
        assert chisquare(np.bincount(y & 15, minlength=16)).pvalue > 1e-4, name
        assert abs(np.corrcoef(y.astype(np.float64), np.arange(n_values))[0, 1]) < 0.02
    # ... and the two uploads are not related to each other or to the updates
    assert abs(np.corrcoef(uploads["zeros"].astype(np.float64), uploads["large"].astype(np.float64))[0, 1]) < 0.02


def test_partial_neighbour_graph_still_sums_exactly_with_a_dropout():
    # Prepare: 12 sites, 4 neighbours each (SecAgg+), threshold 3 of 5 holders
    xs = _inputs(12, 300, seed=1)
    rnd = Round(12, 300, threshold=3, neighbours=4)
    # Execute: site 5 drops before uploading
    total = rnd.run(xs, drop_upload={5})
    # Assert
    graph = rnd.server.graph
    assert all(len(v) == 4 for v in graph.values()) and all(i in graph[j] for i in graph for j in graph[i])
    np.testing.assert_array_equal(total, ring_sum(x for i, x in xs.items() if i != 5))


def test_neighbour_graph_is_regular_and_symmetric():
    graph = neighbour_graph(range(1, 21), 6)
    assert all(len(v) == 6 and i not in v for i, v in graph.items())
    assert all(i in graph[j] for i in graph for j in graph[i])
    assert neighbour_graph([1, 2, 3], 0) == {1: (2, 3), 2: (1, 3), 3: (1, 2)}


# ------------------------------------------------------------------ dropouts
def test_one_of_five_drops_before_upload_round_gives_sum_of_the_other_four():
    # Prepare: t = 3 of 5
    xs = _inputs(5, 500, seed=2)
    rnd = Round(5, 500, threshold=3)
    # Execute: site 4 shared its keys, then never uploads; its pairwise masks are removed from its shares
    total = rnd.run(xs, drop_upload={4})
    # Assert
    assert rnd.server.threshold == 3 and rnd.server.dropped == [4]
    np.testing.assert_array_equal(total, ring_sum(x for i, x in xs.items() if i != 4))


def test_one_of_five_drops_after_upload_its_input_is_recovered_from_shares():
    # Prepare
    xs = _inputs(5, 500, seed=3)
    rnd = Round(5, 500, threshold=3)
    # Execute: site 2 uploads its masked input, then goes silent at unmasking
    total = rnd.run(xs, drop_unmask={2})
    # Assert: its self mask is removed with the others' shares; all five inputs are in the sum
    np.testing.assert_array_equal(total, ring_sum(xs.values()))


def test_below_threshold_round_fails_cleanly():
    # Prepare
    xs = _inputs(5, 100, seed=4)
    rnd = Round(5, 100, threshold=3)
    rnd.advertise()
    rnd.share()
    # Execute / Assert: three of five never upload -> 2 < t = 3
    with pytest.raises(RoundFailed, match=r"2 site\(s\) left after masked input, below .* t=3"):
        rnd.upload(xs, drop={1, 2, 3})
    # ... and too few unmask replies to remove a self mask is a clean failure too
    rnd = Round(5, 100, threshold=3)
    rnd.advertise()
    rnd.share()
    rnd.upload(xs, drop={1, 2})
    with pytest.raises(RoundFailed, match=r"cannot remove the masks: .*2 share\(s\) received, 3 needed"):
        rnd.unmask(drop={3})


def test_late_site_cannot_make_the_server_unmask_it_twice():
    # Prepare: site 3 drops before upload; the server asks the survivors for its mask-key shares
    xs = _inputs(5, 200, seed=5)
    rnd = Round(5, 200, threshold=3)
    rnd.advertise()
    rnd.share()
    rnd.upload(xs, drop={3})
    late = rnd.clients[3].mask(xs[3])
    # Execute / Assert: the late upload is refused once the survivor set is fixed
    with pytest.raises(ProtocolError, match=r"arrived after the survivor set was fixed"):
        rnd.server.receive_masked_inputs({3: late})
    replies = {i: rnd.clients[i].unmask(r) for i, r in rnd.unmask_requests.items()}
    assert all(3 in r["sk-of"] and 3 not in r["b-of"] for r in replies.values())
    # A second unmask request (say, naming site 3 as a survivor) is refused by every site
    with pytest.raises(ProtocolError, match=r"already answered an unmask request"):
        rnd.clients[1].unmask({"u3": [1, 2, 3, 4, 5]})
    total = rnd.server.receive_unmask(replies)
    np.testing.assert_array_equal(total, ring_sum(x for i, x in xs.items() if i != 3))
    with pytest.raises(ProtocolError, match=r"arrived after the survivor set was fixed"):
        rnd.server.receive_masked_inputs({3: late})


def test_threshold_must_be_a_strict_majority():
    assert resolve_threshold(0.6, 5) == 3 and resolve_threshold(3, 5) == 3 and resolve_threshold(0.6, 3) == 2
    with pytest.raises(ValueError, match=r"not a strict majority"):
        resolve_threshold(2, 5)
    with pytest.raises(ValueError, match=r"asks for 6 shares .* only 5"):
        resolve_threshold(6, 5)


# -------------------------------------------------------- tampering, forgery
def test_tampered_ciphertext_is_rejected_naming_sender_and_receiver():
    # Prepare: the relayed shares from site 2 to site 1 get one bit flipped
    rnd = Round(3, 10)
    rnd.advertise()
    requests = rnd.share()
    req = dict(requests[1])
    k = req["from"].index(2)
    ct = bytearray(req["ct"][k])
    ct[-20] ^= 1
    req["ct"] = [bytes(ct) if j == k else c for j, c in enumerate(req["ct"])]
    # Execute / Assert
    with pytest.raises(DecryptionError, match=r"Encrypted shares from site 2 to site 1 .*failed authentication"):
        rnd.clients[1].receive_shares(req)
    # The untouched request still works
    rnd.clients[1].receive_shares(requests[1])


def test_shares_replayed_to_another_site_are_rejected():
    rnd = Round(3, 10)
    rnd.advertise()
    requests = rnd.share()
    req = dict(requests[3])
    # The server relays to site 3 the ciphertext site 2 made for site 1
    req["ct"] = [requests[1]["ct"][requests[1]["from"].index(2)] if j == 2 else c
                 for j, c in zip(req["from"], req["ct"])]
    with pytest.raises(DecryptionError, match=r"from site 2 to site 3"):
        rnd.clients[3].receive_shares(req)


def test_forged_key_advertisement_is_rejected_by_name_at_the_server():
    # Prepare: site 2's advertisement is replaced by a key pair signed with another identity
    def forge(ads):
        from fedeeg.secagg.keys import sign, x25519_keypair
        from fedeeg.secagg.protocol import advertisement_payload

        _, c_pk = x25519_keypair()
        _, s_pk = x25519_keypair()
        payload = advertisement_payload(rnd.server.session, 1, 2, c_pk, s_pk)
        ads[2] = {"site": 2, "c-pk": c_pk, "s-pk": s_pk, "sig": sign(generate_identity(), payload)}

    rnd = Round(4, 10, threshold=2)
    # Execute
    requests = rnd.advertise(ads_hook=forge)
    # Assert: site 2 is out, the round goes on with the others
    assert sorted(requests) == [1, 3, 4]
    (rej,) = rnd.server.rejected
    assert rej["site"] == "site id 2" and "SignatureError" in rej["reason"] and "does not verify" in rej["reason"]


def test_substituted_key_in_relayed_advertisement_is_rejected_by_the_site():
    # Prepare: a man in the middle swaps site 2's mask key in the request relayed to site 1
    from fedeeg.secagg.keys import x25519_keypair

    rnd = Round(3, 10)
    requests = rnd.advertise()
    req = dict(requests[1])
    k = req["nbrs"].index(2)
    req["nbr-s"] = [x25519_keypair()[1] if j == k else v for j, v in enumerate(req["nbr-s"])]
    # Execute / Assert
    with pytest.raises(SignatureError, match=r"Key advertisement of site 2 .*does not verify"):
        rnd.clients[1].share_keys(req)


def test_site_refuses_a_threshold_below_majority():
    rnd = Round(5, 10)
    requests = rnd.advertise()
    with pytest.raises(ProtocolError, match=r"threshold 2 is not a strict majority"):
        rnd.clients[1].share_keys({**requests[1], "threshold": 2})


# ------------------------------------------------- no numpy / python random
def test_no_numpy_or_python_random_in_mask_generation(monkeypatch):
    # Prepare: data first, then every numpy.random and random entry point raises
    import random

    xs = _inputs(4, 64, seed=6)
    vec = np.linspace(-1, 1, 62)

    def boom(*args, **kwargs):
        raise AssertionError("numpy/python random called")

    for name in ("default_rng", "Generator", "RandomState", "seed", "random", "rand", "randn", "randint", "normal",
                 "uniform", "integers", "bytes", "shuffle", "permutation", "choice", "standard_normal"):
        if hasattr(np.random, name):
            monkeypatch.setattr(np.random, name, boom)
    for name in ("random", "randint", "randrange", "getrandbits", "shuffle", "choice", "choices", "sample", "seed",
                 "gauss", "normalvariate", "uniform", "randbytes", "Random", "SystemRandom"):
        if hasattr(random, name):
            monkeypatch.setattr(random, name, boom)
    # Execute: a whole round, with DP noise and stochastic rounding, and a dropout
    spec = EncodingSpec(clip=1.0, n_sites=4, noise_std=0.5)
    encoded = {i: encode_update(vec, 10 * i, 0.3, spec)[0] for i in range(1, 5)}
    rnd = Round(4, 64)
    total = rnd.run(encoded, drop_upload={2})
    # Assert
    np.testing.assert_array_equal(total, ring_sum(encoded[i] for i in (1, 3, 4)))
    assert xs  # the inputs drawn before patching were not needed again


# ---------------------------------------------------------------- encoding
def test_encoding_decodes_the_weighted_mean_within_the_reported_bound():
    # Prepare: 4 sites, updates below the clip, different window counts
    rng = np.random.default_rng(7)
    deltas = [rng.normal(0, 0.01, 5000) for _ in range(4)]
    counts = [120, 300, 45, 900]
    spec = EncodingSpec(clip=10.0, n_sites=4, weight_cap=1000)
    # Execute
    total = ring_sum(encode_update(d, n, 0.5 + i, spec)[0] for i, (d, n) in enumerate(zip(deltas, counts)))
    dec = decode_sum(total, spec, n_inputs=4)
    # Assert
    exact = sum(n * d for d, n in zip(deltas, counts)) / sum(counts)
    assert dec.n_examples == sum(counts)
    assert np.max(np.abs(dec.mean - exact)) <= dec.error_bound
    assert dec.error_bound < 1e-5
    assert dec.mean_loss == pytest.approx(sum((0.5 + i) * n for i, n in enumerate(counts)) / sum(counts), abs=1e-4)


def test_encoding_clips_to_the_norm_bound():
    spec = EncodingSpec(clip=1.0, n_sites=1, weight_cap=10)
    enc, info = encode_update(np.full(100, 1.0), 10, 0.1, spec)
    dec = decode_sum(enc, spec, n_inputs=1)
    assert info["clipped"] and info["norm"] == pytest.approx(10.0)
    assert np.linalg.norm(dec.mean) == pytest.approx(1.0, abs=1e-5)


def test_ring_overflow_is_an_error_naming_the_parameters():
    with pytest.raises(ValueError, match=r"'quant_scale' .* too large for 50 sites with clip 10.*largest safe scale"):
        EncodingSpec(clip=10.0, n_sites=50, scale=1e8)
    with pytest.raises(ValueError, match=r"weight cap .* 'secagg_weight_cap'"):
        EncodingSpec(clip=1.0, n_sites=1000, weight_cap=10**7)
    # The largest safe scale keeps the worst case inside int32
    spec = EncodingSpec(clip=10.0, n_sites=50, noise_std=2.0)
    assert 50 * (spec.coordinate_bound * spec.scale + 1) <= 2**31 - 1


# ------------------------------------------------------------------------ DP
def test_distributed_noise_of_the_sum_has_the_configured_std():
    # Prepare: 4 sites send zero updates with noise multiplier 2 and clip 0.5
    n_values, sigma, clip = 50_000, 2.0, 0.5
    spec = EncodingSpec(clip=clip, n_sites=4, weight_cap=1, noise_std=sigma * clip)
    # Execute
    total = ring_sum(encode_update(np.zeros(n_values), 1, 0.0, spec)[0] for _ in range(4))
    noise = decode_sum(total, spec, n_inputs=4).total
    # Assert: std sigma * clip (within 2 %), centred
    assert np.std(noise) == pytest.approx(sigma * clip, rel=0.02)
    assert abs(np.mean(noise)) < 5 * sigma * clip / math.sqrt(n_values)


def test_rdp_epsilon_matches_closed_form_and_decreases_with_sigma():
    # Closed form for T rounds of the Gaussian mechanism: min over alpha of T alpha / (2 z^2) + log(1/delta)/(alpha-1)
    delta, rounds = 1e-5, 10
    epsilons = []
    for z in (0.5, 1.0, 2.0, 4.0):
        acc = RdpAccountant(delta)
        for _ in range(rounds):
            acc.step(z)
        L = math.log(1 / delta)
        best = rounds / (2 * z**2) + math.sqrt(2 * rounds * L) / z  # at the continuous optimum
        assert best <= acc.epsilon <= best * 1.02
        epsilons.append(acc.epsilon)
    assert all(a > b for a, b in zip(epsilons, epsilons[1:]))
    acc = RdpAccountant(delta)
    first = acc.step(1.0)
    acc.step(1.0)
    assert acc.epsilon > first > 0


# -------------------------------------------------------------------- shamir
def test_shamir_any_threshold_shares_give_the_secret_and_fewer_do_not():
    secret = os.urandom(32)
    shares = split_secret(secret, [1, 2, 3, 4, 5], 3)
    assert combine_shares({k: shares[k] for k in (1, 4, 5)}, 3, 32) == secret
    assert combine_shares(shares, 3, 32) == secret
    with pytest.raises(ShareError, match=r"2 share\(s\) received, 3 needed"):
        combine_shares({1: shares[1], 2: shares[2]}, 3, 32)
    bad = dict(shares)
    bad[5] = (bad[5] + 1) % (2**521 - 1)
    with pytest.raises(ShareError, match=r"inconsistent"):
        combine_shares(bad, 3, 32)


# ------------------------------------------------------------------ identity
def test_identity_file_is_private_and_round_trips(tmp_path):
    key = generate_identity()
    path = tmp_path / "site.key"
    pub_path = save_identity(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_bytes(load_identity(path)) == public_bytes(key)
    from fedeeg.secagg import load_public_identity

    assert public_bytes(load_public_identity(pub_path)) == public_bytes(key)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match=r"chmod 600"):
        load_identity(path)


def test_simulation_identities_are_deterministic_and_distinct():
    assert public_bytes(simulation_identity(3, 1)) == public_bytes(simulation_identity(3, 1))
    assert len({public_bytes(simulation_identity(3, i)) for i in range(1, 6)}) == 5
    assert public_bytes(simulation_identity(3, 1)) != public_bytes(simulation_identity(4, 1))
