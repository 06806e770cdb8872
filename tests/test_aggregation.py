"""Aggregation and update checks (Flower-free)."""

import numpy as np
import pytest

from fedeeg.aggregation import UpdateRejected, check_update, lora_delta, weighted_average


def _ref():
    return {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def test_weighted_average_weights_by_examples():
    u1 = {"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    u2 = {"a": 3 * np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}
    out = weighted_average([(u1, 30), (u2, 10)])
    np.testing.assert_allclose(out["a"], 1.5)
    np.testing.assert_allclose(out["b"], 0.25)
    assert out["a"].dtype == np.float32


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda u: u.pop("b"), r"missing tensors \['b'\]"),
        (lambda u: u.update(c=np.zeros(1, np.float32)), r"unexpected tensors \['c'\]"),
        (lambda u: u.update(a=np.zeros((3, 2), np.float32)), r"a: shape \(3, 2\), expected \(2, 3\)"),
        (lambda u: u.update(a=np.zeros((2, 3), np.float64)), r"a: dtype float64, expected float32"),
        (lambda u: u.update(b=np.array([0, np.nan, 0, 0], np.float32)), r"b: non-finite"),
    ],
)
def test_check_update_names_site_and_problem(mutate, match):
    update = _ref()
    mutate(update)
    with pytest.raises(UpdateRejected, match=r"site 'hospital-a'.*" + match):
        check_update(update, _ref(), site="hospital-a")


def test_check_update_accepts_matching_update():
    check_update(_ref(), _ref(), site="x")


def test_lora_delta_of_linear_and_conv_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5)), rng.normal(size=(7, 2))
    np.testing.assert_allclose(lora_delta(a, b), b @ a)
    a4, b4 = rng.normal(size=(4, 8, 1, 3)), rng.normal(size=(8, 4, 1, 1))
    assert lora_delta(a4, b4).shape == (8, 24)
