"""Schedule-free learning: `keras_swa.ScheduleFree` and Keras' own
`ScheduleFreeAdamW` as sources, against NumPy implementations of both
recurrences; and the Keras defects that docs/schedule_free.md describes."""

import contextlib
import warnings

import keras
import numpy as np
import pytest

import keras_swa
from tests.test_callbacks import InterruptAt

BACKEND = keras.backend.backend()
RTOL, ATOL = 2e-5, 1e-6
BETA = 0.9
# A warmup from 0 (the first update has lr 0, so S stays 0 and c = 0), a
# peak, then a lower rate: lr_max stays at the peak.
BOUNDARIES, RATES = [0, 2], [0.0, 0.05, 0.02]

# Keras 3.15.1's ScheduleFreeAdamW reads its old momentum through the
# variable after updating it, on TensorFlow and PyTorch (JAX's arrays are
# values): x_old comes out of the new z. See docs/schedule_free.md.
KERAS_RECOVERS_X_FROM_NEW_Z = BACKEND in ("tensorflow", "torch")
# Keras' own schedule-free optimizer is new in Keras 3.15.
needs_keras_schedule_free = pytest.mark.skipif(
    not hasattr(keras.optimizers, "ScheduleFreeAdamW"),
    reason=f"Keras {keras.__version__} has no ScheduleFreeAdamW",
)
KERAS_DEFECT_FIXED = (
    "Keras {version} no longer has this defect of ScheduleFreeAdamW on "
    "{backend}: update the section 'Keras defects' of docs/schedule_free.md "
    "and the expectation of this test (and, for the lost copy, the warning "
    "of keras_swa.schedule_free._check_initial_copy)."
)


def _data(n=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x @ rng.normal(size=(3, 2)) + rng.normal(0, 0.3, (n, 2)))
    return x, y.astype("float32")


def _linear_model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def _bn_model():
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(2),
    ])


def _weights(variables):
    return [np.asarray(keras.ops.convert_to_numpy(v.value), "float64")
            for v in variables]


def _grads(weights, x, y):
    """The full-batch gradient of the mean squared error of x @ k + b."""
    kernel, bias = weights
    delta = 2.0 * (x @ kernel + bias - y) / y.size
    return [x.T @ delta, delta.sum(0)]


def _schedule():
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        BOUNDARIES, RATES
    )


def _rate(step):
    return float(np.float32(RATES[np.searchsorted(BOUNDARIES, step)]))


# ---------------------------------------------------------------------------
# Independent references, in float64.


def schedule_free_reference(w0, rates, base, x, y, beta=BETA, power=2.0):
    """DESIGN.md's recurrence with an SGD base step or an AdamW one with
    beta_1=0 and weight decay 0.1 (Keras' defaults otherwise)."""
    z = [w.copy() for w in w0]
    average = [w.copy() for w in w0]
    weights = [w.copy() for w in w0]
    velocity = [np.zeros_like(w) for w in w0]
    lr_max = weight_sum = 0.0
    for t, lr in enumerate(rates, start=1):
        grads = _grads(weights, x, y)
        if base == "sgd":
            z = [w - lr * g for w, g in zip(z, grads)]
        else:
            z = [w - w * 0.1 * lr for w in z]  # decoupled decay, on z
            velocity = [v + (g * g - v) * 0.001 for v, g in zip(velocity, grads)]
            alpha = lr * np.sqrt(1 - 0.999**t)
            z = [w - alpha * g / (np.sqrt(v) + 1e-7)
                 for w, g, v in zip(z, grads, velocity)]
        lr_max = max(lr_max, lr)
        weight_sum += lr_max**power
        c = lr_max**power / weight_sum if weight_sum > 0 else 0.0
        average = [(1 - c) * a + c * w for a, w in zip(average, z)]
        weights = [(1 - beta) * w + beta * a for a, w in zip(average, z)]
    return weights, z, average


def keras_schedule_free_reference(w0, steps, x, y, lr=0.05, zero_start=False,
                                  x_from_new_z=False):
    """Keras' ScheduleFreeAdamW.update_step (beta_1=0.9, beta_2=0.999,
    epsilon=1e-8, warmup_steps=2), with its copy of the initial weights
    (`zero_start=False`) or without it, and x_old recovered from the old
    momentum as written (`x_from_new_z=False`) or from the new one.

    Returns y, z (its momentum) and the average: x as written, the running
    mean of the zs with x_old from the new momentum."""
    beta_1, beta_2, warmup = 0.9, 0.999, 2
    mean_z = [np.zeros_like(w) for w in w0]
    weights = [w.copy() for w in w0]
    momentum = [np.zeros_like(w) if zero_start else w.copy() for w in w0]
    velocity = [np.zeros_like(w) for w in w0]
    for k in range(1, steps + 1):
        grads = _grads(weights, x, y)
        rate = np.float32(lr) * min(k / warmup, 1.0)
        old = momentum
        velocity = [v + (g * g - v) * (1 - beta_2) for v, g in zip(velocity, grads)]
        denom = [np.sqrt(v / (1 - beta_2**k)) + 1e-8 for v in velocity]
        momentum = [m - rate * g / d for m, g, d in zip(momentum, grads, denom)]
        mean_z = [a + (m - a) / k for a, m in zip(mean_z, momentum)]
        recover_from = momentum if x_from_new_z else old
        average = [(w - (1 - beta_1) * m) / beta_1
                   for w, m in zip(weights, recover_from)]
        average = [(1 - 1 / k) * a + m / k for a, m in zip(average, momentum)]
        weights = [(1 - beta_1) * m + beta_1 * a
                   for m, a in zip(momentum, average)]
    # With x_old from the new momentum, y is the running mean of the zs:
    # the average is y itself (docs/schedule_free.md).
    return weights, momentum, mean_z if x_from_new_z else average


def _close(actual, expected, err_msg=""):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=err_msg)


def _keras_schedule_free(build_for=None):
    opt = keras.optimizers.ScheduleFreeAdamW(0.05, warmup_steps=2)
    if build_for is not None:
        # The workaround of the lost initial copy (docs/schedule_free.md).
        opt.build(build_for.trainable_variables)
    return opt


def _x_of(model, source):
    """x, as NumPy, from y and the z or momentum of `source`."""
    if isinstance(source, keras_swa.ScheduleFree):
        zs, beta = source.z_variables, source.momentum
    elif KERAS_RECOVERS_X_FROM_NEW_Z:
        return _weights(model.trainable_variables)
    else:
        zs, beta = source._momentums, source.beta_1
    return [(y - (1 - beta) * z) / beta for y, z in
            zip(_weights(model.trainable_variables), _weights(zs))]


# ---------------------------------------------------------------------------
# ScheduleFree against NumPy.


@pytest.mark.parametrize("base, path", [
    ("sgd", "fit"), ("adamw", "fit"), ("sgd", "fit_accumulated"),
    ("sgd", "apply"), ("adamw", "apply"),
])
def test_recurrence_matches_numpy(base, path):
    keras.utils.set_random_seed(1)
    x, y = _data()
    model = _linear_model()
    w0 = _weights(model.trainable_variables)
    steps = 7
    accumulation = 2 if path == "fit_accumulated" else None
    if base == "sgd":
        inner = keras.optimizers.SGD(
            _schedule(), gradient_accumulation_steps=accumulation
        )
    else:
        inner = keras.optimizers.AdamW(
            _schedule(), beta_1=0.0, weight_decay=0.1,
            gradient_accumulation_steps=accumulation,
        )
    opt = keras_swa.ScheduleFree(inner, momentum=BETA)
    if path == "apply":
        for _ in range(steps):
            grads = _grads(_weights(model.trainable_variables), x, y)
            opt.apply([keras.ops.convert_to_tensor(g, "float32") for g in grads],
                      model.trainable_variables)
        rates = [_rate(t) for t in range(steps)]
    else:
        # Keras' schedules read the micro-step counter: with accumulation,
        # update t runs at micro-step 2t + 1. Two half batches average to
        # the full-batch gradient. XLA once (TensorFlow's default on CPU is
        # without it).
        model.compile(
            optimizer=opt, loss="mse",
            jit_compile=(base, path) == ("sgd", "fit") and BACKEND != "torch",
        )
        model.fit(x, y, batch_size=4 if accumulation else 8, epochs=steps,
                  shuffle=False, verbose=0)
        rates = [_rate(2 * t + 1 if accumulation else t) for t in range(steps)]

    expected_y, expected_z, expected_x = schedule_free_reference(
        w0, rates, base, x, y
    )
    assert int(opt.n_averaged.numpy()) == steps
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == steps
    _close(_weights(model.trainable_variables), expected_y, "y")
    _close(_weights(opt.z_variables), expected_z, "z")
    assert np.abs(expected_x[0] - expected_y[0]).max() > 1e-3
    keras_swa.assign_average(model, source=opt)
    _close(_weights(model.trainable_variables), expected_x, "x")


@pytest.mark.parametrize("policy", ["bfloat16", "float64"])
def test_z_is_float32_for_narrow_weights_and_float64_for_float64(policy):
    keras.config.set_dtype_policy(policy)
    model = _linear_model()
    variable = model.trainable_variables[0]
    if keras.backend.standardize_dtype(variable.value.dtype) != policy:
        pytest.skip(f"{policy} variables are not available here (JAX x64)")
    opt = keras_swa.ScheduleFree(keras.optimizers.SGD(0.5))
    opt.build(model.trainable_variables)
    z_dtype = "float32" if policy == "bfloat16" else "float64"
    # Increments that the weights' own dtype would round away: 5e-5 next to
    # weights of about 0.5 in bfloat16 (spacing 2e-3), 1e-12 in float32.
    step = 1e-4 if policy == "bfloat16" else 2e-12
    w0 = keras.ops.convert_to_numpy(
        keras.ops.cast(variable.value, z_dtype)
    )
    z = opt.z_variables[0]
    assert keras.backend.standardize_dtype(z.dtype) == z_dtype
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(z.value), w0)
    grads = [keras.ops.full(v.shape, step, v.dtype)
             for v in model.trainable_variables]
    for _ in range(2):
        opt.apply(grads, model.trainable_variables)
    increment = np.asarray(
        keras.ops.convert_to_numpy(keras.ops.cast(grads[0], z_dtype))
    ) * 0.5
    expected = (w0 - increment) - increment
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(z.value), expected)
    assert not np.array_equal(expected, w0)


def test_mixed_float16_keeps_z_in_float32_and_assigns_x():
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(2)
    x, y = _data(16)
    model = _linear_model()
    opt = keras_swa.ScheduleFree(keras.optimizers.SGD(0.05))
    model.compile(optimizer=opt, loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
    # The loss scaler skips the first steps (float16 overflows): no update.
    updates = int(keras.ops.convert_to_numpy(opt.iterations))
    assert 0 < updates == int(opt.n_averaged.numpy())
    assert all(keras.backend.standardize_dtype(z.dtype) == "float32"
               for z in opt.z_variables)
    expected = _x_of(model, opt)
    keras_swa.assign_average(model)  # model.optimizer, inside the loss scaler
    _close(_weights(model.trainable_variables), expected)


@pytest.mark.parametrize("resume", ["save_and_load", "backup_and_restore"])
def test_resumed_training_equals_uninterrupted(tmp_path, resume):
    x, y = _data()

    def new_model():
        keras.utils.set_random_seed(3)
        model = _linear_model()
        model.compile(
            optimizer=keras_swa.ScheduleFree(
                keras.optimizers.Adam(_schedule(), beta_1=0.0),
                momentum=0.8, weight_lr_power=1.5,
            ),
            loss="mse",
        )
        return model

    def fit(model, epochs, initial_epoch=0, callbacks=()):
        model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                  initial_epoch=initial_epoch, callbacks=list(callbacks))

    straight = new_model()
    fit(straight, 6)
    if resume == "save_and_load":
        model = new_model()
        fit(model, 3)
        model.save(tmp_path / "model.keras")
        model = keras.models.load_model(tmp_path / "model.keras")
        config = model.optimizer.get_config()
        assert (config["momentum"], config["weight_lr_power"]) == (0.8, 1.5)
        assert config["inner_optimizer"]["config"]["learning_rate"] == (
            keras.saving.serialize_keras_object(_schedule())
        )
        fit(model, 6, initial_epoch=3)
    else:
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        with pytest.raises(RuntimeError, match="Interrupted"):
            fit(new_model(), 6, callbacks=[backup, InterruptAt(2)])
        model = new_model()
        fit(model, 6, callbacks=[backup])
    opt = model.optimizer
    assert isinstance(opt, keras_swa.ScheduleFree)
    assert int(opt.n_averaged.numpy()) == 6
    _close(_weights(model.trainable_variables),
           _weights(straight.trainable_variables))
    _close(_weights(opt.z_variables), _weights(straight.optimizer.z_variables))
    _close(_x_of(model, opt), _x_of(straight, straight.optimizer))


# ---------------------------------------------------------------------------
# Arguments.


@pytest.mark.parametrize("momentum", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_momentum_outside_zero_one_is_a_value_error(momentum):
    with pytest.raises(ValueError, match="momentum"):
        keras_swa.ScheduleFree(keras.optimizers.SGD(), momentum=momentum)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="momentum"):
        keras_swa.ScheduleFree(keras.optimizers.SGD(), momentum="0.9")
    with pytest.raises(ValueError, match="weight_lr_power"):
        keras_swa.ScheduleFree(keras.optimizers.SGD(), weight_lr_power=-1.0)
    # z is stepped at every update: refused in host memory, not ignored.
    with pytest.raises(ValueError, match="offload"):
        keras_swa.ScheduleFree(keras.optimizers.SGD(), offload=True)
    with pytest.raises(TypeError, match="offload"):
        keras_swa.ScheduleFree(keras.optimizers.SGD(), offload="yes")
    keras_schedule_free = getattr(keras.optimizers, "ScheduleFreeAdamW", None)
    for inner, match in [
        (keras_swa.ScheduleFree(keras.optimizers.SGD()), "schedule-free"),
        *([(keras_schedule_free(), "schedule-free")] if keras_schedule_free
          else []),
        (keras.optimizers.SGD(use_ema=True), "use_ema"),
        (keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
         "LossScaleOptimizer"),
        (keras_swa.SWA(keras.optimizers.SGD()), "averaging optimizer"),
    ]:
        with pytest.raises(ValueError, match=match):
            keras_swa.ScheduleFree(inner)


@pytest.mark.parametrize("inner, warns", [
    (lambda: keras.optimizers.SGD(momentum=0.9), "momentum=0.9"),
    (lambda: keras.optimizers.Adam(), "beta_1=0.9"),
    (lambda: keras.optimizers.AdamW(beta_1=0.5), "beta_1=0.5"),
    (lambda: keras.optimizers.SGD(), None),
    (lambda: keras.optimizers.AdamW(beta_1=0.0), None),
])
def test_a_base_step_with_its_own_momentum_warns(inner, warns):
    if warns is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            keras_swa.ScheduleFree(inner())
    else:
        with pytest.warns(UserWarning, match=warns):
            keras_swa.ScheduleFree(inner())


def test_config_round_trip_and_weight_decay_exclusions_reach_z():
    opt = keras_swa.ScheduleFree(
        keras.optimizers.AdamW(0.1, beta_1=0.0, weight_decay=0.5),
        momentum=0.7, weight_lr_power=1.0, name="sf",
    )
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(opt)
    )
    assert isinstance(clone, keras_swa.ScheduleFree)
    assert clone.get_config() == opt.get_config()
    assert clone.inner_optimizer.weight_decay == 0.5
    model = _linear_model()
    kernel, bias = model.trainable_variables
    opt.exclude_from_weight_decay(var_list=[bias])
    opt.build(model.trainable_variables)
    before = _weights(opt.z_variables)
    # A zero gradient: only weight decay moves z.
    opt.apply([keras.ops.zeros(v.shape) for v in (kernel, bias)])
    after = _weights(opt.z_variables)
    np.testing.assert_allclose(after[0], before[0] * (1 - 0.5 * 0.1), rtol=1e-6)
    np.testing.assert_array_equal(after[1], before[1])


def test_assign_average_before_any_update_raises_and_leaves_model():
    model = _linear_model()
    opt = keras_swa.ScheduleFree(keras.optimizers.SGD(0.1))
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    before = _weights(model.trainable_variables)
    with pytest.raises(ValueError, match="n_averaged=0"):
        keras_swa.assign_average(model)
    with pytest.raises(ValueError, match="no update yet"):
        opt.assign_average_vars(model.trainable_variables)
    _close(_weights(model.trainable_variables), before)


# ---------------------------------------------------------------------------
# Both kinds as sources: BN at x, y back bit for bit, the callbacks.


def _trained(kind, model, x, y, epochs=3, callbacks=()):
    if kind == "schedule_free":
        opt = keras_swa.ScheduleFree(keras.optimizers.Adam(0.05, beta_1=0.0))
    else:
        opt = _keras_schedule_free(build_for=model)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
              callbacks=list(callbacks))
    return opt


@pytest.mark.parametrize("kind", [
    "schedule_free", pytest.param("keras", marks=needs_keras_schedule_free),
])
def test_bn_at_x_and_y_back_bit_for_bit(kind):
    keras.utils.set_random_seed(4)
    x, y = _data(16)
    model = _bn_model()
    opt = _trained(kind, model, x, y)
    expected_x = _x_of(model, opt)
    before = [v.numpy() for v in model.variables]
    assert (np.abs(expected_x[0] - before[0]).max() > 1e-4) != (
        kind == "keras" and KERAS_RECOVERS_X_FROM_NEW_Z
    )
    with keras_swa.averaged_weights(model, bn_data=x, verbose=0):
        inside = [v.numpy() for v in model.variables]
        _close(_weights(model.trainable_variables), expected_x, "x")
    norm = model.layers[1]
    statistics = [norm.moving_mean, norm.moving_variance]
    for variable in statistics:
        index = [id(v) for v in model.variables].index(id(variable))
        assert np.abs(inside[index] - before[index]).max() > 1e-4
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)
    # BN at x: update_bn run by hand at x.
    model.set_weights(inside)
    for variable, value in zip(model.trainable_variables, expected_x):
        variable.assign(value.astype("float32"))
    norm.moving_mean.assign(np.zeros(4, "float32"))
    keras_swa.update_bn(model, x, verbose=0)
    for variable, value in zip(model.variables, inside):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("kind", [
    "schedule_free", pytest.param("keras", marks=needs_keras_schedule_free),
])
def test_evaluate_average_and_checkpoint_of_the_default_source(tmp_path, kind):
    keras.utils.set_random_seed(5)
    x, y = _data(16)
    model = _linear_model()
    path = tmp_path / "x.weights.h5"
    opt = _trained(kind, model, x, y, callbacks=[
        keras_swa.EvaluateAverage((x, y)),
        keras_swa.AverageModelCheckpoint(str(path), save_weights_only=True),
    ])
    history = model.history.history
    assert len(history["val_sf_loss"]) == 3
    expected_x = _x_of(model, opt)
    with keras_swa.averaged_weights(model):
        loss_at_x = model.evaluate(x, y, verbose=0)
    at_y = model.evaluate(x, y, verbose=0)
    if kind == "keras" and KERAS_RECOVERS_X_FROM_NEW_Z:
        assert loss_at_x == at_y
    else:
        assert loss_at_x != pytest.approx(at_y)
    np.testing.assert_allclose(history["val_sf_loss"][-1], loss_at_x,
                               rtol=1e-5)
    saved = _linear_model()
    saved.load_weights(path)
    _close(_weights(saved.trainable_variables), expected_x)


# ---------------------------------------------------------------------------
# Keras' ScheduleFreeAdamW: x against NumPy, the lost copy, the defects.


@needs_keras_schedule_free
def test_keras_schedule_free_x_matches_numpy():
    keras.utils.set_random_seed(6)
    x, y = _data()
    model = _linear_model()
    w0 = _weights(model.trainable_variables)
    opt = _trained("keras", model, x, y, epochs=5)
    expected_y, expected_z, expected_x = keras_schedule_free_reference(
        w0, 5, x, y, x_from_new_z=KERAS_RECOVERS_X_FROM_NEW_Z
    )
    _close(_weights(model.trainable_variables), expected_y, "y")
    _close(_weights(opt._momentums), expected_z, "momentum")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_swa.assign_average(model, source=opt)
    _close(_weights(model.trainable_variables), expected_x, "x")
    said = [str(w.message) for w in caught if "running mean" in str(w.message)]
    assert len(said) == int(KERAS_RECOVERS_X_FROM_NEW_Z)
    assert keras_swa.schedule_free.keras_update_rule() == (
        "x_from_new_z" if KERAS_RECOVERS_X_FROM_NEW_Z else "as_written"
    ), KERAS_DEFECT_FIXED.format(version=keras.__version__, backend=BACKEND)


@needs_keras_schedule_free
def test_keras_lost_copy_is_reported():
    model = _linear_model()
    opt = _keras_schedule_free(build_for=model)
    model.compile(optimizer=opt, loss="mse")
    # The state Keras leaves when it loses the copy: slots all zero.
    for momentum in opt._momentums:
        momentum.assign(keras.ops.zeros(momentum.shape, momentum.dtype))
    opt.iterations.assign(1)
    with pytest.warns(UserWarning, match="lost its copy.*optimizer.build"):
        keras_swa.assign_average(model)
    # Before `fit`: only TensorFlow's trainer builds it in the trace.
    x, y = _data()
    model = _linear_model()
    model.compile(optimizer=_keras_schedule_free(), loss="mse")
    expect = (pytest.warns(UserWarning, match="not built yet.*optimizer.build")
              if BACKEND == "tensorflow" else contextlib.nullcontext())
    with expect, warnings.catch_warnings():
        if BACKEND != "tensorflow":
            warnings.filterwarnings("error", message=".*not built yet.*")
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[keras_swa.EvaluateAverage((x, y))])


@needs_keras_schedule_free
def test_keras_defect_fit_loses_the_initial_copy_on_tensorflow():
    keras.utils.set_random_seed(7)
    x, y = _data()
    model = _linear_model()
    w0 = _weights(model.trainable_variables)
    model.compile(optimizer=_keras_schedule_free(), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    kept, _, _ = keras_schedule_free_reference(w0, 1, x, y)
    lost, _, _ = keras_schedule_free_reference(w0, 1, x, y, zero_start=True)
    actual = _weights(model.trainable_variables)
    is_lost = np.allclose(actual[0], lost[0], rtol=RTOL, atol=ATOL)
    assert is_lost != np.allclose(actual[0], kept[0], rtol=RTOL, atol=ATOL)
    assert is_lost == (BACKEND == "tensorflow"), KERAS_DEFECT_FIXED.format(
        version=keras.__version__, backend=BACKEND
    )


@needs_keras_schedule_free
def test_keras_defect_old_x_from_the_new_momentum_on_tensorflow_and_torch():
    keras.utils.set_random_seed(8)
    x, y = _data()
    model = _linear_model()
    w0 = _weights(model.trainable_variables)
    _trained("keras", model, x, y, epochs=4)
    actual = _weights(model.trainable_variables)

    def matches(x_from_new_z):
        expected, _, _ = keras_schedule_free_reference(
            w0, 4, x, y, x_from_new_z=x_from_new_z
        )
        return all(np.allclose(a, e, rtol=RTOL, atol=ATOL)
                   for a, e in zip(actual, expected))

    assert matches(True) != matches(False)
    assert matches(True) == KERAS_RECOVERS_X_FROM_NEW_Z, (
        KERAS_DEFECT_FIXED.format(version=keras.__version__, backend=BACKEND)
    )


# ---------------------------------------------------------------------------
# tf.distribute: MirroredStrategy on the two logical CPUs of conftest.py. A
# model without synchronized BatchNormalization: its collective operations
# would clash with those of tests/test_distribute.py's strategy in the same
# process.


@pytest.mark.tensorflow_only
def test_mirrored_strategy_equals_one_device():
    import tensorflow as tf

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the two logical CPU devices of conftest.py")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = _data(16)

    def trained(scope, initial=None):
        keras.utils.set_random_seed(9)
        with scope:
            model = _linear_model()
            if initial is not None:
                model.set_weights(initial)
            opt = keras_swa.ScheduleFree(
                keras.optimizers.SGD(_schedule()), momentum=BETA
            )
            model.compile(optimizer=opt, loss="mse")
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        model.fit(dataset, epochs=3, verbose=0)
        keras_swa.assign_average(model)
        return model, opt

    keras.utils.set_random_seed(9)
    single_initial = _linear_model().get_weights()
    single, single_opt = trained(contextlib.nullcontext(), single_initial)
    mirrored, mirrored_opt = trained(strategy.scope(), single_initial)
    assert int(mirrored_opt.n_averaged.numpy()) == 6
    for expected, variable in zip(
        single_opt.z_variables + single.variables,
        mirrored_opt.z_variables + mirrored.variables,
    ):
        replicas = strategy.experimental_local_results(variable.value)
        assert len(replicas) == 2
        for replica in replicas:
            np.testing.assert_allclose(
                np.asarray(replica), expected.numpy(), rtol=1e-5, atol=1e-6,
                err_msg=variable.path,
            )
