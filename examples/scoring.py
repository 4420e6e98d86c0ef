"""How `examples.train` scores a row: test accuracy, NLL and calibration,
from the row's test probabilities.

A row is one model the table reports (plain SGD, the SWA average, ...):
`LABELS` names them, in the table's order.
"""

# Confidence bins of the expected calibration error and the reliability
# diagram (the usual 15 of Guo et al., 2017).
ECE_BINS = 15

# The schedule-free rows: y, the weights a schedule-free optimizer trains
# at (what Keras leaves in the model), and x, its average.
LABELS = {
    "sgd": "SGD iterate",
    "swa_iterate": "SWA: final iterate",
    "swa": "SWA: average",
    "swag": "SWAG-BMA",
    "ema": "EMA: average",
    "sf_y": "ScheduleFree(SGD): y",
    "sf_x": "ScheduleFree(SGD): x",
    "sf_adamw_y": "ScheduleFree(AdamW): y",
    "sf_adamw_x": "ScheduleFree(AdamW): x",
    "keras_sf_y": "Keras ScheduleFreeAdamW: y",
    "keras_sf_x": "Keras ScheduleFreeAdamW: x",
}
METRICS = ("accuracy", "nll", "ece")


def softmax(logits):
    """Softmax over the last axis, computed in float64, as float32."""
    import numpy as np

    logits = np.asarray(logits, dtype="float64")
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (exponentials / exponentials.sum(axis=-1, keepdims=True)).astype("float32")


def scores(probabilities, labels):
    """Test accuracy, NLL (mean negative log-probability of the true class)
    and expected calibration error (`keras_swa.metrics.
    ExpectedCalibrationError`, `ECE_BINS` bins) of class probabilities."""
    import numpy as np

    import keras_swa

    probabilities = np.asarray(probabilities, dtype="float32")
    labels = np.asarray(labels)
    true_class = probabilities[np.arange(len(labels)), labels].astype("float64")
    # A probability that underflowed float32 counts as the smallest one.
    nll = -np.log(np.maximum(true_class, np.finfo("float32").tiny))
    ece = keras_swa.metrics.ExpectedCalibrationError(num_bins=ECE_BINS)
    ece.update_state(labels, probabilities)
    return {
        "accuracy": float(np.mean(probabilities.argmax(axis=-1) == labels)),
        "nll": float(np.mean(nll)),
        "ece": float(ece.result()),
    }


def test_probabilities(model, dataset):
    """The model's class probabilities on the test set, in its order."""
    return softmax(model.predict(dataset.test, verbose=0))


def evaluate_bn_recomputed(model, dataset):
    """Recomputes the model's BatchNorm statistics on the training set, then
    predicts the test set: the evaluation every row of the table gets."""
    import keras_swa

    keras_swa.update_bn(model, dataset.train_eval, verbose=0)
    return test_probabilities(model, dataset)


def calibration_bins(probabilities, labels, num_bins=ECE_BINS):
    """The reliability diagram's bins, as `ExpectedCalibrationError` makes
    them: bin `b` holds the confidences (largest probabilities) in
    `(b / num_bins, (b + 1) / num_bins]`. Returns per bin the number of
    predictions, their mean confidence and their accuracy (NaN when empty)."""
    import numpy as np

    probabilities = np.asarray(probabilities, dtype="float64")
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == np.asarray(labels)
    bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, confidence, num_bins) / counts
        accuracy = np.bincount(bins, correct.astype(float), num_bins) / counts
    return counts, mean_confidence, accuracy

