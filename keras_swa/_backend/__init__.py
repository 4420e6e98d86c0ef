"""The few lines that differ between Keras backends, kept in one package.

- `snapshot`: the snapshot update of the averaging engine (a `tf.distribute`
  cross-replica update on TensorFlow, a value-returning `lax.cond` on JAX, a
  fused multi-tensor lerp on PyTorch);
- `distribute`: `tf.distribute` scope checks and per-replica copies;
- `compiled`: compiled passes over data (`tf.function`, `jax.jit`,
  `torch.no_grad`) and dataset iteration;
- `random`: random draws laid out like a (sharded) array.

Everything else in keras_swa is backend-agnostic `keras.ops`.
"""

import keras
import numpy as np
from keras import ops


def variable_value(variable):
    """The tensor behind a variable: a `keras.Variable`'s `value`, or a plain
    backend variable itself (a `tf.Variable` in a TensorFlow custom loop,
    which Keras' optimizers accept, and whose `value` is a method)."""
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


def numpy_value(value) -> np.ndarray:
    """A variable's or tensor's value as a NumPy array, eagerly, without
    NumPy 2's deprecation warning about `__array__` (which `np.asarray` of a
    `keras.Variable` and `ops.convert_to_numpy` of a `tf.Variable` raise)."""
    value = variable_value(value)
    if keras.backend.backend() == "tensorflow":
        # A `tf.Variable` (mirrored too) or an eager tensor.
        return np.asarray(value.numpy())
    return np.asarray(ops.convert_to_numpy(value))
