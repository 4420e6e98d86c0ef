import contextlib

import keras
import numpy as np
import pytest
from keras import ops

from keras_swa import averaging


@contextlib.contextmanager
def float64_enabled():
    """float64 arrays for the span of a test: JAX turns them into float32
    unless `jax_enable_x64` is on (the other backends always have them)."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("start,period", [(0, 1), (0, 10), (3, 4), (7, 1)])
def test_is_snapshot_step_matches_tensorflow_addons_rule(start, period):
    steps = np.arange(40)
    got = [
        bool(ops.convert_to_numpy(averaging.is_snapshot_step(s, start, period)))
        for s in steps
    ]
    # tensorflow_addons: num_snapshots = (step - start) // period, averaged
    # when step >= start and step == start + num_snapshots * period.
    expected = [
        s >= start and s == start + ((s - start) // period) * period
        for s in steps
    ]
    assert got == expected


def test_is_snapshot_step_on_int64_tensor():
    step = ops.convert_to_tensor(np.int64(22))
    assert bool(ops.convert_to_numpy(averaging.is_snapshot_step(step, 2, 5)))
    step = ops.convert_to_tensor(np.int64(23))
    assert not bool(ops.convert_to_numpy(averaging.is_snapshot_step(step, 2, 5)))


def test_swa_update_is_the_running_mean():
    rng = np.random.default_rng(0)
    snapshots = rng.normal(size=(6, 3, 2)).astype("float32")
    average = np.full((3, 2), 123.0, dtype="float32")  # ignored by n == 0
    for n, snapshot in enumerate(snapshots):
        average = ops.convert_to_numpy(
            averaging.swa_update(average, snapshot, n)
        )
    np.testing.assert_allclose(
        average, snapshots.mean(axis=0), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_update_matches_numpy(warmup):
    rng = np.random.default_rng(1)
    snapshots = rng.normal(size=(8, 4)).astype("float32")
    decay = 0.9
    average = np.zeros(4, "float32")
    expected = None
    for n, snapshot in enumerate(snapshots):
        average = ops.convert_to_numpy(
            averaging.ema_update(average, snapshot, n, decay, warmup)
        )
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        expected = snapshot if n == 0 else d * expected + (1 - d) * snapshot
        np.testing.assert_allclose(average, expected, rtol=1e-5, atol=1e-6)


def test_ema_decay_warmup_values():
    got = [
        float(ops.convert_to_numpy(averaging.ema_decay(n, 0.95, True)))
        for n in (0, 5, 1000)
    ]
    np.testing.assert_allclose(got, [0.1, 6 / 15, 0.95], rtol=1e-6)
    assert float(ops.convert_to_numpy(averaging.ema_decay(0, 0.95, False))) == (
        pytest.approx(0.95)
    )


@pytest.mark.parametrize("warmup", [False, True])
def test_snapshot_weights_match_the_rules(warmup):
    for n in (0, 1, 7, 100):
        t = float(ops.convert_to_numpy(averaging.swa_weight(n)))
        assert t == pytest.approx(1 / (n + 1))
        t = float(ops.convert_to_numpy(averaging.ema_weight(n, 0.9, warmup)))
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        assert t == pytest.approx(1.0 if n == 0 else 1 - d)


def test_interpolate_matches_numpy_and_keeps_the_average_dtype():
    rng = np.random.default_rng(2)
    average, value = rng.normal(size=(2, 6)).astype("float32")
    got = averaging.interpolate(average, value.astype("float16"), 0.3)
    assert ops.convert_to_numpy(got).dtype == np.float32
    np.testing.assert_allclose(
        ops.convert_to_numpy(got),
        0.7 * average + 0.3 * value.astype("float16").astype("float32"),
        rtol=1e-5, atol=1e-6,
    )


@pytest.mark.parametrize("start,period", [(0, 1), (3, 4), (5, 10)])
def test_is_snapshot_step_on_python_ints_agrees_with_tensors(start, period):
    for step in range(30):
        in_python = averaging.is_snapshot_step(step, start, period)
        assert isinstance(in_python, bool)
        tensor = ops.convert_to_tensor(step, dtype="int32")
        assert in_python == bool(
            ops.convert_to_numpy(
                averaging.is_snapshot_step(tensor, start, period)
            )
        )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rules_compute_in_the_dtype_they_are_given(dtype):
    gamma = averaging.sigma_rel_to_gamma(0.1)
    rules = {
        averaging.Uniform(): lambda n: 1.0 / (n + 1),
        averaging.Exponential(0.9): lambda n: 1.0 if n == 0 else 1.0 - 0.9,
        averaging.PowerFunction(gamma): lambda n: (
            1.0 if n == 0 else -np.expm1((gamma + 1) * np.log1p(-1 / (n + 1)))
        ),
    }
    with float64_enabled():
        for rule, expected in rules.items():
            for n in (0, 2, 9, 999):
                t = rule.weight(averaging.Snapshot(count=n, dtype=dtype))
                t = ops.convert_to_numpy(t)
                assert t.dtype == dtype
                # Exact to the last digit of `dtype`, not to float32's.
                np.testing.assert_allclose(
                    t, expected(n), rtol=4 * np.finfo(dtype).eps
                )
