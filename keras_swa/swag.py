"""SWA-Gaussian (Maddox et al., 2019): a Gaussian posterior of the weights
fitted to the SGD iterates of the SWA phase."""

import inspect
import math
import random
import warnings

import keras
import numpy as np
from keras import ops

from keras_swa import _validation
from keras_swa import callbacks
from keras_swa._backend import placement
from keras_swa._backend import random as backend_random

# The floor of the diagonal variance (as the reference code,
# wjmaddox/swa_gaussian): a sample takes its square root.
VARIANCE_FLOOR = 1e-30

_VARIANCE = "swag_variance_"
# The key of the raw second moment `sq_mean` in backups of earlier versions.
_OLD_SECOND_MOMENT = "swag_second_moment_"
_MAX_RANK = "swag_max_rank"


def _deviation_prefix(slot):
    return f"swag_deviation_{slot}_"


class SWAG(callbacks.StochasticWeightAveraging):
    """SWA-Gaussian: a Gaussian over the weights, from the SWA snapshots.

    A `StochasticWeightAveraging` callback (same schedule, learning-rate
    phase and snapshots; the model ends `fit` holding the SWA mean, with
    BatchNormalization recomputed on `bn_data`) that also keeps, at each
    snapshot `w`:

    - `mean`, the running mean of `w` (the SWA average, `average_variables`);
    - `var`, the variance of the snapshots, `mean((w - mean)**2)`
      (`variance_variables`), by Welford's update of centred deviations:
      the paper's `sq_mean - mean**2` cancels where the spread is small
      against the weights (float32 weights `1 +- 3e-4` lose it all);
    - the deviation `w - mean` (with `mean` already updated for `w`) as a
      column of `D`, keeping the last `max_rank` columns
      (`deviation_variables`).

    The posterior is the Gaussian of mean `mean` and covariance
    `scale * (diag(max(var, 1e-30)) + D D^T / (K - 1))`, with `K` the
    columns held (`rank`) and `scale` 0.5 by default (the paper's);
    `sample` draws from it, `keras_swa.sampled_weights` swaps a sample into
    the model, and `keras_swa.predict_bma` averages the predictions of many
    samples (Bayesian model averaging), which usually lowers the NLL and
    calibration error of the SWA model at the same accuracy. With fewer
    than 2 columns (one snapshot, or `max_rank=1`) a sample has no low-rank
    term: SWAG warns once (not with `max_rank=0`, the diagonal by choice).

    `D` is a ring buffer: the `j`-th snapshot (1-based) goes to column slot
    `(j - 1) % max_rank`, overwriting the snapshot `max_rank` before it. The
    slots are used in slot order (the order does not change the
    distribution).

    With `window=k`, `mean` and `var` are those of the last `min(n, k)`
    snapshots (the variance computed exactly from the window's ring, see
    `_window_variances`), and the columns of `D` deviate from that mean.

    Memory: `max_rank + 2` copies of the trainable weights (mean, variance,
    `max_rank` columns; float32 for float16 and bfloat16 variables), created
    like the weights (sharded, mirrored under `tf.distribute`), or in host
    memory with `offload=True`, all saved to the backup file with
    `backup_dir`: 22 copies, 2.25 GB, for a ResNet-50 in float32 with
    `max_rank=20`; 2 with `max_rank=0` (the diagonal only); `window - 1`
    more with a window.

    Args:
        start_epoch: As in `StochasticWeightAveraging`: an integer >= 0, the
            0-based first epoch of the snapshots, or a float in (0, 1], a
            fraction of `epochs`. Defaults to `0.75`.
        max_rank: Integer >= 0, the deviation columns kept (the rank of the
            low-rank covariance; the paper uses 20). `0` or `1` samples from
            the diagonal only (`1` with a warning). Defaults to `20`.
        *args: The other arguments of `StochasticWeightAveraging`, in its
            order after `start_epoch` (`swa_lr`, `anneal_epochs`,
            `anneal_strategy`, `average_period`, `bn_data`, `bn_steps`,
            `validation_data`, `backup_dir`, `verbose`,
            `allow_averaging_optimizer`, `bn_batch_size`, `window`,
            `offload`), with its defaults. `bn_data` and `validation_data`
            apply to the SWA mean; `backup_dir` keeps all the moments;
            `window` applies to the mean and variance, `offload` to every
            moment.
        **kwargs: The same arguments, by name.

    Example:

    >>> swag = keras_swa.SWAG(start_epoch=0.5, max_rank=20, swa_lr=0.01,
    ...                       bn_data=train_ds)  # doctest: +SKIP
    >>> model.fit(train_ds, epochs=40, callbacks=[swag])  # doctest: +SKIP
    >>> probs = keras_swa.predict_bma(model, x_test, source=swag,
    ...                               bn_data=train_ds)  # doctest: +SKIP
    """

    log_name = "swag"

    def __init__(
        self, start_epoch: int | float = 0.75, max_rank: int = 20, *args,
        **kwargs,
    ):
        max_rank = _validation.integer("max_rank", max_rank, 0)
        # The other arguments are `StochasticWeightAveraging`'s, in its
        # order after `start_epoch`: written once, there.
        super().__init__(start_epoch, *args, **kwargs)
        self.max_rank = max_rank
        self._variance = None
        self._deviations = []
        self._warned_diagonal = False

    @property
    def rank(self) -> int:
        """The deviation columns held: `min(n_averaged, max_rank)`."""
        return min(int(np.asarray(self._n_averaged.numpy())), self.max_rank)

    @property
    def variance_variables(self):
        """The variances of the snapshots, `mean((w - mean)**2)`, one per
        `model.trainable_variables` entry, in order (before the floor of
        1e-30 that sampling applies)."""
        return [] if self._variance is None else list(self._variance.averages)

    @property
    def deviation_variables(self):
        """The deviation columns: `max_rank` lists (slot `k` holds the
        snapshot `j` with `(j - 1) % max_rank == k`), each with one variable
        per `model.trainable_variables` entry."""
        return [list(columns.averages) for columns in self._deviations]

    def on_train_begin(self, logs=None):
        self._warned_diagonal = False
        super().on_train_begin(logs)

    def _create_averages(self):
        super()._create_averages()
        self._variance = self._new_averages("swag_variance")
        self._deviations = [
            self._new_averages(f"swag_deviation_{slot}")
            for slot in range(self.max_rank)
        ]

    def _add_snapshot(self, epoch):
        before = self._averages.n_averaged
        super()._add_snapshot(epoch)
        n_averaged = self._averages.n_averaged
        if n_averaged == before:
            # A snapshot of non-finite weights, skipped for the mean too.
            return
        # Computed where the weights live (offloaded moments come back for
        # it, one variable at a time), in the dtype of the averages.
        means = self._averages.average_values()
        # `w - mean` with the updated mean: close values, subtracted
        # exactly.
        deviations = [
            ops.subtract(ops.cast(variable.value, mean.dtype), mean)
            for variable, mean in zip(self._averages.variables, means)
        ]
        if self.window is not None:
            self._variance.assign_values(
                _window_variances(self._averages, means, n_averaged)
            )
        elif n_averaged > 1:
            # A single snapshot has variance 0, as the fresh variables hold.
            self._variance.assign_values(
                _updated_variances(
                    self._variance.average_values(), deviations, n_averaged
                )
            )
        if self.max_rank:
            slot = (n_averaged - 1) % self.max_rank
            self._deviations[slot].assign_values(deviations)

    def _state(self):
        state = super()._state()
        state[_MAX_RANK] = np.int64(self.max_rank)
        state.update(self._variance.get_state(prefix=_VARIANCE))
        for slot, columns in enumerate(self._deviations):
            state.update(columns.get_state(prefix=_deviation_prefix(slot)))
        return state

    def _set_state(self, state, path):
        saved = int(state[_MAX_RANK]) if _MAX_RANK in state else None
        if saved != self.max_rank:
            written_by = (
                "StochasticWeightAveraging (no SWAG moments)"
                if saved is None
                else f"SWAG with max_rank={saved}"
            )
            raise ValueError(
                f"The backup {path!r} was written by {written_by}, and this "
                f"fit runs SWAG with max_rank={self.max_rank}. Resume with "
                "the same callback, or delete the backup to start over."
            )
        _check_not_second_moment(state, path)
        super()._set_state(state, path)
        self._variance.set_state(state, path, prefix=_VARIANCE)
        for slot, columns in enumerate(self._deviations):
            columns.set_state(state, path, prefix=_deviation_prefix(slot))

    def _check_sampled(self):
        _check_sampled(self)

    def _sample_values(self, scale: float, seed, diagonal: bool):
        """A sample as tensors placed like the weights, in the averages'
        dtypes (see `_draw`); a full sample with fewer than 2 columns warns,
        once."""
        variables = self._averages.variables
        means = [mean.value for mean in self._averages.averages]
        if scale == 0.0:
            # Exactly the mean (noise times 0 is NaN where noise is infinite).
            return [
                ops.copy(placement.like(mean, variable))
                for mean, variable in zip(means, variables)
            ]
        rank = self.rank
        # Not with `max_rank=0`, which asks for the diagonal.
        if not diagonal and rank < 2 and self.max_rank and (
            not self._warned_diagonal
        ):
            self._warned_diagonal = True
            _warn_diagonal_only(rank, self._averages.n_averaged, self.max_rank)
        columns = []
        if not diagonal and rank >= 2:
            columns = [
                [column.value for column in slot.averages]
                for slot in self._deviations[:rank]
            ]
        variances = [variance.value for variance in self._variance.averages]
        return _draw(means, variances, columns, scale, seed, variables)

    def sample(
        self, scale: float = 0.5, seed: int | None = None, diagonal: bool = False
    ) -> list:
        """Draws weights from the SWAG posterior.

        `mean + sqrt(scale) * (sqrt(var) * z1 + D @ z2 / sqrt(K - 1))`, with
        `K = rank`, `z1` and `z2` standard normal, and `var` floored at
        1e-30; the low-rank term is left out when `diagonal=True` or `K < 2`
        (then with a warning, once, unless `max_rank=0`). Its covariance is
        `scale * (diag(var) + D D^T / (K - 1))` (`scale * diag(var)` with
        `diagonal=True`); `scale=0.5` is the paper's. `scale=0` returns the
        SWA mean exactly.

        Args:
            scale: Float >= 0, the factor of the covariance. Defaults to
                `0.5`.
            seed: Integer >= 0: the same seed gives the same sample (on the
                same backend); or `None` for a fresh one (from Keras' global
                seed, `keras.utils.set_random_seed`). Defaults to `None`.
            diagonal: Whether to sample from the diagonal part only
                (SWAG-Diagonal). Defaults to `False`.

        Returns:
            A list of NumPy arrays, one per `model.trainable_variables`
            entry, in the dtype of the averages (float32 for float16 and
            bfloat16 variables; the variable's own dtype otherwise).

        Raises:
            ValueError: if nothing was folded in yet, or on a bad argument.

        Example:

        >>> weights = swag.sample(scale=0.5, seed=0)  # doctest: +SKIP
        >>> [w.shape for w in weights] == [
        ...     tuple(v.shape) for v in model.trainable_variables
        ... ]  # doctest: +SKIP
        True
        """
        scale, seed, diagonal = check_sample_arguments(scale, seed, diagonal)
        self._check_sampled()
        return [
            np.asarray(ops.convert_to_numpy(value))
            for value in self._sample_values(scale, seed, diagonal)
        ]


def _check_sampled(swag):
    if swag._averages is None or swag._averages.n_averaged == 0:
        raise ValueError(
            "SWAG has no snapshot yet (n_averaged=0), so there is no "
            "posterior to sample from. " + swag._schedule()
        )


def _updated_variances(variances, deviations, n):
    """The variances after the `n`-th snapshot (`n >= 2`), by Welford's
    update of `M2 = n * var` written for `var`: with `d = w - mean_n` (the
    updated mean), `M2_n = M2_(n-1) + n / (n - 1) * d**2`, so
    `var_n = var_(n-1) * (n - 1) / n + d**2 / (n - 1)`. No difference of two
    large moments: the paper's `sq_mean - mean**2` cancels where the spread
    is small against the weights."""
    return [
        ops.add(
            ops.multiply(variance, (n - 1) / n),
            ops.divide(ops.square(deviation), n - 1),
        )
        for variance, deviation in zip(variances, deviations)
    ]


def _window_variances(averages, means, n):
    """The variances of the snapshots in the window of `averages` after its
    `n`-th snapshot, `mean((w - mean)**2)` over them, from its ring and
    updated `means` (placed like the variables).

    The ring holds the last `min(n, k - 1)` snapshots (`k` the window). Once
    `n >= k` the window's oldest snapshot is the one the ring lacks, and its
    deviation from the mean is minus the sum of the ring's (the deviations
    of a set from its mean sum to 0): so the variance is
    `(sum(d**2) + sum(d)**2) / k` with `d` the ring's deviations, each a
    difference of close values (no cancellation), and exact for any `n`.
    """
    window = averages.window
    held = min(n, window)
    values = []
    for ring, mean, variable in zip(averages.rings, means, averages.variables):
        if ring is None:
            # A window of one snapshot: no spread.
            values.append(ops.zeros_like(mean))
            continue
        ring = placement.like(ring.value, variable)
        deviations = ops.subtract(ring[: min(n, window - 1)], mean)
        total = ops.sum(ops.square(deviations), axis=0)
        if n >= window:
            total = ops.add(total, ops.square(ops.sum(deviations, axis=0)))
        values.append(ops.divide(total, ops.cast(held, mean.dtype)))
    return values


def _check_not_second_moment(state, path):
    """Refuses a backup of an earlier version, which held `sq_mean`."""
    if any(key.startswith(_OLD_SECOND_MOMENT) for key in state):
        raise ValueError(
            f"The backup {path!r} was written by an earlier version of "
            "keras_swa, whose SWAG kept the mean of the squared weights: its "
            "variance cannot be recovered without the cancellation that "
            "version suffered, so it cannot be resumed. Delete it to start "
            "over."
        )


def _warn_diagonal_only(rank, n_averaged, max_rank):
    warnings.warn(
        f"SWAG samples from the diagonal only: it holds {rank} deviation "
        f"column(s) (n_averaged={n_averaged}, max_rank={max_rank}), and the "
        "low-rank part of the covariance needs 2. Sample after more "
        "snapshots, or pass `diagonal=True` to ask for SWAG-Diagonal.",
        stacklevel=4,
    )


def _draw(means, variances, columns, scale, seed, variables):
    """`mean + sqrt(scale) * (sqrt(var) * z1 + D @ z2 / sqrt(K - 1))` for
    each variable, `var` floored at `VARIANCE_FLOOR`, `D` its `K` deviation
    `columns` (lists by slot, each with one tensor per variable; none for a
    diagonal sample), computed where each of `variables` lives: offloaded
    moments come to its devices one variable at a time.

    `z2` and each variable's `z1` come from their own stream of
    `keras.random.normal`, seeded by `draw_seeds(seed, ...)`: `z2` by the
    first seed, the `z1` of variable `i` by seed `i + 1`; so a diagonal
    sample draws the same `z1` as a full one.
    """
    rank = len(columns)
    seeds = draw_seeds(seed, 1 + len(means))
    z2 = keras.random.normal((rank,), seed=seeds[0]) if rank else None
    root_scale = math.sqrt(scale)
    values = []
    for index, (mean, variance, z1_seed, variable) in enumerate(
        zip(means, variances, seeds[1:], variables)
    ):
        mean = placement.like(mean, variable)
        variance = placement.like(variance, variable)
        variance = ops.maximum(variance, ops.cast(VARIANCE_FLOOR, mean.dtype))
        # Drawn like `mean` (shard by shard where it is sharded).
        z1 = backend_random.normal_like(mean, z1_seed)
        noise = ops.multiply(ops.sqrt(variance), z1)
        if rank:
            z = ops.cast(z2, mean.dtype)
            # One column at a time: stacking `D` would hold another `rank`
            # copies of the variable.
            def column(slot):
                return placement.like(columns[slot][index], variable)

            deviation = ops.multiply(z[0], column(0))
            for slot in range(1, rank):
                deviation = ops.add(deviation, ops.multiply(z[slot], column(slot)))
            noise = ops.add(noise, ops.divide(deviation, math.sqrt(rank - 1)))
        values.append(ops.add(mean, ops.multiply(root_scale, noise)))
    return values


def draw_seeds(seed, count):
    """`count` independent integer seeds for `keras.random`, derived from
    `seed` by `numpy.random.SeedSequence` (integer seeds keep the draws free
    of state: a `keras.random.SeedGenerator` is a variable, slow to create
    in eager TensorFlow). `seed=None` takes a fresh seed from Python's
    `random`, which `keras.utils.set_random_seed` seeds."""
    if seed is None:
        seed = random.getrandbits(64)
    return [int(value) for value in np.random.SeedSequence(seed).generate_state(count)]


def check_sample_arguments(scale, seed, diagonal=False):
    """Checks the arguments of a SWAG sample; returns them as Python values."""
    return (
        _validation.real("scale", scale, minimum=0.0, below=math.inf),
        _validation.integer("seed", seed, 0, optional=True),
        _validation.boolean("diagonal", diagonal),
    )


def _signature():
    """SWAG's signature as written out: `StochasticWeightAveraging`'s, with
    `max_rank` after `start_epoch` (for `help`, `inspect` and editors)."""
    parent = inspect.signature(callbacks.StochasticWeightAveraging.__init__)
    parameters = list(parent.parameters.values())
    max_rank = inspect.Parameter(
        "max_rank", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=20,
        annotation=int,
    )
    return parent.replace(
        parameters=parameters[:2] + [max_rank] + parameters[2:]
    )


SWAG.__init__.__signature__ = _signature()
