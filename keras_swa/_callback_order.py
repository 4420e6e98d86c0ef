"""The orders of `fit` callbacks that would silently lose an average.

Keras runs callbacks in list order, and some orders undo what a keras_swa
callback did: `EarlyStopping(restore_best_weights=True)` after the
`StochasticWeightAveraging` callback puts raw weights back over the average,
and a callback that monitors `val_swa_accuracy` before the callback that logs
it never sees it. These are refused before training, with the order to use.
"""

import contextlib
import re
import sys
import warnings

import keras


def fit_callbacks(callback):
    """The callbacks of the running `fit`, in order, or None if unknown.

    Call it from `on_train_begin`. Keras gives a callback no public way to
    see the others; the `keras.callbacks.CallbackList` that calls
    `on_train_begin` holds them, so this looks for it among the calling
    frames. Where it is not found (a custom loop calling the hooks by hand),
    nothing is checked.
    """
    frame = sys._getframe(1)
    for _ in range(4):
        frame = frame.f_back
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        if isinstance(caller, keras.callbacks.CallbackList) and any(
            other is callback for other in caller.callbacks
        ):
            return list(caller.callbacks)
    return None


def _index(callbacks, callback):
    return next(i for i, other in enumerate(callbacks) if other is callback)


def check_metrics_come_first(callback, prefix: str) -> None:
    """Raises if a callback before `callback` monitors what it logs.

    Args:
        callback: A callback that adds `<prefix><metric>` to the epoch logs
            in `on_epoch_end`.
        prefix: The prefix of those logs, such as `"val_swa_"`.

    Raises:
        ValueError: naming both callbacks and the order to use.
    """
    callbacks = fit_callbacks(callback)
    if callbacks is None:
        return
    for other in callbacks[: _index(callbacks, callback)]:
        monitor = getattr(other, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith(prefix):
            raise ValueError(
                f"{type(other).__name__}(monitor={monitor!r}) comes before "
                f"{type(callback).__name__} in `callbacks`, but "
                f"{type(callback).__name__} adds `{prefix}*` to the logs at "
                "the end of each epoch: the earlier callback would never see "
                f"it. Put {type(other).__name__} after "
                f"{type(callback).__name__} in the list."
            )


def check_nothing_restores_after(callback) -> None:
    """Raises if `EarlyStopping(restore_best_weights=True)` runs after
    `callback`, which puts an average into the model at the end of `fit`.

    Raises:
        ValueError: naming the callbacks and what to do instead.
    """
    callbacks = fit_callbacks(callback)
    if callbacks is None:
        return
    for other in callbacks[_index(callbacks, callback) + 1 :]:
        if isinstance(other, keras.callbacks.EarlyStopping) and getattr(
            other, "restore_best_weights", False
        ):
            raise ValueError(
                "EarlyStopping(restore_best_weights=True) comes after "
                f"{type(callback).__name__} in `callbacks`: at the end of "
                "`fit` it would put the best raw weights back over the "
                "average, silently. Put EarlyStopping before "
                f"{type(callback).__name__} (the average then replaces the "
                "restored weights), or pass `restore_best_weights=False`."
            )


def check_source_comes_first(callback, source) -> None:
    """Raises if `source`, a callback that folds in at the end of each
    epoch, runs after `callback`, which reads its average then.

    Raises:
        ValueError: naming both callbacks and the order to use.
    """
    callbacks = fit_callbacks(callback)
    if callbacks is None or not any(other is source for other in callbacks):
        return
    if _index(callbacks, source) > _index(callbacks, callback):
        raise ValueError(
            f"{type(source).__name__} comes after {type(callback).__name__} "
            f"in `callbacks`, so each epoch {type(callback).__name__} would "
            "see the average of the epoch before. Put "
            f"{type(callback).__name__} after {type(source).__name__}."
        )


def check_prefix_is_its_own(callback, prefix: str) -> None:
    """Raises if a callback before `callback` logs under the same `prefix`:
    the later one would overwrite the earlier one's metrics silently.

    Raises:
        ValueError: naming the prefix and how to tell them apart.
    """
    callbacks = fit_callbacks(callback)
    if callbacks is None:
        return
    for other in callbacks[: _index(callbacks, callback)]:
        if getattr(other, "_prefix", None) == prefix or (
            prefix == "val_swa_"
            and getattr(other, "log_name", None) in ("swa", "swag")
            and getattr(other, "validation_data", None) is not None
        ):
            raise ValueError(
                f"{type(other).__name__} and {type(callback).__name__} both "
                f"log `{prefix}*`: the second would overwrite the first's "
                "metrics. Give each its own `prefix=`."
            )


# Keras' EarlyStopping, ReduceLROnPlateau and ModelCheckpoint warn, each
# epoch, when their monitor is not in the logs. Their messages' beginnings:
_MISSING_METRIC = (
    "Early stopping conditioned on metric `{}` which is not available",
    "Learning rate reduction is conditioned on metric `{}` which is not "
    "available",
    "Can save best model only with {} available",
)


def quiet_missing_metrics(callback, prefix: str):
    """Silences the "metric not available" warnings of the callbacks after
    `callback` that monitor `<prefix>*`, until the returned object's
    `close()` (call it when the metric is first logged, and at the end of
    `fit`). Other warnings, and monitors of other metrics, are untouched.

    Returns:
        A `contextlib.ExitStack` whose `close()` removes the filters.
    """
    stack = contextlib.ExitStack()
    callbacks = fit_callbacks(callback)
    if callbacks is None:
        return stack
    for other in callbacks[_index(callbacks, callback) + 1:]:
        monitor = getattr(other, "monitor", None)
        if not (isinstance(monitor, str) and monitor.startswith(prefix)):
            continue
        for message in _MISSING_METRIC:
            warnings.filterwarnings(
                "ignore", message=re.escape(message.format(monitor))
            )
            entry = warnings.filters[0]
            stack.callback(_remove_filter, entry)
    return stack


def _remove_filter(entry):
    if entry in warnings.filters:
        warnings.filters.remove(entry)
        # The warnings module caches which filter matched where; the only
        # way to reset that cache after removing a filter is this private
        # function (what `warnings.catch_warnings` itself calls on exit).
        warnings._filters_mutated()
