"""ExpectedCalibrationError against a NumPy computation bin by bin, on every
backend."""

import keras
import numpy as np
import pytest

import keras_swa
from keras_swa.metrics import ExpectedCalibrationError


def ece_reference(probabilities, labels, num_bins, weights=None):
    """ECE by its definition: per bin `(lo, hi]` (0 in the first), the
    weighted accuracy and mean confidence, then their gaps weighted by the
    bin's share of the predictions."""
    probabilities = np.asarray(probabilities, "float64")
    weights = np.ones(len(labels)) if weights is None else np.asarray(weights)
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece = 0.0
    for b in range(num_bins):
        in_bin = (confidence <= edges[b + 1]) & (
            (confidence > edges[b]) if b else (confidence >= 0.0)
        )
        n_b = weights[in_bin].sum()
        if n_b == 0:
            continue
        accuracy = (weights * correct)[in_bin].sum() / n_b
        mean_confidence = (weights * confidence)[in_bin].sum() / n_b
        ece += n_b / weights.sum() * abs(accuracy - mean_confidence)
    return ece


def random_predictions(n, num_classes, seed, sharpness=1.0):
    rng = np.random.default_rng(seed)
    logits = sharpness * rng.normal(size=(n, num_classes))
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # Labels that agree with the prediction more often than chance.
    labels = np.where(
        rng.random(n) < 0.6,
        probabilities.argmax(-1),
        rng.integers(0, num_classes, n),
    )
    return logits.astype("float32"), probabilities.astype("float32"), labels


def result(metric):
    return float(np.asarray(keras.ops.convert_to_numpy(metric.result())))


@pytest.mark.parametrize("num_bins", [15, 7, 1])
def test_matches_numpy_over_several_batches(num_bins):
    _, probabilities, labels = random_predictions(300, 4, seed=num_bins)
    weights = np.random.default_rng(1).random(300).astype("float32")
    metric = ExpectedCalibrationError(num_bins=num_bins)
    for start in range(0, 300, 128):
        batch = slice(start, start + 128)
        metric.update_state(
            labels[batch], probabilities[batch], sample_weight=weights[batch]
        )
    expected = ece_reference(probabilities, labels, num_bins, weights)
    assert expected > 0.01
    np.testing.assert_allclose(result(metric), expected, rtol=1e-5, atol=1e-6)


def test_one_hot_and_column_labels_equal_sparse_labels():
    _, probabilities, labels = random_predictions(200, 5, seed=2)
    expected = ece_reference(probabilities, labels, 15)
    for y_true in (labels, labels[:, None], np.eye(5)[labels]):
        metric = ExpectedCalibrationError()
        metric.update_state(y_true, probabilities)
        np.testing.assert_allclose(result(metric), expected, rtol=1e-5)


def test_from_logits():
    logits, probabilities, labels = random_predictions(200, 3, seed=3)
    metric = ExpectedCalibrationError(num_bins=10, from_logits=True)
    metric.update_state(labels, logits)
    np.testing.assert_allclose(
        result(metric), ece_reference(probabilities, labels, 10), rtol=1e-5
    )


def test_empty_bins_and_full_confidence():
    # Confident predictions: most of the 20 bins stay empty, and the
    # one-hot rows have confidence exactly 1 (the top bin).
    _, probabilities, labels = random_predictions(60, 3, seed=4, sharpness=6.0)
    probabilities[:10] = np.eye(3, dtype="float32")[labels[:10]]
    probabilities[10:15] = np.eye(3, dtype="float32")[(labels[10:15] + 1) % 3]
    metric = ExpectedCalibrationError(num_bins=20)
    metric.update_state(labels, probabilities)
    confidence = probabilities.max(-1)
    occupied = len(np.unique(np.ceil(confidence * 20)))
    assert occupied < 20
    np.testing.assert_allclose(
        result(metric), ece_reference(probabilities, labels, 20), rtol=1e-5
    )
    assert result(ExpectedCalibrationError()) == 0.0


def test_hand_computed_value_and_reset():
    metric = ExpectedCalibrationError(num_bins=10)
    metric.update_state([0, 1], [[0.9, 0.1], [0.6, 0.4]])
    # Bin (0.8, 0.9]: right at 0.9; bin (0.5, 0.6]: wrong at 0.6.
    np.testing.assert_allclose(result(metric), (0.1 + 0.6) / 2, rtol=1e-6)
    metric.reset_state()
    assert result(metric) == 0.0


def test_binary_single_unit():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(150, 1)).astype("float32")
    p = 1.0 / (1.0 + np.exp(-logits.astype("float64")))
    labels = (rng.random(150) < p[:, 0]).astype("float32")
    # As two classes [1 - p, p].
    expected = ece_reference(np.concatenate([1 - p, p], -1), labels, 15)
    for y_pred, from_logits in ((p.astype("float32"), False), (logits, True)):
        metric = ExpectedCalibrationError(from_logits=from_logits)
        metric.update_state(labels[:, None], y_pred)
        np.testing.assert_allclose(result(metric), expected, rtol=1e-5)
    metric = ExpectedCalibrationError()
    metric.update_state(labels, p[:, 0].astype("float32"))
    np.testing.assert_allclose(result(metric), expected, rtol=1e-5)


def test_in_compile_metrics():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0.5)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
         keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras_swa.metrics.ExpectedCalibrationError(from_logits=True)],
    )
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert "ece" in history.history
    results = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    logits = model.predict(x, verbose=0).astype("float64")
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        results["ece"], ece_reference(probabilities, y, 15), rtol=1e-4,
        atol=1e-6,
    )


def test_serialization():
    metric = ExpectedCalibrationError(num_bins=8, from_logits=True, name="cal")
    config = metric.get_config()
    assert config["num_bins"] == 8 and config["from_logits"] is True
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(restored, ExpectedCalibrationError)
    assert (restored.num_bins, restored.from_logits, restored.name) == (
        8, True, "cal"
    )


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"num_bins": 0}, ValueError, "num_bins"),
        ({"num_bins": 10.0}, TypeError, "num_bins"),
        ({"from_logits": 1}, TypeError, "from_logits"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`.*Received: {name}="):
        ExpectedCalibrationError(**kwargs)
    assert ExpectedCalibrationError(num_bins=np.int32(4)).num_bins == 4
