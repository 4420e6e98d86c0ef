"""One swap: other values in a model's variables for a while, then its own
back, bit for bit.

Every function of keras_swa that writes other values into a model's
variables goes through a `Swap`: `averaged_weights`, `assign_average`,
`sampled_weights`, `predict_bma` and `update_bn`. Before it writes, it hands
the swap every variable it is about to write, trainable or not (a layer
frozen after training is written like any other), BatchNormalization
statistics included; the swap copies their values. On exit, normally or by
an exception, it writes each copy back. A function that writes for good
(`assign_average`, `update_bn`) calls `keep()` once every write succeeded,
so that only an error puts the old values back.

The copies stay where the values are: on the device, sharded like them
(`keras.distribution`), and under `tf.distribute` one per replica, so that
the replicas of an unsynchronized BatchNormalization each get their own
statistics back. A swap costs one copy of the variables it records; it keeps
no copy of anything else.

How a caller uses it:

- the averages of a source, for a block: `weights.averaged_weights(...)`;
  swapped in at one point and out at another (a checkpoint callback):
  `swapped = weights.swap_in(model, source, bn)` (`bn` a
  `batch_norm.BNRecompute`), later `swapped.restore()`;
- what the averages of a source (and the BatchNorm recompute `bn`) write:
  `weights.written_variables(model, source, bn)`;
- any other values (weights read from files, a soup): record first, then
  write, `with Swap(variables) as swapped: ...`, and `swapped.keep()` at the
  end of the block where the writes are for good.
"""

from keras_swa._backend import distribute


class Swap:
    """Records the values of variables and writes them back, bit for bit.

    Give it every variable the code after it writes. Used as a context
    manager, it writes the recorded values back when the block ends, also
    when it raises; `keep()` inside the block keeps the writes instead.
    Without `with`, call `restore()` or `keep()` once the writes are done
    or undone. Either closes the swap: later calls do nothing, and the
    copies are freed.

    Args:
        variables: Iterable of `keras.Variable`s (or anything with `value`
            and `assign`), trainable or not, of any dtype. A variable listed
            twice is recorded once.

    Example:

    >>> with Swap(model.variables):
    ...     model.set_weights(other_weights)  # doctest: +SKIP
    ...     model.evaluate(x_test, y_test)  # doctest: +SKIP
    >>> # The model holds its own weights again.

    For good, unless something fails:

    >>> with Swap(model.trainable_variables) as swapped:
    ...     source.assign_average_vars(model.variables)  # doctest: +SKIP
    ...     keras_swa.update_bn(model, x_train)  # doctest: +SKIP
    ...     swapped.keep()
    """

    def __init__(self, variables):
        seen = set()
        self._variables = []
        for variable in variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                self._variables.append(variable)
        self._copies = [
            distribute.copy_variable(variable) for variable in self._variables
        ]

    @property
    def variables(self) -> list:
        """The recorded variables, each once, in the order given."""
        return list(self._variables)

    def restore(self) -> None:
        """Writes every recorded value back, bit for bit, and closes the swap.

        A variable that cannot be written does not stop the others: all are
        tried, then the first error is raised. Does nothing on a closed swap.
        """
        copies, self._copies = self._copies, None
        if copies is None:
            return
        error = None
        for variable, copy in zip(self._variables, copies):
            try:
                distribute.restore_variable(variable, copy)
            except BaseException as exception:  # noqa: BLE001 (re-raised)
                error = error or exception
        if error is not None:
            raise error

    def keep(self) -> None:
        """Keeps what was written: closes the swap without writing back."""
        self._copies = None

    def __enter__(self) -> "Swap":
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()
