r"""Trains an image classifier plainly and with weight averaging, same budget.

Two learning-rate recipes (`--schedule`), each for three kinds of run:

  `cosine` (the default; for any budget, short ones included):
    * plain (`sgd`): cosine annealing from `--lr` to 0 over `--epochs`;
    * `swa`: cosine annealing from `--lr` to `--swa_lr` over the epochs
      before `--swa_start` (default 75% of the budget), then `--swa_lr`,
      constant (the recipe of PyTorch's `torch.optim.swa_utils`:
      `CosineAnnealingLR`, then `SWALR`);
    * `ema`: the plain schedule, with the `keras_swa.EMA` wrapper.
  `paper` (the SWA paper, Izmailov et al., 2018, tuned for 150-225 epochs):
    * plain: `--lr` for half of the budget, then linear decay to 1% of it
      by 90% of the budget, then constant;
    * `swa`: the same shape squeezed into the epochs before `--swa_start`
      (default 50% of the budget), decaying to `--swa_lr` instead of 1%,
      then `--swa_lr`, constant;
    * `ema`: the plain schedule, with the `keras_swa.EMA` wrapper.

In the SWA run the `keras_swa.StochasticWeightAveraging` callback averages
the weights at the end of every epoch from `--swa_start` on; with
`--averaging=swag` or `compare` it is `keras_swa.SWAG`, the same callback
that also keeps the second moment and the last `--swag_rank` deviations, so
the same run gives the SWA average and the SWAG posterior. The SWAG-BMA
row is `keras_swa.predict_bma` over the test set: the mean probabilities of
`--swag_samples` weight samples (covariance scaled by `--swag_scale`), each
with its BatchNorm statistics recomputed on `--swag_bn_batches` training
batches. The EMA wrapper does not change the trajectory of the weights it
averages, so plain SGD and EMA are one run: its raw weights are the plain
row, its average the EMA row (so `--averaging=ema` reports both rows, as
`--averaging=swa` reports the SWA average and its final iterate).

`--averaging=compare` (the default) trains the plain/EMA run and the
SWA/SWAG run from the same initial weights and seed, for each seed of
`--seeds`, and prints a table of test accuracy, NLL and expected
calibration error (plain, final SWA iterate, SWA average, SWAG-BMA, EMA
average; mean +- standard deviation over the seeds) with one sentence on
whether the differences exceed the seed-to-seed spread. Every row is
evaluated with its BatchNorm statistics recomputed on the training set
(`keras_swa.update_bn`), so that the rows compare like with like at any
budget. It writes `metrics.json`, `predictions.npz` (every row's test
probabilities), `curves.png` and `calibration.png` (a reliability diagram)
to `--output_dir`.

`--averaging=posthoc_ema` trains the plain run once under
`keras_swa.PostHocEMA` (the power-function EMAs of `--ema_sigma_rels`),
with `keras_swa.EMASnapshots` writing them about `--ema_snapshots` times to
`--output_dir`/ema_snapshots/seed_<seed>; after training,
`keras_swa.sweep_ema` rebuilds the EMA of every `sigma_rel` of `--ema_sweep`
from the snapshots and evaluates it. It prints the sweep as a table and
plots the test metrics against `sigma_rel` (`posthoc_ema.png`).

A flag the chosen `--averaging` does not use is refused, not ignored: given
on the command line, even at its default value, it stops the binary before
anything is loaded, in one line naming the modes that use it. `--swa_start`
and `--swa_lr` are used by `compare`, `swa` and `swag`; `--ema_decay` and
`--ema_warmup` by `compare` and `ema`; the `--swag_*` flags by `compare` and
`swag`; `--ema_sigma_rels`, `--ema_sweep` and `--ema_snapshots` by
`posthoc_ema` (the table `MODE_FLAGS`); the other flags do not depend on
the mode. Also refused, in one line: `--swag_samples` given with
`--swag_scale=0` (one sample, the SWA mean), and `--data_dir` or
`--download` where the data does not need them (`--dataset=digits`;
`--download` with the IDX files in `--data_dir`).

Examples:
  python -m examples.train                       # offline digits demo
  python -m examples.train --epochs=10 --seeds=0,1,2
  python -m examples.train --averaging=posthoc_ema --epochs=10
  python -m examples.train --dataset=cifar100 --model=preresnet164 \
      --schedule=paper --epochs=225 --lr=0.1 --swa_start=126 --swa_lr=0.05 \
      --weight_decay=3e-4 --batch_size=128 --data_dir=~/tensorflow_datasets

From another folder than the checkout's root, run the file itself:
  python path/to/checkout/examples/train.py --epochs=10
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: python path/to/examples/train.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from examples import _cli  # noqa: E402
from examples import data as data_lib  # noqa: E402

# Keras, TensorFlow and keras_swa are imported where they are used, after
# the flags and the data are checked: a mistake is told in a second, in one
# line, instead of after their start-up and its log lines.

PROG = "examples.train"
# The keys of `models.MODELS` (a test keeps them in step), here so that the
# flags are checked without importing Keras.
MODEL_NAMES = ("small_cnn", "vgg16_bn", "preresnet110", "preresnet164", "wrn28_10")
SCHEDULES = ("cosine", "paper")
AVERAGING = ("compare", "sgd", "swa", "swag", "ema", "posthoc_ema")
# keras_swa.averaging.MAX_SIGMA_REL (a test keeps them in step), here so
# that the flags are checked without importing Keras: the widest
# power-function EMA profile.
MAX_SIGMA_REL = 0.28
# Confidence bins of the expected calibration error and the reliability
# diagram (the usual 15 of Guo et al., 2017).
ECE_BINS = 15

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "digits", "'digits' (offline) or a tensorflow-datasets name.")
flags.DEFINE_string("data_dir", None,
                    "tensorflow-datasets data, or the IDX files of (fashion_)mnist "
                    "(not with --dataset=digits).")
flags.DEFINE_bool("download", False,
                  "Let tensorflow-datasets download a missing dataset (not with "
                  "--dataset=digits, nor with the IDX files in --data_dir).")
flags.DEFINE_enum("model", "small_cnn", MODEL_NAMES, "The network.")
flags.DEFINE_integer("epochs", 40, "Training budget in epochs, the same for every run.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_enum("schedule", "cosine", SCHEDULES,
                  "Learning-rate recipe: 'cosine' (any budget) or 'paper' (the SWA paper's, "
                  "for 150-225-epoch budgets). See the module docstring.")
flags.DEFINE_float("lr", 0.05, "Initial learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay of SGD.")
flags.DEFINE_string("swa_start", None,
                    "First averaged epoch: an integer epoch, or a fraction of --epochs. "
                    "Default: 0.75 with --schedule=cosine, 0.5 with --schedule=paper.")
flags.DEFINE_float("swa_lr", 0.01, "Learning rate of the SWA phase.")
flags.DEFINE_float("ema_decay", 0.998, "Decay of the EMA average.")
flags.DEFINE_bool("ema_warmup", True,
                  "Ramp the EMA decay up as min(decay, (1 + n) / (10 + n)), so that the "
                  "initial weights do not linger in short runs.")
flags.DEFINE_enum("averaging", "compare", AVERAGING,
                  "Which runs to train: 'compare' (all but posthoc_ema), 'sgd', 'swa', "
                  "'swag' (the SWA run with SWAG), 'ema' or 'posthoc_ema' (see the "
                  "module docstring).")
flags.DEFINE_integer("swag_rank", 20, "Deviation columns SWAG keeps (its max_rank).")
flags.DEFINE_integer("swag_samples", 30, "Weight samples of the SWAG-BMA prediction.")
flags.DEFINE_float("swag_scale", 0.5,
                   "Scale of the SWAG covariance when sampling (0: one sample, the SWA "
                   "mean, and --swag_samples is refused).")
flags.DEFINE_integer("swag_bn_batches", 50,
                     "Training batches the BatchNorm statistics of each SWAG sample are "
                     "recomputed on.")
flags.DEFINE_list("ema_sigma_rels", ["0.05", "0.10"],
                  "The sigma_rel of the power-function EMAs PostHocEMA tracks "
                  "(--averaging=posthoc_ema).")
flags.DEFINE_list("ema_sweep", ["0.02", "0.03", "0.05", "0.07", "0.10", "0.13", "0.16", "0.20"],
                  "The sigma_rel values rebuilt from the snapshots after training and "
                  "evaluated (--averaging=posthoc_ema).")
flags.DEFINE_integer("ema_snapshots", 20,
                     "About how many EMA snapshots to write over the run, evenly spaced, "
                     "the last at the last update (--averaging=posthoc_ema).")
flags.DEFINE_list("seeds", ["0"],
                  "Comma-separated seeds (initial weights, data order, augmentation); "
                  "with several, the table gives mean +- standard deviation.")
flags.DEFINE_string("output_dir", "runs/latest", "Where metrics.json and curves.png go.")
flags.DEFINE_integer("verbose", 2, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")

CONFIG_KEYS = ("dataset", "data_dir", "download", "model", "epochs", "batch_size",
               "schedule", "lr", "momentum", "weight_decay", "swa_start", "swa_lr",
               "ema_decay", "ema_warmup", "averaging", "swag_rank", "swag_samples",
               "swag_scale", "swag_bn_batches", "ema_sigma_rels", "ema_sweep",
               "ema_snapshots", "seeds", "output_dir", "verbose")
# Defaults of the keys a caller of `train` may leave out.
DEFAULTS = {"schedule": "cosine", "ema_warmup": True, "seeds": [0], "swa_start": None,
            "swag_rank": 20, "swag_samples": 30, "swag_scale": 0.5, "swag_bn_batches": 50,
            "ema_sigma_rels": [0.05, 0.10],
            "ema_sweep": [0.02, 0.03, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20],
            "ema_snapshots": 20}
# The modes of `--averaging` that use each of these flags, and no other mode
# reads them (a test trains every mode and holds it to this table): given on
# the command line to another mode, the flag is refused rather than ignored.
# The other flags do not depend on the mode.
MODE_FLAGS = {
    **dict.fromkeys(("swa_start", "swa_lr"), ("compare", "swa", "swag")),
    **dict.fromkeys(("ema_decay", "ema_warmup"), ("compare", "ema")),
    **dict.fromkeys(("swag_rank", "swag_samples", "swag_scale", "swag_bn_batches"),
                    ("compare", "swag")),
    **dict.fromkeys(("ema_sigma_rels", "ema_sweep", "ema_snapshots"), ("posthoc_ema",)),
}
# The default `--swa_start` of each schedule. Cosine: measured on digits at
# 10 and 20 epochs (docs/examples.md), 0.75 beats 0.5 (the SWA run anneals
# over more epochs before averaging); paper: about the paper's 126 of 225.
SWA_START = {"cosine": "0.75", "paper": "0.5"}


# --- Flags ------------------------------------------------------------------


def parse_swa_start(text, epochs):
    """`"12"` is epoch 12, `"0.75"` is 75% of `epochs`; returns the epoch."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"--swa_start must be an epoch or a fraction, got {text!r}."
            ) from None
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"--swa_start as a fraction must be in (0, 1], got {value}."
            )
        return min(int(math.floor(value * epochs)), epochs - 1)
    if not 0 <= value < epochs:
        raise ValueError(
            f"--swa_start must be an epoch in [0, {epochs - 1}] "
            f"(--epochs={epochs}), got {value}."
        )
    return value


def parse_seeds(seeds):
    """The seeds of `--seeds` (a list of ints or of their strings) as ints."""
    if isinstance(seeds, (int, str)):
        seeds = [seeds]
    try:
        values = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ValueError(
            f"--seeds must be integers >= 0 separated by commas, got "
            f"{','.join(map(str, seeds))!r}."
        ) from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ValueError(
            f"--seeds must be distinct integers >= 0 separated by commas "
            f"(e.g. 0,1,2), got {','.join(map(str, seeds))!r}."
        )
    return values


def parse_sigma_rels(values, flag):
    """The floats of `--flag` (a list of floats or of their strings), each
    in (0, MAX_SIGMA_REL), distinct, at least one."""
    if not isinstance(values, (list, tuple)):
        values = [values]
    text = ",".join(map(str, values))
    expected = (f"--{flag} must be distinct floats in (0, {MAX_SIGMA_REL}) separated "
                f"by commas (e.g. 0.05,0.10), got {text!r}.")
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(expected) from None
    if (not floats or len(set(floats)) != len(floats)
            or not all(0.0 < v < MAX_SIGMA_REL for v in floats)):
        raise ValueError(expected)
    return floats


def validate(config):
    """Checks the settings; returns the SWA start epoch and the seeds, and
    stores the parsed `sigma_rel` lists back into `config`.

    Raises:
        ValueError: for a setting out of range, naming its flag.
    """
    checks = [
        ("epochs", config["epochs"] >= 1, "an integer >= 1"),
        ("batch_size", config["batch_size"] >= 1, "an integer >= 1"),
        ("lr", config["lr"] > 0, "a float > 0"),
        ("swa_lr", config["swa_lr"] > 0, "a float > 0"),
        ("momentum", 0 <= config["momentum"] < 1, "a float in [0, 1)"),
        ("weight_decay", config["weight_decay"] >= 0, "a float >= 0"),
        ("ema_decay", 0 <= config["ema_decay"] < 1, "a float in [0, 1)"),
        ("verbose", config["verbose"] in (0, 1, 2), "0, 1 or 2"),
        ("swag_rank", config["swag_rank"] >= 0, "an integer >= 0"),
        ("swag_samples", config["swag_samples"] >= 1, "an integer >= 1"),
        ("swag_scale", config["swag_scale"] >= 0, "a float >= 0"),
        ("swag_bn_batches", config["swag_bn_batches"] >= 1, "an integer >= 1"),
        ("ema_snapshots", config["ema_snapshots"] >= 1, "an integer >= 1"),
        ("schedule", config["schedule"] in SCHEDULES, " or ".join(SCHEDULES)),
        ("averaging", config["averaging"] in AVERAGING, ", ".join(AVERAGING)),
        ("model", config["model"] in MODEL_NAMES, "one of " + ", ".join(MODEL_NAMES)),
        ("dataset", bool(config["dataset"]), "a dataset name"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{name} must be {expected}, got {config[name]!r}.")
    for flag in ("ema_sigma_rels", "ema_sweep"):
        config[flag] = parse_sigma_rels(config[flag], flag)
    swa_start = config["swa_start"]
    if swa_start is None:
        swa_start = SWA_START[config["schedule"]]
    return parse_swa_start(str(swa_start), config["epochs"]), parse_seeds(config["seeds"])


def check_mode_flags(averaging, given):
    """Raises a ValueError if a flag of `given` (the names of the flags on
    the command line, whatever their values: a default never is) is one
    `--averaging=averaging` does not use, by `MODE_FLAGS`."""
    for name in given:
        modes = MODE_FLAGS.get(name)
        if modes and averaging not in modes:
            users = modes[0] if len(modes) == 1 else f"{', '.join(modes[:-1])} or {modes[-1]}"
            raise ValueError(
                f"--{name} is used only with --averaging={users}, not "
                f"--averaging={averaging}: drop it or change --averaging."
            )


def check_swag_samples(config, given):
    """Raises a ValueError if `--swag_samples` is in `given` (the flags on
    the command line) with `--swag_scale=0`: `predict_bma` then takes one
    sample, the SWA mean, so the number asked for would be ignored. Left
    at its default, it is not refused: the run reports its one sample."""
    if "swag_samples" in given and config["swag_scale"] == 0:
        raise ValueError(
            "--swag_samples is not used with --swag_scale=0 (one sample: the SWA "
            "mean): drop --swag_samples or pass --swag_scale > 0."
        )


# --- Learning-rate schedules (per epoch, 0-based) -----------------------------


def paper_schedule(lr, epochs, final_ratio):
    """The SWA paper's per-epoch learning rate: `lr` for the first half of
    `epochs`, linear down to `lr * final_ratio` at 90%, then constant."""

    def schedule(epoch, current_lr=None):
        t = epoch / epochs
        if t <= 0.5:
            factor = 1.0
        elif t <= 0.9:
            factor = 1.0 - (1.0 - final_ratio) * (t - 0.5) / 0.4
        else:
            factor = final_ratio
        return lr * factor

    return schedule


def cosine_schedule(lr, epochs, final_lr=0.0):
    """Cosine annealing from `lr` at epoch 0 towards `final_lr` at epoch
    `epochs`, `final_lr` from then on: `torch.optim.lr_scheduler.
    CosineAnnealingLR(T_max=epochs, eta_min=final_lr)` stepped per epoch."""

    def schedule(epoch, current_lr=None):
        if epoch >= epochs:
            return final_lr
        return final_lr + (lr - final_lr) * (1 + math.cos(math.pi * epoch / epochs)) / 2

    return schedule


def plain_schedule(config):
    """The per-epoch learning rate of `--schedule` for the runs without SWA
    (plain, EMA, post-hoc EMA)."""
    lr, epochs = config["lr"], config["epochs"]
    if config["schedule"] == "paper":
        return paper_schedule(lr, epochs, 0.01)
    return cosine_schedule(lr, epochs)


def swa_schedule(config, swa_start):
    """The per-epoch learning rate of `--schedule` for the SWA run. Apart
    from `plain_schedule`, so that a mode without the SWA run reads neither
    `--swa_lr` nor `--swa_start` (a test holds each mode to `MODE_FLAGS`)."""
    lr, swa_lr = config["lr"], config["swa_lr"]
    if config["schedule"] == "paper":
        return paper_schedule(lr, max(swa_start, 1), swa_lr / lr)
    return cosine_schedule(lr, swa_start, swa_lr)


# --- Training -----------------------------------------------------------------


def build(config, dataset, optimizer, seed, metrics=()):
    import keras

    from examples import models as models_lib

    keras.utils.set_random_seed(seed)
    model = models_lib.get(config["model"], dataset.input_shape, dataset.num_classes)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", *metrics],
    )
    return model


def sgd(config):
    import keras

    return keras.optimizers.SGD(
        config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"] or None,
    )


def fit(model, dataset, config, schedule, extra_callbacks=()):
    import keras

    history = model.fit(
        dataset.train,
        epochs=config["epochs"],
        shuffle=False,  # the pipeline shuffles
        validation_data=dataset.test,
        callbacks=[keras.callbacks.LearningRateScheduler(schedule), *extra_callbacks],
        verbose=config["verbose"],
    )
    return history.history


# --- Evaluation: accuracy, NLL and calibration from test probabilities --------


def softmax(logits):
    """Softmax over the last axis, computed in float64, as float32."""
    import numpy as np

    logits = np.asarray(logits, dtype="float64")
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (exponentials / exponentials.sum(axis=-1, keepdims=True)).astype("float32")


def scores(probabilities, labels):
    """Test accuracy, NLL (mean negative log-probability of the true class)
    and expected calibration error (`keras_swa.metrics.
    ExpectedCalibrationError`, `ECE_BINS` bins) of class probabilities."""
    import numpy as np

    import keras_swa

    probabilities = np.asarray(probabilities, dtype="float32")
    labels = np.asarray(labels)
    true_class = probabilities[np.arange(len(labels)), labels].astype("float64")
    # A probability that underflowed float32 counts as the smallest one.
    nll = -np.log(np.maximum(true_class, np.finfo("float32").tiny))
    ece = keras_swa.metrics.ExpectedCalibrationError(num_bins=ECE_BINS)
    ece.update_state(labels, probabilities)
    return {
        "accuracy": float(np.mean(probabilities.argmax(axis=-1) == labels)),
        "nll": float(np.mean(nll)),
        "ece": float(ece.result()),
    }


def test_probabilities(model, dataset):
    """The model's class probabilities on the test set, in its order."""
    return softmax(model.predict(dataset.test, verbose=0))


def evaluate_bn_recomputed(model, dataset):
    """Recomputes the model's BatchNorm statistics on the training set, then
    predicts the test set: the evaluation every row of the table gets."""
    import keras_swa

    keras_swa.update_bn(model, dataset.train_eval, verbose=0)
    return test_probabilities(model, dataset)


def last_epoch(history):
    """The last per-epoch evaluation of `fit` (running BatchNorm statistics)."""
    return {
        "accuracy": float(history["val_accuracy"][-1]),
        "loss": float(history["val_loss"][-1]),
    }


# --- The runs -------------------------------------------------------------------
# Each returns its `history`, the test `probabilities` of its rows, the
# accuracy of its raw weights with the running BatchNorm statistics
# (`running_bn`) and, where it has them, `extra` results for metrics.json.


def run_plain(config, dataset, schedule, seed, with_ema):
    """Plain SGD; with `with_ema`, under the EMA wrapper, which averages the
    same trajectory. Rows `sgd` (and `ema`)."""
    import keras_swa

    optimizer = sgd(config)
    if with_ema:
        optimizer = keras_swa.EMA(
            optimizer, decay=config["ema_decay"], warmup=config["ema_warmup"]
        )
    model = build(config, dataset, optimizer, seed)
    history = fit(model, dataset, config, schedule)
    probabilities = {}
    if with_ema:
        with keras_swa.averaged_weights(model, bn_data=dataset.train_eval, verbose=0):
            probabilities["ema"] = test_probabilities(model, dataset)
    probabilities["sgd"] = evaluate_bn_recomputed(model, dataset)
    return {"history": history, "probabilities": probabilities,
            "running_bn": {"sgd": last_epoch(history)}}


def run_swa(config, dataset, schedule, swa_start, seed, with_swag):
    """SGD with the SWA callback, or with SWAG (the SWA callback that also
    keeps the posterior). Rows `swa_iterate`, `swa` (and `swag`)."""
    import keras
    import keras_swa

    class KeepIterate(keras.callbacks.Callback):
        # Before the averager in the list, so it sees the final iterate
        # before the average replaces it.
        def on_train_end(self, logs=None):
            self.final_weights = self.model.get_weights()

    iterate = KeepIterate()
    averager_arguments = dict(
        start_epoch=swa_start,
        bn_data=dataset.train_eval,
        validation_data=dataset.test,
        verbose=int(config["verbose"] == 1),
    )
    if with_swag:
        averager = keras_swa.SWAG(max_rank=config["swag_rank"], **averager_arguments)
    else:
        averager = keras_swa.StochasticWeightAveraging(**averager_arguments)
    model = build(config, dataset, sgd(config), seed)
    history = fit(model, dataset, config, schedule, [iterate, averager])
    # The callback left the average, with recomputed BatchNorm, in the model.
    probabilities = {"swa": test_probabilities(model, dataset)}
    extra = {}
    if with_swag:
        start = time.perf_counter()
        probabilities["swag"] = keras_swa.predict_bma(
            model,
            dataset.test,
            source=averager,
            num_samples=config["swag_samples"],
            scale=config["swag_scale"],
            seed=seed,
            bn_data=dataset.train_eval,
            bn_steps=config["swag_bn_batches"],
            from_logits=True,
        )
        seconds = time.perf_counter() - start
        samples = config["swag_samples"] if config["swag_scale"] > 0 else 1
        extra["swag"] = {
            "rank": averager.rank,
            "n_averaged": int(keras.ops.convert_to_numpy(averager.n_averaged)),
            "samples": samples,
            "bma_seconds": seconds,
            "bma_seconds_per_sample": seconds / samples,
        }
    model.set_weights(iterate.final_weights)
    probabilities["swa_iterate"] = evaluate_bn_recomputed(model, dataset)
    return {"history": history, "probabilities": probabilities, "extra": extra,
            "running_bn": {"swa_iterate": last_epoch(history)}}


def snapshot_every(total_updates, wanted):
    """The updates between two EMA snapshots for about `wanted` snapshots
    over `total_updates`: `total_updates / m` for the smallest divisor `m`
    of `total_updates` in [wanted, 2 * wanted], so that the last snapshot
    is the last update; `total_updates // wanted` if there is none."""
    wanted = min(wanted, total_updates)
    for count in range(wanted, min(2 * wanted, total_updates) + 1):
        if total_updates % count == 0:
            return total_updates // count
    return total_updates // wanted


def clear_snapshots(directory):
    """Removes the EMA snapshots (`ema-<step>.npz`) an earlier run of this
    binary left in `directory` (EMASnapshots refuses to mix runs); returns
    how many."""
    import re

    if not os.path.isdir(directory):
        return 0
    stale = [name for name in os.listdir(directory) if re.fullmatch(r"ema-\d+\.npz", name)]
    for name in stale:
        os.remove(os.path.join(directory, name))
    return len(stale)


def run_posthoc_ema(config, dataset, schedule, seed, directory):
    """Plain SGD under PostHocEMA with EMASnapshots writing to `directory`;
    after training, `sweep_ema` over `--ema_sweep`. Row `sgd` and the
    sweep, in `extra["posthoc_ema"]`."""
    import keras_swa

    updates = config["epochs"] * math.ceil(dataset.train_size / config["batch_size"])
    every = snapshot_every(updates, config["ema_snapshots"])
    removed = clear_snapshots(directory)
    if removed:
        print(f"Removed {removed} EMA snapshots of an earlier run from {directory}.")
    optimizer = keras_swa.PostHocEMA(sgd(config), sigma_rels=tuple(config["ema_sigma_rels"]))
    ece = keras_swa.metrics.ExpectedCalibrationError(num_bins=ECE_BINS, from_logits=True)
    model = build(config, dataset, optimizer, seed, metrics=[ece])
    history = fit(model, dataset, config, schedule,
                  [keras_swa.EMASnapshots(directory, every_n_steps=every)])
    start = time.perf_counter()
    table = keras_swa.sweep_ema(model, directory, config["ema_sweep"], dataset.test,
                                bn_data=dataset.train_eval)
    seconds = time.perf_counter() - start
    sweep = [
        # The loss is the cross-entropy of the logits: the NLL.
        {"sigma_rel": row["sigma_rel"], "accuracy": float(row["accuracy"]),
         "nll": float(row["loss"]), "ece": float(row["ece"])}
        for row in table
    ]
    probabilities = {"sgd": evaluate_bn_recomputed(model, dataset)}
    extra = {"posthoc_ema": {
        "directory": directory,
        "every_n_steps": every,
        "updates": updates,
        "snapshots": updates // every,
        "sweep": sweep,
        "sweep_seconds": seconds,
    }}
    return {"history": history, "probabilities": probabilities, "extra": extra,
            "running_bn": {"sgd": last_epoch(history)}}


RUN_TITLES = {
    "sgd": "SGD",
    "sgd_ema": "SGD + EMA",
    "swa": "SGD + SWA callback",
    "swag": "SGD + SWAG callback",
    "posthoc_ema": "SGD + PostHocEMA",
}


def train_seed(config, dataset, labels, swa_start, seed, output_dir):
    """The runs of `--averaging` for one seed: their histories, and per row
    the test probabilities and scores."""
    averaging = config["averaging"]
    # Run name -> kind of run.
    wanted = {
        "compare": {"sgd": "sgd_ema", "swa": "swag"},
        "sgd": {"sgd": "sgd"},
        "ema": {"sgd": "sgd_ema"},
        "swa": {"swa": "swa"},
        "swag": {"swa": "swag"},
        "posthoc_ema": {"sgd": "posthoc_ema"},
    }[averaging]
    runs, seconds = {}, {}
    for name, kind in wanted.items():
        print(f"\n== seed {seed}: {RUN_TITLES[kind]}, {config['model']} on "
              f"{config['dataset']}, {config['epochs']} epochs, {config['schedule']} "
              "schedule ==", flush=True)
        start = time.time()
        if kind in ("swa", "swag"):
            runs[name] = run_swa(config, dataset, swa_schedule(config, swa_start),
                                 swa_start, seed, with_swag=kind == "swag")
        elif kind == "posthoc_ema":
            directory = os.path.join(output_dir, "ema_snapshots", f"seed_{seed}")
            runs[name] = run_posthoc_ema(config, dataset, plain_schedule(config), seed,
                                         directory)
        else:
            runs[name] = run_plain(config, dataset, plain_schedule(config), seed,
                                   with_ema=kind == "sgd_ema")
        seconds[name] = time.time() - start
    probabilities = {k: v for run in runs.values() for k, v in run["probabilities"].items()}
    probabilities = {k: probabilities[k] for k in LABELS if k in probabilities}
    running = {k: v for run in runs.values() for k, v in run["running_bn"].items()}
    extra = {k: v for run in runs.values() for k, v in run.get("extra", {}).items()}
    return {
        "final": {k: scores(p, labels) for k, p in probabilities.items()},
        "running_bn": running,
        "seconds": seconds,
        "runs": {name: {"history": run["history"]} for name, run in runs.items()},
        **extra,
        "probabilities": probabilities,
    }


# --- Summary over seeds -------------------------------------------------------

LABELS = {
    "sgd": "SGD (plain)",
    "swa_iterate": "SWA: final iterate",
    "swa": "SWA: average",
    "swag": "SWAG-BMA",
    "ema": "EMA: average",
}
METRICS = ("accuracy", "nll", "ece")
# How `conclusion` shows a difference of each metric: factor, unit, format,
# and the differences it counts as ties (accuracies are float32 metrics).
UNITS = {"accuracy": (100, " points", ".2f", 1e-4), "nll": (1, "", ".4f", 1e-7)}


def summarize(finals):
    """Mean and sample standard deviation (None for one seed) of each row
    over the per-seed results `finals` (a list of `{row: {"accuracy",
    "nll", "ece"}}`), with the per-seed values."""
    summary = {}
    for row in finals[0]:
        summary[row] = {}
        for metric in METRICS:
            values = [float(f[row][metric]) for f in finals]
            summary[row][metric] = statistics.fmean(values)
            summary[row][f"{metric}_std"] = (
                statistics.stdev(values) if len(values) > 1 else None
            )
            summary[row][f"{metric}_per_seed"] = values
    return summary


def _cell(row, metric):
    """`mean ± std` of a metric, accuracy in percent."""
    if metric == "accuracy":
        mean, std = row["accuracy"] * 100, row["accuracy_std"]
        return f"{mean:.2f}%" if std is None else f"{mean:.2f} ± {std * 100:.2f}%"
    mean, std = row[metric], row[f"{metric}_std"]
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_table(summary, labels=None):
    """The Markdown table of `summarize`'s rows, in the order of `labels`
    (`{row: label}`; `LABELS` by default)."""
    labels = LABELS if labels is None else labels
    keys = [k for k in labels if k in summary]
    width = max([20, *(len(labels[k]) for k in keys)])
    header = ("test accuracy", "test NLL", "test ECE")
    widths = (16, 17, 17)
    lines = [
        f"| {'model':<{width}} | " + " | ".join(f"{h:>{w}}" for h, w in zip(header, widths)) + " |",
        f"|{'-' * (width + 2)}|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for key in keys:
        cells = [f"{_cell(summary[key], m):>{w}}" for m, w in zip(METRICS, widths)]
        lines.append(f"| {labels[key]:<{width}} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def conclusion(summary, resolution=0.0, metric="accuracy", labels=None):
    """One sentence: whether each row's test `metric` (`"accuracy"` or
    `"nll"`) differs from the baseline's (plain SGD; else the SWA final
    iterate) by more than the seed-to-seed spread: the larger standard
    deviation of the two rows, and at least `resolution` (for accuracy, one
    test example, as a fraction: on a small test set a one-example
    difference is the smallest there is).

    A rough screen, not a significance test: with three seeds only a large
    difference is worth reading. For `"nll"`, None when there is one row
    or one seed (the accuracy sentence says so), and no `resolution`.
    """
    labels = LABELS if labels is None else labels
    scale, unit, spec, tie = UNITS[metric]
    accuracy = metric == "accuracy"
    resolution = resolution if accuracy else 0.0
    base = "sgd" if "sgd" in summary else ("swa_iterate" if "swa_iterate" in summary else None)
    others = [k for k in labels if k in summary and k != base]
    if base is None or not others:
        return "One row only: nothing to compare (--averaging=compare trains them all)." \
            if accuracy else None
    n = len(summary[base][f"{metric}_per_seed"])
    diffs = {k: (summary[k][metric] - summary[base][metric]) * scale for k in others}
    diffs = {k: 0.0 if abs(d) <= tie else d for k, d in diffs.items()}  # no "-0.00"
    listed = [f"{labels[k]} {diffs[k]:+{spec}}{unit}" for k in others]
    if n == 1:
        if not accuracy:
            return None
        return (
            f"One seed, so no spread to hold the differences against "
            f"({_join(listed)} against {labels[base]}): rerun with --seeds=0,1,2 "
            f"before reading anything into them."
        )
    spread = {
        k: max(summary[k][f"{metric}_std"], summary[base][f"{metric}_std"], resolution) * scale
        for k in others
    }
    above = [k for k in others if abs(diffs[k]) > spread[k] + tie]
    within = [k for k in others if k not in above]
    rule = "the larger standard deviation of the two rows"
    if resolution:
        rule += f", at least one test example, {resolution * scale:{spec}}{unit}"
    opening = f"Over {n} seeds" if accuracy else f"In test NLL, over {n} seeds"

    def items(keys):
        return [f"{labels[k]} ({diffs[k]:+{spec}}{unit}, spread {spread[k]:{spec}})"
                for k in keys]

    if not above:
        return (
            f"{opening}, no row differs from {labels[base]} by more than the "
            f"seed-to-seed spread ({rule}): {_join(items(within))}."
        )
    if not within:
        return (
            f"{opening}, every row differs from {labels[base]} by more than "
            f"the seed-to-seed spread ({rule}): {_join(items(above))}."
        )
    verb = "differs" if len(above) == 1 else "differ"
    return (
        f"{opening}, {_join(items(above))} {verb} from {labels[base]} by "
        f"more than the seed-to-seed spread ({rule}); {_join(items(within))} "
        f"{'does' if len(within) == 1 else 'do'} not."
    )


def sweep_labels(config):
    """`{row: label}` of the post-hoc EMA table: plain SGD, then one row per
    `sigma_rel` of the sweep (rows keyed `ema@<sigma_rel>`)."""
    labels = {"sgd": LABELS["sgd"]}
    for sigma_rel in config["ema_sweep"]:
        tracked = " (tracked)" if sigma_rel in config["ema_sigma_rels"] else ""
        labels[f"ema@{sigma_rel:g}"] = f"EMA sigma_rel={sigma_rel:g}{tracked}"
    return labels


def sweep_rows(per_seed_result):
    """One seed's sweep as rows `{ema@<sigma_rel>: {metric: value}}`."""
    return {
        f"ema@{row['sigma_rel']:g}": {m: row[m] for m in METRICS}
        for row in per_seed_result["posthoc_ema"]["sweep"]
    }


def running_bn_note(summary, running):
    """A note for the rows whose accuracy with the running BatchNorm
    statistics (what `model.evaluate` right after `fit` gives) is more than
    a point away from the table's (statistics recomputed); or None."""
    far = [
        f"{LABELS[k]} {running[k]['accuracy'] * 100:.2f}% (table: "
        f"{summary[k]['accuracy'] * 100:.2f}%)"
        for k in LABELS
        if k in running and abs(running[k]["accuracy"] - summary[k]["accuracy"]) > 0.01
    ]
    if not far:
        return None
    return (
        f"Note: with the running BatchNorm statistics training left (what "
        f"model.evaluate right after fit sees), {_join(far)}: at this budget "
        f"those statistics have not caught up with the weights, so the table "
        f"recomputes them for every row."
    )


# --- Plot ---------------------------------------------------------------------


def _band(ax, curves, start, label, **style):
    """Mean curve over seeds, with the min-max band when several."""
    import numpy as np

    values = np.array(curves) * 100
    epochs = np.arange(start, start + values.shape[1])
    (line,) = ax.plot(epochs, values.mean(axis=0), label=label, **style)
    if len(values) > 1:
        ax.fill_between(epochs, values.min(axis=0), values.max(axis=0),
                        color=line.get_color(), alpha=0.15, linewidth=0)
    return line


def figure(per_seed, summary, title):
    """The test-accuracy curves of the runs (mean over the seeds, with the
    min-max band) and the final rows; the legend sits outside the axes, so
    that it covers no curve. Returns the Matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    seeds = list(per_seed)
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    lowest = []
    first = per_seed[seeds[0]]["runs"]
    for name in first:
        curves = [per_seed[s]["runs"][name]["history"]["val_accuracy"] for s in seeds]
        label = "SWA run: iterate" if name == "swa" else "SGD run: iterate"
        _band(ax, curves, 1, label)
        lowest.append(min(min(c[len(c) // 4:]) for c in curves))
        history = first[name]["history"]
        if name == "swa" and "val_swa_accuracy" in history:
            swa = [per_seed[s]["runs"][name]["history"]["val_swa_accuracy"] for s in seeds]
            start = len(history["val_accuracy"]) - len(swa[0]) + 1
            _band(ax, swa, start, "SWA run: average (BN recomputed)", marker="o", markersize=3)
    epochs = len(first[next(iter(first))]["history"]["val_accuracy"])
    markers = {"sgd": "s", "swa_iterate": "^", "swa": "*", "swag": "P", "ema": "D"}
    for i, key in enumerate(k for k in markers if k in summary):
        # Side by side after the last epoch, so that equal results stay visible.
        x = epochs + 0.5 + i * max(epochs, 4) / 40
        ax.plot([x], [summary[key]["accuracy"] * 100], markers[key], markersize=9,
                linestyle="none", label=f"{LABELS[key]} (final, BN recomputed)")
        lowest.append(summary[key]["accuracy"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    band = ", band: min to max over seeds" if len(seeds) > 1 else ""
    ax.set_title(f"{title}\ncurves: running BN statistics, mean over seeds{band}", fontsize=10)
    ax.set_ylim(max(min(lowest) * 100 - 2, 0), 100.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
              borderaxespad=0.0)
    return fig


def calibration_bins(probabilities, labels, num_bins=ECE_BINS):
    """The reliability diagram's bins, as `ExpectedCalibrationError` makes
    them: bin `b` holds the confidences (largest probabilities) in
    `(b / num_bins, (b + 1) / num_bins]`. Returns per bin the number of
    predictions, their mean confidence and their accuracy (NaN when empty)."""
    import numpy as np

    probabilities = np.asarray(probabilities, dtype="float64")
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == np.asarray(labels)
    bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, confidence, num_bins) / counts
        accuracy = np.bincount(bins, correct.astype(float), num_bins) / counts
    return counts, mean_confidence, accuracy


def calibration_figure(per_seed, labels, summary, title):
    """The reliability diagram of every row (the predictions of all seeds
    pooled): accuracy against mean confidence per bin, a marker's area
    growing with the bin's share of predictions, above the share of
    predictions per bin. Returns the Matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = list(per_seed)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    top.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1,
             label="perfect calibration")
    edges = np.linspace(0, 1, ECE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for key, label in LABELS.items():
        if key not in summary:
            continue
        probabilities = np.concatenate([per_seed[s]["probabilities"][key] for s in seeds])
        counts, confidence, accuracy = calibration_bins(
            probabilities, np.tile(labels, len(seeds))
        )
        filled = counts > 0
        share = counts / counts.sum()
        (line,) = top.plot(confidence[filled], accuracy[filled], linewidth=1, alpha=0.8,
                           label=f"{label} (ECE {summary[key]['ece']:.4f})")
        top.scatter(confidence[filled], accuracy[filled], s=10 + 300 * np.sqrt(share[filled]),
                    color=line.get_color(), alpha=0.6, edgecolors="none")
        bottom.plot(centres[filled], share[filled], marker="o", markersize=3,
                    color=line.get_color())
    top.set_ylabel("accuracy in the bin")
    top.set_xlim(0, 1.02)
    top.set_ylim(-0.02, 1.02)
    top.grid(alpha=0.3)
    pooled = f"{len(seeds)} seeds pooled, " if len(seeds) > 1 else ""
    top.set_title(f"{title}\nreliability diagram: {pooled}{ECE_BINS} equal-width "
                  "confidence bins, marker area ~ share of predictions", fontsize=10)
    top.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
               borderaxespad=0.0)
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence (largest class probability)")
    bottom.set_ylabel("share of\npredictions")
    bottom.grid(alpha=0.3)
    return fig


def posthoc_figure(sweep_summary, summary, config, title):
    """The post-hoc EMA sweep: test accuracy, NLL and ECE against
    `sigma_rel` (mean over seeds, min-max band), with plain SGD as a line
    and the tracked `sigma_rel` marked. Returns the Matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sigma_rels = config["ema_sweep"]
    rows = [sweep_summary[f"ema@{s:g}"] for s in sigma_rels]
    order = np.argsort(sigma_rels)
    x = np.array(sigma_rels)[order]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = {"accuracy": "test accuracy (%)", "nll": "test NLL", "ece": "test ECE"}
    for ax, metric in zip(axes, METRICS):
        scale = 100 if metric == "accuracy" else 1
        values = np.array([r[f"{metric}_per_seed"] for r in rows])[order] * scale
        ax.plot(x, values.mean(axis=1), marker="o", label="post-hoc EMA (reconstructed)")
        if values.shape[1] > 1:
            ax.fill_between(x, values.min(axis=1), values.max(axis=1), alpha=0.15,
                            linewidth=0, label="min to max over seeds")
        ax.axhline(summary["sgd"][metric] * scale, color="0.3", linestyle="--",
                   linewidth=1, label=LABELS["sgd"])
        for i, tracked in enumerate(config["ema_sigma_rels"]):
            ax.axvline(tracked, color="tab:red", linestyle=":", linewidth=1,
                       label="tracked sigma_rel" if i == 0 else None)
        ax.set_xlabel("sigma_rel")
        ax.set_title(names[metric], fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\npost-hoc EMA: every point rebuilt after training from the "
                 "snapshots, BN recomputed", fontsize=10)
    handles, texts = axes[0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="lower center", ncol=len(texts), fontsize="small",
               bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout()
    return fig


def save(fig, path):
    """Writes the Matplotlib figure `fig` as a PNG to `path`."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --- The binary ---------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """What `prepare` checked and loaded, before any training."""

    config: dict
    swa_start: int
    seeds: list
    arrays: data_lib.Arrays
    output_dir: str


def prepare(config):
    """Checks the settings and the output folder and reads the data.

    Raises:
        ValueError: naming the flag, file or folder that is wrong, and what
            to do (`data.DataError`, `_cli.UsageError` included).
    """
    config = {**DEFAULTS, **config}
    swa_start, seeds = validate(config)
    output_dir = _cli.check_output_dir(config["output_dir"])
    arrays = data_lib.read(config["dataset"], config["data_dir"], config["download"])
    return Plan({**config, "seeds": seeds}, swa_start, seeds, arrays, output_dir)


def describe(plan, summary):
    config, seeds = plan.config, plan.seeds
    over = (f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}"
            if len(seeds) > 1 else f"seed {seeds[0]}")
    swa = f", SWA from epoch {plan.swa_start}" if "swa" in summary else ""
    text = (
        f"{config['model']} on {config['dataset']} ({len(plan.arrays.x_test)} test "
        f"images), {config['epochs']} epochs, {config['schedule']} schedule{swa}; "
        f"{over}. Every row is evaluated with its BatchNorm statistics recomputed on "
        f"the training set (keras_swa.update_bn). NLL: mean negative log-probability "
        f"of the true class; ECE: expected calibration error, {ECE_BINS} bins."
    )
    if "swag" in summary:
        text += (
            f" SWAG-BMA: the mean probabilities of {config['swag_samples']} samples of "
            f"the SWAG posterior (rank {config['swag_rank']} at most, scale "
            f"{config['swag_scale']:g}), each with BatchNorm recomputed on "
            f"{config['swag_bn_batches']} training batches at most."
        )
    return text


def bma_timing(plan, per_seed):
    """A line on the time `predict_bma` took per sample; or None."""
    timings = [per_seed[s]["swag"]["bma_seconds_per_sample"] for s in plan.seeds
               if "swag" in per_seed[s]]
    if not timings:
        return None
    first = per_seed[plan.seeds[0]]["swag"]
    return (
        f"keras_swa.predict_bma: {statistics.fmean(timings):.3f} s per sample "
        f"({first['samples']} samples; a BatchNorm pass over at most "
        f"{plan.config['swag_bn_batches']} training batches and a prediction of the "
        f"{len(plan.arrays.x_test)} test images each), mean over {len(timings)} "
        f"seed(s). The posterior had {first['n_averaged']} snapshots, rank "
        f"{first['rank']} (seed {plan.seeds[0]})."
    )


def report_posthoc_ema(plan, per_seed, summary):
    """The sweep's table, sentences and summary; None without a sweep."""
    seeds = plan.seeds
    if "posthoc_ema" not in per_seed[seeds[0]]:
        return None
    first = per_seed[seeds[0]]["posthoc_ema"]
    sweep_summary = summarize([sweep_rows(per_seed[s]) for s in seeds])
    labels = sweep_labels(plan.config)
    table = format_table({**sweep_summary, "sgd": summary["sgd"]}, labels)
    combined = {**sweep_summary, "sgd": summary["sgd"]}
    resolution = 1 / len(plan.arrays.x_test)
    sentences = [conclusion(combined, resolution, "accuracy", labels),
                 conclusion(combined, 0.0, "nll", labels)]
    header = (
        f"Post-hoc EMA: one training run under PostHocEMA (sigma_rel "
        f"{', '.join(f'{s:g}' for s in plan.config['ema_sigma_rels'])}), "
        f"{first['snapshots']} snapshots every {first['every_n_steps']} of its "
        f"{first['updates']} updates; each row rebuilt after training by "
        f"keras_swa.sweep_ema from the snapshots, BatchNorm recomputed "
        f"({statistics.fmean(per_seed[s]['posthoc_ema']['sweep_seconds'] for s in seeds):.1f} s "
        f"for the sweep)."
    )
    text = header + "\n\n" + table + "\n\n" + "\n\n".join(s for s in sentences if s)
    return {"text": text, "summary": sweep_summary, "conclusions": sentences,
            "labels": labels}


def save_predictions(path, per_seed, labels):
    """Writes every row's test probabilities, per seed, to the `.npz` file
    `path`: `labels`, and `<row>_seed<seed>` arrays (float32)."""
    import numpy as np

    arrays = {"labels": np.asarray(labels)}
    for seed, result in per_seed.items():
        for row, probabilities in result["probabilities"].items():
            arrays[f"{row}_seed{seed}"] = probabilities
    np.savez_compressed(path, **arrays)


def run(plan):
    """Trains what `plan` asks; prints the table; writes `metrics.json`,
    `predictions.npz`, `curves.png`, `calibration.png` (and
    `posthoc_ema.png`). Returns the metrics."""
    config = plan.config
    labels = plan.arrays.y_test
    per_seed = {}
    for seed in plan.seeds:
        dataset = data_lib.pipelines(config["dataset"], plan.arrays, config["batch_size"], seed)
        per_seed[seed] = train_seed(config, dataset, labels, plan.swa_start, seed,
                                    plan.output_dir)
    summary = summarize([per_seed[s]["final"] for s in plan.seeds])
    running = {k: {"accuracy": statistics.fmean(per_seed[s]["running_bn"][k]["accuracy"]
                                                for s in plan.seeds)}
               for k in per_seed[plan.seeds[0]]["running_bn"]}
    header = describe(plan, summary)
    table = format_table(summary)
    resolution = 1 / len(plan.arrays.x_test)
    sentence = conclusion(summary, resolution)
    nll_sentence = conclusion(summary, 0.0, "nll")
    note = running_bn_note(summary, running)
    timing = bma_timing(plan, per_seed)
    posthoc = report_posthoc_ema(plan, per_seed, summary)
    if posthoc:  # its table has the plain row too
        paragraphs = [header, posthoc["text"], note]
    else:
        paragraphs = [header, table, sentence, nll_sentence, timing, note]
    print("\n" + "\n\n".join(p for p in paragraphs if p), flush=True)

    files = ["metrics.json", "predictions.npz", "curves.png", "calibration.png"]
    metrics = {
        "config": config,
        "seeds": plan.seeds,
        "swa_start_epoch": plan.swa_start,
        "evaluation": header,
        "final": summary,
        "conclusion": sentence,
        "conclusion_nll": nll_sentence,
        "running_bn_note": note,
        "swag_bma_timing": timing,
        "per_seed": {str(s): {k: v for k, v in per_seed[s].items() if k != "probabilities"}
                     for s in plan.seeds},
    }
    if posthoc:
        metrics["posthoc_ema"] = {
            "sweep": posthoc["summary"],
            "labels": posthoc["labels"],
            "conclusion": posthoc["conclusions"][0],
            "conclusion_nll": posthoc["conclusions"][1],
        }
        files.append("posthoc_ema.png")
    with open(os.path.join(plan.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    save_predictions(os.path.join(plan.output_dir, "predictions.npz"), per_seed, labels)
    title = (f"{config['model']} on {config['dataset']}, {config['epochs']} epochs, "
             f"{config['schedule']} schedule")
    save(figure(per_seed, summary, title), os.path.join(plan.output_dir, "curves.png"))
    save(calibration_figure(per_seed, labels, summary, title),
         os.path.join(plan.output_dir, "calibration.png"))
    if posthoc:
        save(posthoc_figure(posthoc["summary"], summary, config, title),
             os.path.join(plan.output_dir, "posthoc_ema.png"))
    print(f"\nWrote {', '.join(files)} to {plan.output_dir}")
    return metrics


def train(config):
    """`run(prepare(config))`: checks, then trains; returns the metrics.

    The tests' way in, not a documented interface (`main` calls `prepare`
    and `run` itself). It checks the values as the binary does, but does
    not refuse the settings a mode does not use (`check_mode_flags`,
    `check_swag_samples`): those checks need to know which flags the user
    gave, and a settings dict holds every key, whatever the mode.
    """
    return run(prepare(config))


def main(argv):
    del argv  # checked by _cli.run
    config = {name: FLAGS[name].value for name in CONFIG_KEYS}
    try:
        given = [n for n in CONFIG_KEYS if FLAGS[n].present]
        check_mode_flags(config["averaging"], given)
        check_swag_samples(config, given)
        plan = prepare(config)
    except ValueError as e:
        raise _cli.UsageError(str(e)) from None
    run(plan)


if __name__ == "__main__":
    _cli.run(main, PROG)
