"""Epoch-level Stochastic Weight Averaging as a `fit` callback.

The callback orchestrates; each job has its module: the epochs averaged
(here), the learning-rate phase (`_lr_phase`), the averages (`engine`), the
evaluation of the average (`evaluation.evaluate_average`) and the backup
file (`_callback_backup`).
"""

import contextlib
import fractions
import math
import numbers
import os
import warnings

import keras
import numpy as np

from keras_swa import _callback_backup
from keras_swa import _callback_order
from keras_swa import _lr_phase
from keras_swa import _validation
from keras_swa import averaging
from keras_swa import batch_norm
from keras_swa import engine
from keras_swa import evaluation
from keras_swa import optimizers
from keras_swa import weights

# Where the tests and users find it since the first milestone.
BACKUP_FILENAME = _callback_backup.BACKUP_FILENAME


def _check_start_epoch(start_epoch):
    message = (
        "`start_epoch` must be an integer >= 0 (a 0-based epoch) or a float "
        "in (0, 1] (a fraction of `epochs`)."
    )
    if isinstance(start_epoch, (bool, np.bool_)) or not isinstance(
        start_epoch, numbers.Real
    ):
        raise TypeError(
            f"{message} Received: start_epoch={start_epoch!r} of type "
            f"{type(start_epoch).__name__}"
        )
    if isinstance(start_epoch, numbers.Integral):
        if start_epoch < 0:
            raise ValueError(f"{message} Received: start_epoch={start_epoch}")
        return int(start_epoch)
    if not 0.0 < start_epoch <= 1.0:
        raise ValueError(f"{message} Received: start_epoch={start_epoch}")
    return float(start_epoch)


def _resolve_start_epoch(start_epoch, epochs):
    """The 0-based first epoch averaged, for a fit of `epochs` epochs
    (`None` when unknown, in a custom training loop)."""
    if isinstance(start_epoch, numbers.Integral):
        start = int(start_epoch)
        if epochs is None:
            return start
    elif epochs is None:
        raise ValueError(
            "`start_epoch` is a fraction of `epochs` "
            f"(start_epoch={start_epoch}), but the training parameters hold "
            "no `epochs` (a custom training loop whose "
            "`keras.callbacks.CallbackList` was not given `epochs=`). Pass "
            "`epochs=` to the CallbackList, or give an integer `start_epoch`."
        )
    else:
        # The decimal the user wrote, not its binary float: 0.29 * 100
        # is 28.999999999999996 in floats.
        fraction = fractions.Fraction(repr(float(start_epoch)))
        start = max(0, min(math.floor(fraction * epochs), epochs - 1))
    if start >= epochs:
        raise ValueError(
            f"`start_epoch` is past the last epoch: averaging would start "
            f"at epoch {start} (0-based), but `fit` runs epochs={epochs}, "
            f"so its last epoch is {epochs - 1}. Received: "
            f"start_epoch={start_epoch}"
        )
    return start


def _check_optimizer(model, allow_averaging_optimizer):
    wrappers = [
        optimizer
        for optimizer in _lr_phase.optimizer_chain(model.optimizer)
        if isinstance(optimizer, optimizers.AveragedOptimizer)
    ]
    if wrappers and not allow_averaging_optimizer:
        raise ValueError(
            "The model's optimizer is a keras_swa averaging wrapper "
            f"({type(wrappers[0]).__name__}) and StochasticWeightAveraging "
            "keeps an average too: two averages of one model. Use one of "
            "them, or pass `allow_averaging_optimizer=True` to keep both."
        )


def _zeros(shape, dtype, name, layout):
    """A zero average, a variable of the callback's own."""
    return keras.Variable(
        initializer="zeros", shape=shape, dtype=dtype, trainable=False,
        name=name, layout=layout,
    )


def _add_epoch_snapshot(averages, epoch, verbose):
    """Folds the weights at the end of `epoch` into `averages`; returns
    whether it did (not when they are not finite: training diverged)."""
    if not averages.variables_finite():
        warnings.warn(
            f"Epoch {epoch + 1}: StochasticWeightAveraging skipped this "
            "epoch's snapshot: the weights hold NaN or infinity (training "
            f"diverged). The average keeps its {averages.n_averaged} "
            "earlier snapshot(s).",
            stacklevel=4,
        )
        return False
    # The rule computes its weight in the averages' dtype (float64 stays
    # float64-accurate).
    averages.add_snapshot(True, averaging.Uniform())
    if verbose:
        print(
            f"\nEpoch {epoch + 1}: StochasticWeightAveraging folded the "
            f"weights in (n_averaged={averages.n_averaged})."
        )
    return True


def _assign_at_end(callback):
    """Puts the callback's average into its model at the end of `fit`
    (with BatchNormalization recomputed on `bn_data`), or says why not."""
    if callback._averages.n_averaged == 0:
        warnings.warn(
            "StochasticWeightAveraging averaged no epoch: training stopped "
            f"before `start_epoch` (epoch {callback._start}). The model "
            "keeps its trained weights.",
            stacklevel=3,
        )
        return
    # Only the statistics training updates go stale: frozen BN layers are
    # not among them.
    if callback.bn_data is None and batch_norm.statistics_variables(
        callback.model
    ):
        warnings.warn(
            "The model has BatchNormalization layers, whose statistics were "
            "computed for the raw weights, not for their average: they are "
            "stale. Pass `bn_data` (such as the training data) to "
            "StochasticWeightAveraging, or call "
            "`keras_swa.update_bn(model, data)` after `fit`.",
            stacklevel=3,
        )
    bn = batch_norm.BNRecompute.of(callback, 1 if callback.verbose else 0)
    weights.swap_in(callback.model, callback, bn).keep()


def _schedule(callback):
    if callback._start is None:
        return "It has not run in a `fit` yet."
    return (
        f"It averages from epoch {callback._start} (0-based; "
        f"start_epoch={callback.start_epoch}) every "
        f"{callback.average_period} epoch(s) (average_period), and the last "
        "epoch; `fit` stopped before."
    )


class StochasticWeightAveraging(keras.callbacks.Callback, engine.Averager):
    """Stochastic Weight Averaging (Izmailov et al., 2018) over `fit` epochs.

    From epoch `start_epoch` on, the callback sets the learning rate of the
    optimizer to the SWA learning rate and keeps the equal-weight mean of
    the weights at the end of epochs `start_epoch`,
    `start_epoch + average_period`, ... and of the last epoch of `fit`. When
    `fit` ends, the model holds that average, with its BatchNormalization
    statistics recomputed on `bn_data`. Any optimizer works; for averaging
    inside the train step, per update, use `keras_swa.SWA` instead.

    The learning rate (with `swa_lr`): epoch `start_epoch + k` runs at
    `swa_lr * alpha + lr0 * (1 - alpha)`, `lr0` the rate when epoch
    `start_epoch` begins, `alpha = anneal(min(1, k / anneal_epochs))`
    (`1` when `anneal_epochs=0`), `anneal(t) = t` ("linear") or
    `(1 - cos(pi * t)) / 2` ("cos"): `torch.optim.swa_utils.SWALR` stepped
    once per epoch, on the innermost optimizer. It is set when the epoch
    begins (later callbacks see it) and held at its first batch (a
    `LearningRateScheduler` in any place does not override it). A
    `LearningRateSchedule` runs unchanged until the first update of epoch
    `start_epoch` of this `fit` (placed from the optimizer's step: a second
    `fit`, an `initial_epoch` and a resume are placed right), then anneals
    per update (real updates under gradient accumulation); it needs the
    steps per epoch, and comes back at the end of `fit`.

    With `backup_dir` a `fit` resumed with `keras.callbacks.BackupAndRestore`
    (in either order) ends as an uninterrupted one; the backup file is
    deleted at the end unless a snapshot was skipped as non-finite. The
    `val_swa_*` logs reach the callbacks after this one; one that stops
    training should come before it. In a custom loop's `CallbackList`
    without `epochs`, `start_epoch` must be an integer, and the last epoch
    is folded in at `on_train_end`. The guide has the details.

    Args:
        start_epoch: Integer >= 0, the 0-based epoch where averaging starts,
            or a float in (0, 1], a fraction of `fit`'s `epochs`: epoch
            `floor(start_epoch * epochs)` (in decimal: 0.29 of 100 is 29), at
            the latest the last. Defaults to `0.75` (epochs 30-39 of 40).
        swa_lr: Float >= 0, the SWA learning rate, or `None` to leave the
            learning rate alone. Defaults to `None`.
        anneal_epochs: Integer >= 0, the epochs from the current learning
            rate to `swa_lr`. Defaults to `0`.
        anneal_strategy: "cos" or "linear", the shape of the annealing.
            Defaults to `"cos"`.
        average_period: Integer >= 1, the epochs between two snapshots.
            Defaults to `1`.
        bn_data: Data to recompute the BatchNormalization statistics of the
            average on, in any form `fit` takes as `x`, or `None`. Checked
            when the callback is created. Defaults to `None`.
        bn_steps: Integer >= 1, the batches of `bn_data` to use, or `None`
            for all. Defaults to `None`.
        validation_data: Data to evaluate the averaged model on after each
            averaging epoch (as `fit`'s `validation_data`), logged as
            `val_swa_<metric>`, with the statistics recomputed on `bn_data`
            first; training goes on with the raw weights and statistics.
            `None` evaluates nothing. Defaults to `None`.
        backup_dir: Directory where the callback keeps its state to resume
            an interrupted `fit`, or `None`; not that of `BackupAndRestore`,
            which deletes its directory at the end. Defaults to `None`.
        verbose: 0 for silence, 1 to print a line when averaging starts and
            at each snapshot. Defaults to `1`.
        allow_averaging_optimizer: Whether the model's optimizer may itself
            be a keras_swa averaging wrapper (two averages of one model, a
            mistake unless said). Defaults to `False`.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32, as `fit`.
        window: Integer >= 1: average only the last `window` snapshots
            (exactly; `window - 1` more copies), or `None` for all of them.
            Defaults to `None`.
        offload: Boolean, whether the averages live in host memory, off the
            accelerator, as the wrappers' `offload`. Defaults to `False`.

    Example:

    >>> import keras_swa
    >>> swa = keras_swa.StochasticWeightAveraging(
    ...     start_epoch=0.75, swa_lr=0.01, anneal_epochs=2,
    ...     bn_data=train_ds)  # doctest: +SKIP
    >>> model.fit(train_ds, epochs=40, callbacks=[swa])  # doctest: +SKIP
    >>> model.evaluate(test_ds)  # the averaged model  # doctest: +SKIP
    """

    # The kind of average, for the `val_<log_name>_*` metrics of
    # `keras_swa.EvaluateAverage`.
    log_name = "swa"

    def __init__(
        self,
        start_epoch: int | float = 0.75,
        swa_lr: float | None = None,
        anneal_epochs: int = 0,
        anneal_strategy: str = "cos",
        average_period: int = 1,
        bn_data=None,
        bn_steps: int | None = None,
        validation_data=None,
        backup_dir: str | os.PathLike | None = None,
        verbose: int = 1,
        allow_averaging_optimizer: bool = False,
        bn_batch_size: int | None = None,
        window: int | None = None,
        offload: bool = False,
    ):
        super().__init__()
        self.start_epoch = _check_start_epoch(start_epoch)
        self.swa_lr, self.anneal_epochs, self.anneal_strategy = (
            _lr_phase.check_arguments(swa_lr, anneal_epochs, anneal_strategy)
        )
        self.average_period = _validation.integer(
            "average_period", average_period, 1
        )
        self.bn_steps = _validation.integer(
            "bn_steps", bn_steps, 1, optional=True
        )
        self.verbose = _validation.choice("verbose", verbose, (0, 1))
        self.window = _validation.integer("window", window, 1, optional=True)
        self.offload = _validation.boolean("offload", offload)
        self.allow_averaging_optimizer = _validation.boolean(
            "allow_averaging_optimizer", allow_averaging_optimizer
        )
        evaluation.check_validation_data(validation_data)
        # Before training: a wrong `bn_data` would otherwise only show after
        # the last epoch. It is read at every evaluation with
        # `validation_data`, once at the end otherwise.
        batch_norm.BNRecompute.checked(
            bn_data, self.bn_steps, bn_batch_size,
            reused=validation_data is not None,
        )
        self.backup_dir = _callback_backup.check_directory(backup_dir)
        self.bn_data = bn_data
        self.bn_batch_size = bn_batch_size
        self.validation_data = validation_data
        self._averages = None
        self._diverged = False
        self._n_averaged = keras.Variable(
            # "int", as the optimizers: int64 on TensorFlow, int32 elsewhere
            # (JAX has no int64 by default).
            0, dtype="int", trainable=False, name="n_averaged"
        )
        self._start = None

    def _schedule(self):
        return _schedule(self)

    def on_train_begin(self, logs=None):
        # A custom training loop's `CallbackList` may give no params.
        params = self.params or {}
        self._start = _resolve_start_epoch(
            self.start_epoch, params.get("epochs")
        )
        _check_optimizer(self.model, self.allow_averaging_optimizer)
        _callback_order.check_nothing_restores_after(self)
        self._quiet = _check_logging(self)
        self._create_averages()
        self._n_averaged.assign(0)
        self._diverged = False
        self._unfolded_epoch = None
        self._resumed_after_epoch = None
        self._phase = _lr_phase.LearningRatePhase(
            self.model, self.swa_lr, self.anneal_epochs, self.anneal_strategy,
            self._start, params.get("steps"),
        )
        self._backup = None
        if self.backup_dir is not None:
            self._backup = _callback_backup.CallbackBackup(self.backup_dir)
            state = self._backup.read(self._start, self.average_period)
            if state is not None:
                self._set_state(state, self._backup.path)
                self._phase.set_state(state)
                self._diverged = _callback_backup.diverged(state)
                self._resumed_after_epoch = int(state["epoch"])

    def _new_averages(self, name, window=None):
        """Zero averages of the model's trainable variables, counted by
        `n_averaged` and created as the callback's own, placed as `offload`
        says (a subclass keeps its further moments alike: same dtypes, same
        distribution, same place), with a `window`'s ring if given."""
        return engine.AverageState(
            self.model.trainable_variables, self._n_averaged, _zeros,
            name=name, window=window, offload=self.offload,
        )

    def _create_averages(self):
        """Creates the averages of a fit (a backup is then read into them)."""
        self._averages = self._new_averages("swa_average", self.window)

    def _state(self):
        """The averages as NumPy arrays, for the backup file."""
        return self._averages.get_state()

    def _set_state(self, state, path):
        """Loads what `_state` returned, read from the backup `path`."""
        self._averages.set_state(state, path)

    def on_epoch_begin(self, epoch, logs=None):
        if self._resumed_after_epoch is not None:
            self._backup.check_resumed_epoch(self._resumed_after_epoch, epoch)
            self._resumed_after_epoch = None
        self._phase.epoch_begin(epoch)
        if epoch == self._start and self.verbose:
            print(
                f"\nEpoch {epoch + 1}: StochasticWeightAveraging starts "
                "averaging at the end of this epoch."
            )

    def on_train_batch_begin(self, batch, logs=None):
        self._phase.batch_begin()

    def on_epoch_end(self, epoch, logs=None):
        last = (self.params or {}).get("epochs", 0) - 1
        # An epoch off the period is folded in at `on_train_end` if it
        # turns out to be the last (the params may not say).
        self._unfolded_epoch = epoch if epoch >= self._start else None
        if epoch >= self._start and (
            averaging.is_snapshot_step(epoch, self._start, self.average_period)
            or epoch == last
            or self.model.stop_training
        ):
            self._unfolded_epoch = None
            self._add_snapshot(epoch)
            _log_average(self, logs)
        if self._backup is not None:
            self._backup.write(
                epoch, self._start, self.average_period, self._diverged,
                {**self._phase.get_state(), **self._state()},
            )

    def on_train_end(self, logs=None):
        if self._unfolded_epoch is not None:
            # Without `epochs` in the params (a custom training loop), the
            # last epoch is only known as such now.
            self._add_snapshot(self._unfolded_epoch)
            self._unfolded_epoch = None
        self._phase.end()
        self._quiet.close()
        if not self._diverged and not self._averages.variables_finite():
            self._diverged = True
        _assign_at_end(self)
        if self._backup is not None:
            self._backup.finish(self._diverged)

    def _add_snapshot(self, epoch):
        if not _add_epoch_snapshot(self._averages, epoch, self.verbose):
            self._diverged = True


def _check_logging(callback):
    """Before training: the `val_swa_*` logs of `validation_data` come
    before their monitors, which get no "metric not available" warning
    until the first one is logged. Returns what silences them."""
    if callback.validation_data is None:
        return contextlib.ExitStack()
    _callback_order.check_metrics_come_first(callback, "val_swa_")
    return _callback_order.quiet_missing_metrics(callback, "val_swa_")


def _log_average(callback, logs):
    """Evaluates the average on `validation_data` into the epoch `logs`."""
    if callback.validation_data is None or logs is None or (
        callback._averages.n_averaged == 0
    ):
        return
    callback._quiet.close()
    # The same `logs` dict goes to the callbacks after this one, History and
    # the progress bar among them.
    logs.update(
        evaluation.evaluate_average(
            callback.model, callback, callback.validation_data,
            batch_norm.BNRecompute.of(callback), "val_swa_",
        )
    )
