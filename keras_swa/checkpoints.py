"""Averages of saved models: checkpoint averaging and greedy model soups.

Practitioners average saved checkpoints after training: the last few epochs
of one run (fairseq's and timm's averaging scripts; LAWA, Kaddour 2022 and
Sanyal et al. 2023), or several fine-tuned models of one base model (model
soups, Wortsman et al. 2022, arXiv:2203.05482). `average_checkpoints` takes
the (weighted) mean of the files; `greedy_soup` picks the files to average by
their validation metric. Both recompute the BatchNormalization statistics of
the average with `keras_swa.update_bn` when given data.

How: a `.weights.h5` file, and the `model.weights.h5` inside a `.keras`
archive, hold one HDF5 dataset per variable, laid out by the model's
structure. The model's own `save_weights` gives the layout expected of every
file, so a file of another architecture is caught before anything is read
into the model; the files are then read one variable at a time into
accumulators (one copy of the weights), and the result is written into a
copy of the model's own file and loaded with `load_weights`, which maps
datasets to variables exactly as Keras does. No scratch model is built, and
nothing reaches the model before every file has been read and checked.
"""

import contextlib
import dataclasses
import math
import numbers
import os
import shutil
import tempfile
import warnings
import zipfile

import h5py
import keras
import ml_dtypes
import numpy as np

from keras_swa import batch_norm
from keras_swa import evaluation

# The top-level group of the optimizer's state in Keras' weights files. It is
# not part of the architecture and is never averaged: the model keeps its
# own optimizer state.
_OPTIMIZER_GROUP = "optimizer"

# The member of a `.keras` archive that holds the weights.
_KERAS_WEIGHTS_MEMBER = "model.weights.h5"

_SUFFIXES = (".weights.h5", ".keras")

_MODES = ("auto", "max", "min")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One variable of the layout: its shape, stored dtype and how it is
    averaged (`accumulator` is None for a variable that is not averaged)."""

    shape: tuple
    dtype: np.dtype
    accumulator: np.dtype | None


def _stored_dtype(dataset):
    # h5py has no bfloat16: Keras' `H5IOStore` writes its bits as an opaque
    # type and marks the dataset with an attribute.
    if dataset.attrs.get("dtype") == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return dataset.dtype


def _read_dataset(dataset):
    return np.asarray(dataset[()]).view(_stored_dtype(dataset))


def _accumulator_dtype(dtype):
    # As every averager of the library: float16/bfloat16 averages are
    # float32; float32 and float64 stay as they are. Integers, booleans and
    # the like (counters, seeds) are not averaged.
    if dtype == np.float64:
        return np.dtype(np.float64)
    if dtype in (np.float16, np.float32, ml_dtypes.bfloat16):
        return np.dtype(np.float32)
    return None


def _datasets(h5_file):
    """The variable datasets of a weights file, by path, optimizer excluded."""
    found = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and (
            name.split("/")[0] != _OPTIMIZER_GROUP
        ):
            found[name] = item

    h5_file.visititems(visit)
    return found


def _check_paths(paths):
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(
            "`paths` must be a list of file paths, not a single path: wrap it "
            f"in a list. Received: paths={paths!r}"
        )
    try:
        paths = list(paths)
    except TypeError:
        raise TypeError(
            "`paths` must be a list of paths of `.weights.h5` or `.keras` "
            f"files. Received: paths={paths!r:.200} of type "
            f"{type(paths).__name__}"
        ) from None
    if not paths:
        raise ValueError(
            "`paths` is empty: there is nothing to average. Received: paths=[]"
        )
    checked = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                "Every element of `paths` must be a `str` or `os.PathLike`. "
                f"Received: {path!r:.200} of type {type(path).__name__}"
            )
        path = os.fspath(path)
        if not path.endswith(_SUFFIXES):
            raise ValueError(
                f"`paths` holds {path!r}, which is neither a `.weights.h5` "
                "nor a `.keras` file (as written by `model.save_weights` and "
                "`model.save`)."
            )
        if not os.path.isfile(path):
            raise ValueError(
                f"`paths` holds {path!r}, which does not exist or is not a "
                "file."
            )
        checked.append(path)
    return checked


def _check_weights(weights, count):
    """Returns the weights as float64, each divided by their sum."""
    if weights is None:
        return np.full(count, 1.0 / count)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(
            "`weights` must be None or a list of numbers, one per path. "
            f"Received: weights={weights!r:.200}"
        )
    weights = list(weights)
    for weight in weights:
        if isinstance(weight, (bool, np.bool_)) or not isinstance(
            weight, numbers.Real
        ):
            raise TypeError(
                "`weights` must hold real numbers, one per path. Received: "
                f"weights={weights!r:.200}, with {weight!r} of type "
                f"{type(weight).__name__}"
            )
    if len(weights) != count:
        raise ValueError(
            f"`weights` must have one number per path: {count} paths, "
            f"{len(weights)} weights. Received: weights={weights!r:.200}"
        )
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(
            "`weights` must be finite numbers >= 0. Received: "
            f"weights={weights.tolist()!r:.200}"
        )
    total = weights.sum()
    if not total > 0:
        raise ValueError(
            "`weights` must not all be zero: their sum divides the average. "
            f"Received: weights={weights.tolist()!r:.200}"
        )
    return weights / total




class _Workspace:
    """The model's own weights file (its layout, and a backup of its state)
    and a copy of it that receives the averages, in a temporary directory.
    """

    def __init__(self, model, directory):
        if not model.built:
            raise ValueError(
                "`model` must be built before checkpoints can be read into "
                "it: call it on a batch or build it first."
            )
        self.model = model
        self.directory = directory
        self.backup = os.path.join(directory, "backup.weights.h5")
        self.target = os.path.join(directory, "average.weights.h5")
        model.save_weights(self.backup)
        shutil.copyfile(self.backup, self.target)
        with h5py.File(self.backup, "r") as backup:
            self.layout = {}
            for key, dataset in _datasets(backup).items():
                dtype = _stored_dtype(dataset)
                self.layout[key] = _Entry(
                    dataset.shape, dtype, _accumulator_dtype(dtype)
                )

    @contextlib.contextmanager
    def open(self, path):
        """Opens the weights of the file `path` after checking its layout.

        Yields a dict of its variable datasets by path. The weights member
        of a `.keras` archive is extracted next to the workspace first:
        seeking inside a zip member rereads it from its start.
        """
        extracted = None
        try:
            if path.endswith(".keras"):
                try:
                    with zipfile.ZipFile(path) as archive:
                        extracted = archive.extract(
                            _KERAS_WEIGHTS_MEMBER,
                            # Unique: the same archive may be open twice.
                            tempfile.mkdtemp(dir=self.directory),
                        )
                except (zipfile.BadZipFile, KeyError) as error:
                    raise ValueError(
                        f"Cannot read {path!r} as a `.keras` file saved by "
                        f"`model.save`: {error}"
                    ) from None
            try:
                h5_file = h5py.File(extracted or path, "r")
            except OSError as error:
                raise ValueError(
                    f"Cannot read the weights of {path!r} as an HDF5 file "
                    f"saved by Keras: {error}"
                ) from None
            with h5_file:
                datasets = _datasets(h5_file)
                self._check_layout(path, datasets)
                yield datasets
        finally:
            if extracted is not None:
                shutil.rmtree(os.path.dirname(extracted))

    def _check_layout(self, path, datasets):
        missing = sorted(set(self.layout) - set(datasets))
        extra = sorted(set(datasets) - set(self.layout))
        problems = []
        if missing:
            problems.append(f"it lacks the variables {missing[:5]}")
        if extra:
            problems.append(f"it has variables the model lacks: {extra[:5]}")
        for key in sorted(set(self.layout) & set(datasets)):
            entry, dataset = self.layout[key], datasets[key]
            if dataset.shape != entry.shape:
                problems.append(
                    f"{key} has shape {dataset.shape} where the model's "
                    f"variable has {entry.shape}"
                )
            elif (
                _accumulator_dtype(_stored_dtype(dataset)) is None
            ) != (entry.accumulator is None):
                problems.append(
                    f"{key} is {_stored_dtype(dataset)} where the model's "
                    f"variable is {entry.dtype}"
                )
        if problems:
            raise ValueError(
                f"The file {path!r} was not saved from the architecture of "
                f"`model`: {'; '.join(problems[:5])}. The model is unchanged."
            )

    def read(self, path, datasets, key):
        """The float variable `key` of a file, in its accumulator dtype."""
        dataset = datasets[key]
        value = _read_dataset(dataset).astype(
            self.layout[key].accumulator, copy=False
        )
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"The file {path!r} holds non-finite values (NaN or inf) in "
                f"{key}; it cannot be averaged. The model is unchanged."
            )
        return value

    def write(self, values, last_path):
        """Writes `values(key)` for the float variables and the values of
        `last_path` for the others into the file that `load` loads."""
        with contextlib.ExitStack() as stack:
            target = stack.enter_context(h5py.File(self.target, "r+"))
            if any(entry.accumulator is None for entry in self.layout.values()):
                last = stack.enter_context(self.open(last_path))
            for key, entry in self.layout.items():
                dataset = target[key]
                if entry.accumulator is None:
                    dataset[()] = last[key][()]
                else:
                    # A bfloat16 dataset is opaque to h5py: write the bits.
                    value = values(key).astype(entry.dtype, copy=False)
                    dataset[()] = value.view(dataset.dtype)

    def load(self):
        self.model.load_weights(self.target)

    def restore(self):
        self.model.load_weights(self.backup)


class _Sum:
    """Weighted sums of the float variables of files, read one at a time."""

    def __init__(self, workspace):
        self.workspace = workspace
        self.sums = {}
        self.total = 0.0
        self.last_path = None

    def add(self, path, weight):
        workspace = self.workspace
        with workspace.open(path) as datasets:
            for key, entry in workspace.layout.items():
                if entry.accumulator is None:
                    continue
                value = workspace.read(path, datasets, key)
                # In place: no temporary beside the one variable read.
                value *= np.asarray(weight, value.dtype)
                if key in self.sums:
                    self.sums[key] += value
                else:
                    self.sums[key] = value
        self.total += weight
        self.last_path = path

    def load_mean(self):
        """Loads the mean into the model, consuming the sums: each is freed
        once written, so that Keras' loading does not add to the peak."""

        def values(key):
            value = self.sums.pop(key)
            value /= np.asarray(self.total, value.dtype)
            return value

        self.workspace.write(values, self.last_path)
        self.workspace.load()

    def load_mean_with(self, candidate):
        """Loads the mean of the files summed so far and `candidate` into the
        model, without adding `candidate` to the sums."""
        workspace = self.workspace
        with workspace.open(candidate) as datasets:

            def values(key):
                value = workspace.read(candidate, datasets, key)
                if self.total:
                    value += self.sums[key]
                    value /= np.asarray(self.total + 1.0, value.dtype)
                return value

            workspace.write(values, candidate)
        workspace.load()


def _has_batch_norm(model):
    return bool(batch_norm._batch_norm_layers(model))


def _warn_averaged_statistics(model, function):
    if _has_batch_norm(model):
        warnings.warn(
            f"`{function}` averaged the BatchNormalization statistics stored "
            "in the files instead of recomputing them: the mean of statistics "
            "is not the statistics of the mean weights. Pass `bn_data` (such "
            "as the training data) to recompute them.",
            stacklevel=3,
        )


def average_checkpoints(
    model,
    paths,
    weights=None,
    bn_data=None,
    bn_steps: int | None = None,
    verbose="auto",
    bn_batch_size: int | None = None,
) -> None:
    """Loads the (weighted) mean of saved checkpoints into the model.

    Every float variable of the model (trainable weights and the
    BatchNormalization statistics alike) gets the mean of its values in the
    files, weighted by `weights`. The files are `.weights.h5` files (from
    `model.save_weights` or `ModelCheckpoint(save_weights_only=True)`) or
    `.keras` files (`model.save`), in any mix, saved from models of the
    architecture of `model`. Means are taken in float32 for float16, bfloat16
    and float32 variables and in float64 for float64 ones, whatever the
    files store, and cast to the model's dtype. Variables that are not
    floats (counters, seeds) take their value in the last file. The model's
    optimizer state is left as it is.

    With `bn_data`, the BatchNormalization statistics are then recomputed for
    the averaged weights with `keras_swa.update_bn`; without it, the stored
    statistics are averaged, and a model with BatchNormalization layers gets
    a warning.

    Every path, the weights, each file's architecture and the finiteness of
    every value are checked before anything is written into the model; if
    anything fails (`update_bn` included), the model is left as it was.
    One file is read at a time, one variable at a time, beside one copy of
    the weights for the sums, so that memory does not grow with the number
    of files; two temporary copies of the model's weights file are written
    to the temporary directory.

    Args:
        model: A built `keras.Model` of the architecture the files were saved
            from.
        paths: A list of paths of `.weights.h5` or `.keras` files, in order
            (the last one gives the non-float variables). A file may appear
            several times.
        weights: A list of numbers >= 0, one per path, not all zero: the
            weight of each file in the mean. Defaults to `None`, the uniform
            mean.
        bn_data: Data to recompute the BatchNormalization statistics on, as
            `data` of `keras_swa.update_bn` (typically the training data).
            Defaults to `None`: the stored statistics are averaged.
        bn_steps: Integer, the number of batches of `bn_data` to use at most.
            Defaults to `None`, all of them.
        verbose: The progress bar of the BatchNorm pass, as in
            `keras_swa.update_bn`. Defaults to `"auto"`.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32.

    Raises:
        TypeError: if `paths` or `weights` is of the wrong type.
        ValueError: if `paths` is empty, a file is missing or unreadable, a
            file was saved from another architecture or holds a NaN or
            infinity (the message names the file), `weights` has the wrong
            length, a negative or non-finite number or sums to zero, or
            `update_bn` rejects `bn_data`; the model is unchanged.

    Example:

    >>> checkpoint = keras.callbacks.ModelCheckpoint(
    ...     "ckpt/{epoch:03d}.weights.h5", save_weights_only=True)
    >>> model.fit(train_ds, epochs=30, callbacks=[checkpoint])  # doctest: +SKIP
    >>> keras_swa.average_checkpoints(
    ...     model, sorted(glob.glob("ckpt/*.weights.h5"))[-5:],
    ...     bn_data=train_ds)  # doctest: +SKIP
    """
    paths = _check_paths(paths)
    weights = _check_weights(weights, len(paths))
    bn = batch_norm.BNRecompute.checked(
        bn_data, bn_steps, bn_batch_size, verbose
    )
    with tempfile.TemporaryDirectory(prefix="keras_swa_") as directory:
        workspace = _Workspace(model, directory)
        total = _Sum(workspace)
        for path, weight in zip(paths, weights):
            total.add(path, weight)
        try:
            total.load_mean()
            if bn.data is None:
                _warn_averaged_statistics(model, "average_checkpoints")
            bn.run(model)
        except BaseException:
            workspace.restore()
            raise


@dataclasses.dataclass(frozen=True)
class SoupStep:
    """One step of `greedy_soup`: a file tried as an ingredient.

    Attributes:
        path: The file.
        metric: Its own validation metric, alone.
        soup_metric: The validation metric of the soup with it (the file's
            own metric for the first, best file).
        added: Whether it went into the soup.
    """

    path: str
    metric: float
    soup_metric: float
    added: bool


class GreedySoup(list):
    """The paths `greedy_soup` chose, best first: a `list` of `str`.

    Attributes:
        metric: The name of the validation metric.
        steps: One `SoupStep` per file, in the order they were tried (best
            single file first), for a table of the search.
        soup_metric: The validation metric of the final soup.
    """

    def __init__(self, paths, metric, steps, soup_metric):
        super().__init__(paths)
        self.metric = metric
        self.steps = list(steps)
        self.soup_metric = soup_metric


def _metric_direction(model, metric, mode):
    """True when a higher `metric` is better."""
    if mode != "auto":
        return mode == "max"
    if metric == "loss" or metric.endswith("_loss"):
        return False
    # Keras marks its metrics as maximized or minimized only in the private
    # `_direction` ("up"/"down"), which its own callbacks read for
    # `mode="auto"`; compiled metrics sit inside a `CompileMetrics` container.
    for container in model.metrics:
        for candidate in [container, *getattr(container, "metrics", [])]:
            if getattr(candidate, "name", None) == metric:
                direction = getattr(candidate, "_direction", None)
                if direction in ("up", "down"):
                    return direction == "up"
    raise ValueError(
        f"Cannot tell whether a higher or lower `metric` is better for "
        f"metric={metric!r}: pass mode='max' or mode='min'."
    )


def greedy_soup(
    model,
    paths,
    validation_data,
    metric: str = "accuracy",
    bn_data=None,
    bn_steps: int | None = None,
    mode: str = "auto",
    verbose="auto",
    bn_batch_size: int | None = None,
) -> GreedySoup:
    """Builds a greedy model soup of saved checkpoints into the model.

    The greedy soup of Wortsman et al. 2022 ("Model soups", arXiv:2203.05482,
    Recipe 1): each file is evaluated alone on `validation_data`; the files
    are sorted from best to worst; the soup starts as the best one, and each
    next file is added when the uniform mean of the soup and that file does
    at least as well on `metric` as the soup without it (`>=`, as in the
    paper's recipe; the authors' code adds only on a strict improvement,
    which differs on ties). The model is left holding the soup, and the
    chosen paths are returned.

    The files are read as in `keras_swa.average_checkpoints` (same formats,
    same checks, non-float variables from the last file added). With
    `bn_data`, the BatchNormalization statistics are recomputed with
    `keras_swa.update_bn` before every evaluation, each single file
    included, so that all are measured alike; without it, each file is
    evaluated with its stored statistics and each soup with their mean
    (with a warning for a model with BatchNormalization layers). The model's
    optimizer state is left as it is. If anything fails, the model gets back
    the weights and statistics it had. Memory: one copy of the weights for
    the soup's sums beside the model, one variable of one file at a time.

    Args:
        model: A built and compiled `keras.Model` of the architecture the
            files were saved from; `metric` must be one of its metrics.
        paths: A list of paths of `.weights.h5` or `.keras` files, the
            ingredients.
        validation_data: What `model.evaluate` takes: a `tf.data.Dataset`,
            a `keras.utils.PyDataset`, or a tuple `(x, y)` or
            `(x, y, sample_weight)` of arrays.
        metric: The name of the metric to select on, as `model.evaluate`
            reports it with `return_dict=True` (`"accuracy"`, `"loss"`,
            ...). Defaults to `"accuracy"`.
        bn_data: Data to recompute the BatchNormalization statistics on, as
            `data` of `keras_swa.update_bn`. Defaults to `None`: stored
            statistics, averaged for soups.
        bn_steps: Integer, the number of batches of `bn_data` to use at most.
            Defaults to `None`, all of them.
        mode: `"max"` if a higher `metric` is better, `"min"` if a lower
            one is, or `"auto"`: `"min"` for `"loss"` and names ending in
            `"_loss"`, otherwise the direction Keras gives the metric (as for
            `ModelCheckpoint(mode="auto")`: higher accuracy, lower error).
            Defaults to `"auto"`.
        verbose: The progress bar of the BatchNorm passes, as in
            `keras_swa.update_bn`. Defaults to `"auto"`.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32.

    Returns:
        A `GreedySoup`: the list of the chosen paths, best single file
        first. Its `steps` attribute has one `SoupStep` (path, its own
        metric, the soup's metric with it, whether it was added) per file
        in the order tried, and `soup_metric` the final soup's metric.

    Raises:
        TypeError: if `paths`, `metric` or `mode` is of the wrong type.
        ValueError: on a bad file or path as in
            `keras_swa.average_checkpoints`, a model that is not compiled, a
            `metric` that `model.evaluate` does not report, or a `mode` not
            in `("auto", "max", "min")`; the model is unchanged.

    Example:

    >>> chosen = keras_swa.greedy_soup(
    ...     model, glob.glob("finetuned/*.keras"), (x_val, y_val),
    ...     metric="accuracy")  # doctest: +SKIP
    >>> for step in chosen.steps:  # doctest: +SKIP
    ...     print(step.path, step.metric, step.soup_metric, step.added)
    """
    paths, bn = _check_soup_arguments(
        model, paths, validation_data, metric, mode, bn_data, bn_steps,
        bn_batch_size, verbose,
    )
    with tempfile.TemporaryDirectory(prefix="keras_swa_") as directory:
        workspace = _Workspace(model, directory)
        evaluate = _SoupEvaluator(model, validation_data, metric, mode, bn)
        try:
            soup = _greedy_search(workspace, paths, evaluate)
            if bn.data is None and len(soup) > 1:
                _warn_averaged_statistics(model, "greedy_soup")
        except BaseException:
            workspace.restore()
            raise
    return soup


def _check_soup_arguments(
    model, paths, validation_data, metric, mode, bn_data, bn_steps,
    bn_batch_size, verbose,
):
    """Checks `greedy_soup`'s arguments before any file is read; returns the
    checked paths and the `batch_norm.BNRecompute`."""
    paths = _check_paths(paths)
    if not isinstance(metric, str):
        raise TypeError(
            "`metric` must be the name of a metric of the compiled model, "
            f"such as 'accuracy' or 'loss'. Received: metric={metric!r}"
        )
    if mode not in _MODES:
        raise ValueError(
            f"`mode` must be one of {_MODES}. Received: mode={mode!r}"
        )
    if validation_data is None:
        raise ValueError(
            "`validation_data` is required: the soup is chosen on it. "
            "Received: validation_data=None"
        )
    # Evaluated once per file and once per candidate soup.
    evaluation.check_validation_data(validation_data)
    bn = batch_norm.BNRecompute.checked(
        bn_data, bn_steps, bn_batch_size, verbose, reused=True
    )
    if not getattr(model, "compiled", False):
        raise ValueError(
            "`model` must be compiled with `metric` among its metrics: "
            "`greedy_soup` evaluates it. Received an uncompiled model."
        )
    return paths, bn


class _SoupEvaluator:
    """`metric` of the model as it now holds weights (BN recomputed first),
    and which way is better."""

    def __init__(self, model, validation_data, metric, mode, bn):
        self.model, self.metric, self.mode = model, metric, mode
        self.bn = bn
        if isinstance(validation_data, tuple):
            self.data = keras.utils.unpack_x_y_sample_weight(validation_data)
        else:
            self.data = validation_data, None, None
        self.sign = None

    def recompute_bn(self):
        self.bn.run(self.model)

    def __call__(self):
        self.recompute_bn()
        x, y, sample_weight = self.data
        logs = self.model.evaluate(
            x, y, sample_weight=sample_weight, verbose=0, return_dict=True
        )
        if self.metric not in logs:
            raise ValueError(
                f"`model.evaluate` reports no metric {self.metric!r}; it "
                f"reports {sorted(logs)}. The model is unchanged."
            )
        if self.sign is None:
            higher = _metric_direction(self.model, self.metric, self.mode)
            self.sign = 1.0 if higher else -1.0
        return float(logs[self.metric])


def _greedy_search(workspace, paths, evaluate):
    """Wortsman et al.'s Recipe 1 over `paths`; leaves the soup in the model
    and returns the `GreedySoup`. Files and soups whose metric is not finite
    (diverged weights) are never added."""
    empty = _Sum(workspace)
    scores = []
    for path in paths:
        empty.load_mean_with(path)
        scores.append(evaluate())
    finite = [i for i in range(len(paths)) if math.isfinite(scores[i])]
    if not finite:
        raise ValueError(
            f"Every file of `paths` gives a non-finite {evaluate.metric!r} "
            "(NaN or infinity: diverged weights), so there is no soup to "
            "make. The model is unchanged."
        )
    skipped = [paths[i] for i in range(len(paths)) if i not in finite]
    if skipped:
        warnings.warn(
            f"greedy_soup skips {len(skipped)} file(s) whose "
            f"{evaluate.metric!r} is not finite (NaN or infinity: diverged "
            f"weights): {skipped}.",
            stacklevel=3,
        )
    # A stable sort: equal files keep the order of `paths`.
    order = sorted(finite, key=lambda i: -evaluate.sign * scores[i])
    soup = _Sum(workspace)
    first = order[0]
    soup.add(paths[first], 1.0)
    best = scores[first]
    steps = [SoupStep(paths[first], best, best, True)]
    chosen = [paths[first]]
    # The scores leave the last file alone in the model.
    model_holds_soup = order == [len(paths) - 1]
    for i in order[1:]:
        soup.load_mean_with(paths[i])
        value = evaluate()
        # A NaN soup compares false: it is never added.
        added = evaluate.sign * value >= evaluate.sign * best
        if added:
            soup.add(paths[i], 1.0)
            chosen.append(paths[i])
            best = value
        steps.append(SoupStep(paths[i], scores[i], value, added))
        model_holds_soup = added
    steps += [SoupStep(path, scores[paths.index(path)], math.nan, False)
              for path in skipped]
    if not model_holds_soup:
        soup.load_mean()
        evaluate.recompute_bn()
    return GreedySoup(chosen, evaluate.metric, steps, best)
