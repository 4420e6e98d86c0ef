"""Image classification data for the examples, as `tf.data` pipelines.

Three sources, tried in this order for a dataset name:
  * `digits`: scikit-learn's 8x8 digits, shipped inside the package (offline;
    a `data_dir` or `download` is refused).
  * `mnist` / `fashion_mnist` from `data_dir` holding the four standard IDX
    files (`train-images-idx3-ubyte.gz`, ...), for machines without network
    (`download` is then refused: the files are read, nothing is fetched).
  * any image classification dataset of tensorflow-datasets by name
    (`cifar10`, `cifar100`, `mnist`, ...), prepared in `data_dir` or
    downloaded by tensorflow-datasets where the network allows.

`check` tells, without reading the data or importing TensorFlow, whether a
dataset can be loaded; `load` reads it. Both raise `DataError`, a one-line
message that names the missing flag or file and says what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import math
import os
import typing
import zlib

import numpy as np

from examples._cli import one_line

if typing.TYPE_CHECKING:  # TensorFlow is imported only to build pipelines
    import tensorflow as tf

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
IDX_DATASETS = ("mnist", "fashion_mnist")
# Per-channel statistics of the CIFAR training sets, for normalisation.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# The digits split is the same for every seed, so that seeds vary the
# training only (as the fixed test sets of the other datasets do).
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """The dataset cannot be found or read; the message says what to do."""


@dataclasses.dataclass
class Arrays:
    """A train/test split in memory: float32 images, int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


@dataclasses.dataclass
class Dataset:
    """A train/test split ready for `model.fit`.

    Attributes:
        name: The dataset name.
        arrays: The split in memory (`Arrays`).
        batch_size: Batch size of every pipeline.
        seed: Seed of the training order and augmentation.
        augment: Whether the training pipeline augments (CIFAR).
        train_eval: The training set without shuffling or augmentation, for
            recomputing BatchNorm statistics.
        test: Batched test `tf.data.Dataset`.
        input_shape: Shape of one image, `(height, width, channels)`.
        num_classes: Number of classes.
        train_size: Number of training examples.
    """

    name: str
    arrays: Arrays
    batch_size: int
    seed: int
    augment: bool
    train_eval: tf.data.Dataset
    test: tf.data.Dataset
    input_shape: tuple
    num_classes: int
    train_size: int

    def train_pipeline(self):
        """A new shuffled (and, for CIFAR, augmented) training pipeline.

        Its `k`-th pass (epoch `k` of a `fit`) visits the examples in the
        order `epoch_order(seed, k, train_size)` and augments each by a
        seed drawn from `(seed, k, index)`: a function of the seed and the
        epoch alone. So every run that trains on a pipeline of its own sees
        the same batches in the same order, whatever ran before it (a
        `tf.data` shuffle would continue its sequence of orders from one
        `fit` to the next).
        """
        return _train_pipeline(self.arrays.x_train, self.arrays.y_train, self.batch_size,
                               self.seed, self.augment)


def epoch_order(seed, epoch, size):
    """The order of the `size` training examples in epoch `epoch` (from 0)
    of a run with seed `seed`: a permutation, the same in every run."""
    return np.random.default_rng([seed, 0, epoch]).permutation(size)


def check(name, data_dir=None, download=False):
    """Checks that `name` can be loaded from where `load` would look.

    Reads no data and does not import TensorFlow (only tensorflow-datasets'
    catalogue, for names other than `digits`).

    Returns:
        `"digits"`, `"idx"` or `"tfds"`: the source `load` will read.

    Raises:
        DataError: naming the flag (`--dataset`, `--data_dir`,
            `--download`) or the missing file, and what to do; also for a
            `data_dir` or `download` that `load` would not use (`digits`,
            or `download` with the IDX files in `data_dir`), which are
            refused rather than ignored.
    """
    if name == "digits":
        if data_dir or download:
            given = [f"--data_dir={data_dir}"] if data_dir else []
            given += ["--download"] if download else []
            raise DataError(
                f"--dataset=digits ships with scikit-learn and needs neither "
                f"--data_dir nor --download: drop {' and '.join(given)}, or "
                f"name another --dataset."
            )
        return "digits"
    if data_dir:
        data_dir = os.path.expanduser(data_dir)
        if os.path.exists(data_dir) and not os.path.isdir(data_dir):
            raise DataError(f"--data_dir={data_dir} is a file: pass a folder.")
    idx_hint = ""
    if name in IDX_DATASETS:
        idx_hint = (
            f"; or put the four IDX files of {name} "
            f"({', '.join(IDX_FILES.values())}) in --data_dir"
        )
        if data_dir and os.path.isdir(data_dir) and _check_idx(name, data_dir, download):
            return "idx"
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"--dataset={name} needs tensorflow-datasets (pip install "
            f"tensorflow-datasets){idx_hint}; --dataset=digits needs neither."
        ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:  # its message: the whole catalogue
        names = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.8)
        maybe = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DataError(
            f"--dataset={name} is neither 'digits' nor a tensorflow-datasets "
            f"name{maybe}: use --dataset=digits (offline), mnist or "
            f"fashion_mnist with their IDX files in --data_dir, or an image "
            f"classification dataset of tensorflow-datasets such as cifar10."
        ) from None
    features = builder.info.features
    if "image" not in features or "label" not in features or not hasattr(
        features["label"], "num_classes"
    ):
        raise DataError(
            f"--dataset={name} is not an image classification dataset (it "
            f"has no 'image' and class 'label' features): use one such as "
            f"cifar10, cifar100 or mnist."
        )
    if download or _quietly(builder.is_prepared):
        return "tfds"
    if name in IDX_DATASETS and data_dir:
        raise DataError(
            f"--data_dir={data_dir} holds neither the four IDX files of {name} "
            f"({', '.join(IDX_FILES.values())}) nor {name} prepared by "
            f"tensorflow-datasets ({builder.data_dir}): put the IDX files "
            f"there, or pass --download to let tensorflow-datasets fetch it."
        )
    where = f"--data_dir={data_dir}" if data_dir else "tensorflow-datasets' default folder"
    raise DataError(
        f"--dataset={name}: no prepared data in {where} (looked for "
        f"{builder.data_dir}): pass --download to let tensorflow-datasets "
        f"fetch it, or run `tfds build {name} --data_dir=DIR` where there is "
        f"network and pass --data_dir=DIR{idx_hint}."
    )


def _check_idx(name, data_dir, download):
    """Whether `data_dir` holds the four IDX files of `name`; raises
    `DataError` for some of them only, or for `download` with all four."""
    present = [f for f in IDX_FILES.values() if _is_file(data_dir, f)]
    if len(present) == len(IDX_FILES):
        if download:
            # The IDX files are read; tensorflow-datasets, and so its
            # download, is not used.
            raise DataError(
                f"--download is not needed: --data_dir={data_dir} holds "
                f"the four IDX files of {name}, which are read from "
                f"there: drop --download (or pass a --data_dir without "
                f"them to have tensorflow-datasets fetch {name})."
            )
        return True
    if present:
        missing = [f for f in IDX_FILES.values() if f not in present]
        raise DataError(
            f"--data_dir={data_dir} lacks {', '.join(missing)} (it "
            f"holds {', '.join(present)}): put all four IDX files of "
            f"{name} there."
        )
    return False


def _quietly(fn):
    """`fn()` with absl's log lines below ERROR muted: tensorflow-datasets
    warns about the very folder whose absence `check` then explains."""
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        return fn()
    finally:
        logging.set_verbosity(verbosity)


def read(name, data_dir=None, download=False):
    """Reads `name` into memory (after `check`) as an `Arrays`: images as
    float32 in [0, 1] (normalised per channel for CIFAR), labels as int64.

    Raises:
        DataError: as `check`, or for an unreadable file, naming it.
    """
    source = check(name, data_dir, download)
    if data_dir:
        data_dir = os.path.expanduser(data_dir)
    if source == "digits":
        arrays = _digits()
    elif source == "idx":
        arrays = _idx(data_dir)
    else:
        arrays = _tfds(name, data_dir, download)
    if name.startswith("cifar"):
        mean, std = np.array(CIFAR_MEAN), np.array(CIFAR_STD)
        arrays.x_train = ((arrays.x_train - mean) / std).astype("float32")
        arrays.x_test = ((arrays.x_test - mean) / std).astype("float32")
    return arrays


def with_label_noise(arrays, fraction, seed):
    """`arrays` with `round(fraction * n)` of its `n` training labels, drawn
    by `seed`, each replaced by another class drawn uniformly (symmetric
    label noise); the test labels are left alone. Returns the new `Arrays`
    and the indices of the changed labels."""
    rng = np.random.default_rng([seed, 1])  # apart from the orders, [seed, 0, epoch]
    size = len(arrays.y_train)
    changed = np.sort(rng.choice(size, size=int(round(fraction * size)), replace=False))
    labels = arrays.y_train.copy()
    # An offset in [1, num_classes): never the true class, the others alike.
    offsets = rng.integers(1, arrays.num_classes, size=len(changed))
    labels[changed] = (labels[changed] + offsets) % arrays.num_classes
    noisy = dataclasses.replace(arrays, y_train=labels)
    return noisy, changed


def pipelines(name, arrays, batch_size=128, seed=0):
    """The `Dataset` of `arrays`: the unshuffled train and test batches,
    and `train_pipeline()` for shuffled (by `seed`) and, for CIFAR,
    augmented training batches."""
    import tensorflow as tf

    def batches(x, y):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return Dataset(
        name=name,
        arrays=arrays,
        batch_size=batch_size,
        seed=seed,
        augment=name.startswith("cifar"),
        train_eval=batches(arrays.x_train, arrays.y_train),
        test=batches(arrays.x_test, arrays.y_test),
        input_shape=tuple(arrays.x_train.shape[1:]),
        num_classes=arrays.num_classes,
        train_size=len(arrays.x_train),
    )


def _train_pipeline(x, y, batch_size, seed, augment):
    """The training batches of `Dataset.train_pipeline`: a generator of
    index batches, one pass per epoch (counted by the pipeline), gathered
    from the arrays inside `tf.data`."""
    import itertools

    import tensorflow as tf

    size = len(x)
    passes = itertools.count()

    def indices():
        epoch = next(passes)
        order = epoch_order(seed, epoch, size)
        for start in range(0, size, batch_size):
            yield order[start : start + batch_size], epoch

    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.int64))
    ds = tf.data.Dataset.from_generator(indices, output_signature=signature)
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(size / batch_size)))
    images, labels = tf.constant(x), tf.constant(y)

    def gather(index, epoch):
        batch = tf.gather(images, index)
        if augment:
            batch = _augment_cifar(batch, seed, epoch * size + index)
        return batch, tf.gather(labels, index)

    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def load(name, batch_size=128, data_dir=None, seed=0, download=False):
    """Loads `name` as a `Dataset` (`read`, then `pipelines`).

    Args:
        name: `"digits"`, or a tensorflow-datasets name such as `"cifar10"`.
        batch_size: Batch size of all three pipelines.
        data_dir: Folder with IDX files (mnist, fashion_mnist) or prepared
            tensorflow-datasets data.
        seed: Seed of the shuffling and augmentation.
        download: Whether tensorflow-datasets may download and prepare a
            dataset missing from `data_dir`.

    Returns:
        A `Dataset`.

    Raises:
        DataError: if the dataset cannot be found or read, with how to
            provide it.
    """
    return pipelines(name, read(name, data_dir, download), batch_size, seed)


def _augment_cifar(images, seed, keys):
    """The standard CIFAR augmentation of a batch: 4-pixel padding, random
    32x32 crop, random horizontal flip; image `i` drawn from the stateless
    seed `(seed, keys[i])`, so that the same key gives the same crop."""
    import tensorflow as tf

    def one(args):
        image, key = args
        pair = tf.stack([tf.constant(seed, tf.int64), key])
        image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
        image = tf.image.stateless_random_crop(image, (32, 32, 3), seed=pair)
        return tf.image.stateless_random_flip_left_right(image, seed=pair + 1)

    return tf.map_fn(one, (images, keys), fn_output_signature=images.dtype)


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return Arrays(x_train, y_train, x_test, y_test, 10)


def _is_file(folder, name):
    return os.path.isfile(os.path.join(folder, name))


def read_idx(path):
    """Reads one gzipped IDX file of unsigned bytes (the MNIST format) into
    a NumPy array; raises `DataError` naming the file if it is not one."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} cannot be read as a gzipped IDX file ({one_line(e)}): "
            f"download it again."
        ) from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes (bad header): "
            f"download it again."
        )
    ndim = data[3]
    offset = 4 + 4 * ndim
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    if len(data) != offset + int(np.prod(shape)):
        raise DataError(
            f"{path} is truncated or too long: its header promises shape "
            f"{shape}, its size does not match. Download it again."
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    return array.reshape(shape)


def _idx(data_dir):
    arrays = {k: read_idx(os.path.join(data_dir, f)) for k, f in IDX_FILES.items()}
    for split in ("train", "test"):
        n_x, n_y = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if n_x != n_y:
            raise DataError(
                f"--data_dir={data_dir}: {IDX_FILES[f'x_{split}']} holds {n_x} "
                f"images but {IDX_FILES[f'y_{split}']} {n_y} labels: the files "
                f"do not belong together."
            )
    return Arrays(
        (arrays["x_train"] / 255.0).astype("float32")[..., None],
        arrays["y_train"].astype("int64"),
        (arrays["x_test"] / 255.0).astype("float32")[..., None],
        arrays["y_test"].astype("int64"),
        10,
    )


def _tfds(name, data_dir, download):
    import tensorflow_datasets as tfds

    try:
        splits, info = tfds.load(
            name,
            split=["train", "test"],
            as_supervised=True,
            data_dir=data_dir,
            download=download,
            with_info=True,
        )
    except Exception as e:
        raise DataError(
            f"--dataset={name} could not be loaded"
            f"{' or downloaded' if download else ''} "
            f"({type(e).__name__}: {one_line(e)[:300]}). Without network, run "
            f"`tfds build {name} --data_dir=DIR` elsewhere and pass "
            f"--data_dir=DIR."
        ) from None
    (x_train, y_train), (x_test, y_test) = [_to_numpy(split) for split in splits]
    return Arrays(
        (x_train / 255.0).astype("float32"),
        y_train.astype("int64"),
        (x_test / 255.0).astype("float32"),
        y_test.astype("int64"),
        info.features["label"].num_classes,
    )


def _to_numpy(split):
    # Chunks rather than `batch_size=-1`, which aborts on tfds' mock data.
    images, labels = zip(*split.batch(4096).as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)
