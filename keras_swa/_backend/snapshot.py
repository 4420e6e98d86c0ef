"""Folds a snapshot into averages, per backend, inside or outside a
compiled train step."""

import platform
from typing import NamedTuple
from typing import Optional

import keras
from keras import ops

from keras_swa import averaging
from keras_swa._backend import variable_value as _value


class Target(NamedTuple):
    """One set of averages of the weights and how a snapshot goes in.

    Attributes:
        averages: List of `keras.Variable`s, one per weight, in order.
        rule: The `averaging.Rule` (unused with a window).
        state: Dict of the rule's state variables (scalars of `dtype`), by
            the names of `rule.state`.
        dtype: String, the dtype in which the rule computes: float64 where
            an average is float64, else float32.
        window: Integer `k`, or `None`: the average is the mean of the last
            `k` snapshots, of which `rings` holds the `k - 1` before the
            newest.
        rings: With a window, one variable of shape `(k - 1,) + shape` per
            weight (`None` where `k == 1`).
        offload: Whether the averages live in host memory, where each
            snapshot is folded in.
    """

    averages: list
    rule: averaging.Rule
    state: dict
    dtype: str
    window: Optional[int] = None
    rings: Optional[list] = None
    offload: bool = False

    def targets(self):
        """Every variable a snapshot writes, in the order of `_values`."""
        rings = [ring for ring in self.rings or () if ring is not None]
        return self.averages + rings + list(self.state.values())


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


def window_mean(ring, weight, count, window: int):
    """The mean of the last `min(count + 1, window)` snapshots: the
    `window - 1` held in `ring` (zeros where none was taken yet) and
    `weight`, summed afresh at every snapshot, so that no rounding carries
    over from one snapshot to the next.

    Args:
        ring: Tensor of shape `(window - 1,) + weight.shape`, or `None`
            where `window == 1`.
        weight: Tensor, the new snapshot, in the mean's dtype.
        count: Integer scalar tensor, the snapshots before this one.
        window: Python int `k`.

    Returns:
        The mean, in the dtype of `weight`.
    """
    if ring is None:
        return weight
    held = ops.cast(ops.minimum(ops.add(count, 1), window), weight.dtype)
    # Slice by slice (`window` is a Python int): XLA's CPU backend runs a
    # `sum` over the leading axis about 50 times slower than the unrolled
    # additions, which fuse into one pass.
    total = weight
    for slot in range(window - 1):
        total = ops.add(total, ring[slot])
    return ops.divide(total, held)


def ring_slot(count, window: int):
    """The slot of the ring that the snapshot after `count` others takes:
    that of the snapshot `window - 1` before it, which then leaves the
    window."""
    return ops.mod(count, window - 1)


def _values(fold, weights, count, step, learning_rate):
    """The new values of `fold.targets()` (keras ops: JAX, eager)."""
    if fold.window is None:
        t, state = _rule_values(fold, count, step, learning_rate)
        return [
            averaging.interpolate(_value(a), w, t)
            for a, w in zip(fold.averages, weights)
        ] + [state[name] for name in fold.state]
    means, rings = [], []
    for average, ring, weight in zip(fold.averages, fold.rings, weights):
        weight = ops.cast(weight, average.dtype)
        ring = None if ring is None else _value(ring)
        means.append(window_mean(ring, weight, count, fold.window))
        if ring is not None:
            start = [ring_slot(count, fold.window)] + [0] * len(weight.shape)
            rings.append(
                ops.slice_update(ring, start, ops.expand_dims(weight, 0))
            )
    return means + rings


def add_snapshot(
    snapshot,
    folds,
    weights,
    counter,
    step=None,
    learning_rate=None,
    skip_non_finite=False,
):
    """Where `snapshot` holds, folds the weights into every fold (with its
    rule, `average <- average + t * (weight - average)`, or its window),
    updates the rules' states, then `counter += 1` (once).

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
        folds: List of `Target`s, each with one average per weight.
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
        _tf_add_snapshot(
            snapshot, folds, weights, counter, step, learning_rate,
            skip_non_finite,
        )
        return
    if backend == "torch":
        if snapshot is True or snapshot:
            if not skip_non_finite or bool(_all_finite(weights)):
                _torch_add_snapshot(folds, weights, counter, step, learning_rate)
        return
    _jax_add_snapshot(
        snapshot, folds, weights, counter, step, learning_rate,
        skip_non_finite,
    )


def _jax_add_snapshot(
    snapshot, folds, weights, counter, step, learning_rate, skip_non_finite
):
    import jax
    from jax.experimental import compute_on

    def new_values():
        count = counter.value
        stored = [_stored(w) for w in weights]
        values = []
        for fold in folds:
            if not fold.offload:
                values += _values(fold, stored, count, step, learning_rate)
                continue
            # The weights go to host memory, and the fold runs there: the
            # offloaded state never enters accelerator memory.
            on_host = [jax.device_put(w, jax.memory.Space.Host) for w in stored]
            with compute_on.compute_on("device_host"):
                values += _values(fold, on_host, count, step, learning_rate)
        return values + [ops.add(count, 1)]

    if skip_non_finite:
        snapshot = ops.logical_and(snapshot, _all_finite(weights))
    targets = [t for fold in folds for t in fold.targets()] + [counter]
    if snapshot is True:
        values = new_values()
    else:
        values = ops.cond(
            snapshot, new_values, lambda: [v.value for v in targets]
        )
    for target, value in zip(targets, values):
        target.assign(value)


def _stored(weight):
    """The weight as stored: on JAX, a barrier before a narrow weight is
    widened again. Fused with the optimizer's update, XLA removes the
    `float32 -> bfloat16 -> float32` conversions of the new weight, and the
    average would fold in the weight before its rounding to its own dtype
    (off by that rounding, about 1e-3 for bfloat16)."""
    value = _value(weight)
    if keras.backend.standardize_dtype(value.dtype) in ("float16", "bfloat16"):
        import jax

        return jax.lax.optimization_barrier(value)
    return value


def _torch_add_snapshot(folds, weights, counter, step, learning_rate):
    import torch

    count = counter.value
    groups = {}
    with torch.no_grad():
        for fold in folds:
            if fold.window is not None:
                _torch_window(fold, weights, count)
                continue
            # `t` stays a tensor on the device: no read into Python, so no
            # wait for the device on every snapshot.
            t, state = _rule_values(fold, count, step, learning_rate)
            for average, weight in zip(fold.averages, weights):
                value = average.value
                group = groups.setdefault((value.dtype, value.device), {})
                group.setdefault(id(t), (t.to(value), []))[1].append(
                    (value, _value(weight).to(value))
                )
            for name, value in state.items():
                fold.state[name].assign(value)
        # `_foreach_lerp_` is the multi-tensor kernel torch.optim itself
        # uses (no public equivalent): one launch for all averages of a
        # dtype and device, each with the weight of its fold.
        for group in groups.values():
            averages, targets, ts = [], [], []
            for t, pairs in group.values():
                averages += [a for a, _ in pairs]
                targets += [w for _, w in pairs]
                ts += [t] * len(pairs)
            torch._foreach_lerp_(averages, targets, ts)
        counter.assign(count + 1)


def _torch_window(fold, weights, count):
    import torch

    # Tensors on the device: no wait for them in Python. The slot is that
    # of `ring_slot` (unused by a window of 1, which has no ring).
    held = torch.clamp(count + 1, max=fold.window)
    slot = torch.remainder(count, max(fold.window - 1, 1)).reshape(1)
    slot = slot.to(torch.int64)
    for average, ring, weight in zip(fold.averages, fold.rings, weights):
        mean = average.value
        weight = _value(weight).to(device=mean.device, dtype=mean.dtype)
        if ring is None:
            mean.copy_(weight)
            continue
        ring = ring.value
        # In place, without a temporary per addition: the same sum as
        # `window_mean`, a third of its passes over memory.
        torch.sum(ring, dim=0, out=mean)
        mean.add_(weight).div_(held.to(mean))
        ring.index_copy_(0, slot.to(ring.device), weight.unsqueeze(0))


def _tf_add_snapshot(
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

        def update(variable, fn, args=(), offload=False):
            variable = variable.value
            if isinstance(variable, tf.distribute.DistributedValues):
                strategy.extended.update(variable, fn, args=args, group=False)
            elif offload:
                # On the CPU, where the average lives: the weight is copied
                # there, and the arithmetic runs there.
                with tf.device(variable.device):
                    fn(variable, *args)
            else:
                # Not a variable of the strategy: one created outside its
                # scope, such as a callback's counter made before a `fit`
                # called inside the scope (the strategy refuses to update
                # it). It lives on one device: updated there.
                fn(variable, *args)

        def write():
            count = counter.value
            fused = _tf_fused_interpolate()

            def interpolate(a, w, t):
                if (
                    fused is None
                    or strategy.num_replicas_in_sync > 1
                    or isinstance(w, tf.distribute.DistributedValues)
                ):
                    # Replicas, each updating its own copy inside the
                    # strategy's update, keep the plain ops (an XLA function
                    # there reads another replica's values).
                    return a.assign(averaging.interpolate(a, w, t))
                # Values, not variables: the function is traced once per
                # shape, not per variable.
                return a.assign(
                    fused(ops.convert_to_tensor(a), ops.convert_to_tensor(w), t)
                )

            for fold_ in folds:
                if fold_.window is not None:
                    _tf_window(fold_, weights, count, update)
                    continue
                # Once per fold, in cross-replica context: every replica
                # folds in with the same weight.
                t, state = _rule_values(fold_, count, step, learning_rate)
                for average, weight in zip(fold_.averages, weights):
                    update(
                        average,
                        interpolate,
                        args=(_value(weight), t),
                        offload=fold_.offload,
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


def _tf_fused_interpolate():
    """`averaging.interpolate` as one fused loop over the average, for a
    train step compiled without XLA; `None` where it does not apply.

    Without XLA, TensorFlow runs the interpolation as three kernels, each a
    pass over the weights (about twice the memory traffic of one fused
    pass); a `fit` or a custom loop compiled without `jit_compile` would pay
    that on every snapshot. A function with `jit_compile=True` is one XLA
    fusion per variable there, and inlined into an XLA train step. A new one
    for each trace of a train step: one traced in another step's graph,
    shared, would outlive that graph's variables (TensorFlow then refuses to
    call it). Eager snapshots (a `fit` callback's, once an epoch) keep the
    plain ops, as do TensorFlow's Metal GPUs (macOS on Apple silicon), where
    XLA does not run (as Keras' own `jit_compile="auto"` has it).
    """
    import tensorflow as tf

    metal = (
        platform.system() == "Darwin"
        and "arm" in platform.processor().lower()
        and tf.config.list_physical_devices("GPU")
    )
    if metal or tf.executing_eagerly():
        return None
    return tf.function(averaging.interpolate, jit_compile=True)


def _tf_window(fold, weights, count, update):
    import tensorflow as tf

    def mean(m, ring, w, count):
        w = tf.cast(w, m.dtype)
        return m.assign(window_mean(ring, w, count, fold.window))

    def store(ring, w, count):
        slot = ring_slot(count, fold.window)
        # In place: one slot written, not the whole ring.
        return ring.scatter_update(
            tf.IndexedSlices(tf.cast(w, ring.dtype)[None], slot[None])
        )

    for average, ring, weight in zip(fold.averages, fold.rings, weights):
        ring_value = None if ring is None else ring.value
        update(
            average, mean, args=(ring_value, _value(weight), count),
            offload=fold.offload,
        )
        if ring is not None:
            update(
                ring, store, args=(_value(weight), count),
                offload=fold.offload,
            )
