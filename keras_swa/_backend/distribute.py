"""Distribution helpers: `tf.distribute` scope checks, per-replica copies,
and the pieces of a data-parallel pass (the strategy, the shards, a sum)."""

import keras
from keras import ops

from keras_swa._backend import variable_value


def check_distribution(variables, optimizer=None):
    """Raises a clear error where `variables` and the strategy do not match.

    Under `tf.distribute`, variables created in one strategy's scope can only
    be used with that strategy; TensorFlow reports a mix with errors that
    name none of the user's objects ("Mixing different tf.distribute.Strategy
    objects", `colocate_vars_with`, a bare AssertionError). Checked here:

    - with `optimizer` (about to create its variables for `variables`): the
      variables must come from the strategy in effect when the optimizer was
      created, and no other strategy's scope may be in effect now (a wrapper
      created outside `strategy.scope()` for a model built inside it, or the
      reverse, or a model and wrapper both created outside and trained
      inside);
    - without: distributed variables must come from the strategy in effect,
      if any (a model of one strategy used in another strategy's scope).
      Outside every scope a distributed model is fine: its variables are
      then read and written in cross-replica context, on every replica.

    Other backends have no distribution strategies: nothing to check.

    Args:
        variables: List of `keras.Variable`s, the model's.
        optimizer: The optimizer about to be built for `variables`, or None.

    Raises:
        ValueError: on a mix of strategies.
    """
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    def name(strategy):
        # TensorFlow's stand-in outside every scope has a private class.
        if "Default" in type(strategy).__name__:
            return "no strategy"
        return type(strategy).__name__

    current = tf.distribute.get_strategy()
    problem = None
    if optimizer is not None:
        # Keras' TensorFlow optimizer records the strategy current at its
        # creation and creates its variables under it.
        strategy = getattr(optimizer, "_distribution_strategy", None) or current
        owner = f"the optimizer {type(optimizer).__name__}"
        if tf.distribute.has_strategy() and current is not strategy:
            problem = (
                f"{owner} was created outside the scope of the "
                f"{name(current)} in which it is now built (where the model "
                "is trained)"
            )
        else:
            mismatched = [
                variable
                for variable in variables
                if not strategy.extended.variable_created_in_scope(
                    variable_value(variable)
                )
            ]
            if mismatched:
                problem = (
                    f"the model (variable {_name(mismatched[0])!r}) was not "
                    f"created in the same scope as {owner}, which was "
                    f"created under {name(strategy)}"
                )
    elif tf.distribute.has_strategy():
        mismatched = [
            variable
            for variable in variables
            if isinstance(variable_value(variable), tf.distribute.DistributedValues)
            and not current.extended.variable_created_in_scope(
                variable_value(variable)
            )
        ]
        if mismatched:
            problem = (
                f"the model (variable {_name(mismatched[0])!r}) was created under "
                f"another tf.distribute strategy than the {name(current)} "
                "whose scope is in effect"
            )
    if problem is None:
        return
    raise ValueError(
        f"{problem[0].upper()}{problem[1:]}. Create the model and the "
        "optimizer (with its keras_swa wrapper), and call `compile` and "
        "`fit`, all inside the same `strategy.scope()`; call keras_swa "
        "functions on the model inside that scope or outside every scope."
    )


def copy_variable(variable):
    """A copy of the value of `variable`, which `restore_variable` writes back.

    Under `tf.distribute`, a copy of each replica's value: the replicas of an
    unsynchronized BatchNormalization hold different statistics, which one
    copy written back would replace with those of the first replica.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        value = variable.value
        if isinstance(value, tf.distribute.DistributedValues):
            copies = []
            for component in value.values:
                with tf.device(component.device):
                    copies.append(tf.identity(component))
            return tuple(copies)
    # `ops.copy`, since on PyTorch a variable's value is its buffer.
    return ops.copy(variable.value)


def restore_variable(variable, copy):
    """Writes back a copy made by `copy_variable`."""
    if isinstance(copy, tuple):
        for component, value in zip(variable.value.values, copy):
            component.assign(value)
    else:
        variable.assign(copy)


def _name(variable):
    return getattr(variable, "path", None) or variable.name


def replica_strategy(variables):
    """The `tf.distribute` strategy that holds `variables` on several replicas.

    Returns `None` on the other backends, for variables of one device (a
    strategy of one replica included), and inside `strategy.run`: a pass
    over data is then run as it is, where it is called.

    Args:
        variables: List of `keras.Variable`s, the model's.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    in_replica_context = not tf.distribute.in_cross_replica_context()
    if tf.distribute.has_strategy() and in_replica_context:
        return None  # inside `strategy.run`
    for variable in variables:
        value = variable_value(variable)
        if isinstance(value, tf.distribute.DistributedValues):
            strategy = value.distribute_strategy
            if strategy.num_replicas_in_sync > 1:
                return strategy
            return None
    return None


def shard_batch(strategy, batch):
    """`batch` split along its first axis into one shard per replica.

    The shards are as even as can be (the later ones one sample longer); a
    batch smaller than the number of replicas leaves the first shards
    empty. Each worker of a multi-worker strategy splits the same global
    batch and takes the shards of its own replicas.

    Args:
        strategy: A `tf.distribute.Strategy`.
        batch: A nested structure of tensors sharing their first dimension.

    Returns:
        The shards as a distributed value, for `strategy.run`.
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    size = int(keras.tree.flatten(batch)[0].shape[0])
    bounds = [size * replica // replicas for replica in range(replicas + 1)]
    # Cut where the batch lives, so that each device receives its shard
    # alone, not the whole batch.
    shards = [
        keras.tree.map_structure(lambda t: t[start:stop], batch)
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]

    def shard(context):
        # Called under the replica's device scope: the copy lands there.
        return keras.tree.map_structure(
            tf.identity, shards[context.replica_id_in_sync_group]
        )

    return strategy.experimental_distribute_values_from_function(shard)


def sum_over_replicas(value):
    """The sum of `value` over the replicas, in a replica context of several
    (`tf.distribute`); elsewhere `value` itself."""
    if keras.backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)
