"""The averaging engine: the one place where averages of weights are kept.

Every averager of keras_swa (the optimizer wrappers inside the compiled train
step, the `fit` callbacks between epochs) holds its averages in an `AverageState`,
which owns their whole state: the average variables, the rule's running
scalars, the ring of a window, the snapshot counter it is given; where they
live; the fold-in on each backend; the copy into a model; the saved state. So
the rules that make an average right hold for all of them alike:

- an average of a float16 or bfloat16 variable is float32 (thousands of
  snapshots would drown in the rounding of a narrow type); float32 and
  float64 variables are averaged in their own type, and the rule's weight of
  a snapshot is computed in that type (float64 end to end);
- an average is created beside its variable: sharded like it
  (`keras.distribution` layouts) and, under `tf.distribute`, mirrored like
  it; or, with `offload=True`, in host memory;
- a rule sees the snapshot count, the step and the learning rate of the
  update (`keras_swa.averaging.Rule`); a window keeps the last snapshots and
  averages them exactly;
- a non-finite average is never copied into a model.

How an averager uses it (the optimizer wrappers in `keras_swa.optimizers`;
a `fit` callback alike, with `keras.Variable`s of its own):

    counter = keras.Variable(0, dtype="int", trainable=False)
    averages = engine.AverageState(
        model.trainable_variables, counter, create_variable,
        rule=averaging.Uniform(), window=None, offload=False)
    averages.add_snapshot(True, step=epoch)          # a snapshot
    averages.assign_to(model.variables, "SWA", schedule)
    state = averages.get_state()                # NumPy, for a backup file
"""

import re

import keras
import numpy as np
from keras import ops

from keras_swa import averaging
from keras_swa._backend import snapshot as snapshot_lib
from keras_swa import _validation
from keras_swa._backend import numpy_value
from keras_swa._backend import placement
from keras_swa._backend import variable_value

_NARROW_FLOATS = ("float16", "bfloat16")


def average_dtype(dtype) -> str:
    """The dtype in which a variable of `dtype` is averaged.

    Args:
        dtype: A dtype (string or backend dtype).

    Returns:
        `"float32"` for float16 and bfloat16, else `dtype` as a string.

    Example:

    >>> average_dtype("bfloat16")
    'float32'
    """
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in _NARROW_FLOATS else dtype


def variable_name(variable) -> str:
    """A name for a variable derived from `variable`, as Keras' optimizers
    name their slots: its path with `/` replaced (a plain `tf.Variable` in a
    custom loop has a name but no path)."""
    name = getattr(variable, "path", None) or variable.name
    return str(name).replace("/", "_").replace(":", "_")


def python_int(value) -> int:
    """A scalar integer variable or tensor as a Python int, eagerly.

    Tensors too, such as an optimizer's `iterations` under gradient
    accumulation (computed from a variable; a JAX array has no `.numpy()`).

    Args:
        value: A scalar integer `keras.Variable` or tensor.

    Returns:
        A Python int.
    """
    return int(numpy_value(value))


def all_finite(variables) -> bool:
    """Whether every element of every variable is finite (eagerly).

    Args:
        variables: List of `keras.Variable`s or tensors.

    Returns:
        A Python bool.
    """
    for variable in variables:
        value = variable_value(variable)
        if not keras.backend.is_float_dtype(keras.backend.standardize_dtype(
            value.dtype
        )):
            continue
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(value)))):
            return False
    return True


class Averager:
    """What every averager shows of its averages, as the wrappers of
    `tensorflow_addons` did: `average_variables`, `n_averaged` and
    `assign_average_vars`.

    A base of the optimizer wrappers and of the `fit` callbacks. They keep
    an `AverageState` in `self._averages` (`None` until they are built or `fit`
    runs) and its counter in `self._n_averaged`, and say in `_schedule()`
    when they take snapshots and how far training got.
    """

    @property
    def average_variables(self):
        """The averages, one per trainable variable, in the same order
        (float32 for float16 and bfloat16 variables)."""
        return [] if self._averages is None else list(self._averages.averages)

    @property
    def n_averaged(self):
        """Scalar integer variable: the snapshots folded in so far."""
        return self._n_averaged

    def assign_average_vars(self, var_list) -> None:
        """Copies the averages into the given model variables.

        Variables without an average (BatchNorm statistics, say) are left as
        they are, as in `tensorflow_addons`. Run it eagerly, outside a train
        step.

        Args:
            var_list: List of model variables, such as
                `model.trainable_variables` or `model.variables`.

        Raises:
            ValueError: if nothing has been averaged yet, or the averages are
                not finite; the variables are then left untouched.

        Example:

        >>> opt.assign_average_vars(model.variables)  # doctest: +SKIP
        """
        if self._averages is None:
            raise ValueError(
                f"{type(self).__name__} has averaged no snapshot yet "
                f"(n_averaged=0). {self._schedule()}"
            )
        self._averages.assign_to(
            var_list, type(self).__name__, self._schedule()
        )

    def _schedule(self) -> str:
        raise NotImplementedError


class AverageState:
    """The state of the averages of a list of variables, and their counter.

    Each averager creates one `AverageState` for the variables it averages and
    folds snapshots in with its rule: `average <- average + t * (value -
    average)` with `t = rule.weight(snapshot)` (SWA's mean, the EMA and the
    power EMA are such interpolations, see `keras_swa.averaging`), or, with
    a `window`, the exact mean of the last snapshots.

    Memory: one copy of the variables (the averages; float32 for float16
    and bfloat16 variables), and with `window=k` `k - 1` more (the ring of
    the last `k - 1` snapshots); a rule's state is a few scalars.

    Args:
        variables: List of the variables to average (a model's trainable
            variables). An entry of `excluded` gets no average.
        counter: Scalar integer `keras.Variable`, the snapshots folded in
            (`n_averaged`); the averager creates it, so that it exists before
            the averages do. With a window it still counts every snapshot.
        create_variable: Function `(shape, dtype, name, layout) ->
            keras.Variable` that creates a zero-initialized variable of the
            state: an optimizer's `add_variable` (the state is then optimizer
            variables, saved and distributed with it) or `keras.Variable`.
            The engine calls it inside the placement's scope with the
            placement's layout: it must pass `layout` on.
        excluded: Collection of variables, by identity, without an average
            (a float8 layer's variables overwritten with their gradient).
            Defaults to `()`.
        name: String, the suffix of the state's names. Defaults to
            `"average"`.
        rule: A `keras_swa.averaging.Rule`, or a function `n_averaged -> t`;
            its state variables are created here. Defaults to `None`: give
            a rule to each `add_snapshot` instead.
        window: Integer `k >= 1`, or `None`: the average is the uniform
            mean of the last `min(n_averaged, k)` snapshots (a `Uniform`
            rule, or none). Defaults to `None`: every snapshot, by the rule.
        offload: Whether the averages (and a window's ring) live in host
            memory: on the CPU device on TensorFlow, in pinned host memory
            on JAX (sharded like the variables), in CPU tensors on PyTorch;
            each snapshot copies the weights there. The counter and a rule's
            scalars stay where they are. Defaults to `False`: beside the
            variables, sharded like them.

    Raises:
        ValueError: for a window with a rule other than `Uniform`, or
            `offload` where the backend cannot keep the state in host memory.

    Example:

    >>> counter = keras.Variable(0, dtype="int", trainable=False)
    >>> averages = AverageState(model.trainable_variables, counter,
    ...                     lambda shape, dtype, name, layout: keras.Variable(
    ...                         "zeros", shape, dtype, trainable=False,
    ...                         name=name, layout=layout),
    ...                     rule=averaging.Uniform(), window=5,
    ...                     offload=True)  # doctest: +SKIP
    >>> averages.add_snapshot(True, step=epoch)  # doctest: +SKIP
    """

    def __init__(
        self,
        variables,
        counter,
        create_variable,
        excluded=(),
        name: str = "average",
        rule=None,
        window=None,
        offload=False,
    ):
        self.window = _validation.integer("window", window, 1, optional=True)
        self.offload = _validation.boolean("offload", offload)
        self.rule = None if rule is None else averaging.as_rule(rule)
        if self.window is not None and not isinstance(
            self.rule, (type(None), averaging.Uniform)
        ):
            raise ValueError(
                "`window` makes the average the uniform mean of the last "
                f"{self.window} snapshots: it takes no other rule. Received: "
                f"rule={type(self.rule).__name__}"
            )
        self.variables = list(variables)
        self.counter = counter
        if self.offload:
            placement.check_offload(self.variables)
        _create_state(self, create_variable, excluded, name)

    @property
    def n_averaged(self) -> int:
        """The number of snapshots folded in, as a Python int."""
        return python_int(self.counter)

    def _pairs(self):
        return [
            (average, variable)
            for average, variable in zip(self.averages, self.variables)
            if average is not None
        ]

    def add_snapshot(
        self,
        snapshot,
        rule=None,
        skip_non_finite=False,
        step=None,
        learning_rate=None,
    ):
        """Folds the variables' current values in where `snapshot` holds.

        Runs inside a compiled train step or eagerly; a step where `snapshot`
        is false touches no weights.

        Args:
            snapshot: Boolean scalar tensor, a Python bool, or `True` when
                every call is a snapshot (no branch: the compiler may fuse
                the pass with the optimizer's update).
            rule: An `averaging.Rule` without state, or a function
                `n_averaged -> t`. Defaults to `None`: the rule given to
                `AverageState`.
            skip_non_finite: Whether a snapshot whose values are not all
                finite is skipped (an extra read of the weights on snapshot
                steps). Defaults to `False`.
            step: Integer scalar tensor, the index of the update (or epoch)
                the snapshot follows, for rules that read it. Defaults to
                `None`.
            learning_rate: Float scalar tensor, the learning rate of that
                update, for rules that read it. Defaults to `None`.
        """
        snapshot_lib.add_snapshot(
            snapshot,
            [_fold(self, rule)],
            [variable for _, variable in self._pairs()],
            self.counter,
            step=step,
            learning_rate=learning_rate,
            skip_non_finite=skip_non_finite,
        )

    def assign_values(self, values) -> None:
        """Writes given values into the averages, eagerly.

        For moments that are not an interpolation towards the variables
        (SWAG's second moment and deviations); the counter is left alone.

        Args:
            values: List with one tensor per entry of `variables`, cast to
                its average's dtype (`None` where the variable has no
                average). On JAX a value must not be another variable's
                buffer, which `fit` donates: pass computed tensors.
        """
        for average, value in zip(self.averages, values):
            if average is not None:
                average.assign(ops.cast(value, average.dtype))

    def average_values(self) -> list:
        """The averages' values, placed like their variables, eagerly.

        Where the averages are offloaded, each comes back to its variable's
        devices, ready to be computed with it.

        Returns:
            A list with one tensor per entry of `variables` (`None` where
            the variable has no average).
        """
        return [
            None if average is None else placement.like(average.value, variable)
            for average, variable in zip(self.averages, self.variables)
        ]

    def variables_finite(self) -> bool:
        """Whether the averaged variables hold only finite values, eagerly."""
        return all_finite([variable for _, variable in self._pairs()])

    def averages_finite(self) -> bool:
        """Whether the averages hold only finite values, eagerly."""
        return all_finite([average for average, _ in self._pairs()])

    def assign_to(self, var_list, owner: str, schedule: str) -> None:
        """Copies the averages into the variables of `var_list` they belong to.

        Variables without an average (BatchNorm statistics, say) are left as
        they are. Nothing is written when there is nothing right to write.

        Args:
            var_list: List of variables, such as `model.variables`.
            owner: What holds the averages, for messages (`"SWA"`, ...).
            schedule: When the owner takes snapshots and how far training got,
                for the message when nothing was averaged.

        Raises:
            ValueError: if no snapshot was folded in yet, or an average holds
                NaN or infinity (a snapshot of diverged weights).
        """
        _check_assignable(self, owner, schedule)
        averages_by_variable = {
            id(variable): average for average, variable in self._pairs()
        }
        for variable in var_list:
            average = averages_by_variable.get(id(variable))
            if average is not None:
                # A copy: on JAX, a variable assigned another's value shares
                # its buffer, and `fit` donates the buffers of both.
                value = placement.like(average.value, variable)
                variable.assign(ops.copy(ops.cast(value, variable.dtype)))

    def get_state(self, prefix: str = "") -> dict:
        """The counter and the state as NumPy arrays, for a backup file.

        Args:
            prefix: String before every key, so that several `AverageState` can
                share one file. Defaults to `""`.

        Returns:
            A dict: `"<prefix>n_averaged"`, `"<prefix>average_<i>"` for
            each average (`i` its index in `variables`), with a window
            `"<prefix>window_<i>"` for its ring, and `"<prefix>rule_<name>"`
            for each scalar of the rule's state.
        """
        state = {f"{prefix}n_averaged": np.int64(self.n_averaged)}
        for key, variable in _stored(self, prefix).items():
            state[key] = numpy_value(variable)
        return state

    def set_state(self, state: dict, source: str, prefix: str = "") -> None:
        """Loads what `get_state` returned, after checking it fits.

        Args:
            state: A dict as returned by `get_state` (other keys ignored).
            source: Where the state comes from, for messages (a file path).
            prefix: The prefix given to `get_state`. Defaults to `""`.

        Raises:
            ValueError: if the state does not match in number or shape; the
                averages are then unchanged.
        """
        stored = _stored(self, prefix)
        problem = _state_problem(self, state, stored, prefix)
        if problem is not None:
            raise ValueError(
                f"The saved averages {source!r} do not match this model: "
                f"{problem}. Delete them to start over."
            )
        for key, variable in stored.items():
            variable.assign(state[key])
        self.counter.assign(int(state[f"{prefix}n_averaged"]))


def _create_state(averages, create_variable, excluded, name):
    """Creates the state of `averages`: an average per variable (not those
    of `excluded`), a window's rings, the rule's scalars; and sets the
    dtype in which the rule computes."""
    excluded = {id(variable) for variable in excluded}
    window = averages.window

    def create(variable, suffix, ring=False):
        if id(variable) in excluded:
            return None
        shape = tuple(variable.shape)
        if ring:
            shape = (window - 1,) + shape
        with placement.creation_scope(averages.offload):
            return create_variable(
                shape,
                average_dtype(variable.dtype),
                f"{variable_name(variable)}_{suffix}",
                placement.layout(variable, averages.offload, ring=ring),
            )

    averages.averages = [create(v, name) for v in averages.variables]
    averages.rings = None
    if window is not None:
        averages.rings = [
            create(v, f"{name}_window", ring=True) if window > 1 else None
            for v in averages.variables
        ]
    # The rule computes in float64 where an average is float64: a float32
    # weight such as 1/3 would leave it float32-accurate.
    wide = any(
        average is not None and average.dtype == "float64"
        for average in averages.averages
    )
    averages.dtype = "float64" if wide else "float32"
    # Scalars, kept beside the counter (never offloaded: the rule computes
    # with them on the device).
    rule = averages.rule
    averages.rule_state = {
        state_name: create_variable(
            (), averages.dtype, f"{name}_{state_name}", None
        )
        for state_name in (() if rule is None else rule.state)
    }


def _fold(averages, rule=None) -> snapshot_lib.Target:
    """What the backends need to fold a snapshot into `averages` with
    `rule` (default: their own)."""
    if rule is None:
        rule = averages.rule
    if rule is None and averages.window is None:
        raise ValueError(
            "These averages have no rule: give one to `AverageState` or to "
            "`add_snapshot`."
        )
    rule = averaging.Uniform() if rule is None else averaging.as_rule(rule)
    if rule.state and rule is not averages.rule:
        raise ValueError(
            f"The rule {type(rule).__name__} keeps a state "
            f"({', '.join(rule.state)}): give it to `AverageState`, which keeps "
            "the state beside the averages."
        )
    if averages.window is not None and not isinstance(rule, averaging.Uniform):
        raise ValueError(
            "Windowed averages are uniform means: they take no other rule. "
            f"Received: rule={type(rule).__name__}"
        )
    kept = [average is not None for average in averages.averages]
    return snapshot_lib.Target(
        averages=[average for average, _ in averages._pairs()],
        rule=rule,
        state=averages.rule_state if rule is averages.rule else {},
        dtype=averages.dtype,
        window=averages.window,
        rings=None if averages.rings is None else [
            ring for ring, keep in zip(averages.rings, kept) if keep
        ],
        offload=averages.offload,
    )


def _stored(averages, prefix):
    """`{key: variable}` of everything `get_state` saves but the counter."""
    stored = {}
    for index, average in enumerate(averages.averages):
        if average is not None:
            stored[f"{prefix}average_{index}"] = average
            if averages.rings is not None and averages.rings[index] is not None:
                stored[f"{prefix}window_{index}"] = averages.rings[index]
    for state_name, variable in averages.rule_state.items():
        stored[f"{prefix}rule_{state_name}"] = variable
    return stored


def _check_assignable(averages, owner, schedule):
    n_averaged = averages.n_averaged
    if n_averaged == 0:
        raise ValueError(
            f"{owner} has averaged no snapshot yet (n_averaged=0), so "
            f"there is no average to assign; nothing was changed. "
            f"{schedule}"
        )
    if not averages.averages_finite():
        raise ValueError(
            f"The averages of {owner} are not finite (NaN or infinity): "
            f"one of its {n_averaged} snapshot(s) folded in weights that "
            "had diverged. Nothing was changed. Averages whose snapshots "
            "skip non-finite weights: pass `skip_non_finite=True` to the "
            "optimizer wrapper (the fit callbacks always skip them)."
        )


def _state_problem(averages, state, stored, prefix):
    """What keeps `state` from loading into `averages`, or `None`."""
    key = re.compile(re.escape(prefix) + r"average_(\d+)")
    saved = sorted(
        int(match.group(1)) for match in map(key.fullmatch, state) if match
    )
    expected = [
        index for index, average in enumerate(averages.averages)
        if average is not None
    ]
    if saved != expected:
        return (
            f"it holds {len(saved)} averages where this model has "
            f"{len(expected)}"
        )
    missing = [name for name in stored if name not in state]
    if missing:
        return (
            f"it lacks {missing[0]!r} (a window of another length, or the "
            "state of another averaging rule)"
        )
    for name, variable in stored.items():
        shape = tuple(np.shape(state[name]))
        wanted = tuple(variable.shape)
        if shape == wanted:
            continue
        kind, _, index = name[len(prefix):].rpartition("_")
        if kind == "average":
            owner = variable_name(averages.variables[int(index)])
            return (
                f"its average {index} has shape {shape} where the variable "
                f"{owner!r} has shape {wanted}"
            )
        return (
            f"its {name[len(prefix):]!r} has shape {shape} where this "
            f"model's has shape {wanted} (a window of another length?)"
        )
    return None


def add_snapshot_together(
    average_sets, snapshot, skip_non_finite=False, step=None,
    learning_rate=None,
):
    """Folds the same snapshot into several `AverageState` in one pass.

    For averagers that keep several averages of the same weights with
    different rules (`keras_swa.PostHocEMA`'s profiles): one branch and one
    read of the weights for all of them, instead of one `add_snapshot` each. The
    sets share their counter, which counts the snapshot once.

    Args:
        average_sets: List of `AverageState` of the same variables (the same
            objects, in the same order, the same ones excluded), the same
            counter, each with its rule.
        snapshot: As in `AverageState.add_snapshot`.
        skip_non_finite: As in `AverageState.add_snapshot`. Defaults to `False`.
        step: As in `AverageState.add_snapshot`. Defaults to `None`.
        learning_rate: As in `AverageState.add_snapshot`. Defaults to `None`.

    Raises:
        ValueError: if the sets do not average the same variables with the
            same counter.
    """
    first = average_sets[0]
    layout = [
        (id(variable), average is None)
        for average, variable in zip(first.averages, first.variables)
    ]
    for other in average_sets[1:]:
        if other.counter is not first.counter or layout != [
            (id(variable), average is None)
            for average, variable in zip(other.averages, other.variables)
        ]:
            raise ValueError(
                "Averages folded in together must average the same "
                "variables with the same counter."
            )
    snapshot_lib.add_snapshot(
        snapshot,
        [_fold(averages) for averages in average_sets],
        [variable for _, variable in first._pairs()],
        first.counter,
        step=step,
        learning_rate=learning_rate,
        skip_non_finite=skip_non_finite,
    )
