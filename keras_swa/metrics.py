"""Calibration metrics: how far a classifier's confidence is from its
accuracy."""

import keras
import numpy as np
from keras import ops

from keras_swa import _validation


@keras.saving.register_keras_serializable(package="keras_swa")
class ExpectedCalibrationError(keras.metrics.Metric):
    """Expected calibration error (Guo et al., 2017) of a classifier.

    Each prediction's confidence, its largest class probability, falls into
    one of `num_bins` equal-width bins: bin `b` holds the confidences in
    `(b / num_bins, (b + 1) / num_bins]` (the first bin also holds 0). With
    `n_b` the (sample-weighted) predictions in bin `b`, `acc_b` their
    accuracy and `conf_b` their mean confidence, the metric is
    `sum_b (n_b / N) * |acc_b - conf_b|`, over all batches seen; empty bins
    count 0, and no data at all gives 0.

    Predictions `y_pred` of shape `(..., C)` with `C >= 2` are class
    probabilities (or logits with `from_logits=True`, which go through a
    softmax); the predicted class is the most probable (the first one on a
    tie). A single unit (`(..., 1)` or 1-D) is a binary classifier: the
    probability (or, with `from_logits`, the logit) of class 1, with
    confidence `max(p, 1 - p)` and class 1 predicted where `p > 0.5`. Labels
    `y_true` are integer class indices (of shape `(...)` or `(..., 1)`), or
    one-hot (or soft) labels of the same shape as `y_pred`, of which the
    largest entry is the class.

    Args:
        num_bins: Integer >= 1, the number of confidence bins. Defaults to
            `15`.
        from_logits: Whether `y_pred` holds logits rather than
            probabilities. Defaults to `False`.
        name: String, the name of the metric. Defaults to `"ece"`.
        dtype: The dtype of the metric's result and state. Defaults to
            `None` (float32).

    Example:

    >>> ece = keras_swa.metrics.ExpectedCalibrationError(num_bins=10)
    >>> ece.update_state([0, 1], [[0.9, 0.1], [0.6, 0.4]])
    >>> round(float(ece.result()), 4)  # (|1 - 0.9| + |0 - 0.6|) / 2
    0.35
    >>> model.compile(optimizer="adam",
    ...               loss="sparse_categorical_crossentropy",
    ...               metrics=["accuracy", ece])  # doctest: +SKIP
    """

    def __init__(
        self,
        num_bins: int = 15,
        from_logits: bool = False,
        name: str = "ece",
        dtype=None,
    ):
        num_bins = _validation.integer("num_bins", num_bins, 1)
        from_logits = _validation.boolean("from_logits", from_logits)
        super().__init__(name=name, dtype=dtype)
        self.num_bins = num_bins
        self.from_logits = from_logits
        # Per bin: the weight of its predictions, of their confidences and
        # of the correct ones.
        self.bin_weights, self.bin_confidences, self.bin_corrects = (
            self.add_variable(
                shape=(num_bins,),
                initializer="zeros",
                dtype=self.dtype,
                name=state_name,
            )
            for state_name in (
                "bin_weights", "bin_confidences", "bin_corrects"
            )
        )
        edges = np.linspace(0.0, 1.0, num_bins + 1)
        self._lower_edges = edges[:-1].copy()
        self._lower_edges[0] = -np.inf
        self._upper_edges = edges[1:]

    def _confidences_and_corrects(self, y_true, y_pred):
        """The confidences, the 0/1 correctness and the shape of the
        predictions without the class axis."""
        y_pred = ops.cast(ops.convert_to_tensor(y_pred), self.dtype)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_pred.shape) == 1 or y_pred.shape[-1] == 1:
            if len(y_pred.shape) > 1:
                y_pred = ops.squeeze(y_pred, axis=-1)
            probability = ops.sigmoid(y_pred) if self.from_logits else y_pred
            confidence = ops.maximum(probability, 1.0 - probability)
            predicted = ops.greater(probability, 0.5)
            labels = ops.reshape(y_true, ops.shape(predicted))
            correct = ops.equal(predicted, ops.greater(labels, 0.5))
            return confidence, correct
        probabilities = (
            ops.softmax(y_pred, axis=-1) if self.from_logits else y_pred
        )
        confidence = ops.max(probabilities, axis=-1)
        predicted = ops.argmax(probabilities, axis=-1)
        if len(y_true.shape) == len(y_pred.shape) and (
            y_true.shape[-1] == y_pred.shape[-1]
        ):
            labels = ops.argmax(y_true, axis=-1)
        else:
            labels = ops.reshape(y_true, ops.shape(predicted))
        correct = ops.equal(
            ops.cast(predicted, "int32"), ops.cast(labels, "int32")
        )
        return confidence, correct

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch of predictions to the bins.

        Args:
            y_true: Integer labels, or one-hot labels shaped as `y_pred`.
            y_pred: Class probabilities (or logits with `from_logits`).
            sample_weight: Optional weights of the predictions, of the shape
                of `y_pred` without its class axis (or broadcastable to it).
                Defaults to `None`, weight 1 each.
        """
        confidence, correct = self._confidences_and_corrects(y_true, y_pred)
        if sample_weight is None:
            weight = ops.ones_like(confidence)
        else:
            weight = ops.cast(ops.convert_to_tensor(sample_weight), self.dtype)
            if len(weight.shape) == len(confidence.shape) + 1:
                weight = ops.squeeze(weight, axis=-1)
            while len(weight.shape) < len(confidence.shape):
                weight = ops.expand_dims(weight, axis=-1)
            weight = ops.broadcast_to(weight, ops.shape(confidence))
        confidence = ops.reshape(confidence, (-1, 1))
        correct = ops.cast(ops.reshape(correct, (-1,)), self.dtype)
        weight = ops.reshape(weight, (-1,))
        in_bin = ops.cast(
            ops.logical_and(
                ops.greater(
                    confidence, ops.cast(self._lower_edges, self.dtype)
                ),
                ops.less_equal(
                    confidence, ops.cast(self._upper_edges, self.dtype)
                ),
            ),
            self.dtype,
        )
        confidence = ops.reshape(confidence, (-1,))
        for variable, per_prediction in (
            (self.bin_weights, weight),
            (self.bin_confidences, weight * confidence),
            (self.bin_corrects, weight * correct),
        ):
            variable.assign_add(
                ops.matmul(ops.expand_dims(per_prediction, 0), in_bin)[0]
            )

    def result(self):
        gaps = ops.abs(
            ops.subtract(self.bin_corrects.value, self.bin_confidences.value)
        )
        return ops.divide_no_nan(
            ops.sum(gaps), ops.sum(self.bin_weights.value)
        )

    def reset_state(self):
        for variable in (
            self.bin_weights, self.bin_confidences, self.bin_corrects
        ):
            variable.assign(ops.zeros_like(variable.value))

    def get_config(self):
        return {
            **super().get_config(),
            "num_bins": self.num_bins,
            "from_logits": self.from_logits,
        }
