"""What `update_bn`, and every `bn_data` argument, accept as data.

The rule is that of `model.fit` for `x`:

- arrays: NumPy arrays and tensors of TensorFlow, JAX or PyTorch (whatever
  the backend), a list or dict of them for a model with several inputs, or a
  tuple `(x,)`, `(x, y)` or `(x, y, sample_weight)` of those, split in order
  into batches of `batch_size` (default 32, as `fit`), the last one shorter;
- batches: a `tf.data.Dataset`, a `keras.utils.PyDataset`, a Python
  generator or iterator, or a `torch.utils.data.DataLoader`, each batch `x`,
  `(x,)`, `(x, y)` or `(x, y, sample_weight)` (a list counts as a tuple, as
  in `fit`: that is what a DataLoader yields). They come batched, so
  `batch_size` is refused with them.

Only `x` of each batch is used. `check_data` validates without reading any
data, so that a wrong argument fails before a training run, not after it.
`input_batches` iterates.

Keras has data adapters that do this (`keras.src.trainers.data_adapters`),
but they are private, their messages cannot name the user's argument (such as
`bn_data`), and on TensorFlow the array adapter builds a `tf.data` pipeline
for every pass: 47 ms to start and iterate 20 batches of 32 16x16x3 images
(1 ms by slicing), when `update_bn` over them is held to 1.2x a compiled
training-mode forward pass of 45 to 70 ms (`examples/benchmark.py --small`
on 2 cores). So this module does it itself: slicing arrays in order is what
`fit(shuffle=False)` does, and batches are used as they come.
"""

import numbers
import sys
import types

import keras
import numpy as np
from keras import ops

# The batch size of `Model.fit` and `Model.predict` for arrays.
DEFAULT_BATCH_SIZE = 32

ACCEPTED = (
    "a NumPy array or a TensorFlow, JAX or PyTorch tensor; a list or dict of "
    "them (several inputs); a tuple `(x,)`, `(x, y)` or "
    "`(x, y, sample_weight)` of those; a `tf.data.Dataset`; a "
    "`keras.utils.PyDataset`; a Python generator or iterator; or a "
    "`torch.utils.data.DataLoader`"
)

# The kinds of data.
ARRAYS = "arrays"
TF_DATASET = "tf.data.Dataset"
PY_DATASET = "keras.utils.PyDataset"
DATA_LOADER = "torch DataLoader"
ITERATOR = "generator or iterator"


def _short(value):
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _received(name, value):
    return f"Received: {name}={_short(value)} of type {type(value).__name__}"


def _module(name):
    # A framework that is not imported has no objects in `data`: checking
    # `sys.modules` keeps this module from importing any of them.
    return sys.modules.get(name)


def _is_tf_dataset(data):
    tf = _module("tensorflow")
    return tf is not None and isinstance(data, tf.data.Dataset)


def _is_data_loader(data):
    torch_data = _module("torch.utils.data")
    return torch_data is not None and isinstance(
        data, torch_data.DataLoader
    )


def _is_iterator(data):
    return isinstance(data, types.GeneratorType) or (
        hasattr(type(data), "__next__") and hasattr(type(data), "__iter__")
    )


def _tensor_types():
    """The tensor types of the frameworks imported so far."""
    types_ = [np.ndarray]
    if (tf := _module("tensorflow")) is not None:
        types_.append(tf.Tensor)
    if (jax := _module("jax")) is not None:
        types_.append(jax.Array)
    if (torch := _module("torch")) is not None:
        types_.append(torch.Tensor)
    return tuple(types_)


def _is_array(value):
    """A NumPy array or a tensor of any installed framework, not a scalar."""
    return (
        isinstance(value, _tensor_types()) or ops.is_tensor(value)
    ) and len(value.shape) >= 1


def _check_count(name, value, allow_none=True):
    """Raises unless `value` is an integer >= 1 (or None if allowed)."""
    if value is None and allow_none:
        return
    accepted = "None or an integer >= 1" if allow_none else "an integer >= 1"
    # `bool` is an `int` subclass, but `True` as a count is a bug.
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, numbers.Integral
    ):
        raise TypeError(
            f"`{name}` must be {accepted}. {_received(name, value)}"
        )
    if value < 1:
        raise ValueError(
            f"`{name}` must be {accepted}. Received: {name}={value!r}"
        )


def _kind(data, name):
    """The kind of `data`; a TypeError naming `name` if it is none."""
    if _is_tf_dataset(data):
        return TF_DATASET
    if isinstance(data, keras.utils.PyDataset):
        return PY_DATASET
    if _is_data_loader(data):
        return DATA_LOADER
    if _is_iterator(data):
        return ITERATOR
    if isinstance(data, (tuple, list, dict)) or _is_array(data):
        return ARRAYS
    raise TypeError(f"`{name}` must be {ACCEPTED}. {_received(name, data)}")


def _split_arrays(data):
    """`(x, others)`: the model inputs and the labels and sample weights."""
    if isinstance(data, tuple):
        return data[0], [part for part in data[1:] if part is not None]
    return data, []


def _check_arrays(data, name):
    """Raises unless `data` is arrays; returns the number of samples."""
    if isinstance(data, tuple) and not 1 <= len(data) <= 3:
        raise TypeError(
            f"A tuple `{name}` must be `(x,)`, `(x, y)` or "
            f"`(x, y, sample_weight)`; this one has {len(data)} elements "
            "(for a model with several inputs, pass a list or dict as `x`). "
            f"{_received(name, data)}"
        )
    x, others = _split_arrays(data)
    x_leaves = keras.tree.flatten(x)
    if not x_leaves:
        raise TypeError(
            f"`{name}` must be {ACCEPTED}; its `x` holds no array. "
            f"{_received(name, data)}"
        )
    for leaf in x_leaves + [
        leaf for part in others for leaf in keras.tree.flatten(part)
    ]:
        if not _is_array(leaf):
            raise TypeError(
                f"`{name}` must be {ACCEPTED}; it holds "
                f"{_short(leaf)} of type {type(leaf).__name__}, which is not "
                "an array of at least one dimension. "
                f"{_received(name, data)}"
            )
    sizes = {
        int(leaf.shape[0])
        for part in [x, *others]
        for leaf in keras.tree.flatten(part)
    }
    if len(sizes) > 1:
        raise ValueError(
            f"The arrays of `{name}` must all have the same number of "
            f"samples (first dimension). Received sizes: {sorted(sizes)}"
        )
    return sizes.pop()


def _py_dataset_batches(data, name):
    """The number of batches of a PyDataset, None if infinite."""
    try:
        return data.num_batches
    except NotImplementedError as error:
        raise ValueError(
            f"`{name}` is a `keras.utils.PyDataset` without a number of "
            "batches: give it a `num_batches` property (None if infinite) or "
            f"`__len__`, as `fit` requires. {_received(name, data)}"
        ) from error


def _loader_batches(data):
    """The number of batches of a DataLoader, None if it has no length."""
    try:
        return len(data)
    except TypeError:  # an `IterableDataset` without `__len__`
        return None


def _no_batch(name, data):
    return ValueError(
        f"`{name}` holds no batch, so there are no statistics to compute. "
        f"{_received(name, data)}"
    )


def check_data(
    data,
    *,
    name="data",
    batch_size=None,
    steps=None,
    batch_size_name="batch_size",
    steps_name="steps",
):
    """Checks `data` and its arguments without reading any batch.

    Safe to call before training starts: nothing of `data` is consumed (a
    generator or iterator is checked no further than its type) and no batch
    is read. Every message names the argument as the user wrote it.

    Args:
        data: The data, in any form `model.fit` accepts as `x` (see the
            module docstring).
        name: The name of the user's argument holding `data`, such as
            `"bn_data"`.
        batch_size: `None` or an integer >= 1, the batch size for arrays.
            Refused with data that comes in batches.
        steps: `None` or an integer >= 1, the number of batches to use at
            most. Required for an infinite `tf.data.Dataset` (`repeat()`)
            or `PyDataset` (`num_batches` of `None`).
        batch_size_name: The name of the user's batch size argument.
        steps_name: The name of the user's steps argument, such as
            `"bn_steps"`.

    Raises:
        TypeError: if `data`, `batch_size` or `steps` is of a type not
            accepted.
        ValueError: if `batch_size` or `steps` is < 1; if `batch_size` is
            given with data that comes in batches; if arrays differ in their
            number of samples; if `data` is known to hold no batch; if it is
            infinite and `steps` is `None`.
    """
    _check_count(batch_size_name, batch_size)
    _check_count(steps_name, steps)
    kind = _kind(data, name)
    if kind == ARRAYS:
        if _check_arrays(data, name) == 0:
            raise _no_batch(name, data)
        return
    if batch_size is not None:
        raise ValueError(
            f"`{batch_size_name}` applies to arrays only: a {kind} comes in "
            f"batches already. Remove `{batch_size_name}` or batch "
            f"`{name}` differently. Received: "
            f"{batch_size_name}={batch_size}, {name} of type "
            f"{type(data).__name__}"
        )
    if kind == TF_DATASET:
        cardinality = int(data.cardinality())
        if cardinality == 0:
            raise _no_batch(name, data)
        tf = _module("tensorflow")
        if cardinality == tf.data.INFINITE_CARDINALITY and steps is None:
            raise ValueError(
                f"`{name}` is an infinite `tf.data.Dataset` (`repeat()`), so "
                f"`{steps_name}` must say how many batches to use. "
                f"Received: {name}={_short(data)}, {steps_name}=None"
            )
    elif kind == PY_DATASET:
        num_batches = _py_dataset_batches(data, name)
        if num_batches == 0:
            raise _no_batch(name, data)
        if num_batches is None and steps is None:
            raise ValueError(
                f"`{name}` is an infinite `keras.utils.PyDataset` "
                f"(`num_batches` is None), so `{steps_name}` must say how "
                f"many batches to use. Received: {name}={_short(data)}, "
                f"{steps_name}=None"
            )
    elif kind == DATA_LOADER:
        if _loader_batches(data) == 0:
            raise _no_batch(name, data)


def is_infinite(data, name="data"):
    """Whether `data` is a dataset without end: a `tf.data.Dataset` of
    infinite cardinality (`repeat()`) or a `PyDataset` whose `num_batches`
    is None. Reads no batch."""
    if _is_tf_dataset(data):
        tf = _module("tensorflow")
        return int(data.cardinality()) == tf.data.INFINITE_CARDINALITY
    if isinstance(data, keras.utils.PyDataset):
        return _py_dataset_batches(data, name) is None
    return False


def is_single_use(data):
    """Whether `data` can be iterated only once: a generator or iterator.

    A caller that reads `data` more than once (every epoch, say) gets no
    batch the second time.
    """
    return (
        not _is_tf_dataset(data)
        and not isinstance(data, keras.utils.PyDataset)
        and not _is_data_loader(data)
        and _is_iterator(data)
    )


def _to_numpy(value):
    """A tensor of a framework other than the backend's, as NumPy."""
    torch = _module("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy"):  # TensorFlow
        return value.numpy()
    return np.asarray(value)  # JAX, and array-likes


def _to_backend(value):
    """One input as a tensor of the backend; floats as `floatx`, as `fit`."""
    if not isinstance(value, np.ndarray) and not ops.is_tensor(value):
        value = _to_numpy(value)
    dtype = keras.backend.standardize_dtype(value.dtype)
    floatx = keras.config.floatx()
    if keras.backend.is_float_dtype(dtype) and dtype != floatx:
        if isinstance(value, np.ndarray):
            value = value.astype(floatx)
        else:
            return ops.cast(value, floatx)
    return ops.convert_to_tensor(value)


def _inputs(batch, name):
    """The `x` of a batch as backend tensors, by `fit`'s rule."""
    if isinstance(batch, (tuple, list)) and not 1 <= len(batch) <= 3:
        raise ValueError(
            f"Each batch of `{name}` must be `x`, `(x,)`, `(x, y)` or "
            f"`(x, y, sample_weight)` (a list counts as a tuple, as in "
            f"`fit`); one has {len(batch)} elements. For a model with "
            "several inputs, yield `(x,)` with `x` a list or dict."
        )
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
    leaves = keras.tree.flatten(x)
    if not leaves or not all(_is_array(leaf) for leaf in leaves):
        raise TypeError(
            f"Each batch of `{name}` must hold arrays or tensors as `x`; "
            f"one holds {_short(x)} of type {type(x).__name__}."
        )
    return keras.tree.map_structure(_to_backend, x)


def _array_batches(x, size, batch_size):
    for start in range(0, size, batch_size):
        stop = start + batch_size
        yield keras.tree.map_structure(lambda a: _to_backend(a[start:stop]), x)


def _dataset_batches(dataset):
    if keras.backend.backend() == "tensorflow":
        return iter(dataset)
    # NumPy, converted batch by batch, on the other backends.
    return dataset.as_numpy_iterator()


def _py_dataset_iterator(data, num_batches):
    index = 0
    while num_batches is None or index < num_batches:
        yield data[index]
        index += 1


def input_batches(
    data,
    *,
    name="data",
    batch_size=None,
    steps=None,
    batch_size_name="batch_size",
    steps_name="steps",
):
    """The inputs `x` of the batches of `data`, and how many there are.

    Runs `check_data` first, with the same arguments.

    Args:
        data, name, batch_size, steps, batch_size_name, steps_name: As for
            `check_data`.

    Returns:
        `(iterator, num_batches)`: an iterator over the `x` of each batch,
        at most `steps` of them, as tensors of the backend (floating-point
        NumPy arrays and tensors as `keras.config.floatx()`), each a tensor
        or a list or dict of tensors; and the number of batches it will
        yield, or `None` where that is not known in advance (a generator,
        a `tf.data.Dataset` of unknown cardinality). The iterator may yield
        nothing (an exhausted generator, a filtered dataset).
    """
    check_data(
        data,
        name=name,
        batch_size=batch_size,
        steps=steps,
        batch_size_name=batch_size_name,
        steps_name=steps_name,
    )
    kind = _kind(data, name)
    if kind == ARRAYS:
        x, _ = _split_arrays(data)
        size = int(keras.tree.flatten(x)[0].shape[0])
        batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
        num_batches = -(-size // batch_size)
        if steps is not None:
            num_batches = min(num_batches, int(steps))
        # Only the batches that will be used are cut.
        return (
            _array_batches(x, min(size, num_batches * batch_size), batch_size),
            num_batches,
        )
    if kind == TF_DATASET:
        cardinality = int(data.cardinality())
        num_batches = cardinality if cardinality >= 0 else None
        batches = _dataset_batches(data)
    elif kind == PY_DATASET:
        num_batches = _py_dataset_batches(data, name)
        batches = _py_dataset_iterator(data, num_batches)
    elif kind == DATA_LOADER:
        num_batches = _loader_batches(data)
        batches = iter(data)
    else:
        num_batches = None
        batches = iter(data)
    if steps is not None:
        steps = int(steps)
        num_batches = steps if num_batches is None else min(num_batches, steps)
    return _limited(batches, steps, name), num_batches


def _limited(batches, steps, name):
    # Reads a batch only when it is asked for, and never one past `steps`
    # (a generator shared with other code keeps the rest).
    for index, batch in enumerate(batches):
        yield _inputs(batch, name)
        if steps is not None and index + 1 >= steps:
            return
