"""Power-function EMA and post-hoc EMA (Karras et al. 2024): the recurrence
and the sigma_rel <-> gamma relation against NumPy, PostHocEMA's profiles
against separate PowerEMA runs, snapshots on disk, and the reconstruction of
untracked profiles against the power EMA of recorded per-step weights."""

import os
import shutil

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa import averaging
from keras_swa import posthoc_ema
from tests.test_optimizers import UpdateRecorder
from tests.test_optimizers import assert_weights_close
from tests.test_optimizers import custom_train_step
from tests.test_optimizers import make_data
from tests.test_optimizers import make_model

# ---------------------------------------------------------------------------
# NumPy references


def power_ema_reference(updates, gamma, start=0, period=1):
    """The power EMA of recorded (index, weights), in float64."""
    average, k = None, 0
    for i, weights in updates:
        if i < start or (i - start) % period:
            continue
        k += 1
        beta = (1.0 - 1.0 / k) ** (gamma + 1.0)
        weights = [np.asarray(w, "float64") for w in weights]
        average = weights if k == 1 else [
            beta * a + (1.0 - beta) * w for a, w in zip(average, weights)
        ]
    return average, k


def profile_sigma_rel(gamma):
    """The standard deviation of the density tau**gamma on [0, 1], by
    numerical integration (independent of the closed form)."""
    tau = np.linspace(0.0, 1.0, 200_001)
    density = tau**gamma
    density /= np.trapezoid(density, tau)
    mean = np.trapezoid(tau * density, tau)
    return float(np.sqrt(np.trapezoid((tau - mean) ** 2 * density, tau)))


def _fit(model, optimizer, x, y, epochs, callbacks=(), batch_size=16):
    model.compile(optimizer=optimizer, loss="mse")
    recorder = UpdateRecorder()
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False,
        callbacks=[recorder, *callbacks],
    )
    return recorder.updates


def _values(variables):
    return [np.asarray(v.numpy()) for v in variables]


# ---------------------------------------------------------------------------
# sigma_rel <-> gamma and the recurrence


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.279])
def test_sigma_rel_and_gamma_determine_each_other(sigma_rel):
    gamma = averaging.sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    np.testing.assert_allclose(profile_sigma_rel(gamma), sigma_rel, rtol=1e-4)
    np.testing.assert_allclose(
        averaging.gamma_to_sigma_rel(gamma), sigma_rel, rtol=1e-12
    )
    np.testing.assert_allclose(
        averaging.sigma_rel_to_gamma(averaging.gamma_to_sigma_rel(gamma)),
        gamma, rtol=1e-10,
    )


def test_power_ema_weight_matches_numpy_for_long_runs():
    for gamma in (0.5, 6.94, 16.97):
        for n in (0, 1, 2, 9, 999, 123_456, 5_000_000):
            k = n + 1
            expected = 1.0 - (1.0 - 1.0 / k) ** (gamma + 1.0)
            got = float(averaging.power_ema_weight(np.int32(n), gamma))
            np.testing.assert_allclose(got, expected, rtol=2e-6)


@pytest.mark.parametrize("given,start,period", [
    ("sigma_rel", 0, 1), ("gamma", 3, 2)
])
def test_power_ema_in_fit_matches_numpy_reference(given, start, period):
    keras.utils.set_random_seed(1)
    x, y = make_data()
    model = make_model()
    kwargs = {"sigma_rel": 0.15} if given == "sigma_rel" else {"gamma": 3.0}
    opt = keras_swa.PowerEMA(
        keras.optimizers.Adam(0.01), start_averaging=start,
        average_period=period, **kwargs,
    )
    if given == "sigma_rel":
        assert opt.sigma_rel == 0.15
        np.testing.assert_allclose(
            averaging.gamma_to_sigma_rel(opt.gamma), 0.15, rtol=1e-12
        )
    else:
        assert opt.gamma == 3.0
        np.testing.assert_allclose(opt.sigma_rel, profile_sigma_rel(3.0),
                                   rtol=1e-4)
    updates = _fit(model, opt, x, y, epochs=3)

    expected, count = power_ema_reference(updates, opt.gamma, start, period)
    assert int(opt.n_averaged.numpy()) == count > 1
    assert_weights_close(_values(opt.average_variables), expected)


# ---------------------------------------------------------------------------
# PostHocEMA


@pytest.mark.parametrize("start,period", [(0, 1), (2, 3)])
def test_post_hoc_ema_profiles_equal_separate_power_emas(start, period):
    sigma_rels = (0.05, 0.2)
    x, y = make_data()

    def run(optimizer):
        keras.utils.set_random_seed(2)
        model = make_model()
        _fit(model, optimizer, x, y, epochs=2)
        return optimizer

    post_hoc = run(keras_swa.PostHocEMA(
        keras.optimizers.SGD(0.05, momentum=0.9), sigma_rels=sigma_rels,
        start_averaging=start, average_period=period,
    ))
    assert post_hoc.gammas == tuple(
        averaging.sigma_rel_to_gamma(s) for s in sigma_rels
    )
    for profile, sigma_rel in zip(post_hoc.profiles, sigma_rels):
        single = run(keras_swa.PowerEMA(
            keras.optimizers.SGD(0.05, momentum=0.9), sigma_rel=sigma_rel,
            start_averaging=start, average_period=period,
        ))
        assert profile.sigma_rel == sigma_rel
        assert int(profile.n_averaged.numpy()) == int(
            single.n_averaged.numpy()
        )
        assert_weights_close(
            _values(profile.average_variables),
            _values(single.average_variables), rtol=1e-6, atol=1e-7,
        )
    # The optimizer stands for its first profile.
    assert_weights_close(
        _values(post_hoc.average_variables),
        _values(post_hoc.profiles[0].average_variables), 0, 0,
    )


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_post_hoc_ema_keeps_float32_profiles_in_a_custom_loop(policy):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(3)
    x, y = make_data()
    model = make_model(batch_norm=False)
    opt = keras_swa.PostHocEMA(
        keras.optimizers.SGD(0.02), sigma_rels=(0.05, 0.2), average_period=2
    )
    train_step = custom_train_step(model, opt, keras.losses.MeanSquaredError())
    updates = []
    for step in range(30):
        start = (step * 16) % len(x)
        train_step(x[start : start + 16], y[start : start + 16])
        updates.append(
            (step, [np.asarray(v.numpy()).astype("float64")
                    for v in model.trainable_variables])
        )
    for profile in opt.profiles:
        assert all(a.dtype == "float32" for a in profile.average_variables)
        expected, count = power_ema_reference(updates, profile.gamma, 0, 2)
        assert int(opt.n_averaged.numpy()) == count == 15
        assert_weights_close(
            _values(profile.average_variables), expected, rtol=2e-6, atol=2e-7
        )


def test_profiles_are_sources_of_averages():
    keras.utils.set_random_seed(4)
    x, y = make_data()
    model = make_model()
    opt = keras_swa.PostHocEMA(keras.optimizers.SGD(0.05))
    _fit(model, opt, x, y, epochs=2)
    raw = _values(model.trainable_variables)
    narrow, wide = opt.profiles
    with keras_swa.averaged_weights(model, source=wide):
        assert_weights_close(
            _values(model.trainable_variables),
            _values(wide.average_variables), 0, 0,
        )
    assert_weights_close(_values(model.trainable_variables), raw, 0, 0)
    keras_swa.assign_average(model)  # model.optimizer: the first profile
    assert_weights_close(
        _values(model.trainable_variables),
        _values(narrow.average_variables), 0, 0,
    )


def test_power_emas_survive_config_and_saving(tmp_path):
    for opt in (
        keras_swa.PowerEMA(keras.optimizers.SGD(0.1), sigma_rel=0.07),
        keras_swa.PowerEMA(keras.optimizers.SGD(0.1), gamma=np.float32(4.5)),
        keras_swa.PostHocEMA(keras.optimizers.SGD(0.1), sigma_rels=[0.03, 0.2],
                             start_averaging=2, average_period=3),
    ):
        clone = type(opt).from_config(opt.get_config())
        assert clone.get_config() == opt.get_config()
        if isinstance(opt, keras_swa.PowerEMA):
            assert (clone.sigma_rel, clone.gamma) == (opt.sigma_rel, opt.gamma)
        else:
            assert clone.sigma_rels == opt.sigma_rels == (0.03, 0.2)

    keras.utils.set_random_seed(5)
    x, y = make_data()
    model = make_model()
    opt = keras_swa.PostHocEMA(keras.optimizers.Adam(0.01))
    _fit(model, opt, x, y, epochs=2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, keras_swa.PostHocEMA)
    assert int(loaded.optimizer.n_averaged.numpy()) == int(
        opt.n_averaged.numpy()
    )
    for saved, restored in zip(opt.profiles, loaded.optimizer.profiles):
        assert_weights_close(
            _values(restored.average_variables),
            _values(saved.average_variables), 0, 0,
        )


# ---------------------------------------------------------------------------
# Snapshots and reconstruction


def _snapshot_run(directory, sigma_rels=(0.05, 0.1), epochs=10, dtype="float32",
                  seed=6, batch_norm=False):
    """200 updates of a small model, a snapshot every 10 updates; returns
    the model, its optimizer and the recorded per-update weights."""
    keras.utils.set_random_seed(seed)
    x, y = make_data(n=320)
    model = make_model(batch_norm=batch_norm)
    opt = keras_swa.PostHocEMA(
        keras.optimizers.SGD(0.03, momentum=0.9), sigma_rels=sigma_rels
    )
    updates = _fit(
        model, opt, x, y, epochs=epochs,
        callbacks=[keras_swa.EMASnapshots(directory, every_n_steps=10,
                                          dtype=dtype)],
    )
    return model, opt, updates


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reconstruction_of_an_untracked_sigma_rel_matches_the_power_ema(
    tmp_path, dtype
):
    directory = str(tmp_path / "ema")
    model, opt, updates = _snapshot_run(directory, dtype=dtype)
    assert len(updates) == 200
    assert sorted(os.listdir(directory)) == [
        f"ema-{step:010d}.npz" for step in range(10, 201, 10)
    ]
    with np.load(os.path.join(directory, "ema-0000000050.npz")) as data:
        assert int(data["step"]) == 50 and int(data["n_averaged"]) == 50
        np.testing.assert_array_equal(data["gammas"], opt.gammas)
        assert data["profile_1_average_0"].dtype == dtype
    narrow, wide = (power_ema_reference(updates, g)[0] for g in opt.gammas)
    spread = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(narrow, wide)))
    size = np.sqrt(sum(np.sum(a**2) for a in narrow + wide))

    for sigma_rel in (0.07, 0.13):
        coefficients = keras_swa.reconstruct_ema(model, directory, sigma_rel)
        assert len(coefficients) == 40
        np.testing.assert_allclose(
            sum(c.coefficient for c in coefficients), 1.0, rtol=1e-9
        )
        expected, _ = power_ema_reference(
            updates, averaging.sigma_rel_to_gamma(sigma_rel)
        )
        error = np.sqrt(sum(
            np.sum((a - e) ** 2)
            for a, e in zip(_values(model.trainable_variables), expected)
        ))
        # Karras et al.: a few percent of the distance between the tracked
        # profiles, also for 0.13, outside them (measured: 0.1% and 0.2%).
        bound = 0.03 * spread
        if dtype == "float16":
            # Each stored value is off by at most 2**-11 of itself, and the
            # coefficients add those errors up (measured: 2e-4 of the
            # weights' size, 3 to 4% of this run's small spread).
            absolute = sum(abs(c.coefficient) for c in coefficients)
            bound += absolute * 2.0**-11 * size
        assert error < bound, (sigma_rel, error / spread)


def test_reconstruction_of_a_tracked_profile_returns_its_snapshot(tmp_path):
    directory = str(tmp_path / "ema")
    model, opt, _ = _snapshot_run(directory, epochs=4)
    with np.load(os.path.join(directory, "ema-0000000050.npz")) as data:
        stored = [data[f"profile_1_average_{i}"] for i in range(4)]
    coefficients = keras_swa.reconstruct_ema(model, directory, 0.1, step=50)
    assert len(coefficients) == 10
    chosen = max(coefficients, key=lambda c: c.coefficient)
    assert (chosen.step, chosen.sigma_rel) == (50, 0.1)
    np.testing.assert_allclose(chosen.coefficient, 1.0, atol=1e-6)
    assert_weights_close(
        _values(model.trainable_variables), stored, rtol=1e-5, atol=1e-6
    )


def test_sweep_evaluates_each_sigma_rel_and_restores_the_model(tmp_path):
    directory = str(tmp_path / "ema")
    model, _, _ = _snapshot_run(directory, epochs=3)
    x, y = make_data(n=64, seed=1)
    raw = _values(model.trainable_variables)
    table = keras_swa.sweep_ema(model, directory, [0.05, 0.08], (x, y))
    assert_weights_close(_values(model.trainable_variables), raw, 0, 0)
    assert [row["sigma_rel"] for row in table] == [0.05, 0.08]
    for row in table:
        keras_swa.reconstruct_ema(model, directory, row["sigma_rel"])
        np.testing.assert_allclose(
            row["loss"], model.evaluate(x, y, verbose=0), rtol=1e-5
        )


def test_snapshots_resume_without_overwriting_or_duplicating(tmp_path):
    directory = str(tmp_path / "ema")
    keras.utils.set_random_seed(7)
    x, y = make_data(n=160)
    model = make_model(batch_norm=False)
    model.compile(
        optimizer=keras_swa.PowerEMA(keras.optimizers.SGD(0.03), sigma_rel=0.1),
        loss="mse",
    )

    def fit():
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[
            keras_swa.EMASnapshots(directory, every_n_steps=10)
        ])

    fit()
    assert sorted(os.listdir(directory)) == ["ema-0000000010.npz",
                                             "ema-0000000020.npz"]
    # A snapshot of the steps a resumed fit replays is kept as it is.
    replayed = os.path.join(directory, "ema-0000000030.npz")
    shutil.copy(os.path.join(directory, "ema-0000000010.npz"), replayed)
    fit()
    assert sorted(os.listdir(directory)) == [
        f"ema-{s:010d}.npz" for s in (10, 20, 30, 40)
    ]
    with np.load(replayed) as data:
        assert int(data["step"]) == 10
    with np.load(os.path.join(directory, "ema-0000000040.npz")) as data:
        assert int(data["step"]) == 40 and int(data["n_averaged"]) == 40

    # A fit from update 0 into that directory would mix two runs.
    fresh = make_model(batch_norm=False)
    fresh.compile(
        optimizer=keras_swa.PowerEMA(keras.optimizers.SGD(0.03), sigma_rel=0.1),
        loss="mse",
    )
    before = _values(fresh.trainable_variables)
    with pytest.raises(ValueError, match="already holds 4 snapshot"):
        fresh.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[
            keras_swa.EMASnapshots(directory, every_n_steps=10)
        ])
    assert_weights_close(_values(fresh.trainable_variables), before, 0, 0)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs,error,match", [
    ({}, ValueError, "exactly one"),
    ({"sigma_rel": 0.1, "gamma": 6.9}, ValueError, "exactly one"),
    ({"sigma_rel": 0.0}, ValueError, "sigma_rel=0.0"),
    ({"sigma_rel": 0.28}, ValueError, "sigma_rel=0.28"),
    ({"sigma_rel": -0.1}, ValueError, "sigma_rel=-0.1"),
    ({"sigma_rel": float("nan")}, ValueError, "sigma_rel=nan"),
    ({"sigma_rel": "0.1"}, TypeError, "sigma_rel='0.1'"),
    ({"sigma_rel": True}, TypeError, "sigma_rel=True"),
    ({"gamma": 0.1}, ValueError, "gamma=0.1"),
    ({"gamma": float("inf")}, ValueError, "gamma=inf"),
])
def test_power_ema_rejects_bad_profiles(kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_swa.PowerEMA(keras.optimizers.SGD(0.1), **kwargs)


@pytest.mark.parametrize("sigma_rels,error,match", [
    ((), TypeError, "non-empty"),
    (0.1, TypeError, "non-empty"),
    ((0.05, 0.05), ValueError, "distinct"),
    ((0.05, 0.3), ValueError, "sigma_rels=0.3"),
    ((0.05, None), TypeError, "sigma_rels=None"),
])
def test_post_hoc_ema_rejects_bad_sigma_rels(sigma_rels, error, match):
    with pytest.raises(error, match=match):
        keras_swa.PostHocEMA(keras.optimizers.SGD(0.1), sigma_rels=sigma_rels)


def test_snapshots_reject_bad_arguments_and_other_optimizers(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps=0"):
        keras_swa.EMASnapshots(str(tmp_path), every_n_steps=0)
    with pytest.raises(ValueError, match="'bfloat16'"):
        keras_swa.EMASnapshots(str(tmp_path), dtype="bfloat16")
    with pytest.raises(TypeError, match="directory=3"):
        keras_swa.EMASnapshots(3)
    x, y = make_data()
    model = make_model(batch_norm=False)
    model.compile(optimizer=keras_swa.EMA(keras.optimizers.SGD(0.1)), loss="mse")
    with pytest.raises(TypeError, match="PostHocEMA"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[keras_swa.EMASnapshots(str(tmp_path / "e"))])


def test_reconstruction_rejects_bad_input_and_leaves_the_model(tmp_path):
    directory = str(tmp_path / "ema")
    model, _, _ = _snapshot_run(directory, epochs=2, batch_norm=True)
    before = _values(model.variables)
    for kwargs, error, match in [
        ({"sigma_rel": 0.28}, ValueError, "sigma_rel=0.28"),
        ({"sigma_rel": 0.1, "step": 15}, ValueError, "step=15"),
        ({"sigma_rel": 0.1, "step": -1}, ValueError, "step=-1"),
    ]:
        with pytest.raises(error, match=match):
            keras_swa.reconstruct_ema(model, directory, **kwargs)
    with pytest.raises(ValueError, match="holds no snapshot"):
        keras_swa.reconstruct_ema(model, str(tmp_path / "empty"), 0.1)
    other = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(3),
        keras.layers.BatchNormalization(), keras.layers.Dense(1),
    ])
    other_before = _values(other.trainable_variables)
    with pytest.raises(ValueError, match="has shape"):
        keras_swa.reconstruct_ema(other, directory, 0.1)
    assert_weights_close(_values(other.trainable_variables), other_before, 0, 0)
    # A BN pass that fails leaves the weights as they were, too.
    with pytest.raises(ValueError):
        keras_swa.reconstruct_ema(
            model, directory, 0.1, bn_data=np.zeros((0, 5), "float32")
        )
    assert_weights_close(_values(model.variables), before, 0, 0)


def test_solver_coefficients_against_a_discrete_least_squares():
    # The closed-form inner products against sums over the discrete power
    # EMA weights of snapshots 1..t (Karras et al.'s profiles, sampled).
    def discrete(t, gamma, length):
        i = np.arange(1, length + 1)
        return np.where(i <= t, (i / t) ** (gamma + 1)
                        - ((i - 1) / t) ** (gamma + 1), 0.0)

    times = np.array([500, 500, 1000, 1000, 2000, 2000], "float64")
    gammas = np.array([16.97, 6.94] * 3)
    rows = np.stack([discrete(t, g, 2000) for t, g in zip(times, gammas)])
    target = discrete(2000, 10.0, 2000)
    # Each discrete weight stands for the profile on a unit interval.
    expected = np.linalg.lstsq(rows.T, target, rcond=None)[0]
    got = posthoc_ema.solve_coefficients(times, gammas, 2000, 10.0)
    np.testing.assert_allclose(got, expected / expected.sum(), atol=2e-2)


def test_reconstruction_checks_the_variables_not_only_their_shapes(tmp_path):
    # Issue 21.11: snapshots of another model with the same shapes loaded
    # silently. A model of the same architecture (other auto-numbered layer
    # names, as a second model in one process gets) still reconstructs.
    directory = str(tmp_path / "ema")
    model, _, _ = _snapshot_run(directory, epochs=2)
    expected = _values(model.trainable_variables)
    keras_swa.reconstruct_ema(model, directory, 0.1)
    reconstructed = _values(model.trainable_variables)
    twin = make_model(batch_norm=False)  # Layers dense_2, dense_3.
    keras_swa.reconstruct_ema(twin, directory, 0.1)
    assert_weights_close(_values(twin.trainable_variables), reconstructed,
                         0, 0)
    assert not np.array_equal(reconstructed[0], expected[0])

    other = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(8, name="encoder"),
        keras.layers.Dense(1, name="head"),
    ])
    before = _values(other.trainable_variables)
    with pytest.raises(ValueError, match=r"ema-\d+\.npz.*encoder/kernel"):
        keras_swa.reconstruct_ema(other, directory, 0.1)
    assert_weights_close(_values(other.trainable_variables), before, 0, 0)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "member"])
def test_reconstruction_names_a_corrupt_snapshot_file(tmp_path, damage):
    # Issue 21.15: a corrupt file gave a raw zip/OS traceback.
    directory = str(tmp_path / "ema")
    model, _, _ = _snapshot_run(directory, epochs=2)
    files = sorted(os.listdir(directory))
    path = os.path.join(directory, files[-1])
    data = open(path, "rb").read()
    if damage == "garbage":
        data = b"not a snapshot at all" * 10
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:  # The directory of the archive intact, a member's bytes broken.
        start = data.index(b"profile_0_average_0") + 200
        data = data[:start] + bytes(64) + data[start + 64:]
    with open(path, "wb") as file:
        file.write(data)
    before = _values(model.variables)
    with pytest.raises(ValueError, match=files[-1]):
        keras_swa.reconstruct_ema(model, directory, 0.1)
    assert_weights_close(_values(model.variables), before, 0, 0)
