"""Post-hoc EMA: choose the EMA length after training (Karras et al. 2024).

During training, `keras_swa.PostHocEMA` (or `keras_swa.PowerEMA`) keeps
power-function EMAs of the weights and `EMASnapshots` writes them to disk
every so many steps. Each stored average is the weights integrated against a
known profile, `(gamma + 1) tau**gamma / t**(gamma + 1)` on `[0, t]` (`t`
the snapshots folded in so far, `tau` the snapshot index), exactly: the
power EMA's snapshot `i` weighs that profile's integral over `(i - 1, i]`.
So the EMA of any other `sigma_rel` is, up to the best fit of its profile by
the stored ones, a linear combination of the stored averages:
`reconstruct_ema` finds the coefficients by least squares over the profiles
(their inner products are in closed form; Karras et al., Algorithm 3) and
writes the combination into the model. `sweep_ema` evaluates a model for
several `sigma_rel` values in one call.
"""

import collections
import os
import re
import tempfile
import warnings

import keras
import numpy as np

from keras_swa import _validation
from keras_swa import averaging
from keras_swa import batch_norm
from keras_swa import evaluation
from keras_swa import optimizers
from keras_swa import weights

_FILE = re.compile(r"ema-(\d+)\.npz")

SnapshotCoefficient = collections.namedtuple(
    "SnapshotCoefficient", ["step", "sigma_rel", "coefficient"]
)
SnapshotCoefficient.__doc__ = """The weight of one stored average in a
reconstructed EMA: the profile `sigma_rel` written at update `step`."""


def _file_name(step):
    return f"ema-{step:010d}.npz"


def _power_ema_optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if not isinstance(optimizer, (optimizers.PowerEMA, optimizers.PostHocEMA)):
        raise TypeError(
            "EMASnapshots writes the averages of a `keras_swa.PostHocEMA` or "
            "`keras_swa.PowerEMA` optimizer (power-function EMAs, the only "
            "averages `reconstruct_ema` can combine): compile the model with "
            "one. Received: model.optimizer="
            f"{optimizer!r:.200} of type {type(optimizer).__name__}"
        )
    return optimizer


def _snapshot_files(directory):
    """The snapshot files of `directory`, as a list of (step, path) sorted
    by step."""
    if not os.path.isdir(directory):
        return []
    files = []
    for name in os.listdir(directory):
        match = _FILE.fullmatch(name)
        if match:
            files.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(files)


class EMASnapshots(keras.callbacks.Callback):
    """Writes the power-function EMAs of the optimizer to disk during `fit`.

    Every `every_n_steps` optimizer updates, one file
    `<directory>/ema-<step>.npz` receives every profile's averages with what
    `keras_swa.reconstruct_ema` needs: the update count (`step`), the
    snapshots folded in (`n_averaged`, the profiles' time) and each
    profile's `sigma_rel` and `gamma`. The model must be compiled with a
    `keras_swa.PostHocEMA` or `keras_swa.PowerEMA` optimizer.

    Writes are atomic (a temporary file, then `os.replace`), so an
    interrupted fit leaves no partial snapshot. A resumed fit (after
    `keras.callbacks.BackupAndRestore`, or a second `fit` call) carries on:
    a step already on disk is not written again (the steps a resumed fit
    replays keep the snapshots of the first run). A fit that starts from
    update 0 refuses a directory that already holds snapshots, since they
    belong to another run.

    Disk: each snapshot holds one copy of the trainable weights per profile
    (4 bytes per weight in float32). `dtype="float16"` halves it, at a
    relative rounding error of at most 2**-11 (about 5e-4) per stored
    weight; a snapshot whose averages exceed float16's range (65504) is
    stored in float32, with a warning.

    With `steps_per_execution > 1` the callback runs once per execution: a
    snapshot is written at the end of the execution that reaches a multiple
    of `every_n_steps` (its true step is in the file).

    Args:
        directory: Path of the folder for the snapshots; created if needed.
        every_n_steps: Integer >= 1, the optimizer updates between two
            snapshots. Defaults to `1000`.
        dtype: `"float32"` or `"float16"`, the storage type of the
            averages. Defaults to `"float32"`.

    Example:

    >>> model.compile(optimizer=keras_swa.PostHocEMA(
    ...     keras.optimizers.AdamW(1e-3)), loss="mse")  # doctest: +SKIP
    >>> model.fit(x, y, epochs=20, callbacks=[
    ...     keras_swa.EMASnapshots("ema", every_n_steps=500)])  # doctest: +SKIP
    >>> keras_swa.reconstruct_ema(model, "ema", sigma_rel=0.08)  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        every_n_steps: int = 1000,
        dtype: str = "float32",
    ):
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                "`directory` must be a path (a string or `os.PathLike`). "
                f"Received: directory={directory!r:.200} of type "
                f"{type(directory).__name__}"
            )
        self.directory = os.fspath(directory)
        self.every_n_steps = _validation.integer(
            "every_n_steps", every_n_steps, 1
        )
        self.dtype = _validation.choice("dtype", dtype, ("float32", "float16"))
        self._optimizer = None
        self._step = None

    def on_train_begin(self, logs=None):
        self._optimizer = _power_ema_optimizer(self.model)
        os.makedirs(self.directory, exist_ok=True)
        # The update count is read at the first batch, after callbacks such
        # as BackupAndRestore have restored the optimizer.
        self._step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._batches_in_epoch = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._step is not None:
            return
        # `self.model` syncs the JAX state, which is current here.
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        files = _snapshot_files(self.directory)
        if step == 0 and files:
            raise ValueError(
                f"`directory` {self.directory!r} already holds "
                f"{len(files)} snapshot(s) (steps {files[0][0]} to "
                f"{files[-1][0]}), but this fit starts at update 0: they are "
                "from another run, and reconstructing from both would mix "
                "them. Pass an empty or new directory, or delete them. "
                "Nothing was trained or written."
            )
        self._step = step
        self._batches = 0
        self._batches_in_epoch = batch

    def on_train_batch_end(self, batch, logs=None):
        # Counted in Python: reading the optimizer's counter would sync the
        # JAX state on every batch.
        self._batches += batch + 1 - self._batches_in_epoch
        self._batches_in_epoch = batch + 1
        accumulation = (
            self._optimizer.inner_optimizer.gradient_accumulation_steps or 1
        )
        step = self._step + self._batches // accumulation
        if step // self.every_n_steps == self._step // self.every_n_steps:
            return
        # `self.model` syncs the JAX state before the averages are read.
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._step, self._batches = step, 0
        if int(self._optimizer.n_averaged.numpy()) == 0:
            return
        if not os.path.exists(os.path.join(self.directory, _file_name(step))):
            self._write(step)

    def _write(self, step):
        optimizer = self._optimizer
        profiles = optimizer._power_profiles()
        state = {
            "step": np.int64(step),
            "n_averaged": np.int64(optimizer.n_averaged.numpy()),
            "sigma_rels": np.array([p[0] for p in profiles], "float64"),
            "gammas": np.array([p[1] for p in profiles], "float64"),
            "variables": np.array(
                [v.path if hasattr(v, "path") else v.name
                 for v in profiles[0][2].variables],
                dtype=str,
            ),
        }
        for index, (_, _, averages) in enumerate(profiles):
            state.update(averages.get_state(prefix=f"profile_{index}_"))
        if self.dtype == "float16":
            state = self._to_float16(state, step)
        descriptor, temporary = tempfile.mkstemp(
            prefix=".ema-", suffix=".tmp", dir=self.directory
        )
        try:
            with os.fdopen(descriptor, "wb") as file:
                np.savez(file, **state)
            os.replace(
                temporary, os.path.join(self.directory, _file_name(step))
            )
        except BaseException:
            os.remove(temporary)
            raise

    def _to_float16(self, state, step):
        narrow = {
            key: value.astype("float16")
            if key.startswith("profile_") and value.dtype.kind == "f"
            else value
            for key, value in state.items()
        }
        overflow = [
            key for key, value in narrow.items()
            if value.dtype == "float16"
            and np.isfinite(state[key]).all()
            and not np.isfinite(value).all()
        ]
        if overflow:
            warnings.warn(
                f"EMASnapshots: the averages of step {step} exceed the "
                "float16 range (65504); this snapshot is stored in float32.",
                stacklevel=2,
            )
            return state
        return narrow


def profile_inner_products(times_a, gammas_a, times_b, gammas_b):
    """The inner products of power-function EMA profiles.

    Profile `(t, gamma)` is `p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`
    on `[0, t]`. For `t_a <= t_b`, the integral of `p_a * p_b` is
    `(gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_b) *
    (t_a / t_b)**gamma_b` (Karras et al. 2024, Algorithm 3), and
    symmetrically.

    Args:
        times_a, gammas_a, times_b, gammas_b: Arrays (broadcast together) of
            profile lengths (> 0) and exponents.

    Returns:
        A float64 NumPy array of the broadcast shape.

    Example:

    >>> float(profile_inner_products(4.0, 1.0, 4.0, 1.0))  # 4/3 / 4
    0.3333333333333333
    """
    times_a, gammas_a, times_b, gammas_b = (
        np.asarray(x, "float64") for x in (times_a, gammas_a, times_b, gammas_b)
    )
    a_first = times_a <= times_b
    longer = np.maximum(times_a, times_b)
    ratio = np.minimum(times_a, times_b) / longer
    exponent = np.where(a_first, gammas_b, gammas_a)
    return (
        (gammas_a + 1.0) * (gammas_b + 1.0)
        / ((gammas_a + gammas_b + 1.0) * longer)
        * ratio**exponent
    )


def solve_coefficients(times, gammas, target_time, target_gamma):
    """The least-squares combination of stored profiles for a target one.

    Minimizes the L2 distance between the target profile and a combination
    of the stored ones, by the normal equations of their inner products
    (`profile_inner_products`), then scales the coefficients to sum to 1 so
    that the combination of equal weights is those weights.

    Args:
        times: 1-D array, the stored profiles' lengths (their `n_averaged`).
        gammas: 1-D array of the same length, their exponents.
        target_time: Float, the length of the target profile.
        target_gamma: Float, its exponent.

    Returns:
        A float64 NumPy array of coefficients, one per stored profile.

    Example:

    >>> solve_coefficients([10, 10], [1.0, 6.0], 10, 6.0).round(6)
    array([0., 1.])
    """
    times = np.asarray(times, "float64")
    gammas = np.asarray(gammas, "float64")
    gram = profile_inner_products(
        times[:, None], gammas[:, None], times[None, :], gammas[None, :]
    )
    target = profile_inner_products(times, gammas, target_time, target_gamma)
    # `lstsq`, not `solve`: a profile stored twice (two snapshots at the same
    # `n_averaged`) makes the Gram matrix singular.
    coefficients = np.linalg.lstsq(gram, target, rcond=None)[0]
    return coefficients / coefficients.sum()


def _unreadable(path, error):
    return ValueError(
        f"{path!r} is not a readable snapshot of EMASnapshots "
        f"({type(error).__name__}: {error}). Delete it or restore it."
    )


def _layer_numbers_removed(path):
    # Keras numbers the automatic names of a second model of the same
    # architecture (`dense_2/kernel` for `dense/kernel`): compare the
    # variables without those numbers.
    return "/".join(re.sub(r"_\d+$", "", part) for part in path.split("/"))


class _Snapshot:
    """What one snapshot file holds, but its averages (read on demand)."""

    def __init__(self, step, path):
        self.step, self.path = step, path
        # A damaged file fails in many ways (zipfile.BadZipFile, zlib.error,
        # EOFError, OSError, a missing key, unpickling refused): all of them
        # name the file.
        try:
            with np.load(path) as data:
                self.n_averaged = int(data["n_averaged"])
                self.sigma_rels = [float(s) for s in data["sigma_rels"]]
                self.gammas = [float(g) for g in data["gammas"]]
                self.variables = [str(v) for v in data["variables"]]
        except Exception as error:
            raise _unreadable(path, error) from error

    def check_variables(self, variables):
        """Raises unless the snapshot averages `variables` (by path)."""
        if len(self.variables) != len(variables):
            raise ValueError(
                f"The snapshot {self.path!r} does not match `model`: it "
                f"holds averages of {len(self.variables)} trainable "
                f"variables where the model has {len(variables)}."
            )
        for saved, variable in zip(self.variables, variables):
            path = getattr(variable, "path", None) or variable.name
            if _layer_numbers_removed(saved) != _layer_numbers_removed(path):
                raise ValueError(
                    f"The snapshot {self.path!r} does not match `model`: it "
                    f"holds the average of {saved!r} where the model has the "
                    f"variable {path!r}. Reconstruct into the model that was "
                    "trained (or one of the same architecture)."
                )

    def averages(self, profile):
        """The averages of profile `profile`, as {variable index: array}."""
        prefix = f"profile_{profile}_average_"
        try:
            with np.load(self.path) as data:
                return {
                    int(key[len(prefix):]): data[key]
                    for key in data.files
                    if key.startswith(prefix)
                }
        except Exception as error:
            raise _unreadable(self.path, error) from error


class _Reconstruction:
    """A reconstructed EMA as a source of averages for `keras_swa.weights`."""

    def __init__(self, values, n_averaged):
        self._values = values
        self.n_averaged = keras.Variable(
            n_averaged, dtype="int32", trainable=False, name="n_averaged"
        )

    def assign_average_vars(self, var_list):
        for variable in var_list:
            value = self._values.get(id(variable))
            if value is not None:
                variable.assign(value.astype(variable.dtype))


def _reconstruction(model, directory, sigma_rel, step):
    """The reconstructed EMA (a source) and its coefficients."""
    files = _snapshot_files(directory)
    if not files:
        raise ValueError(
            f"`directory` {directory!r} holds no snapshot of EMASnapshots "
            "(files `ema-<step>.npz`)."
        )
    if step is None:
        step = files[-1][0]
    steps = [s for s, _ in files]
    if step not in steps:
        raise ValueError(
            f"`step` must be a step with a snapshot in {directory!r}: one of "
            f"{steps[:5]}{' ... ' + str(steps[-1]) if len(steps) > 5 else ''}"
            f". Received: step={step}"
        )
    snapshots = [_Snapshot(s, path) for s, path in files if s <= step]
    target = snapshots[-1]
    if target.n_averaged == 0:
        raise ValueError(
            f"The snapshot of step {step} holds no average (n_averaged=0)."
        )
    variables = model.trainable_variables
    inputs = [
        (snapshot, profile)
        for snapshot in snapshots
        if snapshot.n_averaged > 0
        for profile in range(len(snapshot.gammas))
    ]
    coefficients = solve_coefficients(
        [snapshot.n_averaged for snapshot, _ in inputs],
        [snapshot.gammas[profile] for snapshot, profile in inputs],
        target.n_averaged,
        averaging.sigma_rel_to_gamma(sigma_rel),
    )
    values = {}
    for (snapshot, profile), coefficient in zip(inputs, coefficients):
        snapshot.check_variables(variables)
        for index, array in snapshot.averages(profile).items():
            if tuple(array.shape) != tuple(variables[index].shape):
                raise ValueError(
                    f"The snapshot {snapshot.path!r} does not match `model`: "
                    f"its average of {snapshot.variables[index]!r} has shape "
                    f"{tuple(array.shape)} where the model's variable "
                    f"{variables[index].path!r} has shape "
                    f"{tuple(variables[index].shape)}."
                )
            if not np.isfinite(array).all():
                raise ValueError(
                    f"The snapshot {snapshot.path!r} holds non-finite "
                    "averages (NaN or infinity): the weights diverged before "
                    f"step {snapshot.step}. Reconstruct at an earlier `step`, "
                    "or train with `skip_non_finite=True`."
                )
            term = coefficient * array.astype("float64")
            key = id(variables[index])
            values[key] = term if key not in values else values[key] + term
    source = _Reconstruction(values, target.n_averaged)
    return source, [
        SnapshotCoefficient(
            snapshot.step, snapshot.sigma_rels[profile], float(coefficient)
        )
        for (snapshot, profile), coefficient in zip(inputs, coefficients)
    ]


def _check_directory(directory):
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            "`directory` must be the path of an EMASnapshots folder. "
            f"Received: directory={directory!r:.200} of type "
            f"{type(directory).__name__}"
        )
    return os.fspath(directory)


def reconstruct_ema(
    model,
    directory: str | os.PathLike,
    sigma_rel: float,
    step: int | None = None,
    bn_data=None,
    bn_steps: int | None = None,
    verbose="auto",
    bn_batch_size: int | None = None,
) -> list:
    """Writes into `model` the power EMA of `sigma_rel`, rebuilt from snapshots.

    Takes the snapshots `keras_swa.EMASnapshots` wrote in `directory` up to
    `step`, finds the least-squares combination of their profiles that best
    matches the power-function EMA of `sigma_rel` at `step` (Karras et al.
    2024, Algorithm 3; see `solve_coefficients`), and assigns that
    combination of the stored averages to the model's trainable weights.
    With `bn_data`, the BatchNormalization statistics are then recomputed
    with `keras_swa.update_bn`. The more snapshots and the closer
    `sigma_rel` lies to the tracked ones, the closer the result is to the
    EMA that would have been tracked; a tracked `sigma_rel` at a snapshot
    step gives that snapshot back. After any error the model is as it was.

    Args:
        model: The built `keras.Model` that was trained (or one of the same
            architecture).
        directory: The folder of `keras_swa.EMASnapshots`.
        sigma_rel: Float in (0, 0.28), the relative width of the EMA wanted.
        step: Integer, the update of a stored snapshot at which the EMA is
            wanted. Defaults to `None`: the last snapshot.
        bn_data: Data to recompute the BatchNormalization statistics on, as
            `data` of `keras_swa.update_bn`. Defaults to `None`: the
            statistics are left as they are.
        bn_steps: Integer, the number of batches of `bn_data` to use at most.
            Defaults to `None`, all of them.
        verbose: The progress bar of the BatchNorm pass, as in
            `keras_swa.update_bn`. Defaults to `"auto"`.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32.

    Returns:
        A list of `SnapshotCoefficient(step, sigma_rel, coefficient)`, one
        per stored average used (every profile of every snapshot up to
        `step`); the coefficients sum to 1.

    Raises:
        TypeError, ValueError: for bad arguments, a `step` without snapshot,
            snapshots that do not match `model` or hold non-finite values.

    Example:

    >>> coefficients = keras_swa.reconstruct_ema(
    ...     model, "ema", sigma_rel=0.08, bn_data=x_train)  # doctest: +SKIP
    >>> model.evaluate(x_test, y_test)  # doctest: +SKIP
    """
    _validation.model("model", model)
    directory = _check_directory(directory)
    sigma_rel = optimizers._check_sigma_rel("sigma_rel", sigma_rel)
    step = _validation.integer("step", step, 0, optional=True)
    bn = batch_norm.BNRecompute.checked(
        bn_data, bn_steps, bn_batch_size, verbose
    )
    source, coefficients = _reconstruction(model, directory, sigma_rel, step)
    weights.swap_in(model, source, bn).keep()
    return coefficients


def sweep_ema(
    model,
    directory: str | os.PathLike,
    sigma_rels,
    validation_data,
    step: int | None = None,
    bn_data=None,
    bn_steps: int | None = None,
    bn_batch_size: int | None = None,
) -> list:
    """Evaluates the reconstructed EMA of several `sigma_rel` values.

    For each `sigma_rel`, the EMA is rebuilt as in `reconstruct_ema` and the
    compiled `model` is evaluated on `validation_data`; the model's weights
    and BatchNorm statistics come back afterwards (also on error).

    Args:
        model: The built and compiled `keras.Model`.
        directory: The folder of `keras_swa.EMASnapshots`.
        sigma_rels: List or tuple of floats in (0, 0.28).
        validation_data: What `model.evaluate` takes: a tuple `(x, y)` or
            `(x, y, sample_weight)` of arrays, or a dataset.
        step: Integer, the update of a stored snapshot. Defaults to `None`:
            the last snapshot.
        bn_data: Data to recompute the BatchNormalization statistics on for
            each `sigma_rel`. Defaults to `None`.
        bn_steps: Integer, batches of `bn_data` to use at most. Defaults to
            `None`, all of them.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32.

    Returns:
        A list of dicts, one per `sigma_rel` in order:
        `{"sigma_rel": ..., <metric>: ...}` with the metrics of
        `model.evaluate`.

    Example:

    >>> table = keras_swa.sweep_ema(model, "ema", [0.03, 0.05, 0.1, 0.2],
    ...                             (x_test, y_test))  # doctest: +SKIP
    >>> best = min(table, key=lambda row: row["loss"])  # doctest: +SKIP
    """
    _validation.model("model", model)
    directory = _check_directory(directory)
    if not isinstance(sigma_rels, (list, tuple)) or not sigma_rels:
        raise TypeError(
            "`sigma_rels` must be a non-empty list or tuple of floats in "
            f"(0, {averaging.MAX_SIGMA_REL}). Received: "
            f"sigma_rels={sigma_rels!r:.200} of type {type(sigma_rels).__name__}"
        )
    sigma_rels = [
        optimizers._check_sigma_rel("sigma_rels", s) for s in sigma_rels
    ]
    step = _validation.integer("step", step, 0, optional=True)
    bn = batch_norm.BNRecompute.checked(
        bn_data, bn_steps, bn_batch_size, verbose=0, reused=True
    )
    evaluation.check_validation_data(validation_data)
    table = []
    for sigma_rel in sigma_rels:
        source, _ = _reconstruction(model, directory, sigma_rel, step)
        metrics = evaluation.evaluate_average(
            model, source, validation_data, bn, prefix=""
        )
        table.append({"sigma_rel": sigma_rel, **metrics})
    return table
