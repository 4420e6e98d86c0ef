"""The same numbers on every Keras backend, and on several JAX devices.

Each run is a subprocess (`tests/backend_run.py`), since the backend and
XLA's device count are fixed when a process starts.
"""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests import backend_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def _inputs(path):
    """Data and initial weights, made in NumPy and this process's Keras."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 1)) + 0.1).astype("float32")
    keras.utils.set_random_seed(0)
    model = backend_run.build_model(5)
    weights = model.get_weights()
    # BatchNormalization starts from non-trivial statistics.
    weights[4] = rng.normal(size=weights[4].shape).astype("float32")
    weights[5] = rng.uniform(0.5, 2.0, size=weights[5].shape).astype("float32")
    np.savez(path, x=x, y=y, **{f"weight_{i}": w for i, w in enumerate(weights)})
    return x, y, weights


def _run(backend, source, target, *flags, env=None):
    environment = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(env or {}),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "tests.backend_run", source, target, *flags],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    with np.load(target) as file:
        return dict(file)


def _numpy_swa_reference(x, y, weights):
    """The averaged Dense weights, trained in NumPy: an independent check."""
    w1, b1, gamma, beta, mean, var, w2, b2 = [w.astype("float64") for w in weights]
    params = [w1, b1, gamma, beta, w2, b2]
    velocity = [np.zeros_like(p) for p in params]
    snapshots, step = [], 0
    for _ in range(3):
        for start in range(0, len(x), backend_run.BATCH_SIZE):
            xb = x[start : start + backend_run.BATCH_SIZE].astype("float64")
            yb = y[start : start + backend_run.BATCH_SIZE].astype("float64")
            grads = _grads(params, xb, yb)
            for i, g in enumerate(grads):
                velocity[i] = 0.9 * velocity[i] - 0.05 * g
                params[i] = params[i] + velocity[i]
            if step >= 2 and (step - 2) % 3 == 0:
                snapshots.append([p.copy() for p in params])
            step += 1
    return [np.mean(ps, axis=0) for ps in zip(*snapshots)], len(snapshots)


def _grads(params, xb, yb, epsilon=1e-3):
    w1, b1, gamma, beta, w2, b2 = params
    n = len(xb)
    h = xb @ w1 + b1
    a = np.maximum(h, 0.0)
    mu = a.mean(0)
    var = a.var(0)
    inv = 1.0 / np.sqrt(var + epsilon)
    xhat = (a - mu) * inv
    z = gamma * xhat + beta
    out = z @ w2 + b2
    dout = 2.0 * (out - yb) / n
    dw2 = z.T @ dout
    db2 = dout.sum(0)
    dz = dout @ w2.T
    dgamma = (dz * xhat).sum(0)
    dbeta = dz.sum(0)
    dxhat = dz * gamma
    da = inv / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    dh = da * (h > 0)
    return [xb.T @ dh, dh.sum(0), dgamma, dbeta, dw2, db2]


@pytest.mark.slow
def test_every_backend_gives_the_same_average(tmp_path):
    source = str(tmp_path / "inputs.npz")
    x, y, weights = _inputs(source)
    installed = [
        backend for backend, module in BACKENDS.items()
        if importlib.util.find_spec(module) is not None
    ]
    if len(installed) < 2:
        pytest.skip(f"Only {installed} installed: nothing to compare.")
    results = {
        backend: _run(backend, source, str(tmp_path / f"{backend}.npz"))
        for backend in installed
    }

    expected, count = _numpy_swa_reference(x, y, weights)
    for backend, result in results.items():
        # Updates 2, 5, 8, 11 and 14 of 15.
        assert int(result["n_averaged"]) == count == 5, backend
        trainable = [0, 1, 2, 3, 6, 7]  # the kernels, biases, gamma, beta
        for i, reference in zip(trainable, expected):
            np.testing.assert_allclose(
                result[f"swa_{i}"], reference, rtol=1e-4, atol=1e-5,
                err_msg=f"{backend}: weight {i}",
            )
        # update_bn: the batch moments of the averaged model's hidden layer,
        # over batches of 32, 32 and 16, weighted by their sizes.
        w1, b1 = expected[0], expected[1]
        hidden = np.maximum(x.astype("float64") @ w1 + b1, 0.0)
        batches = [hidden[:32], hidden[32:64], hidden[64:]]
        sizes = np.array([[32], [32], [16]]) / 80
        np.testing.assert_allclose(
            result["swa_4"], (sizes * [b.mean(0) for b in batches]).sum(0),
            rtol=1e-4, atol=1e-5, err_msg=f"{backend}: moving_mean",
        )
        np.testing.assert_allclose(
            result["swa_5"], (sizes * [b.var(0) for b in batches]).sum(0),
            rtol=1e-4, atol=1e-5, err_msg=f"{backend}: moving_variance",
        )
    first, *others = installed
    for backend in others:
        for key in results[first]:
            np.testing.assert_allclose(
                results[backend][key], results[first][key],
                rtol=1e-5, atol=1e-5, err_msg=f"{backend} vs {first}: {key}",
            )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="JAX is not installed."
)
def test_jax_data_parallel_on_two_devices_gives_the_single_device_average(
    tmp_path,
):
    source = str(tmp_path / "inputs.npz")
    _inputs(source)
    single = _run("jax", source, str(tmp_path / "single.npz"))
    parallel = _run(
        "jax", source, str(tmp_path / "parallel.npz"), "--data_parallel",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert int(single.pop("num_devices")) == 1
    assert int(parallel.pop("num_devices")) == 2
    assert parallel.keys() == single.keys()
    for key in single:
        np.testing.assert_allclose(
            parallel[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
