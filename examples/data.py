"""Image classification data for the examples, as `tf.data` pipelines.

Three sources, tried in this order for a dataset name:
  * `digits`: scikit-learn's 8x8 digits, shipped inside the package (offline).
  * `mnist` / `fashion_mnist` from `data_dir` holding the four standard IDX
    files (`train-images-idx3-ubyte.gz`, ...), for machines without network.
  * any image classification dataset of tensorflow-datasets by name
    (`cifar10`, `cifar100`, `mnist`, ...), prepared in `data_dir` or
    downloaded by tensorflow-datasets where the network allows.
"""

import dataclasses
import gzip
import os

import numpy as np
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


@dataclasses.dataclass
class Dataset:
    """A train/test split ready for `model.fit`.

    Attributes:
        name: The dataset name.
        train: Shuffled, augmented, batched training `tf.data.Dataset`.
        train_eval: The training set without shuffling or augmentation, for
            recomputing BatchNorm statistics.
        test: Batched test `tf.data.Dataset`.
        input_shape: Shape of one image, `(height, width, channels)`.
        num_classes: Number of classes.
        train_size: Number of training examples.
    """

    name: str
    train: tf.data.Dataset
    train_eval: tf.data.Dataset
    test: tf.data.Dataset
    input_shape: tuple
    num_classes: int
    train_size: int


def load(name, batch_size=128, data_dir=None, seed=0, download=False):
    """Loads `name` as a `Dataset` of float32 images in [0, 1] (normalised
    per channel for CIFAR) and int labels.

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
        ValueError: if the dataset cannot be found, with how to provide it.
    """
    if name == "digits":
        arrays = _digits(seed)
    elif name in IDX_DATASETS and data_dir and _has_idx_files(data_dir):
        arrays = _idx(data_dir)
    else:
        arrays = _tfds(name, data_dir, download)
    (x_train, y_train), (x_test, y_test), num_classes = arrays
    cifar = name.startswith("cifar")
    if cifar:
        mean, std = np.array(CIFAR_MEAN), np.array(CIFAR_STD)
        x_train = ((x_train - mean) / std).astype("float32")
        x_test = ((x_test - mean) / std).astype("float32")

    def pipeline(x, y, train, augment):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if train:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        if augment:
            ds = ds.map(
                lambda image, label: (_augment_cifar(image, seed), label),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return Dataset(
        name=name,
        train=pipeline(x_train, y_train, train=True, augment=cifar),
        train_eval=pipeline(x_train, y_train, train=False, augment=False),
        test=pipeline(x_test, y_test, train=False, augment=False),
        input_shape=tuple(x_train.shape[1:]),
        num_classes=num_classes,
        train_size=len(x_train),
    )


def _augment_cifar(image, seed):
    # The standard CIFAR augmentation: 4-pixel padding, random 32x32 crop,
    # random horizontal flip.
    image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
    image = tf.image.random_crop(image, (32, 32, 3), seed=seed)
    return tf.image.random_flip_left_right(image, seed=seed)


def _digits(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test), 10


def _has_idx_files(data_dir):
    return all(
        os.path.exists(os.path.join(data_dir, f)) for f in IDX_FILES.values()
    )


def read_idx(path):
    """Reads one gzipped IDX file (the MNIST format) into a NumPy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return array.reshape(shape)


def _idx(data_dir):
    arrays = {k: read_idx(os.path.join(data_dir, f)) for k, f in IDX_FILES.items()}
    x_train = (arrays["x_train"] / 255.0).astype("float32")[..., None]
    x_test = (arrays["x_test"] / 255.0).astype("float32")[..., None]
    return (
        (x_train, arrays["y_train"].astype("int64")),
        (x_test, arrays["y_test"].astype("int64")),
        10,
    )


def _tfds(name, data_dir, download):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises its own DatasetNotFoundError
        raise ValueError(
            f"Unknown dataset {name!r}: use 'digits' or a tensorflow-datasets "
            f"image classification name such as 'cifar10' ({e})."
        ) from e
    try:
        splits = tfds.load(
            name,
            split=["train", "test"],
            as_supervised=True,
            data_dir=data_dir,
            download=download,
        )
    except Exception as e:
        hint = (
            f" For {name}, --data_dir may instead hold the four IDX files "
            f"{', '.join(IDX_FILES.values())}."
            if name in IDX_DATASETS
            else ""
        )
        raise ValueError(
            f"Could not load dataset {name!r} (data_dir={data_dir!r}): {e}. "
            f"Pass --download to let tensorflow-datasets fetch it, or prepare "
            f"it on a machine with network with "
            f"`tfds build {name} --data_dir=DIR` and pass --data_dir=DIR."
            + hint
        ) from e
    (x_train, y_train), (x_test, y_test) = [_to_numpy(split) for split in splits]
    num_classes = builder.info.features["label"].num_classes
    return (
        ((x_train / 255.0).astype("float32"), y_train.astype("int64")),
        ((x_test / 255.0).astype("float32"), y_test.astype("int64")),
        num_classes,
    )


def _to_numpy(split):
    # Chunks rather than `batch_size=-1`, which aborts on tfds' mock data.
    images, labels = zip(*split.batch(4096).as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)
