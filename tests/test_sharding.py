"""Averages of a sharded model: sharded like its weights, same numbers.

`tests/sharding_run.py` trains the same model with every averager twice in
one JAX process with 8 host devices: on one device, and under
`keras.distribution.ModelParallel` (kernels, biases and BatchNormalization
variables sharded 4 ways over a "model" axis, batches 2 ways). The checks
here read its results: the shardings found on the arrays, the collectives of
the compiled train step, and the numbers of both runs.

The run is JAX whatever the backend of this process, so it belongs to the
JAX suite (`make test-jax`) only: running it in the three suites would
repeat the same subprocess three times.
"""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        keras.backend.backend() != "jax",
        reason="the sharded run is JAX's (a subprocess); the JAX suite "
        "runs it",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None, reason="JAX is not installed"
    ),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 1e-5, 1e-6
AVERAGERS = (
    "swa", "ema", "power_ema", "posthoc_ema", "callback", "swag",
    "schedule_free",
)
WRAPPERS = ("swa", "ema", "power_ema", "posthoc_ema", "schedule_free")
# The trainable variables: dense_in kernel and bias, norm gamma and beta,
# dense_out kernel and bias; model.weights has the moving mean and variance
# of norm at 4 and 5.
TRAINABLE = 6
SHARDS = 4  # the "model" axis of the 2 x 4 mesh
BN_BATCH = 32  # update_bn's batch for NumPy arrays, as Keras' predict


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("sharding") / "results.npz")
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    completed = subprocess.run(
        [sys.executable, "-m", "tests.sharding_run", target],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    with np.load(target) as file:
        data = dict(file)
    assert int(data["num_devices"]) == 8
    return data


def _run(results, kind, run):
    prefix = f"{kind}/{run}/"
    return {
        key[len(prefix):]: value
        for key, value in results.items()
        if key.startswith(prefix)
    }


def _indexed(run, name):
    """The entries `<name>_<i>` of a run, in the order of `i`."""
    prefix = f"{name}_"
    keys = sorted(
        (key for key in run if key.startswith(prefix)
         and key[len(prefix):].isdigit()),
        key=lambda key: int(key[len(prefix):]),
    )
    return [run[key] for key in keys]


def _copies(kind):
    """Copies of the trainable weights each averager keeps: one a profile
    for PostHocEMA, the mean, second moment and `max_rank` deviation
    columns for SWAG."""
    from tests import sharding_run

    return {"posthoc_ema": 2, "swag": sharding_run.MAX_RANK + 2}.get(kind, 1)


@pytest.mark.parametrize("kind", AVERAGERS)
def test_averages_are_sharded_like_their_weights(results, kind):
    sharded = _run(results, kind, "sharded")
    weight_specs = [str(s) for s in _indexed(sharded, "weight_spec")]
    assert len(weight_specs) == TRAINABLE
    # The layout map shards every trainable weight over "model".
    assert all("model" in spec for spec in weight_specs)
    average_specs = [str(s) for s in _indexed(sharded, "average_spec")]
    assert average_specs == weight_specs * _copies(kind)
    assert all(_indexed(sharded, "equivalent"))
    # No pattern of the layout map matches an average's path: each average
    # got its sharding from its weight's layout.
    assert not any(_indexed(sharded, "mapped"))


@pytest.mark.parametrize("kind", AVERAGERS)
def test_an_average_takes_a_shard_of_the_bytes_per_device(results, kind):
    sharded = _run(results, kind, "sharded")
    weight_bytes = int(sharded["weight_bytes"])
    assert int(sharded["weight_total_bytes"]) == SHARDS * weight_bytes
    # float32 weights, float32 averages: one more copy per profile, sharded.
    assert int(sharded["average_bytes"]) == _copies(kind) * weight_bytes
    assert int(sharded["average_total_bytes"]) == (
        _copies(kind) * SHARDS * weight_bytes
    )


@pytest.mark.parametrize("kind", WRAPPERS)
def test_the_fold_in_adds_no_collective_to_the_train_step(results, kind):
    plain = [str(c) for c in results["plain/sharded/collectives"]]
    averaged = [str(c) for c in results[f"{kind}/sharded/collectives"]]
    # The step without averaging has collectives (the forward and backward
    # passes of the sharded model), so a collective of the fold-in would
    # show up as one more here.
    assert plain
    assert averaged == plain


@pytest.mark.parametrize("kind", AVERAGERS)
def test_the_sharded_run_gives_the_single_device_numbers(results, kind):
    single = _run(results, kind, "single")
    sharded = _run(results, kind, "sharded")
    numbers = sorted(
        key for key, value in single.items() if value.dtype.kind in "fi"
    )
    assert "n_averaged" in numbers and "average_0" in numbers
    assert "assigned_0" in numbers
    for key in numbers:
        # A SWAG sample scales its noise by sqrt(sq_mean - mean**2), which
        # turns the rounding of the moments into a larger one (the two
        # snapshots' variance is small).
        atol = 5e-5 if key.startswith("sampled_") else ATOL
        np.testing.assert_allclose(
            sharded[key], single[key], rtol=RTOL, atol=atol, err_msg=key
        )


def test_the_snapshots_counted_are_those_of_the_schedules(results):
    steps = 3 * 64 // 16  # epochs * batches an epoch
    expected = {
        "swa": len(range(2, steps, 3)),  # start_averaging=2, period 3
        "ema": steps,
        "power_ema": steps,
        "posthoc_ema": steps,
        "callback": 2,  # epochs 1 and 2 of 3
        "swag": 2,
        "schedule_free": steps,
    }
    for kind, count in expected.items():
        for run in ("single", "sharded"):
            assert int(results[f"{kind}/{run}/n_averaged"]) == count, kind


@pytest.mark.parametrize("kind", (*WRAPPERS, "swag"))
def test_swapped_weights_keep_their_sharding_and_come_back(results, kind):
    """`averaged_weights` (wrappers) and `sampled_weights` (SWAG)."""
    sharded = _run(results, kind, "sharded")
    inside = [str(s) for s in _indexed(sharded, "inside_spec")]
    # model.weights: the trainable ones and the two statistics of norm.
    weight_specs = [str(s) for s in _indexed(sharded, "weight_spec")]
    expected = weight_specs[:4] + ["P('model',)"] * 2 + weight_specs[4:]
    assert inside == expected
    assert bool(sharded["restored"])
    if kind == "swag":
        return
    # Inside the block: the averages, with statistics for them.
    bn_weights = _indexed(sharded, "bn_weights")
    averages = _indexed(sharded, "average")
    if kind == "schedule_free":
        # x = (y - (1 - momentum) z) / momentum, from the raw y and the z.
        raw, beta = _indexed(sharded, "raw"), 0.9
        averages = [
            (raw[i] - (1 - beta) * z) / beta
            for i, z in zip([0, 1, 2, 3, 6, 7], averages)
        ]
    if kind == "posthoc_ema":
        averages = averages[TRAINABLE:]  # the source is the second profile
    for index, average in zip([0, 1, 2, 3, 6, 7], averages):
        np.testing.assert_allclose(bn_weights[index], average, rtol=RTOL)


def test_swag_draws_its_noise_shard_by_shard(results):
    # Drawn whole on one device, the noise of a variable would take its
    # full size there; drawn with the mean's sharding, each device draws
    # its shard, and the numbers are those of an unsharded draw.
    for run in ("single", "sharded"):
        numbers = _run(results, "swag", run)
        noises = _indexed(numbers, "noise")
        references = _indexed(numbers, "noise_reference")
        assert len(noises) == TRAINABLE
        for noise, reference in zip(noises, references):
            np.testing.assert_array_equal(noise, reference)
    sharded = _run(results, "swag", "sharded")
    weight_specs = [str(s) for s in _indexed(sharded, "weight_spec")]
    assert [str(s) for s in _indexed(sharded, "noise_spec")] == weight_specs
    assert all(_indexed(sharded, "noise_on_every_device"))
    assert int(sharded["noise_compilations_for_a_new_seed"]) == 0


@pytest.mark.parametrize("kind", WRAPPERS)
def test_a_loaded_model_has_the_averages_sharded_again(results, kind):
    sharded = _run(results, kind, "sharded")
    loaded = _indexed(sharded, "loaded")
    averages = _indexed(sharded, "average")
    assert len(loaded) == len(averages) == _copies(kind) * TRAINABLE
    for saved, restored in zip(averages, loaded):
        np.testing.assert_array_equal(restored, saved)
    assert [str(s) for s in _indexed(sharded, "loaded_spec")] == [
        str(s) for s in _indexed(sharded, "average_spec")
    ]


@pytest.mark.parametrize(
    "kind, weights", [(kind, "assigned") for kind in AVERAGERS]
    + [("swag", "sampled")],
)
def test_update_bn_on_the_sharded_model_gives_the_batch_moments(
    results, kind, weights
):
    from tests import sharding_run

    x, _, _ = sharding_run._inputs()
    weights = _indexed(_run(results, kind, "sharded"), weights)
    kernel, bias = weights[0].astype("float64"), weights[1].astype("float64")
    hidden = np.maximum(x.astype("float64") @ kernel + bias, 0.0)
    batches = [
        hidden[start:start + BN_BATCH]
        for start in range(0, len(x), BN_BATCH)
    ]
    sizes = np.array([len(b) for b in batches])[:, None] / len(x)
    np.testing.assert_allclose(
        weights[4], (sizes * [b.mean(0) for b in batches]).sum(0),
        rtol=1e-4, atol=1e-5,
    )
    np.testing.assert_allclose(
        weights[5], (sizes * [b.var(0) for b in batches]).sum(0),
        rtol=1e-4, atol=1e-5,
    )
