"""The averaging engine: the one place where averages of weights are kept.

Every averager of keras_swa (the optimizer wrappers inside the compiled train
step, the `fit` callbacks between epochs) holds its averages in an `Averages`:
the average variables, the snapshot counter, the fold-in on each backend, the
copy into a model, and the saved state. So the rules that make an average
right hold for all of them alike:

- an average of a float16 or bfloat16 variable is float32 (thousands of
  snapshots would drown in the rounding of a narrow type); float32 and
  float64 variables are averaged in their own type;
- an average is created beside its variable: sharded like it
  (`keras.distribution` layouts) and, under `tf.distribute`, mirrored like it;
- a non-finite average is never copied into a model.
"""

import re

import keras
import numpy as np
from keras import ops

from keras_swa import averaging
from keras_swa._backend import fold_in as fold_in_lib
from keras_swa._backend import numpy_value
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
    an `Averages` in `self._averages` (`None` until they are built or `fit`
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


class Averages:
    """The running averages of a list of variables, with their counter.

    Each averager creates one `Averages` for the variables it averages and
    folds snapshots in with a rule given as the weight `t` of the snapshot:
    `average <- average + t * (value - average)` (SWA's mean and the EMA are
    both such interpolations, see `keras_swa.averaging`).

    Args:
        variables: List of the variables to average (a model's trainable
            variables). An entry of `excluded` gets no average.
        counter: Scalar integer `keras.Variable`, the snapshots folded in
            (`n_averaged`); the averager creates it, so that it exists before
            the averages do.
        create_variable: Function `(shape, dtype, name, layout) ->
            keras.Variable` that creates a zero-initialized average: an
            optimizer's `add_variable` (the average is then an optimizer
            variable, saved and distributed with it) or `keras.Variable`.
        excluded: Collection of variables, by identity, without an average
            (a float8 layer's variables overwritten with their gradient).
            Defaults to `()`.
        name: String, the suffix of the averages' names. Defaults to
            `"average"`.

    Example:

    >>> counter = keras.Variable(0, dtype="int", trainable=False)
    >>> averages = Averages(model.trainable_variables, counter,
    ...                     lambda shape, dtype, name, layout: keras.Variable(
    ...                         "zeros", shape, dtype, trainable=False,
    ...                         name=name, layout=layout))  # doctest: +SKIP
    >>> averages.fold_in(True, keras_swa.averaging.swa_weight)  # doctest: +SKIP
    """

    def __init__(
        self,
        variables,
        counter,
        create_variable,
        excluded=(),
        name: str = "average",
        rule=None,
    ):
        excluded = {id(variable) for variable in excluded}
        # Each average takes its variable's layout, so that it is sharded
        # like it: `_layout` is private, but it is what Keras' own
        # `add_variable_from_reference` reads (no public accessor).
        self.variables = list(variables)
        self.counter = counter
        self.averages = [
            None
            if id(variable) in excluded
            else create_variable(
                tuple(variable.shape),
                average_dtype(variable.dtype),
                f"{variable_name(variable)}_{name}",
                getattr(variable, "_layout", None),
            )
            for variable in self.variables
        ]
        # The rule computes in float64 where an average is float64: a
        # float32 weight such as 1/3 would leave it float32-accurate.
        self.dtype = (
            "float64"
            if any(
                average is not None and average.dtype == "float64"
                for average in self.averages
            )
            else "float32"
        )
        self.rule = None if rule is None else averaging.as_rule(rule)
        self.rule_state = {
            state_name: create_variable(
                (), self.dtype, f"{name}_{state_name}", None
            )
            for state_name in (() if self.rule is None else self.rule.state)
        }

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

    def _fold(self, rule=None) -> fold_in_lib.Fold:
        if rule is None:
            if self.rule is None:
                raise ValueError(
                    "These averages have no rule: give one to `Averages` or "
                    "to `fold_in`."
                )
            rule = self.rule
        rule = averaging.as_rule(rule)
        if rule.state and rule is not self.rule:
            raise ValueError(
                f"The rule {type(rule).__name__} keeps a state "
                f"({', '.join(rule.state)}): give it to `Averages`, which "
                "keeps the state beside the averages."
            )
        return fold_in_lib.Fold(
            [average for average, _ in self._pairs()],
            rule,
            self.rule_state if rule is self.rule else {},
            self.dtype,
        )

    def fold_in(
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
            rule: An `averaging.Rule`, or a function `n_averaged -> t` (a
                float scalar tensor: the weight of the snapshot). Defaults
                to `None`: the rule given to `Averages`.
            skip_non_finite: Whether a snapshot whose values are not all
                finite is skipped (an extra read of the weights on snapshot
                steps). Defaults to `False`.
            step: Integer scalar tensor, the index of the update (or epoch)
                the snapshot follows, for rules that read it. Defaults to
                `None`.
            learning_rate: Float scalar tensor, the learning rate of that
                update, for rules that read it. Defaults to `None`.
        """
        fold_in_lib.fold_in(
            snapshot,
            [self._fold(rule)],
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
        n_averaged = self.n_averaged
        if n_averaged == 0:
            raise ValueError(
                f"{owner} has averaged no snapshot yet (n_averaged=0), so "
                f"there is no average to assign; nothing was changed. "
                f"{schedule}"
            )
        if not self.averages_finite():
            raise ValueError(
                f"The averages of {owner} are not finite (NaN or infinity): "
                f"one of its {n_averaged} snapshot(s) folded in weights that "
                "had diverged. Nothing was changed. Averages whose snapshots "
                "skip non-finite weights: pass `skip_non_finite=True` to the "
                "optimizer wrapper (the fit callbacks always skip them)."
            )
        averages_by_variable = {
            id(variable): average for average, variable in self._pairs()
        }
        for variable in var_list:
            average = averages_by_variable.get(id(variable))
            if average is not None:
                # A copy: on JAX, a variable assigned another's value shares
                # its buffer, and `fit` donates the buffers of both.
                variable.assign(
                    ops.copy(ops.cast(average.value, variable.dtype))
                )

    def get_state(self, prefix: str = "") -> dict:
        """The counter and the averages as NumPy arrays, for a backup file.

        Args:
            prefix: String before every key, so that several `Averages` can
                share one file. Defaults to `""`.

        Returns:
            A dict: `"<prefix>n_averaged"`, `"<prefix>average_<i>"` for
            each average (`i` its index in `variables`) and
            `"<prefix>rule_<name>"` for each scalar of the rule's state.
        """
        state = {f"{prefix}n_averaged": np.int64(self.n_averaged)}
        for index, average in enumerate(self.averages):
            if average is not None:
                state[f"{prefix}average_{index}"] = numpy_value(average)
        for state_name, variable in self.rule_state.items():
            state[f"{prefix}rule_{state_name}"] = numpy_value(variable)
        return state

    def set_state(self, state: dict, source: str, prefix: str = "") -> None:
        """Loads what `get_state` returned, after checking it fits.

        Args:
            state: A dict as returned by `get_state` (other keys ignored).
            source: Where the state comes from, for messages (a file path).
            prefix: The prefix given to `get_state`. Defaults to `""`.

        Raises:
            ValueError: if the averages do not match in number or shape; the
                averages are then unchanged.
        """
        key = re.compile(re.escape(prefix) + r"average_(\d+)")
        saved = sorted(
            int(match.group(1))
            for match in map(key.fullmatch, state)
            if match
        )
        expected = [
            index for index, average in enumerate(self.averages)
            if average is not None
        ]
        problem = None
        if saved != expected:
            problem = (
                f"it holds {len(saved)} averages where this model has "
                f"{len(expected)}"
            )
        else:
            for index in expected:
                shape = tuple(state[f"{prefix}average_{index}"].shape)
                wanted = tuple(self.averages[index].shape)
                if shape != wanted:
                    problem = (
                        f"its average {index} has shape {shape} where the "
                        f"variable {variable_name(self.variables[index])!r} "
                        f"has shape {wanted}"
                    )
                    break
        missing = [
            state_name for state_name in self.rule_state
            if f"{prefix}rule_{state_name}" not in state
        ]
        if problem is None and missing:
            problem = f"it lacks the state {missing} of the averaging rule"
        if problem is not None:
            raise ValueError(
                f"The saved averages {source!r} do not match this model: "
                f"{problem}. Delete them to start over."
            )
        for index in expected:
            self.averages[index].assign(state[f"{prefix}average_{index}"])
        for state_name, variable in self.rule_state.items():
            variable.assign(state[f"{prefix}rule_{state_name}"])
        self.counter.assign(int(state[f"{prefix}n_averaged"]))


def fold_in_together(
    average_sets, snapshot, skip_non_finite=False, step=None,
    learning_rate=None,
):
    """Folds the same snapshot into several `Averages` in one pass.

    For averagers that keep several averages of the same weights with
    different rules (`keras_swa.PostHocEMA`'s profiles): one branch and one
    read of the weights for all of them, instead of one `fold_in` each. The
    sets share their counter, which counts the snapshot once.

    Args:
        average_sets: List of `Averages` of the same variables (the same
            objects, in the same order, the same ones excluded), the same
            counter, each with its rule.
        snapshot: As in `Averages.fold_in`.
        skip_non_finite: As in `Averages.fold_in`. Defaults to `False`.
        step: As in `Averages.fold_in`. Defaults to `None`.
        learning_rate: As in `Averages.fold_in`. Defaults to `None`.

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
    fold_in_lib.fold_in(
        snapshot,
        [averages._fold() for averages in average_sets],
        [variable for _, variable in first._pairs()],
        first.counter,
        step=step,
        learning_rate=learning_rate,
        skip_non_finite=skip_non_finite,
    )
