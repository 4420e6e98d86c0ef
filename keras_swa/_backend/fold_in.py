"""Folds a snapshot into averages, per backend, inside or outside a
compiled train step."""

from typing import NamedTuple

import keras
from keras import ops

from keras_swa import averaging
from keras_swa._backend import variable_value as _value


class Fold(NamedTuple):
    """One set of averages of the weights and the rule that folds into it.

    Attributes:
        averages: List of `keras.Variable`s, one per weight, in order.
        rule: The `averaging.Rule`.
        state: Dict of the rule's state variables (scalars of `dtype`), by
            the names of `rule.state`.
        dtype: String, the dtype in which the rule computes: float64 where
            an average is float64, else float32.
    """

    averages: list
    rule: averaging.Rule
    state: dict
    dtype: str


def _all_finite(weights):
    return ops.all(
        ops.stack([ops.all(ops.isfinite(_value(w))) for w in weights])
    )


def _rule_values(fold, count, step, learning_rate):
    """`(t, {name: new state})` of `fold`'s rule for the snapshot."""
    snapshot = averaging.Snapshot(
        count=count,
        dtype=fold.dtype,
        step=step,
        learning_rate=(
            None if learning_rate is None
            else ops.cast(learning_rate, fold.dtype)
        ),
        state={name: _value(v) for name, v in fold.state.items()},
    )
    weight = ops.cast(fold.rule.weight(snapshot), fold.dtype)
    next_state = fold.rule.next_state(snapshot)
    if set(next_state) != set(fold.state):
        raise ValueError(
            f"The rule {type(fold.rule).__name__} keeps the state "
            f"{sorted(fold.state)}, but its `next_state` returned "
            f"{sorted(next_state)}."
        )
    return weight, {
        name: ops.cast(value, fold.dtype) for name, value in next_state.items()
    }


def fold_in(
    snapshot,
    folds,
    weights,
    counter,
    step=None,
    learning_rate=None,
    skip_non_finite=False,
):
    """Where `snapshot` holds: `average <- average + t * (weight - average)`
    for every fold and pair, with `t` the fold's rule weight of this
    snapshot, then the rules' states updated and `counter += 1` (once).

    A step where `snapshot` is false touches no weights at all. All folds
    share one branch and one pass. On TensorFlow the update runs in
    cross-replica context through the distribution strategy (the default
    one too), so each replica folds in its own copy of the synchronized
    weights, as Keras updates the weights themselves; one `tf.cond` keeps
    the pass out of non-snapshot steps. JAX forbids side effects inside
    `lax.cond`, so there one branch returns every new value (XLA reads each
    weight once for all folds), assigned inside the trainer's stateless
    scope. PyTorch runs eagerly: a Python `if` on the concrete value, and
    one fused `torch._foreach_lerp_` per dtype over all averages instead of
    a handful of kernels per variable.

    Args:
        snapshot: Boolean scalar tensor, a Python bool, or `True` when every
            call is a snapshot (then there is no branch at all, and the
            compiler may fuse the pass with the optimizer update).
        folds: List of `Fold`s, each with one average per weight.
        weights: List of variables, the weights.
        counter: Integer scalar `keras.Variable`, snapshots so far (shared by
            all folds).
        step: Integer scalar tensor, the index of the update, for the rules.
            Defaults to `None`.
        learning_rate: Float scalar tensor, the learning rate of the update,
            for the rules. Defaults to `None`.
        skip_non_finite: Whether a snapshot is also skipped when a weight
            holds NaN or infinity (one more read of the weights on snapshot
            steps). Defaults to `False`.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        _tf_fold_in(
            snapshot, folds, weights, counter, step, learning_rate,
            skip_non_finite,
        )
        return
    if backend == "torch":
        if snapshot is True or snapshot:
            if not skip_non_finite or bool(_all_finite(weights)):
                _torch_fold_in(folds, weights, counter, step, learning_rate)
        return

    def new_values():
        count = counter.value
        stored = [_stored(w) for w in weights]
        values = []
        for fold in folds:
            t, state = _rule_values(fold, count, step, learning_rate)
            values += [
                averaging.interpolate(a.value, w, t)
                for a, w in zip(fold.averages, stored)
            ]
            values += [state[name] for name in fold.state]
        return values + [ops.add(count, 1)]

    if skip_non_finite:
        snapshot = ops.logical_and(snapshot, _all_finite(weights))
    targets = [
        target
        for fold in folds
        for target in fold.averages + list(fold.state.values())
    ] + [counter]
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


def _torch_fold_in(folds, weights, counter, step, learning_rate):
    import torch

    count = counter.value
    entries = []
    with torch.no_grad():
        for fold in folds:
            t, state = _rule_values(fold, count, step, learning_rate)
            # A Python float is a double: `t` keeps a float64 rule's digits.
            t = float(t)
            entries += [(a, w, t) for a, w in zip(fold.averages, weights)]
            for name, value in state.items():
                fold.state[name].assign(value)
        # `_foreach_lerp_` is the multi-tensor kernel torch.optim itself
        # uses (no public equivalent); its `ScalarList` overload gives each
        # average its own weight: one launch for all folds of a dtype.
        for dtype in {a.value.dtype for a, _, _ in entries}:
            group = [e for e in entries if e[0].value.dtype == dtype]
            torch._foreach_lerp_(
                [a.value for a, _, _ in group],
                [_value(w).to(dtype) for _, w, _ in group],
                [t for _, _, t in group],
            )
        counter.assign(count + 1)


def _tf_fold_in(
    snapshot, folds, weights, counter, step, learning_rate, skip_non_finite
):
    import tensorflow as tf

    def fold(strategy, snapshot, step, learning_rate):
        # Passed through the merge call, not captured: each replica traces
        # its own tensors, equal on all of them (synchronized training).
        snapshot, step, learning_rate = [
            strategy.experimental_local_results(value)[0]
            if isinstance(value, tf.distribute.DistributedValues)
            else value
            for value in (snapshot, step, learning_rate)
        ]

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
            count = counter.value
            for fold_ in folds:
                # Once per fold, in cross-replica context: every replica
                # folds in with the same weight.
                t, state = _rule_values(fold_, count, step, learning_rate)
                for average, weight in zip(fold_.averages, weights):
                    update(
                        average,
                        lambda a, w, t: a.assign(averaging.interpolate(a, w, t)),
                        args=(_value(weight), t),
                    )
                for name, value in state.items():
                    update(
                        fold_.state[name],
                        lambda s, v: s.assign(v),
                        args=(value,),
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
        fold(strategy, snapshot, step, learning_rate)
    else:
        tf.__internal__.distribute.interim.maybe_merge_call(
            fold, strategy, snapshot, step, learning_rate
        )
