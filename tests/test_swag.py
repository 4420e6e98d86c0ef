"""SWAG's moments and samples, against NumPy references of the epoch-end
weights recorded during `fit`, on every backend."""

import os
import warnings

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa.callbacks import BACKUP_FILENAME
from tests.test_callbacks import InterruptAt
from tests.test_engine import _on_device
from tests.test_engine import _placement


class EpochEndWeights(keras.callbacks.Callback):
    """Records the trainable weights (float64) at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [
            np.asarray(v.numpy()).astype("float64")
            for v in self.model.trainable_variables
        ]


def swag_reference(snapshots, max_rank):
    """Mean, variance and the deviation slots of `snapshots` (lists of
    float64 arrays), written from the definition: the variance is NumPy's
    (biased, over the snapshots); slot `(j - 1) % max_rank` holds
    `w_j - mean_j`, with `mean_j` the mean of the first `j`."""
    mean = [np.mean(ws, axis=0) for ws in zip(*snapshots)]
    variance = [np.var(ws, axis=0) for ws in zip(*snapshots)]
    slots = [None] * max_rank
    for j in range(1, len(snapshots) + 1):
        running_mean = [np.mean(ws, axis=0) for ws in zip(*snapshots[:j])]
        if max_rank:
            slots[(j - 1) % max_rank] = [
                w - m for w, m in zip(snapshots[j - 1], running_mean)
            ]
    return mean, variance, [s for s in slots if s is not None]


def make_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 2)) + 0.3 * rng.normal(size=(n, 2)))
    return x, y.astype("float32")


def make_model(seed=0, hidden=True):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,))]
    if hidden:
        layers.append(keras.layers.Dense(5, activation="tanh"))
    layers.append(keras.layers.Dense(2, use_bias=hidden))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def fit(model, callbacks, epochs, batch_size=8, shuffle=False):
    x, y = make_data()
    model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=shuffle,
        verbose=0, callbacks=callbacks,
    )


def assert_close(actual, expected, rtol=2e-6, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(a.numpy()), e, rtol=rtol, atol=atol)


def _flat(arrays):
    return np.concatenate([np.ravel(a).astype("float64") for a in arrays])


@pytest.mark.parametrize(
    "start_epoch, average_period, epochs, max_rank, snapshot_epochs",
    [
        (1, 1, 8, 3, [1, 2, 3, 4, 5, 6, 7]),  # the ring buffer wraps twice
        (1, 2, 8, 5, [1, 3, 5, 7]),  # fewer snapshots than max_rank
        (2, 3, 9, 2, [2, 5, 8]),
    ],
)
def test_moments_and_deviations_match_numpy(
    start_epoch, average_period, epochs, max_rank, snapshot_epochs
):
    model = make_model()
    recorder = EpochEndWeights()
    swag = keras_swa.SWAG(
        start_epoch=start_epoch, max_rank=max_rank,
        average_period=average_period, verbose=0,
    )
    fit(model, [recorder, swag], epochs=epochs)

    snapshots = [recorder.weights[e] for e in snapshot_epochs]
    mean, variance, slots = swag_reference(snapshots, max_rank)
    assert int(swag.n_averaged.numpy()) == len(snapshots)
    assert swag.rank == min(len(snapshots), max_rank)
    assert_close(swag.average_variables, mean)
    assert_close(swag.variance_variables, variance)
    assert len(swag.deviation_variables) == max_rank
    for slot, expected in enumerate(slots):
        assert_close(swag.deviation_variables[slot], expected)
    # Slots not reached yet stay zero.
    for slot in swag.deviation_variables[len(slots):]:
        assert all(not np.asarray(v.numpy()).any() for v in slot)
    # At the end of fit the model holds the SWA mean.
    assert_close(model.trainable_variables, mean)


def window_reference(snapshots, max_rank, window):
    """`swag_reference` with a window: the mean and variance of the last
    `window` snapshots; slot `(j - 1) % max_rank` holds `w_j` minus the
    mean of the window that ends at `j`."""
    mean, variance, _ = swag_reference(snapshots[-window:], max_rank)
    slots = [None] * max_rank
    for j in range(1, len(snapshots) + 1):
        held = snapshots[max(0, j - window):j]
        window_mean = [np.mean(ws, axis=0) for ws in zip(*held)]
        slots[(j - 1) % max_rank] = [
            w - m for w, m in zip(snapshots[j - 1], window_mean)
        ]
    return mean, variance, [s for s in slots if s is not None]


@pytest.mark.parametrize("window", [1, 3, 9])
def test_window_and_offload_moments_match_numpy(window):
    # 7 snapshots: a window of 1 (no ring), one that slides (3) and one not
    # yet full (9); offloaded or not, the same numbers.
    results = {}
    for offload in (False, True):
        model = make_model()
        recorder = EpochEndWeights()
        swag = keras_swa.SWAG(start_epoch=1, max_rank=3, window=window,
                              offload=offload, verbose=0)
        fit(model, [recorder, swag], epochs=8)
        snapshots = [recorder.weights[e] for e in range(1, 8)]
        mean, variance, slots = window_reference(snapshots, 3, window)
        assert int(swag.n_averaged.numpy()) == 7
        assert_close(swag.average_variables, mean)
        assert_close(swag.variance_variables, variance)
        for slot, expected in enumerate(slots):
            assert_close(swag.deviation_variables[slot], expected)
        assert_close(model.trainable_variables, mean)
        moments = swag.average_variables + swag.variance_variables + [
            v for slot in swag.deviation_variables for v in slot
        ]
        places = {_placement(v) for v in moments}
        if offload:
            assert places == {"host"}, places
        elif keras.backend.backend() == "jax":
            assert places == {"device"}, places
        results[offload] = [
            np.asarray(v) for v in swag.sample(scale=0.5, seed=3)
        ]
        # A sample comes into the model where its weights live.
        with keras_swa.sampled_weights(model, swag, seed=3):
            assert all(_on_device(v) for v in model.variables)
            for variable, value in zip(model.trainable_variables,
                                       results[offload]):
                np.testing.assert_allclose(np.asarray(variable.numpy()),
                                           value, rtol=1e-6, atol=1e-7)
    for offloaded, on_device in zip(results[True], results[False]):
        np.testing.assert_allclose(offloaded, on_device, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_narrow_variables_keep_float32_moments(policy):
    keras.config.set_dtype_policy(policy)
    model = make_model()
    assert model.trainable_variables[0].dtype == policy
    recorder = EpochEndWeights()
    swag = keras_swa.SWAG(start_epoch=1, max_rank=2, verbose=0)
    fit(model, [recorder, swag], epochs=5)

    mean, variance, slots = swag_reference(
        [recorder.weights[e] for e in range(1, 5)], 2
    )
    for variables in [
        swag.average_variables, swag.variance_variables,
        *swag.deviation_variables,
    ]:
        assert all(v.dtype == "float32" for v in variables)
    assert_close(swag.variance_variables, variance)
    for slot, expected in enumerate(slots):
        assert_close(swag.deviation_variables[slot], expected)
    assert all(w.dtype == np.float32 for w in swag.sample(seed=0))


def _posterior(swag):
    """The mean, the variance (with its floor) and the deviation columns of
    the posterior, in NumPy, from the moments SWAG holds."""
    mean = _flat([v.numpy() for v in swag.average_variables])
    variance = np.maximum(
        _flat([v.numpy() for v in swag.variance_variables]), 1e-30
    )
    columns = np.stack(
        [_flat([v.numpy() for v in slot])
         for slot in swag.deviation_variables[: swag.rank]],
        axis=1,
    )
    return mean, variance, columns


def test_sample_follows_the_formula():
    model = make_model()
    recorder = EpochEndWeights()
    swag = keras_swa.SWAG(start_epoch=2, max_rank=4, verbose=0)
    fit(model, [recorder, swag], epochs=9)
    mean, variance, columns = _posterior(swag)
    rank = swag.rank
    assert columns.shape == (mean.size, 4)
    # The variance of the snapshots, from the recorded weights.
    snapshots = np.stack([_flat(recorder.weights[e]) for e in range(2, 9)])
    np.testing.assert_allclose(
        variance, np.var(snapshots, axis=0), rtol=1e-4, atol=1e-12
    )

    scale = 0.3
    full = _flat(swag.sample(scale=scale, seed=7))
    diagonal = _flat(swag.sample(scale=scale, seed=7, diagonal=True))
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    assert [w.shape for w in swag.sample(seed=7)] == shapes
    # Reproducible for a seed, different for another.
    np.testing.assert_array_equal(full, _flat(swag.sample(scale=scale, seed=7)))
    assert not np.allclose(full, _flat(swag.sample(scale=scale, seed=8)))
    # The diagonal part: mean + sqrt(scale * var) * z1, z1 plausibly normal.
    z1 = (diagonal - mean) / np.sqrt(scale * variance)
    assert abs(z1.mean()) < 0.5 and 0.5 < z1.std() < 1.5
    # The same z1 in the full sample: what is left is
    # sqrt(scale) * D @ z2 / sqrt(K - 1), in the span of the columns.
    low_rank = (full - diagonal) / np.sqrt(scale / (rank - 1))
    z2, *_ = np.linalg.lstsq(columns, low_rank, rcond=None)
    np.testing.assert_allclose(columns @ z2, low_rank, rtol=1e-4, atol=1e-6)
    assert np.abs(low_rank).max() > 0
    # scale=0 is the mean, exactly.
    for sample, average in zip(
        swag.sample(scale=0.0, seed=1), swag.average_variables
    ):
        np.testing.assert_array_equal(sample, average.numpy())


def test_empirical_covariance_of_samples():
    # One kernel of 2 x 3: few enough parameters for a sharp estimate.
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(3, use_bias=False)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 2)).astype("float32")
    # Targets of pure noise: the weights wander about 0.
    y = rng.normal(size=(64, 3)).astype("float32")
    swag = keras_swa.SWAG(start_epoch=1, max_rank=3, verbose=0)
    model.fit(x, y, batch_size=4, epochs=7, shuffle=False, verbose=0,
              callbacks=[swag])
    mean, variance, columns = _posterior(swag)
    assert swag.rank == 3
    scale = 0.5
    expected = {
        False: scale * (np.diag(variance) + columns @ columns.T / 2),
        True: scale * np.diag(variance),
    }
    # The low-rank part is not negligible: the test would see it missing.
    assert np.abs(expected[False] - expected[True]).max() > 0.3 * np.abs(
        expected[True]
    ).max()

    # 2100 samples in all: a sample is some 20 eager ops, 10 ms on the
    # slowest backend.
    for diagonal, num_samples in ((False, 1500), (True, 600)):
        samples = np.stack(
            [
                _flat(swag.sample(scale=scale, seed=seed, diagonal=diagonal))
                for seed in range(num_samples)
            ]
        )
        covariance = expected[diagonal]
        standard = np.sqrt(np.diag(covariance))
        # Standard errors of the sample mean and covariance of a Gaussian.
        mean_error = standard / np.sqrt(num_samples)
        covariance_error = np.sqrt(
            (np.outer(standard**2, standard**2) + covariance**2) / num_samples
        )
        assert np.all(np.abs(samples.mean(axis=0) - mean) < 5 * mean_error)
        empirical = np.cov(samples, rowvar=False)
        assert np.all(np.abs(empirical - covariance) < 5 * covariance_error)


def test_diagonal_only_without_deviation_columns():
    model = make_model()
    recorder = EpochEndWeights()
    swag = keras_swa.SWAG(start_epoch=1, max_rank=0, verbose=0)
    fit(model, [recorder, swag], epochs=4)
    assert swag.rank == 0 and swag.deviation_variables == []
    mean, variance, _ = swag_reference(
        [recorder.weights[e] for e in range(1, 4)], 0
    )
    assert_close(swag.variance_variables, variance)
    # Without columns, the full sample is the diagonal one.
    np.testing.assert_array_equal(
        _flat(swag.sample(seed=2)), _flat(swag.sample(seed=2, diagonal=True))
    )


def test_one_snapshot_samples_the_diagonal():
    model = make_model()
    swag = keras_swa.SWAG(start_epoch=2, max_rank=5, verbose=0)
    fit(model, [swag], epochs=3)
    assert swag.rank == 1
    # K < 2: no low-rank term (said once); with one snapshot var is the
    # 1e-30 floor.
    with pytest.warns(UserWarning, match="diagonal only") as warned:
        sample = _flat(swag.sample(seed=0))
        swag.sample(seed=1)
    assert sum("diagonal only" in str(w.message) for w in warned) == 1
    np.testing.assert_array_equal(
        sample, _flat(swag.sample(seed=0, diagonal=True))
    )
    np.testing.assert_allclose(
        sample, _flat([v.numpy() for v in swag.average_variables]), atol=1e-12
    )


@pytest.mark.parametrize("kwargs", [{}, {"window": 4, "offload": True}])
def test_resume_gives_the_uninterrupted_moments(tmp_path, kwargs):
    def run(directory, interrupt_at=None):
        model = make_model()
        swag = keras_swa.SWAG(
            start_epoch=1, max_rank=3, backup_dir=directory / "swag",
            verbose=0, **kwargs,
        )
        callbacks = [
            swag, keras.callbacks.BackupAndRestore(str(directory / "fit"))
        ]
        if interrupt_at is not None:
            callbacks.append(InterruptAt(interrupt_at))
        fit(model, callbacks, epochs=7)
        return swag

    reference = run(tmp_path / "reference")
    with pytest.raises(RuntimeError, match="Interrupted"):
        run(tmp_path / "resumed", interrupt_at=4)
    with np.load(tmp_path / "resumed" / "swag" / BACKUP_FILENAME) as state:
        assert int(state["swag_max_rank"]) == 3
        assert "swag_variance_average_0" in state
        assert "swag_deviation_2_average_0" in state
    swag = run(tmp_path / "resumed")

    assert int(swag.n_averaged.numpy()) == 6
    pairs = [
        (swag.average_variables, reference.average_variables),
        (swag.variance_variables, reference.variance_variables),
    ] + list(zip(swag.deviation_variables, reference.deviation_variables))
    for resumed, uninterrupted in pairs:
        assert_close(
            resumed, [np.asarray(v.numpy()) for v in uninterrupted],
            rtol=1e-6, atol=1e-7,
        )
    assert os.listdir(tmp_path / "resumed" / "swag") == []


@pytest.mark.parametrize(
    "first, second, match",
    [
        ("swa", "swag3", "StochasticWeightAveraging \\(no SWAG moments\\)"),
        ("swag3", "swag2", "max_rank=3, and this fit runs SWAG with max_rank=2"),
    ],
)
def test_backup_of_another_callback_is_refused(tmp_path, first, second, match):
    def callback(kind):
        if kind == "swa":
            return keras_swa.StochasticWeightAveraging(
                start_epoch=1, backup_dir=tmp_path, verbose=0
            )
        return keras_swa.SWAG(
            start_epoch=1, max_rank=int(kind[-1]), backup_dir=tmp_path,
            verbose=0,
        )

    with pytest.raises(RuntimeError, match="Interrupted"):
        fit(make_model(), [callback(first), InterruptAt(2)], epochs=5)
    with pytest.raises(ValueError, match=match):
        fit(make_model(), [callback(second)], epochs=5)


def test_non_finite_epochs_reach_no_moment():
    model = make_model()
    recorder = EpochEndWeights()
    swag = keras_swa.SWAG(start_epoch=1, max_rank=4, verbose=0)
    diverge = keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: 1e30 if epoch >= 4 else 0.05
    )
    with pytest.warns(UserWarning, match="skipped this epoch's snapshot"):
        fit(model, [diverge, recorder, swag], epochs=6)
    assert not np.isfinite(recorder.weights[5][0]).all()
    mean, variance, slots = swag_reference(
        [recorder.weights[e] for e in (1, 2, 3)], 4
    )
    assert swag.rank == 3
    assert_close(swag.variance_variables, variance)
    for slot, expected in enumerate(slots):
        assert_close(swag.deviation_variables[slot], expected)
    assert np.isfinite(_flat(swag.sample(seed=0))).all()


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"max_rank": -1}, ValueError, "max_rank"),
        ({"max_rank": 2.0}, TypeError, "max_rank"),
        ({"max_rank": True}, TypeError, "max_rank"),
        ({"average_period": 0}, ValueError, "average_period"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`.*Received: {name}="):
        keras_swa.SWAG(**kwargs)


def test_numpy_scalars_accepted():
    swag = keras_swa.SWAG(max_rank=np.int64(3), verbose=0)
    assert swag.max_rank == 3 and type(swag.max_rank) is int


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"scale": -0.5}, ValueError, "scale"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"scale": "0.5"}, TypeError, "scale"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": -1}, ValueError, "seed"),
        ({"diagonal": 1}, TypeError, "diagonal"),
    ],
)
def test_bad_sample_arguments(kwargs, error, name):
    model = make_model()
    swag = keras_swa.SWAG(start_epoch=1, verbose=0)
    fit(model, [swag], epochs=2)
    with pytest.raises(error, match=f"`{name}`.*Received: {name}="):
        swag.sample(**kwargs)
    # NumPy scalars are numbers.
    swag.sample(scale=np.float32(0.5), seed=np.int64(1), diagonal=np.bool_(True))


def test_sample_before_any_snapshot_is_refused():
    with pytest.raises(ValueError, match="no snapshot yet"):
        keras_swa.SWAG(verbose=0).sample()
    model = make_model()
    swag = keras_swa.SWAG(start_epoch=3, verbose=0)
    stop = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(
            model, "stop_training", epoch == 1
        )
    )
    with pytest.warns(UserWarning, match="averaged no epoch"):
        fit(model, [stop, swag], epochs=5)
    with pytest.raises(ValueError, match="no snapshot yet.*from epoch 3"):
        swag.sample()


class SetWeights(keras.callbacks.Callback):
    """At each epoch end, before SWAG, puts `1 + 3e-4 * N(0, 1)` into every
    trainable variable and records it (float64 of the float32 values)."""

    def __init__(self, seed=0):
        super().__init__()
        self.rng = np.random.default_rng(seed)
        self.snapshots = []

    def on_epoch_end(self, epoch, logs=None):
        values = []
        for variable in self.model.trainable_variables:
            value = 1.0 + 3e-4 * self.rng.normal(size=variable.shape)
            variable.assign(value.astype("float32"))
            values.append(np.asarray(variable.numpy()).astype("float64"))
        self.snapshots.append(values)


@pytest.mark.parametrize("window", [None, 6])
def test_variance_without_cancellation(window):
    # `sq_mean - mean**2` of weights 1 +- 3e-4 in float32 loses the
    # variance (9e-8) in the rounding of sq_mean (6e-8 an ulp). A window's
    # variance, from its ring, must not lose it either.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(50, use_bias=False)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    setter = SetWeights()
    swag = keras_swa.SWAG(start_epoch=0, max_rank=0, verbose=0,
                          window=window)
    x = np.zeros((8, 4), "float32")
    model.fit(x, np.zeros((8, 50), "float32"), epochs=20, verbose=0,
              callbacks=[setter, swag])
    held = setter.snapshots[-(window or 20):]
    expected = np.var(np.stack([s[0] for s in held]), axis=0)
    variance = np.asarray(swag.variance_variables[0].numpy())
    assert variance.dtype == np.float32
    np.testing.assert_allclose(variance, expected, rtol=1e-2)
    assert variance.min() > 1e-29
    # Samples spread by the standard deviation of the snapshots.
    mean = np.asarray(swag.average_variables[0].numpy()).astype("float64")
    scale = 0.5
    z = np.stack(
        [
            (swag.sample(scale=scale, seed=seed)[0] - mean)
            / np.sqrt(scale * expected)
            for seed in range(20)
        ]
    )
    assert 0.9 < z.std() < 1.1 and abs(z.mean()) < 0.1


def test_backup_of_an_earlier_version_is_refused(tmp_path):
    # Backups written before the centred variance held `sq_mean` instead:
    # it cannot be turned into the variance without the cancellation.
    swag = keras_swa.SWAG(
        start_epoch=1, max_rank=2, backup_dir=tmp_path, verbose=0
    )
    with pytest.raises(RuntimeError, match="Interrupted"):
        fit(make_model(), [swag, InterruptAt(2)], epochs=5)
    path = tmp_path / BACKUP_FILENAME
    with np.load(path) as file:
        state = {
            key.replace("swag_variance_", "swag_second_moment_"): value
            for key, value in file.items()
        }
    np.savez(path, **state)
    with pytest.raises(ValueError, match="earlier version.*Delete it"):
        fit(make_model(), [swag], epochs=5)


def test_low_rank_sampling_without_two_columns_warns_once():
    model = make_model()
    swag = keras_swa.SWAG(start_epoch=2, max_rank=5, verbose=0)
    fit(model, [swag], epochs=3)
    x, _ = make_data(n=4)
    with pytest.warns(UserWarning, match="1 deviation column") as warned:
        keras_swa.predict_bma(model, x, source=swag, num_samples=3, seed=0)
        swag.sample(seed=0)
    assert sum("diagonal only" in str(w.message) for w in warned) == 1
    # Asked for the diagonal, or with max_rank=0 (the diagonal by choice),
    # there is nothing to say.
    swag = keras_swa.SWAG(start_epoch=2, max_rank=0, verbose=0)
    fit(make_model(), [swag], epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        swag.sample(seed=0)
        swag.sample(seed=0, diagonal=True)
