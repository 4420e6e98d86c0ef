import math

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa.schedules import SWALearningRate


def values(schedule, steps):
    return np.array([float(schedule(step)) for step in steps])


def reference_anneal(lr0, swa_lr, k, anneal_steps, strategy):
    """torch.optim.swa_utils.SWALR's closed form, `k` steps into the phase."""
    t = 1.0 if anneal_steps == 0 else min(1.0, k / anneal_steps)
    alpha = t if strategy == "linear" else (1 - math.cos(math.pi * t)) / 2
    return swa_lr * alpha + lr0 * (1 - alpha)


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_constant_phase_anneals_like_swalr(strategy):
    schedule = SWALearningRate(
        0.1, swa_start=10, swa_lr=0.01, anneal_steps=4,
        anneal_strategy=strategy,
    )
    steps = list(range(0, 20))
    expected = [
        0.1
        if step < 10
        else reference_anneal(0.1, 0.01, step - 10, 4, strategy)
        for step in steps
    ]
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=1e-6)


def test_constant_phase_hand_values():
    linear = SWALearningRate(1.0, swa_start=2, swa_lr=0.0, anneal_steps=4,
                             anneal_strategy="linear")
    np.testing.assert_allclose(
        values(linear, range(8)), [1, 1, 1, 0.75, 0.5, 0.25, 0, 0], atol=1e-7
    )
    cos = SWALearningRate(1.0, swa_start=2, swa_lr=0.0, anneal_steps=2)
    np.testing.assert_allclose(
        values(cos, range(6)), [1, 1, 1, 0.5, 0, 0], atol=1e-7
    )


def test_no_annealing_switches_at_swa_start():
    schedule = SWALearningRate(0.1, swa_start=5, swa_lr=0.02)
    np.testing.assert_allclose(
        values(schedule, range(8)), [0.1] * 5 + [0.02] * 3, rtol=1e-6
    )


def test_cyclic_phase_runs_from_base_to_swa_lr_each_cycle():
    schedule = SWALearningRate(0.1, swa_start=3, swa_lr=0.01, cycle_length=4)
    expected = [0.1] * 3 + [0.1, 0.07, 0.04, 0.01] * 3
    np.testing.assert_allclose(values(schedule, range(15)), expected, rtol=1e-5)


def test_cycle_length_one_gives_swa_lr_every_step():
    schedule = SWALearningRate(0.1, swa_start=2, swa_lr=0.01, cycle_length=1)
    np.testing.assert_allclose(
        values(schedule, range(6)), [0.1, 0.1] + [0.01] * 4, rtol=1e-6
    )


def test_cycle_ends_match_the_swa_averaging_recipe():
    swa_start, cycle = 7, 5
    schedule = SWALearningRate(0.2, swa_start, 0.002, cycle_length=cycle)
    recipe = keras_swa.SWA(
        keras.optimizers.SGD(0.1),
        start_averaging=swa_start + cycle - 1,
        average_period=cycle,
    )
    snapshot_steps = [
        step for step in range(60)
        if keras_swa.averaging.is_snapshot_step(
            step, recipe.start_averaging, recipe.average_period
        )
    ]
    np.testing.assert_allclose(
        values(schedule, snapshot_steps), 0.002, rtol=1e-6
    )
    assert snapshot_steps[0] == swa_start + cycle - 1


def test_base_schedule_before_and_from_swa_start():
    base = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    lr0 = 0.1 * 0.5 ** (20 / 10)
    constant = SWALearningRate(base, swa_start=20, swa_lr=0.01,
                               anneal_steps=10, anneal_strategy="linear")
    steps = [0, 7, 19, 20, 25, 30, 100]
    expected = [0.1 * 0.5 ** (s / 10) for s in steps[:3]] + [
        reference_anneal(lr0, 0.01, s - 20, 10, "linear") for s in steps[3:]
    ]
    np.testing.assert_allclose(values(constant, steps), expected, rtol=1e-5)

    cyclic = SWALearningRate(base, swa_start=20, swa_lr=0.01, cycle_length=3)
    np.testing.assert_allclose(
        values(cyclic, [19, 20, 21, 22, 23]),
        [0.1 * 0.5 ** 1.9, lr0, (lr0 + 0.01) / 2, 0.01, lr0],
        rtol=1e-5,
    )


def _compiled(fn):
    """`fn` compiled by the backend: tf.function, jax.jit or torch.compile."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    import torch

    return torch.compile(fn)


# JAX runs without 64-bit types unless asked to.
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_inside_a_compiled_function(dtype):
    if keras.backend.backend() == "jax" and dtype == "int64":
        pytest.skip("JAX has no int64 without jax_enable_x64.")
    schedule = SWALearningRate(
        keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5),
        swa_start=10, swa_lr=0.01, anneal_steps=4,
    )

    def step_tensor(step):
        return keras.ops.convert_to_tensor(step, dtype=dtype)

    compiled = _compiled(lambda step: schedule(step))
    eager = values(schedule, range(16))
    traced = [float(compiled(step_tensor(step))) for step in range(16)]
    np.testing.assert_allclose(traced, eager, rtol=1e-6)
    cyclic = SWALearningRate(0.1, swa_start=3, swa_lr=0.01, cycle_length=4)
    compiled = _compiled(lambda step: cyclic(step))
    traced = [float(compiled(step_tensor(step))) for step in range(12)]
    np.testing.assert_allclose(traced, values(cyclic, range(12)), rtol=1e-6)


def test_drives_an_optimizer_in_fit():
    keras.utils.set_random_seed(0)
    schedule = SWALearningRate(0.1, swa_start=3, swa_lr=0.01, cycle_length=2)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    optimizer = keras.optimizers.SGD(schedule)
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.rand(8, 2).astype("float32")
    model.fit(x, x[:, :1], batch_size=2, epochs=1, verbose=0)
    assert int(optimizer.iterations) == 4
    np.testing.assert_allclose(float(optimizer.learning_rate), 0.01, rtol=1e-6)


@pytest.mark.parametrize(
    "base", [0.1, keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)]
)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(anneal_steps=5, anneal_strategy="linear"),
        dict(cycle_length=4),
        dict(anneal_steps=2, gradient_accumulation_steps=4),
    ],
)
def test_config_round_trip(base, kwargs):
    schedule = SWALearningRate(base, swa_start=10, swa_lr=0.01, **kwargs)
    restored = SWALearningRate.from_config(schedule.get_config())
    assert restored.get_config() == schedule.get_config()
    np.testing.assert_allclose(
        values(restored, range(25)), values(schedule, range(25))
    )
    via_keras = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule)
    )
    assert isinstance(via_keras, SWALearningRate)
    assert via_keras.get_config() == schedule.get_config()


def test_survives_saving_a_model(tmp_path):
    schedule = SWALearningRate(
        keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5),
        swa_start=6, swa_lr=0.01, anneal_steps=3,
    )
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    x = np.ones((4, 2), "float32")
    model.fit(x, x[:, :1], batch_size=1, epochs=2, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.optimizer._learning_rate
    assert isinstance(restored, SWALearningRate)
    assert restored.get_config() == schedule.get_config()
    assert int(loaded.optimizer.iterations) == 8
    np.testing.assert_allclose(
        float(loaded.optimizer.learning_rate), float(schedule(8)), rtol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(base="0.1"), TypeError, "base"),
        (dict(base=-0.1), ValueError, "base"),
        (dict(swa_start=-1), ValueError, "swa_start"),
        (dict(swa_start=1.5), TypeError, "swa_start"),
        (dict(swa_lr=-0.01), ValueError, "swa_lr"),
        (dict(swa_lr=None), TypeError, "swa_lr"),
        (dict(anneal_steps=-1), ValueError, "anneal_steps"),
        (dict(anneal_steps=True), TypeError, "anneal_steps"),
        (dict(anneal_strategy="cosine"), ValueError, "anneal_strategy"),
        (dict(cycle_length=0), ValueError, "cycle_length"),
        (dict(cycle_length=2.0), TypeError, "cycle_length"),
        (dict(cycle_length=4, anneal_steps=2), ValueError, "anneal_steps"),
        (dict(gradient_accumulation_steps=0), ValueError,
         "gradient_accumulation_steps"),
        (dict(gradient_accumulation_steps=2.0), TypeError,
         "gradient_accumulation_steps"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    arguments = dict(base=0.1, swa_start=10, swa_lr=0.01)
    arguments.update(kwargs)
    with pytest.raises(error, match=name) as info:
        SWALearningRate(**arguments)
    if name == "anneal_strategy":
        assert "'cosine'" in str(info.value)
        assert '"cos", "linear"' in str(info.value)


def _accumulation_run(schedule, batch_size, accumulation):
    """The kernel after 3 epochs of 16 samples with momentum SGD."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras.optimizers.SGD(
            schedule, momentum=0.9, gradient_accumulation_steps=accumulation
        ),
        loss="mse",
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    model.fit(x, y, batch_size=batch_size, epochs=3, shuffle=False, verbose=0)
    return np.asarray(model.trainable_variables[0].numpy())


def test_gradient_accumulation_counts_real_updates():
    # Keras evaluates a schedule at its micro-step count (update `u` at
    # micro-step `u * A + A - 1`; `optimizer.iterations` counts updates),
    # on every backend. The SWA phase counts updates, as SWA's snapshots.
    def schedule(accumulation, **kwargs):
        return SWALearningRate(
            0.1, swa_start=2, swa_lr=0.01,
            gradient_accumulation_steps=accumulation,
            **(kwargs or dict(anneal_steps=3)),
        )

    micro_steps = [u * 2 + 1 for u in range(8)]
    for kwargs in (dict(anneal_steps=3), dict(cycle_length=3)):
        np.testing.assert_allclose(
            values(schedule(2, **kwargs), micro_steps),
            values(schedule(None, **kwargs), range(8)),
            rtol=1e-6,
        )
    # Batches of 4 accumulated two by two are the updates of batches of 8.
    reference = _accumulation_run(schedule(None), 8, None)
    accumulated = _accumulation_run(schedule(2), 4, 2)
    np.testing.assert_allclose(accumulated, reference, rtol=1e-5, atol=1e-6)
    # Counting micro-steps instead trains otherwise (the test can fail).
    micro = _accumulation_run(schedule(None), 4, 2)
    assert not np.allclose(micro, reference, rtol=1e-4, atol=1e-5)
