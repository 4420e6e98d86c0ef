"""The SWA learning-rate phase of the epoch callbacks.

From epoch `start_epoch` on, `StochasticWeightAveraging` (and `SWAG`) anneal
the optimizer's learning rate to `swa_lr`: per epoch on a float learning
rate, per update on a `LearningRateSchedule`, which a
`keras_swa.SWALearningRate` then wraps for the length of `fit`.
"""

import keras
import numpy as np

from keras_swa import _validation
from keras_swa import schedules


def check_arguments(swa_lr, anneal_epochs, anneal_strategy):
    """Checks the arguments of the phase; returns them as Python values.

    Raises:
        TypeError, ValueError: naming the argument.
    """
    swa_lr = _validation.real("swa_lr", swa_lr, minimum=0.0, optional=True)
    anneal_epochs = _validation.integer("anneal_epochs", anneal_epochs, 0)
    schedules.check_anneal_strategy(anneal_strategy)
    return swa_lr, anneal_epochs, anneal_strategy


def optimizer_chain(optimizer):
    """The optimizer and those it wraps, outermost first."""
    chain = [optimizer]
    # LossScaleOptimizer and the keras_swa wrappers both name the optimizer
    # they delegate to `inner_optimizer`.
    while hasattr(chain[-1], "inner_optimizer"):
        chain.append(chain[-1].inner_optimizer)
    return chain


def _learning_rate_value(optimizer):
    """The optimizer's current learning rate, as a Python float."""
    rate = optimizer.learning_rate
    if isinstance(rate, keras.Variable):
        # `ops.convert_to_numpy` of a TensorFlow variable warns under NumPy 2.
        rate = rate.numpy()
    return float(np.asarray(keras.ops.convert_to_numpy(rate)))


def _schedule_step(optimizer):
    """The step Keras evaluates the optimizer's learning-rate schedule at."""
    if optimizer.gradient_accumulation_steps:
        # The micro-step count: `iterations` counts updates under gradient
        # accumulation (floor-divided), and Keras gives the schedule the
        # private `_iterations` (no public accessor for it).
        return int(np.asarray(optimizer._iterations.numpy()))
    return int(np.asarray(optimizer.iterations.numpy()))


def _schedule_of(optimizer):
    # Keras' `learning_rate` property evaluates a schedule at the current
    # step; the schedule object itself is only held in `_learning_rate`
    # (there is no public accessor). A float rate is a `keras.Variable`.
    rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        return rate
    return None


class LearningRatePhase:
    """The learning rate of the innermost optimizer during one `fit`.

    With a float learning rate, the rate of epoch `start + k` is
    `swa_lr * alpha + lr0 * (1 - alpha)`, `lr0` the rate when epoch `start`
    begins and `alpha = anneal(min(1, k / anneal_epochs))`. It is set when
    the epoch begins, so the callbacks after the owner see it, and again at
    its first batch, after every callback's `on_epoch_begin`: a
    `LearningRateScheduler` later in the list would override it (and if one
    does at epoch `start`, `lr0` is its rate). On JAX the first batch is
    also the last moment a set variable reaches the epoch's train steps.

    With a `LearningRateSchedule`, the schedule runs unchanged until the
    first update of epoch `start`, counted from the optimizer's step at the
    first epoch of this `fit` (a second `fit`, an `initial_epoch` and a
    resume place it right), then a `SWALearningRate` anneals per update.

    Args:
        model: The model in `fit`.
        swa_lr: Float >= 0, or `None` for no phase (nothing is changed).
        anneal_epochs: Integer >= 0, the epochs of the annealing.
        anneal_strategy: "cos" or "linear".
        start: Integer, the 0-based epoch where the phase starts.
        steps: The steps per epoch of the `fit`, or `None` if unknown.

    Raises:
        ValueError: with a schedule, if `steps` is unknown or the schedule
            already is a `SWALearningRate` with another phase.
    """

    def __init__(self, model, swa_lr, anneal_epochs, anneal_strategy, start,
                 steps):
        self._model = model
        self._swa_lr = swa_lr
        self._anneal_epochs = anneal_epochs
        self._anneal_strategy = anneal_strategy
        self._start = start
        self._steps = steps
        self._lr0 = None
        self._lr0_provisional = False
        self._rate_set = None
        self._rate_epoch = None
        self._phase_start = None
        self._base_schedule = None
        self._pending_schedule = None
        if swa_lr is not None:
            self._pending_schedule = self._find_schedule()

    def _optimizer(self):
        return optimizer_chain(self._model.optimizer)[-1]

    def get_state(self) -> dict:
        """`lr0` (NaN until known) and the first update of a schedule's
        phase (-1 until placed), for the callback's backup."""
        return {
            "lr0": np.float64(np.nan if self._lr0 is None else self._lr0),
            "swa_start_step": np.int64(
                -1 if self._phase_start is None else self._phase_start
            ),
        }

    def set_state(self, state: dict) -> None:
        """Loads what `get_state` returned (a backup of an earlier version
        has no `swa_start_step`: the phase is then placed anew)."""
        lr0 = float(state["lr0"])
        self._lr0 = None if np.isnan(lr0) else lr0
        phase_start = int(state.get("swa_start_step", -1))
        self._phase_start = None if phase_start < 0 else phase_start

    def epoch_begin(self, epoch: int) -> None:
        """Places a schedule's phase (first epoch) or sets the epoch's rate."""
        if self._pending_schedule is not None:
            self._take_over_schedule(epoch)
        if self._swa_lr is None or self._base_schedule is not None:
            return
        if epoch < self._start:
            return
        optimizer = self._optimizer()
        if self._lr0 is None:
            self._lr0 = _learning_rate_value(optimizer)
            # Until the first batch shows whether a later callback set
            # this epoch's rate: the phase then anneals from that one.
            self._lr0_provisional = True
        self._rate_epoch = epoch
        optimizer.learning_rate = self._annealed(epoch - self._start)
        if self._lr0_provisional:
            self._rate_set = _learning_rate_value(optimizer)

    def batch_begin(self) -> None:
        """Sets the epoch's rate again at its first batch."""
        if self._rate_epoch is None:
            return
        optimizer = self._optimizer()
        if self._lr0_provisional:
            self._lr0_provisional = False
            rate = _learning_rate_value(optimizer)
            if rate != self._rate_set:
                self._lr0 = rate
        optimizer.learning_rate = self._annealed(self._rate_epoch - self._start)
        self._rate_epoch = None

    def end(self) -> None:
        """Gives a schedule back to the optimizer at the end of `fit`."""
        if self._base_schedule is None:
            return
        self._optimizer().learning_rate = self._base_schedule
        self._base_schedule = None
        self._model.make_train_function(force=True)

    def _annealed(self, k):
        if self._anneal_epochs == 0:
            alpha = 1.0
        else:
            t = min(1.0, k / self._anneal_epochs)
            alpha = float(schedules.anneal_weight(t, self._anneal_strategy))
        return self._swa_lr * alpha + self._lr0 * (1.0 - alpha)

    def _find_schedule(self):
        """The optimizer's schedule to hand over to `swa_lr`, or `None`."""
        optimizer = self._optimizer()
        schedule = _schedule_of(optimizer)
        if schedule is None:
            return None
        if not self._steps:
            raise ValueError(
                "StochasticWeightAveraging needs the number of steps per "
                "epoch to hand a `LearningRateSchedule` over to `swa_lr`, "
                "and `fit` does not know it for this data: pass "
                "`steps_per_epoch` to `fit` (or `steps=` to the "
                "`keras.callbacks.CallbackList` of a custom training loop)."
            )
        if isinstance(schedule, schedules.SWALearningRate):
            ours = schedule.cycle_length is None and all(
                getattr(schedule, key) == value
                for key, value in self._phase(optimizer).items()
            )
            if not ours:
                raise ValueError(
                    "The optimizer's learning rate is already a "
                    "`keras_swa.SWALearningRate` with its own SWA phase; "
                    "StochasticWeightAveraging's `swa_lr` would add a "
                    "second one. Pass `swa_lr=None` to the callback, or "
                    "compile with the base schedule."
                )
            # Saved in the middle of a fit with this callback: placed anew.
            schedule = schedule.base
        return schedule

    def _phase(self, optimizer):
        """The arguments of the `SWALearningRate` but its start, in updates."""
        accumulation = optimizer.gradient_accumulation_steps or None
        return dict(
            swa_lr=self._swa_lr,
            # The updates of `anneal_epochs` epochs (rounded up where an
            # accumulated update spans two epochs).
            anneal_steps=-(
                -self._anneal_epochs * self._steps // (accumulation or 1)
            ),
            anneal_strategy=self._anneal_strategy,
            gradient_accumulation_steps=accumulation,
        )

    def _take_over_schedule(self, epoch):
        """Places the phase where epoch `start` of this fit begins: `epoch`
        is the fit's first. A phase that would have begun before the
        optimizer's first update (an `initial_epoch` past `start` with a
        fresh optimizer) begins there. The train function is traced anew
        for it, and for the original schedule at the end."""
        schedule, self._pending_schedule = self._pending_schedule, None
        optimizer = self._optimizer()
        phase = self._phase(optimizer)
        if self._phase_start is None:
            # A resumed fit reuses the backup's: the step now may be in
            # the middle of an epoch (`BackupAndRestore(save_freq=n)`).
            first = (
                _schedule_step(optimizer) + (self._start - epoch) * self._steps
            )
            accumulation = phase["gradient_accumulation_steps"] or 1
            # The update whose rate is evaluated first in that epoch.
            self._phase_start = max(0, first // accumulation)
        self._base_schedule = schedule
        optimizer.learning_rate = schedules.SWALearningRate(
            schedule, swa_start=self._phase_start, **phase
        )
        self._model.make_train_function(force=True)
