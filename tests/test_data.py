"""Tests of `keras_swa._data`: what `update_bn` and `bn_data` accept."""

import re

import keras
import numpy as np
import pytest

from keras_swa import _data

# TensorFlow is an extra: its forms (tf tensors, tf.data) are tested where it
# is installed, and skipped by name elsewhere.
try:
    import tensorflow as tf
except ImportError:
    tf = None
# JAX and PyTorch come with the `backends` extra (`make test` installs it);
# their forms are tested where they are installed, on every backend.
try:
    import jax.numpy as jnp
except ImportError:
    jnp = None
try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch")
needs_tf = pytest.mark.skipif(
    tf is None, reason="needs TensorFlow (tf tensors, tf.data)"
)

X = np.arange(40, dtype="float32").reshape(10, 4)
Y = np.zeros((10, 1), "float32")


class _Counted(keras.utils.PyDataset):
    """Counts its reads: `check_data` must make none."""

    def __init__(self, batches, num_batches="len"):
        super().__init__()
        self.batches, self.reads, self._num = batches, 0, num_batches

    @property
    def num_batches(self):
        return len(self.batches) if self._num == "len" else self._num

    def __getitem__(self, index):
        self.reads += 1
        return self.batches[index % len(self.batches)]


class _CountedDataset(torch.utils.data.Dataset if torch else object):
    def __init__(self):
        self.reads = 0

    def __len__(self):
        return len(X)

    def __getitem__(self, index):
        self.reads += 1
        return torch.from_numpy(X[index]), torch.from_numpy(Y[index])


ARRAY_FORMS = ("array", "tf tensor", "jax array", "torch tensor", "list",
               "dict", "(x,)", "(x, y)", "(x, y, w)", "(x, None, w)")


# Stands for a form made of TensorFlow objects where TensorFlow is missing.
NO_TF = object()


def _with_tf(build):
    return build() if tf is not None else NO_TF


def _accepted():
    """Every accepted form by name; without TensorFlow, its forms are NO_TF."""
    forms = {
        "array": X,
        "tf tensor": _with_tf(lambda: tf.constant(X)),
        "list": [X, X[:, :2]],
        "dict": _with_tf(lambda: {"a": X, "b": tf.constant(X)}),
        "(x,)": (X,),
        "(x, y)": (X, Y),
        "(x, y, w)": (X, Y, Y[:, 0]),
        "(x, None, w)": (X, None, Y[:, 0]),
        "tf.data": _with_tf(
            lambda: tf.data.Dataset.from_tensor_slices((X, Y)).batch(3)
        ),
        "PyDataset": _Counted([(X, Y)]),
        "generator": (b for b in [X]),
        "iterator": iter([X]),
    }
    if jnp is not None:
        forms["jax array"] = jnp.asarray(X)
    if torch is not None:
        forms["torch tensor"] = torch.from_numpy(X)
        forms["DataLoader"] = torch.utils.data.DataLoader(_CountedDataset(), 4)
    return forms


def _available():
    """The accepted forms that can be built here."""
    return {k: v for k, v in _accepted().items() if v is not NO_TF}


# The TensorFlow forms stay cases, skipped without TensorFlow.
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=needs_tf) if form is NO_TF else name
        for name, form in _accepted().items()
    ],
)
def test_accepted(name):
    _data.check_data(_accepted()[name], name="bn_data")


def test_check_reads_nothing():
    generator = (b for b in [X, Y])
    py_dataset = _Counted([(X, Y)])
    for data in (generator, py_dataset):
        _data.check_data(data, name="bn_data")
    assert next(generator) is X
    assert py_dataset.reads == 0


@needs_torch
def test_check_reads_nothing_of_a_data_loader():
    dataset = _CountedDataset()
    _data.check_data(torch.utils.data.DataLoader(dataset, batch_size=4))
    assert dataset.reads == 0


@pytest.mark.parametrize(
    "data, match",
    [
        (None, "NoneType"),
        ("abc", "str"),
        (3, "int"),
        (np.float32(1.0), "float32"),
        ((), "0 elements"),
        ((X, Y, Y, Y), "4 elements"),
        (("abc",), "str"),
        ([], "no array"),
        ({"a": [1.0, 2.0]}, "float"),
        ((X, "labels"), "str"),
        ({1, 2}, "set"),
    ],
)
def test_refused_types_name_the_argument(data, match):
    with pytest.raises(TypeError, match=f"`bn_data`[\\s\\S]*{match}") as info:
        _data.check_data(data, name="bn_data")
    # Says what is accepted.
    assert re.search(r"tf\.data\.Dataset|\(x, y\)", str(info.value))


def test_empty_data_is_a_value_error():
    empty = np.zeros((0, 4), "float32")
    for data in [
        empty,
        (empty, empty[:, :1]),
        _with_tf(lambda: tf.data.Dataset.from_tensor_slices(empty).batch(2)),
        _Counted([]),
    ] + ([torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
            torch.from_numpy(empty)))] if torch else []):
        if data is NO_TF:
            continue
        with pytest.raises(ValueError, match="`bn_data` holds no batch"):
            _data.check_data(data, name="bn_data")


def test_different_lengths():
    with pytest.raises(ValueError, match="`bn_data`.*same number.*9, 10"):
        _data.check_data((X, Y[:9]), name="bn_data")
    with pytest.raises(ValueError, match="same number"):
        _data.check_data({"a": X, "b": X[:3]}, name="bn_data")


def test_infinite_data_needs_steps():
    infinite = [
        _with_tf(
            lambda: tf.data.Dataset.from_tensor_slices(X).batch(4).repeat()
        ),
        _Counted([X], num_batches=None),
    ]
    for data in infinite:
        if data is NO_TF:
            continue
        with pytest.raises(ValueError, match="infinite.*`bn_steps`"):
            _data.check_data(data, name="bn_data", steps_name="bn_steps")
        _data.check_data(data, name="bn_data", steps=np.int64(3))


def test_py_dataset_without_a_length():
    class NoLength(keras.utils.PyDataset):
        def __getitem__(self, index):
            return X

    with pytest.raises(ValueError, match="`bn_data`.*num_batches"):
        _data.check_data(NoLength(), name="bn_data")


@needs_torch
def test_a_torch_dataset_is_not_a_data_loader():
    with pytest.raises(TypeError, match="`bn_data`.*TensorDataset"):
        _data.check_data(
            torch.utils.data.TensorDataset(torch.from_numpy(X)),
            name="bn_data",
        )


def test_batch_size_with_batched_data():
    batched = {k: v for k, v in _available().items() if k not in ARRAY_FORMS}
    assert {"PyDataset", "generator", "iterator"} <= set(batched)
    for data in batched.values():
        with pytest.raises(ValueError, match="`bn_batch_size` applies"):
            _data.check_data(
                data,
                name="bn_data",
                batch_size=8,
                batch_size_name="bn_batch_size",
            )


@pytest.mark.parametrize(
    "value, error",
    [
        (True, TypeError),
        (np.bool_(True), TypeError),
        (2.0, TypeError),
        (np.float32(2.0), TypeError),
        ("2", TypeError),
        (0, ValueError),
        (-1, ValueError),
        (np.int64(0), ValueError),
    ],
)
def test_bad_counts_name_the_argument(value, error):
    received = re.escape(f"Received: bn_steps={value!r}")
    with pytest.raises(error, match=f"`bn_steps`.*{received}"):
        _data.check_data(X, steps=value, steps_name="bn_steps")
    with pytest.raises(error, match="`batch_size`"):
        _data.check_data(X, batch_size=value)


@pytest.mark.parametrize("value", [1, np.int32(2), np.int64(3), np.uint8(4)])
def test_numpy_integers(value):
    _data.check_data(X, steps=value, batch_size=value)


def _numpy(batches):
    return [
        keras.tree.map_structure(keras.ops.convert_to_numpy, b)
        for b in batches
    ]


def test_arrays_are_batched_in_order():
    batches, count = _data.input_batches((X, Y), batch_size=np.int64(4))
    assert count == 3
    got = _numpy(batches)
    assert [len(b) for b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(got), X)

    batches, count = _data.input_batches(X, batch_size=3, steps=2)
    assert count == 2
    assert [len(b) for b in _numpy(batches)] == [3, 3]

    batches, count = _data.input_batches(X)  # 32, as fit
    assert count == 1
    assert [len(b) for b in _numpy(batches)] == [10]


def test_batches_are_backend_tensors_in_floatx():
    forms = {
        "float64 array": X.astype("float64"),
        "tf float64": _with_tf(lambda: tf.constant(X, tf.float64)),
        "generator": (b for b in [X.astype("float64")]),
    }
    if torch is not None:
        forms["torch"] = torch.from_numpy(X)
    if jnp is not None:
        forms["jax"] = jnp.asarray(X)
    for name, data in forms.items():
        if data is NO_TF:
            continue
        batches, _ = _data.input_batches(data)
        for batch in batches:
            assert keras.ops.is_tensor(batch), name
            assert keras.backend.standardize_dtype(batch.dtype) == "float32"
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(batch), X, err_msg=name
            )
    # Integers stay integers (int32 on JAX without x64).
    integers = np.arange(6).reshape(3, 2)
    batches, _ = _data.input_batches(integers)
    assert keras.backend.standardize_dtype(next(batches).dtype) == (
        keras.backend.standardize_dtype(
            keras.ops.convert_to_tensor(integers).dtype
        )
    )


def test_only_x_of_each_batch():
    forms = {
        "PyDataset": (_Counted([(X[:6], Y[:6]), (X[6:],)]), [6, 4]),
        "tf.data": (
            _with_tf(
                lambda: tf.data.Dataset.from_tensor_slices(
                    (X, Y, Y[:, 0])
                ).batch(5)
            ),
            [5, 5],
        ),
        "generator": (([X[:7], X[:7]] for _ in range(1)), [7]),
        "iterator of dicts": (iter([({"a": X, "b": X},)]), [10]),
    }
    if torch is not None:
        # A DataLoader yields a list [x, y]: a tuple, as in `fit`.
        forms = {
            "DataLoader": (
                torch.utils.data.DataLoader(_CountedDataset(), batch_size=4),
                [4, 4, 2],
            ),
            **forms,
        }
    for name, (data, sizes) in forms.items():
        if data is NO_TF:
            continue
        batches, count = _data.input_batches(data)
        got = _numpy(batches)
        assert [len(keras.tree.flatten(b)[0]) for b in got] == sizes, name
        assert count == (None if name in ("generator", "iterator of dicts")
                         else len(sizes)), name
        first = keras.tree.flatten(got[0])[0]
        np.testing.assert_array_equal(first, X[: sizes[0]], err_msg=name)
    assert isinstance(got[0], dict)


def test_steps_stop_reading():
    py_dataset = _Counted([(X,)] * 5)
    batches, count = _data.input_batches(py_dataset, steps=2)
    assert count == 2
    assert len(list(batches)) == 2
    assert py_dataset.reads == 2
    generator = (b for b in [X, X, Y])
    batches, count = _data.input_batches(generator, steps=2)
    assert count == 2
    assert len(list(batches)) == 2
    assert next(generator) is Y  # the rest stays in the generator


def test_bad_batches_name_the_argument():
    batches, _ = _data.input_batches(iter([(X, Y, Y, Y)]), name="bn_data")
    with pytest.raises(ValueError, match="batch of `bn_data`.*4 elements"):
        next(batches)
    batches, _ = _data.input_batches(iter(["abc"]), name="bn_data")
    with pytest.raises(TypeError, match="batch of `bn_data`.*str"):
        next(batches)


def test_single_use():
    assert _data.is_single_use(b for b in [X])
    assert _data.is_single_use(iter([X]))
    for name, data in _available().items():
        if name not in ("generator", "iterator"):
            assert not _data.is_single_use(data), name
