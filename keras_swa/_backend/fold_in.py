"""Folds a snapshot into averages, per backend, inside or outside a
compiled train step."""

import keras
from keras import ops

from keras_swa import averaging
from keras_swa._backend import variable_value as _value


def _all_finite(weights):
    return ops.all(
        ops.stack([ops.all(ops.isfinite(_value(w))) for w in weights])
    )


def fold_in(
    snapshot, averages, weights, counter, snapshot_weight, skip_non_finite=False
):
    """Where `snapshot` holds: `average <- average + t * (weight - average)`
    for each pair, with `t = snapshot_weight(counter)`, then `counter += 1`.

    A step where `snapshot` is false touches no weights at all. On TensorFlow
    the update runs in cross-replica context through the distribution
    strategy (the default one too), so each replica folds in its own copy of
    the synchronized weights, as Keras updates the weights themselves; a
    `tf.cond` keeps the pass out of non-snapshot steps. JAX forbids side
    effects inside `lax.cond`, so there the branches return values that are
    assigned inside the trainer's stateless scope. PyTorch runs eagerly: a
    Python `if` on the concrete value, and one fused `torch._foreach_lerp_`
    over all averages instead of a handful of kernels per variable.

    Args:
        snapshot: Boolean scalar tensor, a Python bool, or `True` when every
            call is a snapshot (then there is no branch at all, and the
            compiler may fuse the pass with the optimizer update).
        averages: List of `keras.Variable`s, the averages.
        weights: List of variables of the same shapes, the weights.
        counter: Integer scalar `keras.Variable`, snapshots so far.
        snapshot_weight: Function `count -> t`, a float32 scalar tensor.
        skip_non_finite: Whether a snapshot is also skipped when a weight
            holds NaN or infinity (one more read of the weights on snapshot
            steps). Defaults to `False`.
    """
    fold_in_sets(
        snapshot, [averages], weights, counter, [snapshot_weight],
        skip_non_finite,
    )


def _stored(weight):
    """The weight as stored: on JAX, a barrier before a narrow weight is
    widened again. Fused with the optimizer's update, XLA removes the
    `float32 -> bfloat16 -> float32` conversions of the new weight, and the
    average would fold in the weight before its rounding to its own dtype
    (off by that rounding, about 1e-3 for bfloat16)."""
    value = _value(weight)
    if keras.backend.backend() == "jax" and keras.backend.standardize_dtype(
        value.dtype
    ) in ("float16", "bfloat16"):
        import jax

        return jax.lax.optimization_barrier(value)
    return value


def fold_in_sets(
    snapshot,
    average_sets,
    weights,
    counter,
    snapshot_weights,
    skip_non_finite=False,
):
    """`fold_in` for several sets of averages of the same weights, together:
    where `snapshot` holds, `average <- average + t_s * (weight - average)`
    for every set `s` and pair, with `t_s = snapshot_weights[s](counter)`,
    then `counter += 1` once.

    All sets share one branch and one pass: on TensorFlow one `tf.cond`
    whose body updates every set; on JAX one `lax.cond` returning all new
    values, so XLA reads each weight once for all sets; on PyTorch one
    multi-tensor lerp per dtype for all sets, each set with its own weight.

    Args:
        snapshot: As in `fold_in`.
        average_sets: List of lists of `keras.Variable`s, each list one set
            of averages in the order of `weights`.
        weights: List of variables, the weights.
        counter: Integer scalar `keras.Variable`, snapshots so far (shared by
            all sets).
        snapshot_weights: List of functions `count -> t`, one per set.
        skip_non_finite: As in `fold_in`. Defaults to `False`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        _tf_fold_in_sets(
            snapshot, average_sets, weights, counter, snapshot_weights,
            skip_non_finite,
        )
        return
    if backend == "torch":
        if snapshot is True or snapshot:
            if not skip_non_finite or bool(_all_finite(weights)):
                _torch_lerp_sets(
                    average_sets, weights, counter, snapshot_weights
                )
        return

    def new_values():
        count = counter.value
        stored = [_stored(w) for w in weights]
        values = []
        for averages, snapshot_weight in zip(average_sets, snapshot_weights):
            t = snapshot_weight(count)
            values += [
                averaging.interpolate(a.value, w, t)
                for a, w in zip(averages, stored)
            ]
        return values + [ops.add(count, 1)]

    if skip_non_finite:
        snapshot = ops.logical_and(snapshot, _all_finite(weights))
    targets = [a for averages in average_sets for a in averages] + [counter]
    if backend == "jax" and snapshot is not True:
        values = ops.cond(
            snapshot, new_values, lambda: [v.value for v in targets]
        )
    elif snapshot is True or snapshot:
        values = new_values()
    else:
        return
    for target, value in zip(targets, values):
        target.assign(value)


def _torch_lerp_sets(average_sets, weights, counter, snapshot_weights):
    import torch

    ts = [float(f(counter.value)) for f in snapshot_weights]
    entries = [
        (a, w, t)
        for averages, t in zip(average_sets, ts)
        for a, w in zip(averages, weights)
    ]
    with torch.no_grad():
        # `_foreach_lerp_` is the multi-tensor kernel torch.optim itself
        # uses (no public equivalent); its `ScalarList` overload gives each
        # average its own weight: one launch for all sets of a dtype.
        for dtype in {a.value.dtype for a, _, _ in entries}:
            group = [e for e in entries if e[0].value.dtype == dtype]
            torch._foreach_lerp_(
                [a.value for a, _, _ in group],
                [_value(w).to(dtype) for _, w, _ in group],
                [t for _, _, t in group],
            )
        counter.assign(counter.value + 1)


def _tf_fold_in_sets(
    snapshot, average_sets, weights, counter, snapshot_weights, skip_non_finite
):
    import tensorflow as tf

    def fold(strategy, snapshot):
        if isinstance(snapshot, tf.distribute.DistributedValues):
            snapshot = strategy.experimental_local_results(snapshot)[0]

        def update(variable, fn, args=()):
            variable = variable.value
            if isinstance(variable, tf.distribute.DistributedValues):
                strategy.extended.update(variable, fn, args=args, group=False)
            else:
                # Not a variable of the strategy: one created outside its
                # scope, such as a callback's counter made before a `fit`
                # called inside the scope (the strategy refuses to update
                # it). It lives on one device: updated there.
                fn(variable, *args)

        def write():
            for index, weight in enumerate(weights):
                for averages, snapshot_weight in zip(
                    average_sets, snapshot_weights
                ):
                    update(
                        averages[index],
                        lambda a, w, n, f=snapshot_weight: a.assign(
                            averaging.interpolate(a, w, f(n))
                        ),
                        args=(_value(weight), counter.value),
                    )
            update(counter, lambda n: n.assign_add(1))

        if skip_non_finite:
            snapshot = tf.logical_and(snapshot, _all_finite(weights))
        if snapshot is True:
            write()
        else:
            tf.cond(snapshot, write, lambda: None)

    strategy = tf.distribute.get_strategy()
    if tf.distribute.in_cross_replica_context():
        # Already where a merge call leads (eagerly inside
        # `strategy.scope()`: a callback of a `fit` called in the scope),
        # and there is no replica context to merge from.
        fold(strategy, snapshot)
    else:
        tf.__internal__.distribute.interim.maybe_merge_call(
            fold, strategy, snapshot
        )
