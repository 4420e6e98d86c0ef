"""The averaging engine under every averager: narrow dtypes, non-finite
snapshots, a custom rule, plain backend variables and argument checks.

Each case is checked against weights recorded in float64 and averaged in
NumPy, on every backend (a hand-written training loop where `fit` would hide
the per-update weights on JAX).
"""

import os

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa import engine
from tests.test_averaging import float64_enabled
from tests.test_optimizers import assert_weights_close
from tests.test_optimizers import custom_train_step
from tests.test_optimizers import ema_reference
from tests.test_optimizers import make_data
from tests.test_optimizers import make_model
from tests.test_optimizers import swa_reference
from tests.test_optimizers import UpdateRecorder

# ---------------------------------------------------------------------------
# float16 and bfloat16 variables: float32 averages


def _train_by_hand(model, optimizer, x, y, steps, batch=16, nan_at=None):
    """Runs `steps` updates; returns (index, float64 weights) after each.

    With `nan_at`, the inputs of that update and the later ones hold a NaN,
    so the weights are NaN from that update on.
    """
    train_step = custom_train_step(
        model, optimizer, keras.losses.MeanSquaredError()
    )
    updates = []
    for step in range(steps):
        start = (step * batch) % len(x)
        xb, yb = x[start : start + batch].copy(), y[start : start + batch]
        if nan_at is not None and step >= nan_at:
            xb[0, 0] = np.nan
        train_step(xb, yb)
        updates.append(
            (
                step,
                [
                    np.asarray(v.numpy()).astype("float64")
                    for v in model.trainable_variables
                ],
            )
        )
    return updates


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_wrapper_averages_narrow_variables_in_float32(policy, kind):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(1)
    x, y = make_data()
    model = make_model(batch_norm=False)
    assert model.trainable_variables[0].dtype == policy
    if kind == "swa":
        optimizer = keras_swa.SWA(
            keras.optimizers.SGD(0.02), start_averaging=2, average_period=1
        )
    else:
        optimizer = keras_swa.EMA(keras.optimizers.SGD(0.02), decay=0.9)

    updates = _train_by_hand(model, optimizer, x, y, steps=60)

    if kind == "swa":
        expected, count = swa_reference(updates, 2, 1)
    else:
        expected, count = ema_reference(updates, 0, 1, 0.9, False)
    assert int(optimizer.n_averaged.numpy()) == count
    assert all(
        average.dtype == "float32" for average in optimizer.average_variables
    )
    # Within float32 rounding of the float64 reference; averages kept in the
    # narrow type are off by 1e-3 and more.
    assert_weights_close(
        [a.numpy() for a in optimizer.average_variables],
        expected,
        rtol=2e-6,
        atol=2e-7,
    )


class _EpochEndWeights(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(
            [
                np.asarray(v.numpy()).astype("float64")
                for v in self.model.trainable_variables
            ]
        )


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_callback_averages_narrow_variables_in_float32(policy):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(2)
    x, y = make_data()
    model = make_model(batch_norm=False)
    model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
    recorder = _EpochEndWeights()
    swa = keras_swa.StochasticWeightAveraging(start_epoch=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=8, verbose=0,
              callbacks=[recorder, swa])

    expected = [np.mean(ws, axis=0) for ws in zip(*recorder.weights[1:])]
    assert all(a.dtype == "float32" for a in swa.average_variables)
    assert_weights_close(
        [a.numpy() for a in swa.average_variables], expected,
        rtol=2e-6, atol=2e-7,
    )


# ---------------------------------------------------------------------------
# Non-finite snapshots


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_wrapper_skip_non_finite_keeps_the_finite_average(kind):
    keras.utils.set_random_seed(3)
    x, y = make_data()
    model = make_model(batch_norm=False)
    if kind == "swa":
        optimizer = keras_swa.SWA(
            keras.optimizers.SGD(0.05), start_averaging=1, average_period=2,
            skip_non_finite=True,
        )
    else:
        optimizer = keras_swa.EMA(
            keras.optimizers.SGD(0.05), decay=0.5, skip_non_finite=True
        )

    updates = _train_by_hand(model, optimizer, x, y, steps=10, nan_at=6)

    assert not np.isfinite(updates[-1][1][0]).all()
    finite = updates[:6]
    if kind == "swa":
        expected, count = swa_reference(finite, 1, 2)
    else:
        expected, count = ema_reference(finite, 0, 1, 0.5, False)
    assert int(optimizer.n_averaged.numpy()) == count
    assert_weights_close(optimizer.average_variables, expected)
    # The finite average goes into the model.
    optimizer.assign_average_vars(model.trainable_variables)
    assert_weights_close(model.trainable_variables, expected)


def test_wrapper_non_finite_average_is_refused_and_model_kept():
    keras.utils.set_random_seed(4)
    x, y = make_data()
    model = make_model(batch_norm=False)
    optimizer = keras_swa.SWA(keras.optimizers.SGD(0.05), average_period=1)
    _train_by_hand(model, optimizer, x, y, steps=5, nan_at=3)
    assert int(optimizer.n_averaged.numpy()) == 5

    model.trainable_variables[0].assign(
        np.zeros(model.trainable_variables[0].shape, "float32")
    )
    before = [v.numpy().copy() for v in model.variables]
    with pytest.raises(ValueError, match="not finite.*skip_non_finite=True"):
        keras_swa.assign_average(model, source=optimizer)
    with pytest.raises(ValueError, match="not finite"):
        optimizer.assign_average_vars(model.variables)
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_fit_warns_at_its_end_when_the_average_is_not_finite():
    keras.utils.set_random_seed(5)
    x, y = make_data()
    x[40, 0] = np.nan
    model = make_model(batch_norm=False)
    model.compile(
        optimizer=keras_swa.SWA(keras.optimizers.SGD(0.05), average_period=1),
        loss="mse",
    )
    with pytest.warns(UserWarning, match="not finite.*skip_non_finite"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)


def _diverge_from(epoch):
    # A learning rate that sends the weights to infinity from `epoch` on.
    return keras.callbacks.LearningRateScheduler(
        lambda e, lr: 1e30 if e >= epoch else 0.01
    )


def test_callback_skips_non_finite_epochs_and_keeps_its_backup(tmp_path):
    keras.utils.set_random_seed(6)
    x, y = make_data()
    model = make_model(batch_norm=False)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    recorder = _EpochEndWeights()
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=1, backup_dir=tmp_path / "swa", verbose=0
    )
    with pytest.warns(UserWarning) as warned:
        model.fit(
            x, y, batch_size=16, epochs=8, verbose=0,
            callbacks=[
                _diverge_from(4), recorder, swa,
                keras.callbacks.TerminateOnNaN(),
            ],
        )
    messages = [str(w.message) for w in warned]
    assert any(
        "Epoch 5: StochasticWeightAveraging skipped" in m for m in messages
    ), messages
    assert any("keeps its backup" in m for m in messages), messages
    # Epochs 1, 2, 3 were finite; epoch 4 (0-based) diverged.
    assert not np.isfinite(recorder.weights[4][0]).all()
    expected = [np.mean(ws, axis=0) for ws in zip(*recorder.weights[1:4])]
    assert int(swa.n_averaged.numpy()) == 3
    assert_weights_close(model.trainable_variables, expected)
    assert os.path.exists(
        tmp_path / "swa" / "stochastic_weight_averaging.npz"
    )


def test_callback_backup_survives_an_exception(tmp_path):
    class Fail(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("boom")

    x, y = make_data()
    model = make_model(batch_norm=False)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=0, backup_dir=tmp_path, verbose=0
    )
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, epochs=5, verbose=0, callbacks=[swa, Fail()])
    with np.load(tmp_path / "stochastic_weight_averaging.npz") as state:
        assert int(state["n_averaged"]) == 3


# ---------------------------------------------------------------------------
# A custom rule: `AveragedOptimizer.average_weight`


class LinearlyWeighted(keras_swa.AveragedOptimizer):
    """The k-th snapshot (1-based) weighs k: t = 2 / (n + 2)."""

    def average_weight(self, n_averaged):
        n = keras.ops.cast(n_averaged, "float32")
        return 2.0 / (n + 2.0)


def test_custom_averaging_rule_by_subclassing():
    keras.utils.set_random_seed(7)
    x, y = make_data()
    model = make_model(batch_norm=False)
    optimizer = LinearlyWeighted(
        keras.optimizers.SGD(0.05), start_averaging=1, average_period=2
    )
    updates = _train_by_hand(model, optimizer, x, y, steps=9)

    chosen = [w for i, w in updates if i >= 1 and (i - 1) % 2 == 0]
    factors = np.arange(1, len(chosen) + 1, dtype="float64")
    expected = [
        sum(f * w for f, w in zip(factors, ws)) / factors.sum()
        for ws in zip(*chosen)
    ]
    assert int(optimizer.n_averaged.numpy()) == len(chosen) == 4
    assert_weights_close(optimizer.average_variables, expected)


def test_a_subclass_without_a_rule_says_what_is_missing():
    class NoRule(keras_swa.AveragedOptimizer):
        pass

    x, y = make_data()
    model = make_model(batch_norm=False)
    with pytest.raises(NotImplementedError, match="average_weight"):
        _train_by_hand(model, NoRule(keras.optimizers.SGD(0.1)), x, y, 1)


@pytest.mark.tensorflow_only
def test_tensorflow_custom_loop_over_plain_variables():
    import tensorflow as tf

    variable = tf.Variable([1.0, -2.0, 3.0])
    optimizer = keras_swa.SWA(
        keras.optimizers.SGD(0.1), start_averaging=1, average_period=1
    )
    optimizer.build([variable])
    rng = np.random.default_rng(0)
    values = []
    for _ in range(4):
        gradient = rng.normal(size=3).astype("float32")
        optimizer.apply_gradients([(tf.constant(gradient), variable)])
        values.append(variable.numpy().astype("float64"))
    np.testing.assert_allclose(
        optimizer.average_variables[0].numpy(), np.mean(values[1:], axis=0),
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------
# Nothing averaged: what was asked and how far training got


def test_nothing_averaged_says_the_schedule_and_the_updates():
    x, y = make_data()
    model = make_model(batch_norm=False)
    model.compile(
        optimizer=keras_swa.SWA(
            keras.optimizers.SGD(0.01), start_averaging=3000,
            average_period=100,
        ),
        loss="mse",
    )
    with pytest.warns(UserWarning, match="averaged no snapshot by the end"):
        model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    with pytest.raises(ValueError) as error:
        keras_swa.assign_average(model)
    message = str(error.value)
    assert "`model.optimizer`" in message
    assert "start_averaging" in message and "3000" in message
    assert "6 update(s) have run" in message


# ---------------------------------------------------------------------------
# Arguments: NumPy scalars accepted, booleans strict, every message names
# the argument the user wrote


def test_numpy_scalars_are_accepted_everywhere():
    ema = keras_swa.EMA(keras.optimizers.SGD(0.1), decay=np.float32(0.9),
                        warmup=np.bool_(True))
    assert ema.decay == pytest.approx(0.9) and ema.warmup is True
    assert type(ema.get_config()["decay"]) is float
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=np.float64(0.5), swa_lr=np.float32(0.01),
        anneal_epochs=np.int64(1), bn_data=np.zeros((4, 5), "float32"),
        bn_steps=np.int64(2), bn_batch_size=np.int64(2),
    )
    assert type(swa.bn_steps) is int and type(swa.anneal_epochs) is int
    assert type(swa.start_epoch) is float


def test_numpy_bn_steps_works_after_training():
    keras.utils.set_random_seed(8)
    x, y = make_data()
    model = make_model(batch_norm=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    swa = keras_swa.StochasticWeightAveraging(
        start_epoch=0, bn_data=x, bn_steps=np.int64(2), verbose=0
    )
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[swa])
    assert int(swa.n_averaged.numpy()) == 2


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: keras_swa.StochasticWeightAveraging(
            allow_averaging_optimizer="no"), TypeError,
         "allow_averaging_optimizer"),
        (lambda: keras_swa.StochasticWeightAveraging(verbose="yes"),
         ValueError, "verbose"),
        (lambda: keras_swa.StochasticWeightAveraging(verbose=True),
         ValueError, "verbose"),
        (lambda: keras_swa.StochasticWeightAveraging(bn_steps=0),
         ValueError, "bn_steps"),
        (lambda: keras_swa.StochasticWeightAveraging(swa_lr=float("nan")),
         ValueError, "swa_lr"),
        (lambda: keras_swa.SWA(keras.optimizers.SGD(0.1), skip_non_finite=1),
         TypeError, "skip_non_finite"),
        (lambda: keras_swa.EMA(keras.optimizers.SGD(0.1), warmup="yes"),
         TypeError, "warmup"),
        (lambda: keras_swa.EMA(keras.optimizers.SGD(0.1), decay=1.0),
         ValueError, "decay"),
        (lambda: keras_swa.SWALearningRate(0.1, np.int64(10), 0.01,
                                           anneal_strategy=3),
         ValueError, "anneal_strategy"),
        (lambda: keras_swa.assign_average(None), TypeError, "`model`"),
        (lambda: keras_swa.averaged_weights(None).__enter__(), TypeError,
         "`model`"),
    ],
)
def test_bad_arguments_name_the_argument(make, error, name):
    with pytest.raises(error, match=name):
        make()


def test_wrapper_config_round_trips_skip_non_finite():
    optimizer = keras_swa.EMA(keras.optimizers.SGD(0.1), skip_non_finite=True)
    restored = keras_swa.EMA.from_config(optimizer.get_config())
    assert restored.skip_non_finite is True


# ---------------------------------------------------------------------------
# bn_data: checked before any training or assignment, named as written


def test_wrong_bn_data_fails_before_training():
    with pytest.raises(TypeError, match="`bn_data`"):
        keras_swa.StochasticWeightAveraging(bn_data="train.npz")
    infinite = _repeated_dataset()
    if infinite is not None:
        with pytest.raises(ValueError, match="`bn_data`.*`bn_steps`"):
            keras_swa.StochasticWeightAveraging(bn_data=infinite)
        keras_swa.StochasticWeightAveraging(bn_data=infinite, bn_steps=2)
    generator = (x for x in [np.zeros((4, 5), "float32")])
    with pytest.raises(ValueError, match="used up after one pass"):
        keras_swa.StochasticWeightAveraging(
            bn_data=generator, validation_data=make_data()
        )
    with pytest.raises(ValueError, match="used up after one pass"):
        keras_swa.EvaluateAverage(make_data(), bn_data=generator)
    with pytest.raises(ValueError, match="`bn_steps` is given but `bn_data`"):
        keras_swa.StochasticWeightAveraging(bn_steps=3)


def _repeated_dataset():
    try:
        import tensorflow as tf
    except ImportError:
        return None
    x, _ = make_data()
    return tf.data.Dataset.from_tensor_slices(x).batch(16).repeat()


def _trained_swa_model():
    keras.utils.set_random_seed(11)
    x, y = make_data()
    model = make_model(batch_norm=True)
    model.compile(
        optimizer=keras_swa.SWA(keras.optimizers.SGD(0.02), average_period=1),
        loss="mse",
    )
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model, x


def test_assign_average_checks_bn_data_before_assigning():
    model, x = _trained_swa_model()
    before = [np.array(v.numpy()) for v in model.variables]
    with pytest.raises(TypeError, match="`bn_data`"):
        keras_swa.assign_average(model, bn_data=object())
    with pytest.raises(ValueError, match="`bn_batch_size`"):
        keras_swa.assign_average(model, bn_data=(x,), bn_batch_size=0)
    with pytest.raises(ValueError, match="`bn_steps` is given"):
        keras_swa.assign_average(model, bn_steps=2)
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_bn_batch_size_reaches_the_batch_norm_pass():
    model, x = _trained_swa_model()
    with keras_swa.averaged_weights(model, bn_data=(x,), bn_batch_size=7,
                                    verbose=0):
        by_seven = [np.array(v.numpy()) for v in model.non_trainable_variables]
    with keras_swa.averaged_weights(model, verbose=0):
        keras_swa.update_bn(model, x, batch_size=7, verbose=0)
        expected = [np.array(v.numpy()) for v in model.non_trainable_variables]
        keras_swa.update_bn(model, x, batch_size=32, verbose=0)
        by_default = [
            np.array(v.numpy()) for v in model.non_trainable_variables
        ]
    for a, b in zip(by_seven, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Batches of 7 and 32 give other (biased, per-batch) variances.
    assert not all(np.allclose(a, b) for a, b in zip(by_seven, by_default))


# ---------------------------------------------------------------------------
# float64 variables: float64-accurate averages (the rule's weight in float64)


def _float64_rule_reference(kind, snapshots):
    """The float64 NumPy average of `snapshots` under the rule of `kind`."""
    if kind == "swa":
        return np.mean(snapshots, axis=0)
    gamma = keras_swa.averaging.sigma_rel_to_gamma(0.1)
    average = snapshots[0]
    for k, snapshot in enumerate(snapshots[1:], start=2):
        if kind == "ema":
            t = 1.0 - 0.9
        else:
            t = -np.expm1((gamma + 1.0) * np.log1p(-1.0 / k))
        average = average + t * (snapshot - average)
    return average


@pytest.mark.parametrize("kind", ["swa", "ema", "power_ema"])
def test_float64_variables_get_float64_accurate_averages(kind):
    # Weights such as 1/3 and 0.1 are not exact in float32: a rule weight
    # computed in float32 is off by about 1e-8 relative, which hundreds of
    # snapshots carry into the average (float32-accurate, 1e-9 and worse).
    rng = np.random.default_rng(12)
    snapshots = 1.0 + rng.normal(size=(300, 4)) / 3.0
    inner = keras.optimizers.SGD(1.0)
    if kind == "swa":
        optimizer = keras_swa.SWA(inner, average_period=1)
    elif kind == "ema":
        optimizer = keras_swa.EMA(inner, decay=0.9)
    else:
        optimizer = keras_swa.PowerEMA(inner, sigma_rel=0.1)
    with float64_enabled():
        variable = keras.Variable(np.zeros(4), dtype="float64")
        optimizer.build([variable])
        recorded = []
        for snapshot in snapshots:
            # SGD(1.0): w - (w - s) is s, to the rounding of w.
            gradient = np.asarray(variable.numpy()) - snapshot
            optimizer.apply([keras.ops.convert_to_tensor(gradient)], [variable])
            recorded.append(np.asarray(variable.numpy()))
        average = optimizer.average_variables[0]
        assert average.dtype == "float64"
        got = np.asarray(average.numpy())
    expected = _float64_rule_reference(kind, np.asarray(recorded))
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------
# Rules that read the step and the learning rate, and keep a state


class ScheduleFreeWeighted(keras_swa.AveragedOptimizer):
    """Schedule-free's weighting of the snapshots: `lr_max**2 / sum`."""

    def averaging_rule(self):
        return keras_swa.averaging.LearningRateWeighted(power=2.0)


class StepWeighted(keras_swa.AveragedOptimizer):
    """A rule of the step alone: snapshot after update `i` weighs `i + 1`."""

    def averaging_rule(self):
        class ByStep(keras_swa.averaging.Rule):
            state = ("total",)

            def weight(self, snapshot):
                w = keras.ops.cast(snapshot.step + 1, snapshot.dtype)
                return w / (snapshot.state["total"] + w)

            def next_state(self, snapshot):
                w = keras.ops.cast(snapshot.step + 1, snapshot.dtype)
                return {"total": snapshot.state["total"] + w}

        return ByStep()


def _warmup_then_decay(step):
    """The learning rate of update `step` (0-based): up from 0.01 over four
    updates, then down."""
    return min(0.01 * (step + 1), 0.04) * 0.9 ** max(step - 3, 0)


class _WarmupThenDecay(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        return keras.ops.minimum(0.01 * (step + 1), 0.04) * keras.ops.power(
            0.9, keras.ops.maximum(step - 3, 0.0)
        )


@pytest.mark.parametrize("kind", ["schedule_free", "step"])
def test_rules_see_the_step_and_the_learning_rate_of_the_update(kind):
    keras.utils.set_random_seed(13)
    x, y = make_data()
    model = make_model(batch_norm=False)
    inner = keras.optimizers.SGD(_WarmupThenDecay())
    wrapper = ScheduleFreeWeighted if kind == "schedule_free" else StepWeighted
    optimizer = wrapper(inner, start_averaging=1, average_period=2)
    updates = _train_by_hand(model, optimizer, x, y, steps=12)

    chosen = [(i, w) for i, w in updates if i >= 1 and (i - 1) % 2 == 0]
    if kind == "schedule_free":
        # The largest rate so far, over every update (snapshot or not,
        # as the rule reads it at snapshots: the rate of that update).
        factors = [
            max(_warmup_then_decay(j) for j in range(i + 1)) ** 2
            for i, _ in chosen
        ]
    else:
        factors = [i + 1.0 for i, _ in chosen]
    expected = [
        sum(f * w for f, (_, ws) in zip(factors, chosen) for w in [ws[k]])
        / sum(factors)
        for k in range(len(chosen[0][1]))
    ]
    assert int(optimizer.n_averaged.numpy()) == len(chosen) == 6
    assert_weights_close(optimizer.average_variables, expected)
    # The rule's state is optimizer variables, saved with it.
    names = {variable.name for variable in optimizer.variables}
    assert {f"average_{n}" for n in optimizer.averaging_rule().state} <= names


# ---------------------------------------------------------------------------
# Windows and host offload: `SWA(window=k)`, `offload=True` on every wrapper


def _placement(variable):
    """Where a variable's value lives, as the backend shows it."""
    value = variable.value
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return "host" if "CPU" in value.device else value.device
    if backend == "jax":
        return "host" if value.sharding.memory_kind == "pinned_host" else (
            value.sharding.memory_kind
        )
    return "host" if value.device.type == "cpu" else str(value.device)


def _on_device(variable):
    """Whether a model variable is where the backend computes: on JAX, in
    device memory (all devices of a CPU-only run are the host)."""
    if keras.backend.backend() == "jax":
        return variable.value.sharding.memory_kind == "device"
    return True


def _window_reference(updates, start, period, window):
    chosen = [w for i, w in updates if i >= start and (i - start) % period == 0]
    return [np.mean(ws, axis=0) for ws in zip(*chosen[-window:])], len(chosen)


def _make_wrapper(kind, offload):
    inner = keras.optimizers.SGD(0.05, momentum=0.5)
    if kind == "swa":
        return keras_swa.SWA(inner, 1, 2, offload=offload)
    if kind.startswith("window"):
        window = int(kind[len("window"):])
        return keras_swa.SWA(inner, 1, 2, window=window, offload=offload)
    if kind == "ema":
        return keras_swa.EMA(inner, decay=0.7, offload=offload)
    if kind == "power_ema":
        return keras_swa.PowerEMA(inner, sigma_rel=0.2, offload=offload)
    return keras_swa.PostHocEMA(inner, sigma_rels=(0.1, 0.2), offload=offload)


def _power_reference(updates, gamma):
    average = None
    for k, (_, weights) in enumerate(updates, start=1):
        t = 1.0 if k == 1 else -np.expm1((gamma + 1) * np.log1p(-1 / k))
        average = [
            w if average is None else a + t * (w - a)
            for a, w in zip(average or weights, weights)
        ]
    return average, len(updates)


def _reference(kind, optimizer, updates):
    if kind == "swa":
        return swa_reference(updates, 1, 2)
    if kind.startswith("window"):
        return _window_reference(updates, 1, 2, optimizer.window)
    if kind == "ema":
        return ema_reference(updates, 0, 1, 0.7, False)
    gammas = getattr(optimizer, "gammas", None) or [optimizer.gamma]
    return _power_reference(updates, gammas[-1])


@pytest.mark.parametrize(
    "kind", ["swa", "window1", "window3", "ema", "power_ema", "posthoc_ema"]
)
def test_offload_and_windows_in_fit_match_numpy_and_each_other(kind):
    results = {}
    for offload in (False, True):
        keras.utils.set_random_seed(14)
        x, y = make_data()
        model = make_model()
        optimizer = _make_wrapper(kind, offload)
        model.compile(optimizer=optimizer, loss="mse")
        recorder = UpdateRecorder()
        model.fit(x, y, batch_size=16, epochs=3, verbose=0,
                  callbacks=[recorder])

        expected, count = _reference(kind, optimizer, recorder.updates)
        assert int(optimizer.n_averaged.numpy()) == count == (
            9 if kind.startswith(("swa", "window")) else 18
        )
        # The last profile of a PostHocEMA: the widest.
        source = optimizer.profiles[-1] if kind == "posthoc_ema" else optimizer
        averages = source.average_variables
        assert_weights_close(averages, expected)
        state = optimizer._averages.rings or []
        where = {
            _placement(v) for v in averages + [r for r in state if r is not None]
        }
        if offload:
            assert where == {"host"}, where
        elif keras.backend.backend() == "jax":
            assert where == {"device"}, where
        results[offload] = [np.asarray(a.numpy()) for a in averages]
        # Into the model: back on the device, whatever the averages' place.
        keras_swa.assign_average(model, source=source)
        assert all(_on_device(v) for v in model.variables)
        assert_weights_close(model.trainable_variables, results[offload], 0, 0)
    # Offloaded or not, the same numbers (to float32 rounding).
    assert_weights_close(results[True], results[False], rtol=1e-6, atol=1e-7)


def test_window_ring_is_exact_and_does_not_drift():
    # The state of a window is the last k - 1 snapshots, copied exactly, and
    # the counter: the mean is summed afresh from them at every snapshot, so
    # nothing of earlier rounding survives. The same arithmetic after a
    # million snapshots (the counter moved on by a multiple of k - 1, which
    # keeps every snapshot in its slot) as after a few.
    window = 4
    variable = keras.Variable(np.zeros(3, "float32"))
    counter = keras.Variable(0, dtype="int", trainable=False)
    averages = engine.AverageState(
        [variable], counter, _keras_variable, window=window
    )
    rng = np.random.default_rng(15)
    snapshots = (1000.0 + rng.normal(size=(60, 3)) / 7).astype("float32")
    for index, snapshot in enumerate(snapshots):
        if index == 30:
            counter.assign(int(counter.numpy()) + (window - 1) * 333_333)
        variable.assign(snapshot)
        averages.add_snapshot(True)
        held = snapshots[max(0, index + 1 - window) : index + 1]
        np.testing.assert_allclose(
            averages.averages[0].numpy(),
            held.astype("float64").mean(axis=0),
            rtol=2e-7,
        )
        # The ring holds the last k - 1 snapshots, bit for bit (for the
        # next mean).
        ring = held[-(window - 1):]
        np.testing.assert_array_equal(
            np.sort(averages.rings[0].numpy()[: len(ring)], axis=0),
            np.sort(ring, axis=0),
        )
    assert averages.n_averaged == 60 + 3 * 333_333


def _keras_variable(shape, dtype, name, layout):
    """How a `fit` callback creates the state of its averages."""
    return keras.Variable(
        "zeros", shape, dtype, trainable=False, name=name, layout=layout
    )


@pytest.mark.parametrize("window", [None, 3])
def test_engine_window_and_offload_for_keras_variables(tmp_path, window):
    # What a `fit` callback gets from the engine: averages of its own
    # `keras.Variable`s, folded in eagerly, saved to NumPy and loaded back.
    rng = np.random.default_rng(16)
    snapshots = rng.normal(size=(7, 2, 3)).astype("float32")
    variable = keras.Variable(np.zeros((2, 3), "float32"), name="w")
    states = {}
    for offload in (False, True):
        counter = keras.Variable(0, dtype="int", trainable=False)
        averages = engine.AverageState(
            [variable], counter, _keras_variable,
            rule=keras_swa.averaging.Uniform(), window=window,
            offload=offload,
        )
        for snapshot in snapshots:
            variable.assign(snapshot)
            averages.add_snapshot(True, step=0)
        held = snapshots if window is None else snapshots[-window:]
        np.testing.assert_allclose(
            averages.averages[0].numpy(), held.mean(axis=0),
            rtol=1e-6, atol=1e-7,
        )
        assert _placement(averages.averages[0]) == "host" or not offload
        states[offload] = averages.get_state(prefix="swa_")
    for key, value in states[False].items():
        np.testing.assert_allclose(
            states[True][key], value, rtol=1e-6, atol=1e-7
        )
    assert ("swa_window_0" in states[True]) == (window is not None)
    # A saved state loads into offloaded averages, and the next snapshots
    # go on from it.
    counter = keras.Variable(0, dtype="int", trainable=False)
    restored = engine.AverageState(
        [variable], counter, _keras_variable,
        rule=keras_swa.averaging.Uniform(), window=window, offload=True,
    )
    restored.set_state(states[False], "backup", prefix="swa_")
    assert restored.n_averaged == 7
    variable.assign(np.full((2, 3), 5.0, "float32"))
    restored.add_snapshot(True)
    held = list(snapshots) + [np.full((2, 3), 5.0, "float32")]
    held = held if window is None else held[-window:]
    np.testing.assert_allclose(
        restored.averages[0].numpy(), np.mean(held, axis=0),
        rtol=1e-6, atol=1e-7,
    )
    # Another window does not load, with a message.
    other = engine.AverageState(
        [variable], keras.Variable(0, dtype="int", trainable=False),
        _keras_variable, rule=keras_swa.averaging.Uniform(), window=2,
    )
    if window is not None:
        with pytest.raises(ValueError, match="window"):
            other.set_state(states[False], "backup", prefix="swa_")


def test_save_and_load_keep_the_window_and_the_placement(tmp_path):
    keras.utils.set_random_seed(17)
    x, y = make_data()
    model = make_model()
    model.compile(
        optimizer=keras_swa.SWA(
            keras.optimizers.SGD(0.05), 0, 1, window=3, offload=True
        ),
        loss="mse",
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    optimizer = loaded.optimizer
    assert (optimizer.window, optimizer.offload) == (3, True)
    for original, restored in zip(
        model.optimizer._averages.rings + model.optimizer.average_variables,
        optimizer._averages.rings + optimizer.average_variables,
    ):
        np.testing.assert_array_equal(restored.numpy(), original.numpy())
        assert _placement(restored) == "host"
    # The loaded window goes on as the original's.
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_weights_close(
        optimizer.average_variables, model.optimizer.average_variables,
        rtol=1e-6, atol=1e-7,
    )


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: keras_swa.SWA(keras.optimizers.SGD(0.1), window=0),
         ValueError, "window"),
        (lambda: keras_swa.SWA(keras.optimizers.SGD(0.1), window=2.5),
         TypeError, "window"),
        (lambda: keras_swa.SWA(keras.optimizers.SGD(0.1), window=True),
         TypeError, "window"),
        (lambda: keras_swa.EMA(keras.optimizers.SGD(0.1), offload="yes"),
         TypeError, "offload"),
        (lambda: keras_swa.PostHocEMA(keras.optimizers.SGD(0.1), offload=1),
         TypeError, "offload"),
        (lambda: engine.AverageState(
            [keras.Variable(np.zeros(2, "float32"))],
            keras.Variable(0, dtype="int", trainable=False), _keras_variable,
            rule=keras_swa.averaging.Exponential(0.9), window=3),
         ValueError, "window"),
    ],
)
def test_window_and_offload_arguments_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_window_and_offload_round_trip_the_config():
    for optimizer in (
        keras_swa.SWA(keras.optimizers.SGD(0.1), window=4, offload=True),
        keras_swa.EMA(keras.optimizers.SGD(0.1), offload=True),
        keras_swa.PowerEMA(keras.optimizers.SGD(0.1), gamma=7.0, offload=True),
        keras_swa.PostHocEMA(keras.optimizers.SGD(0.1), offload=True),
    ):
        restored = type(optimizer).from_config(optimizer.get_config())
        assert restored.offload is True
        assert restored.window == optimizer.window


@pytest.mark.tensorflow_only
def test_offload_under_a_mirrored_strategy_is_refused():
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("Needs two logical CPU devices (see conftest).")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
    with strategy.scope():
        model = make_model(batch_norm=False)
        optimizer = keras_swa.SWA(keras.optimizers.SGD(0.1), offload=True)
        with pytest.raises(ValueError, match="offload"):
            optimizer.build(model.trainable_variables)
