"""Epoch-level Stochastic Weight Averaging as a `fit` callback."""

import fractions
import math
import numbers
import os
import tempfile
import warnings

import keras
import numpy as np

from keras_swa import _callback_order
from keras_swa import _validation
from keras_swa import averaging
from keras_swa import batch_norm
from keras_swa import engine
from keras_swa import evaluation
from keras_swa import optimizers
from keras_swa import schedules
from keras_swa import weights

BACKUP_FILENAME = "stochastic_weight_averaging.npz"


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


def _optimizer_chain(optimizer):
    """The optimizer and those it wraps, outermost first."""
    chain = [optimizer]
    # LossScaleOptimizer and the keras_swa wrappers both name the optimizer
    # they delegate to `inner_optimizer`.
    while hasattr(chain[-1], "inner_optimizer"):
        chain.append(chain[-1].inner_optimizer)
    return chain


def _schedule_of(optimizer):
    # Keras' `learning_rate` property evaluates a schedule at the current
    # step; the schedule object itself is only held in `_learning_rate`
    # (there is no public accessor). A float rate is a `keras.Variable`.
    rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return rate
    return None


class StochasticWeightAveraging(keras.callbacks.Callback, engine.Averager):
    """Stochastic Weight Averaging (Izmailov et al., 2018) over `fit` epochs.

    From epoch `start_epoch` on, the callback sets the learning rate of the
    optimizer to the SWA learning rate and keeps the equal-weight mean of
    the weights at the end of epochs `start_epoch`,
    `start_epoch + average_period`, ... and of the last epoch of `fit`. When
    `fit` ends, the model holds that average, with its BatchNormalization
    statistics recomputed on `bn_data`. Any optimizer works; for averaging
    inside the train step, per update, use `keras_swa.SWA` instead.

    The learning rate: at the start of epoch `start_epoch + k` it is set to
    `swa_lr * alpha + lr0 * (1 - alpha)`, where `lr0` is the optimizer's
    learning rate when epoch `start_epoch` begins and
    `alpha = anneal(min(1, k / anneal_epochs))` (`alpha = 1` when
    `anneal_epochs=0`), with `anneal(t) = t` for "linear" and
    `(1 - cos(pi * t)) / 2` for "cos". So with `anneal_epochs=0` every epoch
    from `start_epoch` on runs at `swa_lr`; with `anneal_epochs=a` epoch
    `start_epoch` runs at `lr0` and epoch `start_epoch + a` reaches `swa_lr`,
    as `torch.optim.swa_utils.SWALR` stepped once per epoch. The rate set is
    that of the innermost optimizer (inside a `LossScaleOptimizer` or a
    `keras_swa` wrapper). A `LearningRateSchedule` runs unchanged until
    `start_epoch`, then is handed over to a `keras_swa.SWALearningRate`
    with the same phase, per step (`fit` must know the steps per epoch),
    and comes back when `fit` ends.

    Resuming: with `backup_dir`, the callback writes its state to
    `backup_dir/stochastic_weight_averaging.npz` after every epoch and reads
    it back when `fit` begins, so an interrupted `fit` resumed with
    `keras.callbacks.BackupAndRestore` (which restores the weights and the
    epoch) ends with the same average as an uninterrupted one. The two
    callbacks may come in either order. The file is deleted when `fit`
    completes.

    Callback order: the `val_swa_*` entries are added to the epoch `logs`,
    so callbacks after this one (and Keras' own `History` and progress bar)
    see them. A callback that stops training (`EarlyStopping`) should come
    before this one, so that the last epoch is folded in.

    Args:
        start_epoch: Integer >= 0, the 0-based epoch where averaging starts,
            or a float in (0, 1], a fraction of `fit`'s `epochs`: averaging
            starts at epoch `floor(start_epoch * epochs)` (the fraction taken
            as written in decimal, so 0.29 of 100 epochs is epoch 29), at the
            latest at the last epoch. 0.75 of 40 epochs averages epochs 30 to
            39. Defaults to `0.75`.
        swa_lr: Float >= 0, the SWA learning rate, or `None` to leave the
            learning rate alone. Defaults to `None`.
        anneal_epochs: Integer >= 0, the epochs from the current learning
            rate to `swa_lr`. Defaults to `0`.
        anneal_strategy: "cos" or "linear", the shape of the annealing.
            Defaults to `"cos"`.
        average_period: Integer >= 1, the epochs between two snapshots.
            Defaults to `1`.
        bn_data: Data to recompute the BatchNormalization statistics of the
            average on, in any form `fit` takes as `x` (arrays, a tuple
            `(x, ...)`, a `tf.data.Dataset`, a `keras.utils.PyDataset`, a
            generator, a torch `DataLoader`), or `None`. Checked when the
            callback is created. Defaults to `None`.
        bn_steps: Integer >= 1, the batches of `bn_data` to use, or `None`
            for all. Defaults to `None`.
        validation_data: Data to evaluate the averaged model on after each
            averaging epoch, in the forms `fit` accepts for its
            `validation_data`; the results are logged as `val_swa_<metric>`.
            With `bn_data`, each evaluation first recomputes the statistics
            for the average. The raw weights and statistics are back before
            training goes on. `None` evaluates nothing. Defaults to `None`.
        backup_dir: Directory (string or path) where the callback keeps its
            state to resume an interrupted `fit`, or `None`. Give it a
            directory other than that of `BackupAndRestore`, which deletes
            its whole directory when `fit` completes. Defaults to `None`.
        verbose: 0 for silence, 1 to print a line when averaging starts and
            at each snapshot. Defaults to `1`.
        allow_averaging_optimizer: Whether the model's optimizer may itself
            be a `keras_swa.SWA` or `keras_swa.EMA` wrapper. Two averages of
            one model are usually a mistake, so this is refused unless set.
            Defaults to `False`.
        bn_batch_size: Integer >= 1, the batch size when `bn_data` is
            arrays. Defaults to `None`: 32, as `fit`.

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
    ):
        super().__init__()
        start_epoch = _check_start_epoch(start_epoch)
        swa_lr = _validation.real("swa_lr", swa_lr, minimum=0.0, optional=True)
        anneal_epochs = _validation.integer("anneal_epochs", anneal_epochs, 0)
        schedules.check_anneal_strategy(anneal_strategy)
        average_period = _validation.integer(
            "average_period", average_period, 1
        )
        bn_steps = _validation.integer("bn_steps", bn_steps, 1, optional=True)
        verbose = _validation.choice("verbose", verbose, (0, 1))
        allow_averaging_optimizer = _validation.boolean(
            "allow_averaging_optimizer", allow_averaging_optimizer
        )
        evaluation.check_validation_data(validation_data)
        # Before training: a wrong `bn_data` would otherwise only show after
        # the last epoch. It is read at every evaluation with
        # `validation_data`, once at the end otherwise.
        weights.check_bn_data(
            bn_data, bn_steps, bn_batch_size,
            reused=validation_data is not None,
        )
        if backup_dir is not None and not isinstance(
            backup_dir, (str, os.PathLike)
        ):
            raise TypeError(
                "`backup_dir` must be a directory path or None. Received: "
                f"backup_dir={backup_dir!r}"
            )
        self.start_epoch = start_epoch
        self.swa_lr = swa_lr
        self.anneal_epochs = anneal_epochs
        self.anneal_strategy = anneal_strategy
        self.average_period = average_period
        self.bn_data = bn_data
        self.bn_steps = bn_steps
        self.bn_batch_size = bn_batch_size
        self.validation_data = validation_data
        self.backup_dir = None if backup_dir is None else os.fspath(backup_dir)
        self.verbose = verbose
        self.allow_averaging_optimizer = allow_averaging_optimizer
        self._averages = None
        self._diverged = False
        self._n_averaged = keras.Variable(
            # "int", as the optimizers: int64 on TensorFlow, int32 elsewhere
            # (JAX has no int64 by default).
            0, dtype="int", trainable=False, name="n_averaged"
        )
        self._start = None
        self._lr0 = None
        self._resumed_after_epoch = None

    def _schedule(self):
        if self._start is None:
            return "It has not run in a `fit` yet."
        return (
            f"It averages from epoch {self._start} (0-based; "
            f"start_epoch={self.start_epoch}) every {self.average_period} "
            "epoch(s) (average_period), and the last epoch; `fit` stopped "
            "before."
        )

    def on_train_begin(self, logs=None):
        epochs = self.params["epochs"]
        self._start = self._resolve_start_epoch(epochs)
        self._check_optimizer()
        _callback_order.check_nothing_restores_after(self)
        if self.validation_data is not None:
            _callback_order.check_metrics_come_first(self, "val_swa_")
        self._create_averages()
        self._n_averaged.assign(0)
        self._diverged = False
        self._lr0 = None
        self._rate_epoch = None
        self._resumed_after_epoch = None
        if self.backup_dir is not None:
            self._restore_backup()
        self._base_schedule = None
        if self.swa_lr is not None:
            self._take_over_schedule()

    def _new_averages(self, name):
        """Zero averages of the model's trainable variables, counted by
        `n_averaged` and created as the callback's own (a subclass keeps its
        further moments alike: same dtypes, same distribution)."""
        return engine.Averages(
            self.model.trainable_variables,
            self._n_averaged,
            lambda shape, dtype, name, layout: keras.Variable(
                initializer="zeros",
                shape=shape,
                dtype=dtype,
                trainable=False,
                name=name,
                layout=layout,
            ),
            name=name,
        )

    def _create_averages(self):
        """Creates what the callback keeps for a fit (before a backup is
        read into it)."""
        self._averages = self._new_averages("swa_average")

    def _state(self):
        """The averages as NumPy arrays, for the backup file."""
        return self._averages.get_state()

    def _set_state(self, state, path):
        """Loads what `_state` returned, read from the backup `path`."""
        self._averages.set_state(state, path)

    def on_epoch_begin(self, epoch, logs=None):
        if self._resumed_after_epoch is not None:
            self._check_resumed_epoch(epoch)
        if epoch < self._start:
            return
        if epoch == self._start and self.verbose:
            print(
                f"\nEpoch {epoch + 1}: StochasticWeightAveraging starts "
                "averaging at the end of this epoch."
            )
        if self.swa_lr is not None and self._base_schedule is None:
            # Set at the first batch, after every callback's
            # `on_epoch_begin`: a `LearningRateScheduler` later in the list
            # would otherwise override the SWA rate.
            self._rate_epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self._rate_epoch is None:
            return
        optimizer = _optimizer_chain(self.model.optimizer)[-1]
        if self._lr0 is None:
            self._lr0 = float(optimizer.learning_rate.numpy())
        optimizer.learning_rate = self._annealed_learning_rate(
            self._rate_epoch - self._start
        )
        self._rate_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        last_epoch = epoch == self.params["epochs"] - 1
        on_period = bool(
            averaging.is_snapshot_step(epoch, self._start, self.average_period)
        )
        if epoch >= self._start and (
            on_period or last_epoch or self.model.stop_training
        ):
            self._fold_in(epoch)
            if (
                self.validation_data is not None
                and logs is not None
                and self._averages.n_averaged > 0
            ):
                # The same `logs` dict goes to the callbacks after this one,
                # History and the progress bar among them.
                logs.update(self._evaluate_average())
        if self.backup_dir is not None:
            self._write_backup(epoch)

    def on_train_end(self, logs=None):
        self._give_back_schedule()
        if not self._diverged and not self._averages.variables_finite():
            self._diverged = True
        if self._averages.n_averaged == 0:
            warnings.warn(
                "StochasticWeightAveraging averaged no epoch: training "
                f"stopped before `start_epoch` (epoch {self._start}). The "
                "model keeps its trained weights.",
                stacklevel=2,
            )
        else:
            # Only the statistics training updates go stale: frozen BN
            # layers are not among them.
            if self.bn_data is None and batch_norm.statistics_variables(
                self.model
            ):
                warnings.warn(
                    "The model has BatchNormalization layers, whose "
                    "statistics were computed for the raw weights, not for "
                    "their average: they are stale. Pass `bn_data` (such as "
                    "the training data) to StochasticWeightAveraging, or call "
                    "`keras_swa.update_bn(model, data)` after `fit`.",
                    stacklevel=2,
                )
            weights.assign_average(
                self.model,
                source=self,
                bn_data=self.bn_data,
                bn_steps=self.bn_steps,
                bn_batch_size=self.bn_batch_size,
                verbose=1 if self.verbose else 0,
            )
        if self.backup_dir is None:
            return
        path = os.path.join(self.backup_dir, BACKUP_FILENAME)
        if self._diverged:
            # Ended by `TerminateOnNaN`, say: the average of the epochs
            # before is the one good thing left of this fit. (A fit that
            # ends by an exception never gets here, and keeps it too.)
            warnings.warn(
                "StochasticWeightAveraging keeps its backup "
                f"{path!r}: the weights diverged (NaN or infinity) in this "
                "fit. It holds the average of the finite snapshots and "
                "resumes from it; delete it to start over.",
                stacklevel=2,
            )
        elif os.path.exists(path):
            os.remove(path)

    def _resolve_start_epoch(self, epochs):
        if isinstance(self.start_epoch, numbers.Integral):
            start = int(self.start_epoch)
        else:
            # The decimal the user wrote, not its binary float: 0.29 * 100
            # is 28.999999999999996 in floats.
            fraction = fractions.Fraction(repr(float(self.start_epoch)))
            start = max(0, min(math.floor(fraction * epochs), epochs - 1))
        if start >= epochs:
            raise ValueError(
                f"`start_epoch` is past the last epoch: averaging would start "
                f"at epoch {start} (0-based), but `fit` runs epochs={epochs}, "
                f"so its last epoch is {epochs - 1}. Received: "
                f"start_epoch={self.start_epoch}"
            )
        return start

    def _check_optimizer(self):
        chain = _optimizer_chain(self.model.optimizer)
        wrappers = [
            optimizer
            for optimizer in chain
            if isinstance(optimizer, optimizers.AveragedOptimizer)
        ]
        if wrappers and not self.allow_averaging_optimizer:
            raise ValueError(
                "The model's optimizer is a keras_swa averaging wrapper "
                f"({type(wrappers[0]).__name__}) and StochasticWeightAveraging "
                "keeps an average too: two averages of one model. Use one of "
                "them, or pass `allow_averaging_optimizer=True` to keep both."
            )

    def _take_over_schedule(self):
        """With a `LearningRateSchedule`, the SWA phase joins the schedule.

        The schedule runs unchanged until the first step of `start_epoch`;
        from there `keras_swa.SWALearningRate` anneals from its value to
        `swa_lr` over `anneal_epochs` epochs of steps, inside the compiled
        train step. The train function is traced anew for it, and for the
        original schedule, which comes back at the end of `fit`.
        """
        optimizer = _optimizer_chain(self.model.optimizer)[-1]
        schedule = _schedule_of(optimizer)
        if schedule is None:
            return
        steps = self.params.get("steps")
        if not steps:
            raise ValueError(
                "StochasticWeightAveraging needs the number of steps per "
                "epoch to hand a `LearningRateSchedule` over to `swa_lr`, "
                "and `fit` does not know it for this data: pass "
                "`steps_per_epoch` to `fit`."
            )
        phase = dict(
            swa_start=self._start * steps,
            swa_lr=self.swa_lr,
            anneal_steps=self.anneal_epochs * steps,
            anneal_strategy=self.anneal_strategy,
        )
        if isinstance(schedule, schedules.SWALearningRate):
            ours = schedule.cycle_length is None and all(
                getattr(schedule, key) == value
                for key, value in phase.items()
            )
            if not ours:
                raise ValueError(
                    "The optimizer's learning rate is already a "
                    "`keras_swa.SWALearningRate` with its own SWA phase; "
                    "StochasticWeightAveraging's `swa_lr` would add a "
                    "second one. Pass `swa_lr=None` to the callback, or "
                    "compile with the base schedule."
                )
            # Saved in the middle of a fit with this callback: resume it.
            schedule = schedule.base
        self._base_schedule = schedule
        optimizer.learning_rate = schedules.SWALearningRate(schedule, **phase)
        self.model.make_train_function(force=True)

    def _give_back_schedule(self):
        if self._base_schedule is None:
            return
        optimizer = _optimizer_chain(self.model.optimizer)[-1]
        optimizer.learning_rate = self._base_schedule
        self._base_schedule = None
        self.model.make_train_function(force=True)

    def _annealed_learning_rate(self, k):
        if self.anneal_epochs == 0:
            alpha = 1.0
        else:
            t = min(1.0, k / self.anneal_epochs)
            alpha = float(schedules.anneal_weight(t, self.anneal_strategy))
        return self.swa_lr * alpha + self._lr0 * (1.0 - alpha)

    def _fold_in(self, epoch):
        if not self._averages.variables_finite():
            self._diverged = True
            warnings.warn(
                f"Epoch {epoch + 1}: StochasticWeightAveraging skipped this "
                "epoch's snapshot: the weights hold NaN or infinity (training "
                f"diverged). The average keeps its "
                f"{self._averages.n_averaged} earlier snapshot(s).",
                stacklevel=2,
            )
            return
        self._averages.fold_in(True, averaging.swa_weight)
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: StochasticWeightAveraging folded the "
                f"weights in (n_averaged={int(self._n_averaged.numpy())})."
            )

    def _evaluate_average(self):
        return evaluation.evaluate_average(
            self.model,
            self,
            self.validation_data,
            self.bn_data,
            self.bn_steps,
            self.bn_batch_size,
            "val_swa_",
        )

    def _check_resumed_epoch(self, epoch):
        expected = self._resumed_after_epoch + 1
        self._resumed_after_epoch = None
        if epoch != expected:
            raise ValueError(
                "The StochasticWeightAveraging backup in "
                f"{self.backup_dir!r} is from a fit that ended after epoch "
                f"{expected - 1} (0-based), but this fit starts at epoch "
                f"{epoch}. Resume with `keras.callbacks.BackupAndRestore` "
                "in the callbacks (it restores the weights and the epoch), or "
                "delete the backup to start over."
            )

    def _write_backup(self, epoch):
        state = {
            "epoch": np.int64(epoch),
            "start_epoch": np.int64(self._start),
            "average_period": np.int64(self.average_period),
            "lr0": np.float64(np.nan if self._lr0 is None else self._lr0),
            **self._state(),
        }
        os.makedirs(self.backup_dir, exist_ok=True)
        # A crash mid-write must leave the previous backup intact: write a
        # temporary file beside it, then rename it over the old one.
        handle, temporary = tempfile.mkstemp(
            dir=self.backup_dir, suffix=".npz.tmp"
        )
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **state)
                file.flush()
                os.fsync(file.fileno())
            os.replace(
                temporary, os.path.join(self.backup_dir, BACKUP_FILENAME)
            )
        except BaseException:
            os.remove(temporary)
            raise

    def _restore_backup(self):
        path = os.path.join(self.backup_dir, BACKUP_FILENAME)
        if not os.path.exists(path):
            return
        with np.load(path) as file:
            state = dict(file)
        saved = (int(state["start_epoch"]), int(state["average_period"]))
        expected = (self._start, self.average_period)
        if saved != expected:
            raise ValueError(
                f"The StochasticWeightAveraging backup {path!r} does not "
                "match this fit: it was written for (start epoch, "
                f"average_period)={saved}, while this fit has {expected}. "
                "Delete it to start over."
            )
        self._set_state(state, path)
        lr0 = float(state["lr0"])
        self._lr0 = None if math.isnan(lr0) else lr0
        self._resumed_after_epoch = int(state["epoch"])
