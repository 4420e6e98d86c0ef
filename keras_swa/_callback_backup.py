"""The backup file of the epoch callbacks, to resume an interrupted `fit`."""

import os
import tempfile
import warnings

import numpy as np

BACKUP_FILENAME = "stochastic_weight_averaging.npz"


def check_directory(backup_dir):
    """Checks `backup_dir`; returns it as a string, or `None`.

    Raises:
        TypeError: if it is neither a path nor `None`.
    """
    if backup_dir is not None and not isinstance(
        backup_dir, (str, os.PathLike)
    ):
        raise TypeError(
            "`backup_dir` must be a directory path or None. Received: "
            f"backup_dir={backup_dir!r}"
        )
    return None if backup_dir is None else os.fspath(backup_dir)


def diverged(state: dict) -> bool:
    """Whether the fit of a saved state skipped a non-finite snapshot
    (backups of earlier versions did not say: taken as not)."""
    return bool(state.get("diverged", False))


class CallbackBackup:
    """The state of an epoch callback in `directory/BACKUP_FILENAME`.

    Written atomically after every epoch, read when `fit` begins, and
    removed when `fit` completes, unless the weights diverged.

    Args:
        directory: String, the callback's `backup_dir`.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, BACKUP_FILENAME)

    def write(self, epoch, start, average_period, diverged, state) -> None:
        """Writes the state after `epoch` over the previous backup.

        Args:
            epoch: Integer, the 0-based epoch just ended.
            start: Integer, the first epoch averaged.
            average_period: Integer, the callback's `average_period`.
            diverged: Whether a snapshot was skipped as non-finite.
            state: Dict of NumPy values, the rest of the callback's state.
        """
        state = {
            "epoch": np.int64(epoch),
            "start_epoch": np.int64(start),
            "average_period": np.int64(average_period),
            "diverged": np.bool_(diverged),
            **state,
        }
        os.makedirs(self.directory, exist_ok=True)
        # A crash mid-write must leave the previous backup intact: write a
        # temporary file beside it, then rename it over the old one.
        handle, temporary = tempfile.mkstemp(
            dir=self.directory, suffix=".npz.tmp"
        )
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **state)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            os.remove(temporary)
            raise

    def read(self, start: int, average_period: int) -> dict | None:
        """The saved state, or `None` without a backup.

        Raises:
            ValueError: if it was written for another start epoch or
                `average_period`.
        """
        if not os.path.exists(self.path):
            return None
        with np.load(self.path) as file:
            state = dict(file)
        saved = (int(state["start_epoch"]), int(state["average_period"]))
        if saved != (start, average_period):
            raise ValueError(
                f"The StochasticWeightAveraging backup {self.path!r} does "
                "not match this fit: it was written for (start epoch, "
                f"average_period)={saved}, while this fit has "
                f"{(start, average_period)}. Delete it to start over."
            )
        return state

    def check_resumed_epoch(self, saved_epoch: int, epoch: int) -> None:
        """Raises unless `epoch`, the first of this fit, follows the
        backup's last epoch `saved_epoch`."""
        if epoch != saved_epoch + 1:
            raise ValueError(
                "The StochasticWeightAveraging backup in "
                f"{self.directory!r} is from a fit that ended after epoch "
                f"{saved_epoch} (0-based), but this fit starts at epoch "
                f"{epoch}. Resume with `keras.callbacks.BackupAndRestore` "
                "in the callbacks (it restores the weights and the epoch), or "
                "delete the backup to start over."
            )

    def finish(self, diverged: bool) -> None:
        """At the end of a completed `fit`: removes the backup, or keeps it
        with a warning when the weights diverged (in this fit or the one it
        resumed)."""
        if diverged:
            # Ended by `TerminateOnNaN`, say: the average of the epochs
            # before is the one good thing left of this fit. (A fit that
            # ends by an exception never gets here, and keeps it too.)
            warnings.warn(
                "StochasticWeightAveraging keeps its backup "
                f"{self.path!r}: the weights diverged (NaN or infinity) in "
                "this fit. It holds the average of the finite snapshots and "
                "resumes from it; delete it to start over.",
                stacklevel=3,
            )
        elif os.path.exists(self.path):
            os.remove(self.path)
